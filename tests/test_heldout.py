"""The held-out check's engine (training/heldout.py) on the toy model: fixed held-out images, no
gradient into judges, frozen running statistics, the similarity figure, the stop rule, the best
snapshot, and its state through the resume side file."""
import math

import pytest
import torch

from training import (DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings,
                      karras_sigmas, wrap_module)
from training.heldout import (HeldoutCheck, HeldoutSettings, pairwise_similarity,
                              pixel_embedding)
from training.lora_resume import load_training_state, save_training_state
from training.prompt_sets import HELDOUT_PROMPTS, PROMPT_SETS
from training.toy_models import TOY_LORA_TARGETS, build_toy_model, colour_reward
from reward_models import CombinedReward, ImageStatReward

PROMPTS = ["a red fox", "a castle", "a bowl of fruit", "a lighthouse"]


def make_trainer(reward=colour_reward, seed=0):
    denoiser, decoder = build_toy_model(seed=0)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=4, alpha=4, seed=seed)
    sampler = DifferentiableSampler(denoiser, karras_sigmas(6), SamplerSettings(method="draft_k", k=1))
    settings = TrainSettings(batch_size=2, learning_rate=3e-3, seed=seed)
    return DraftTrainer(sampler, decoder, reward, PROMPTS, lora, (4, 8, 8), settings)


def check_for(trainer, judges=(), **settings):
    s = HeldoutSettings(**{"every": 2, "seeds": 3, "prompts": ("held out 1", "held out 2"), **settings})
    return HeldoutCheck(s, judges, reward_label="colour", prompt_offset=len(PROMPTS), chunk=2)


def test_bundled_heldout_prompts_are_no_training_prompt():
    training = set(p for ps in PROMPT_SETS.values() for p in ps)
    training |= {"a photo of a cat", "a photo of a dog", "a lighthouse at sunset"}  # trainer defaults
    assert len(HELDOUT_PROMPTS) == 4 and not training & set(HELDOUT_PROMPTS)


def test_the_same_lora_gives_the_same_heldout_images_and_judges_get_no_gradient():
    trainer = make_trainer()
    seen = []

    def judge(images, prompts):
        seen.append((torch.is_grad_enabled(), list(prompts)))
        return images.mean((1, 2, 3))

    check = check_for(trainer, [("mean", judge)])
    a = check.evaluate(trainer)
    b = check.evaluate(trainer)
    assert a == b  # fixed noises: the same LoRA gives the same figures
    assert not any(g for g, _ in seen)
    assert [p for _, ps in seen for p in ps] == ["held out 1"] * 3 + ["held out 2"] * 3 + \
        ["held out 1"] * 3 + ["held out 2"] * 3
    images, prompts = check.images(trainer)
    assert images.shape == (6, 3, 16, 16) and prompts[:3] == ["held out 1"] * 3
    # the held-out prompts use their own conditioning: other images than the training prompts'
    check_train = HeldoutCheck(check.settings, [], prompt_offset=0, chunk=2)
    assert not torch.equal(check_train.images(trainer)[0], images)
    trainer.step()
    assert check.evaluate(trainer)["figures"] != a["figures"]


def test_an_evaluation_leaves_training_exactly_as_without_it():
    plain, checked = make_trainer(), make_trainer()
    check = check_for(checked, [("mean", lambda im, p: im.mean((1, 2, 3)))])
    for _ in range(4):
        plain.step()
        checked.step()
        check.observe(check.evaluate(checked), checked.params)
    for a, b in zip(plain.params, checked.params):
        assert torch.equal(a, b)


def test_running_statistics_are_frozen_while_heldout_images_are_scored():
    combined = CombinedReward([ImageStatReward("brightness"), ImageStatReward("contrast")],
                              standardize=True)
    trainer = make_trainer(reward=combined)
    trainer.step()
    before = (combined.running_mean.clone(), int(combined.num_batches))
    check_for(trainer, [("combined as judge", combined)]).evaluate(trainer)
    assert torch.equal(combined.running_mean, before[0]) and int(combined.num_batches) == before[1]
    assert combined.track_stats is True


def test_similarity_is_one_for_identical_images_and_lower_for_different_ones():
    img = torch.rand(1, 3, 16, 16)
    same = img.repeat(3, 1, 1, 1)
    assert pairwise_similarity(pixel_embedding(same)) == pytest.approx(1.0, abs=1e-5)
    different = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert pairwise_similarity(pixel_embedding(different)) < 0.5
    assert pairwise_similarity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def _record(it, value):
    return {"iteration": it, "figures": {"judge1": value, "reward": 0.0}}


def _scripted_check(values, **settings):
    trainer = make_trainer()
    check = check_for(trainer, [("scripted", None)], seeds=1, **settings)
    outcomes = []
    for i, v in enumerate(values):
        with torch.no_grad():
            trainer.params[0].fill_(float(i))  # a LoRA that says which update it is
        outcomes.append(check.observe(_record(i, v), trainer.params))
        if outcomes[-1].stop:
            break
    return check, outcomes


def test_the_best_is_the_highest_ranking_figure_and_its_lora_is_copied_then():
    check, outcomes = _scripted_check([0.1, 0.5, 0.5, 0.3, float("nan"), 0.6, 0.2])
    assert [o.new_best for o in outcomes] == [True, True, False, False, False, True, False]
    assert check.best_iteration() == 5 and float(check.best_lora[0].flatten()[0]) == 5.0
    assert check.stop_reason == ""  # stop is off


@pytest.mark.parametrize("values, patience, tolerance, stops_at", [
    ([0.1, 0.5, 0.4, 0.3, 0.2, 0.1], 3, 0.0, 4),             # falls three times after update 1
    ([0.1, 0.5, 0.4, 0.6, 0.5, 0.55, 0.1, 0.1], 3, 0.0, 6),  # a new best resets the streak
    ([0.1, 0.5, 0.48, 0.47, 0.3, 0.3], 2, 0.05, 5),          # within the tolerance does not count
    ([0.1, 0.5, 0.48, 0.3, 0.49, 0.3, 0.3], 2, 0.05, 6),     # ... and breaks the streak
    ([0.1, 0.5, float("nan"), 0.2], 2, 0.0, 3),               # a non-finite figure counts as a fall
])
def test_stop_fires_at_the_rules_evaluation(values, patience, tolerance, stops_at):
    check, outcomes = _scripted_check(values, stop="on", patience=patience, tolerance=tolerance)
    assert len(outcomes) == stops_at + 1 and outcomes[-1].stop
    assert not any(o.stop for o in outcomes[:-1])
    assert check.stop_reason.startswith("judge scripted ")
    assert check.stop_reason.endswith(f"after update {check.best_iteration()}; kept update "
                                      f"{check.best_iteration()}")


def test_while_nothing_beats_the_start_stop_waits_twice_as_long():
    # the judge dips for three evaluations, then rises above the start: no stop (patience 3)
    check, outcomes = _scripted_check([0.5, 0.4, 0.3, 0.45, 0.49, 0.48, 0.6], stop="on", patience=3)
    assert not any(o.stop for o in outcomes) and check.best_iteration() == 6
    # it never beats the start: stop after 2 x 3 evaluations, keeping update 0
    check, outcomes = _scripted_check([0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.9], stop="on", patience=3)
    assert len(outcomes) == 7 and outcomes[-1].stop and check.best_iteration() == 0
    assert check.stop_reason == ("judge scripted did not beat update 0, where the run started, in "
                                 "6 evaluations; kept update 0")


def test_step_noises_of_eta_sampling_are_not_a_seeds_initial_noise():
    from training.heldout import HELDOUT_STREAM, STEP_NOISE_TAG
    from training.trainer import derived_generator
    seeds = [torch.randn(8, generator=derived_generator(HELDOUT_STREAM, s)) for s in range(64)]
    for c in (0, 4, 8):
        step = torch.randn(8, generator=derived_generator(HELDOUT_STREAM, STEP_NOISE_TAG, c + 1))
        assert not any(torch.equal(step, s) for s in seeds)


def test_without_judges_the_training_reward_on_heldout_images_ranks():
    trainer = make_trainer()
    check = check_for(trainer)
    assert check.ranking.key == "reward" and [s.key for s in check.series] == ["reward", "similarity"]
    assert check_for(trainer, seeds=1).series[-1].key == "reward"  # one seed: no similarity


def test_state_survives_the_resume_side_file_and_refuses_other_figures(tmp_path):
    trainer = make_trainer()
    check = check_for(trainer, [("mean", lambda im, p: im.mean((1, 2, 3)))])
    trainer.state_parts["heldout"] = check
    check.observe(check.evaluate(trainer), trainer.params)
    trainer.step()
    trainer.step()
    check.observe(check.evaluate(trainer), trainer.params)
    path = str(tmp_path / "x.draft_state")
    save_training_state(path, trainer.state_dict(), trainer.lora, optimizer=trainer.optimizer)
    state = load_training_state(path, trainer.lora)

    again = make_trainer()
    fresh = check_for(again, [("mean", lambda im, p: im.mean((1, 2, 3)))])
    again.state_parts["heldout"] = fresh
    again.load_state_dict(state)
    assert fresh.history == check.history and fresh.best_iteration() == check.best_iteration()
    assert all(torch.equal(a, b) for a, b in zip(fresh.best_lora, check.best_lora))
    assert not fresh.due(2) and fresh.due(4) and not fresh.due(3)
    other = check_for(again, [("another judge", lambda im, p: im.mean((1, 2, 3)))])
    assert other.load_state_dict(state["heldout"]) is False and other.history == []


def test_settings_refuse_what_cannot_work():
    for bad in (dict(every=0), dict(seeds=0), dict(prompts=()), dict(keep="worst"),
                dict(stop="maybe"), dict(tolerance=-1.0), dict(tolerance=math.inf)):
        with pytest.raises(ValueError):
            HeldoutSettings(**bad)
