"""DRaFT Held-out Check through the real ComfyUI engine (marker ``comfyui``): judges never get a
gradient and do not change what is trained, the best LoRA file equals the LoRA at its update bit
for bit and the outputs carry it, the stop rule ends the run at its update, Cancel keeps the best
and the last, resume restores the history and the best."""
import json

import pytest
import torch

from test_comfyui_inprocess import comfy_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.comfyui

HELDOUT_PROMPTS = ("a red apple", "a blue door")


class RecordingJudge(torch.nn.Module):
    """A judge with a trainable-looking parameter that records the grad mode of every call and
    returns ``values[evaluation]`` or the images' mean brightness. The check scores one chunk (the
    trainer's rows: 1 here) a call, so an evaluation of 2 prompts x 1 seed is 2 calls."""

    def __init__(self, values=None, calls_per_evaluation=2):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.values = list(values) if values is not None else None
        self.per = calls_per_evaluation
        self.calls = []

    def forward(self, images, prompts):
        self.calls.append(torch.is_grad_enabled())
        if self.values is not None:
            v = self.values[min((len(self.calls) - 1) // self.per, len(self.values) - 1)]
            return torch.full((images.shape[0],), float(v)) * self.scale
        return images.mean((1, 2, 3)) * self.scale


def _request(judges=(), **settings):
    from comfyui_draft_pack.nodes.heldout_check_node import HeldoutRequest
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.training.heldout import HeldoutSettings
    handles = tuple(RewardHandle(j, [], label) for label, j in judges)
    return HeldoutRequest(HeldoutSettings(**{"every": 1, "seeds": 1, "prompts": HELDOUT_PROMPTS,
                                             **settings}), handles)


def _config(heldout=None, iterations=4, name="draft/guarded", **kw):
    from comfyui_draft_pack.nodes.training_run import RunConfig
    from comfyui_draft_pack.training import SamplerSettings, TrainSettings
    return RunConfig(prompts=["a cat", "a dog"], negative_prompt="",
                     sampler=SamplerSettings("draft_k", k=1), steps=4, scheduler="ddim_uniform",
                     cfg=3.0, width=64, height=64,
                     train=TrainSettings(iterations=iterations, learning_rate=2e-2, seed=3),
                     rank=4, alpha=4.0, target_set="attention", mixed_precision="auto",
                     save_every=kw.pop("save_every", 0), preview_every=0, lora_name=name,
                     heldout=heldout, **kw)


def _run(env, cfg):
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.training_run import TrainingRun, clip_encoder
    from comfyui_draft_pack.reward_models import ImageStatReward
    reward = RewardHandle(ImageStatReward("saturation"), [], "saturation")
    cfg.reward_label = reward.label
    with torch.inference_mode():  # as ComfyUI runs every node
        with torch.inference_mode(False), torch.enable_grad():
            run = TrainingRun(env["model"], env["vae"], clip_encoder(env["clip"]), reward, cfg)
            result = run.run()
    return run, result


def _factors(lora):
    return [p.detach().clone() for p in lora.trainable_parameters()]


def _file_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _meta(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_judges_get_no_gradient_and_do_not_change_what_is_trained(comfy_env, loras_dir):
    judge = RecordingJudge()
    _, plain = _run(comfy_env, _config())
    run, checked = _run(comfy_env, _config(_request([("brightness", judge)], keep="last", seeds=2)))
    assert judge.calls and not any(judge.calls), "a judge was called with gradients on"
    assert judge.scale.grad is None
    # the check samples, decodes and scores without touching the training's noise, weights or
    # statistics: the same LoRA, bit for bit, as the run without it
    for a, b in zip(_factors(plain.lora), _factors(checked.lora)):
        assert torch.equal(a, b)
    h = checked.heldout
    assert [e["iteration"] for e in h["evaluations"]] == [0, 1, 2, 3, 4]
    assert [s["key"] for s in h["series"]] == ["judge1", "reward", "similarity"]
    assert h["series"][0]["label"] == "brightness" and h["ranking"] == "judge1"
    base = h["evaluations"][0]["figures"]
    assert all(-1.0 <= e["figures"]["similarity"] <= 1.0 for e in h["evaluations"])
    assert base["reward"] != h["evaluations"][-1]["figures"]["reward"]  # the LoRA changed things
    assert checked.kept_iteration is None  # keep = last


def test_best_file_equals_the_lora_at_its_update_and_the_outputs_carry_it(comfy_env, loras_dir):
    # judge values per evaluation (updates 0..4): the best is update 2
    judge = RecordingJudge([0.1, 0.2, 0.9, 0.3, 0.4])
    run, result = _run(comfy_env, _config(_request([("scripted", judge)]), save_every=1))
    folder = loras_dir / "draft"
    best = _file_tensors(folder / "guarded_best.safetensors")
    at_two = _file_tensors(folder / "guarded_step00002.safetensors")
    assert best.keys() == at_two.keys()
    assert all(torch.equal(best[k], at_two[k]) for k in best)
    meta = _meta(folder / "guarded_best.safetensors")
    assert meta["draft_best_iteration"] == "2" and meta["draft_iteration"] == "2"
    assert float(meta["draft_heldout_judge1"]) == pytest.approx(0.9)
    assert json.loads(meta["draft_heldout_labels"])["judge1"] == "scripted"
    assert (folder / "guarded_best.draft_state").exists()  # to resume from the best
    # keep = best: the outputs carry update 2's LoRA; the last (update 4) is saved as well
    assert result.kept_iteration == 2 and result.metadata["iteration"] == 2
    last = _file_tensors(folder / "guarded_step00004.safetensors")
    assert not all(torch.equal(last[k], best[k]) for k in best)
    sd = run.model_with_lora()[1]  # the MODEL output's LoRA: the LoRA as it is now
    for name, delta in result.lora.items():
        key = f"diffusion_model.{name}.lora_up.weight"
        assert torch.equal(sd[key].reshape(delta.up.shape).float(), delta.up.detach().float())
    from comfyui_draft_pack.nodes import lora_files
    facts = lora_files.lora_file_facts(comfy_env["model"])
    # every factor of the outputs equals the best file's
    from comfyui_draft_pack.training.lora_file import load_kohya
    shapes = {n: tuple(d.weight_shape) for n, d in result.lora.items()}
    reread = load_kohya(str(folder / "guarded_best.safetensors"), facts["name_map"], shapes)
    for (n, a), (_, b) in zip(result.lora.items(), reread.items()):
        assert torch.equal(a.up.detach(), b.up.detach()) and torch.equal(a.down.detach(), b.down.detach())


def test_stop_ends_the_run_at_the_rules_update_and_says_why(comfy_env, loras_dir):
    # best at update 1, then three evaluations more than 0.05 below it: stop after update 4
    judge = RecordingJudge([0.5, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    run, result = _run(comfy_env, _config(_request([("scripted", judge)], stop="on", patience=3,
                                                   tolerance=0.05), iterations=8))
    assert result.iteration == 4 and len(result.history) == 4
    h = result.heldout
    assert [e["iteration"] for e in h["evaluations"]] == [0, 1, 2, 3, 4]
    # update 2 is 0.1 below the best (> tolerance): the streak is 2, 3, 4
    assert h["stop_reason"] == ("judge scripted stayed more than 0.05 below its best for 3 "
                                "evaluations after update 1; kept update 1")
    assert result.kept_iteration == 1 and result.metadata["stopped"] == h["stop_reason"]
    assert any("stopped: judge scripted" in line for line in run.check.lines())


def test_tolerance_keeps_a_near_best_evaluation_from_counting(comfy_env, loras_dir):
    judge = RecordingJudge([0.5, 0.8, 0.78, 0.6, 0.79, 0.5, 0.5, 0.5])
    _, result = _run(comfy_env, _config(_request([("scripted", judge)], stop="on", patience=2,
                                                 tolerance=0.05), iterations=8))
    # 0.78 and 0.79 are within 0.05 of 0.8: streaks 0, 1, 0, 1, 2 -> stop after update 6
    assert result.iteration == 6 and result.kept_iteration == 1


def test_cancel_keeps_best_and_last_and_resume_restores_history_and_best(comfy_env, loras_dir,
                                                                         monkeypatch):
    import comfy.model_management

    from comfyui_draft_pack.training.heldout import HeldoutCheck

    judge = RecordingJudge([0.1, 0.9, 0.2, 0.3, 0.2, 0.1, 0.1, 0.1])
    observe = HeldoutCheck.observe

    def cancel_after_update_three(self, record, params):
        out = observe(self, record, params)
        if record["iteration"] == 3:
            comfy.model_management.interrupt_current_processing(True)  # what /interrupt does
        return out

    monkeypatch.setattr(HeldoutCheck, "observe", cancel_after_update_three)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(comfy_env, _config(_request([("scripted", judge)]), iterations=6, save_every=0))
    monkeypatch.setattr(HeldoutCheck, "observe", observe)
    folder = loras_dir / "draft"
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    assert names == ["guarded_best.safetensors", "guarded_step00003_partial.safetensors"]
    assert _meta(folder / "guarded_best.safetensors")["draft_best_iteration"] == "1"
    best_file = _file_tensors(folder / "guarded_best.safetensors")

    # resume from the partial: the history (updates 0..3) and the best (update 1) come back
    judge2 = RecordingJudge([0.2, 0.15, 0.1])  # updates 4, 5, 6: below the best
    run, result = _run(comfy_env, _config(_request([("scripted", judge2)]), iterations=6,
                                          resume_lora="draft/guarded_step00003_partial.safetensors"))
    its = [e["iteration"] for e in result.heldout["evaluations"]]
    assert its == [0, 1, 2, 3, 4, 5, 6], its
    assert result.heldout["best_iteration"] == 1 and result.kept_iteration == 1
    assert len(judge2.calls) == 3 * 2  # updates 4-6; update 3 was evaluated before the Cancel: not again
    from comfyui_draft_pack.nodes import lora_files
    from comfyui_draft_pack.training.lora_file import kohya_state_dict
    facts = lora_files.lora_file_facts(comfy_env["model"])
    kept = kohya_state_dict(result.lora, facts["name_map"], dtype=torch.float32)
    assert kept.keys() == best_file.keys()
    assert all(torch.equal(kept[k], best_file[k]) for k in best_file)


def test_the_trainer_node_with_the_check_node_outputs_the_best_and_its_figures(comfy_env, loras_dir):
    """Through the nodes as a graph runs them: DRaFT Held-out Check (a file-free judge) into the
    trainer's evaluation input; the history output and the node's text carry the held-out figures,
    the reward curve draws them; an empty prompt list is refused when queued."""
    from comfy_api.latest import io as comfy_io  # noqa: F401  (ComfyUI's V3 API is importable)

    from comfyui_draft_pack.nodes.heldout_check_node import DraftHeldoutCheck
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.sampler_node import DraftSamplerNode
    from comfyui_draft_pack.nodes.trainer_node import DraftTrainerNode
    from comfyui_draft_pack.nodes.validation import InputError
    from comfyui_draft_pack.reward_models import ImageStatReward

    def output(node_cls, **widgets):
        values = {i.id: i.default for i in node_cls.define_schema().inputs if hasattr(i, "default")}
        values.update(widgets)
        assert node_cls.validate_inputs(**values) is True
        return node_cls.PREPARE_CLASS_CLONE({}).execute(**values)

    with pytest.raises(InputError, match="prompts: no held-out prompt"):
        DraftHeldoutCheck.validate_inputs(prompts="# only a comment\n", every=1, seeds=1)
    judge = RewardHandle(ImageStatReward("contrast"), [], "contrast")
    check = output(DraftHeldoutCheck, every=2, seeds=2, prompts="a red apple\na blue door",
                   judge_1=judge).args[0]
    sampler = output(DraftSamplerNode, method="DRaFT-K", k=1).args[0]
    trainer = DraftTrainerNode.PREPARE_CLASS_CLONE({})
    with torch.inference_mode():
        out = trainer.execute(
            model=comfy_env["model"], vae=comfy_env["vae"], clip=comfy_env["clip"],
            reward=RewardHandle(ImageStatReward("saturation"), [], "saturation"), sampler=sampler,
            prompt_set="custom", prompts="a cat\na dog", negative_prompt="", steps=4,
            scheduler="ddim_uniform", cfg=3.0, width=64, height=64, iterations=4, batch_size=1,
            learning_rate=1e-2, seed=1, lora_name="draft/node_guarded", resume_lora="none",
            evaluation=check)
    history, curve = out.args[2], out.args[3]
    h = history["heldout"]
    assert [e["iteration"] for e in h["evaluations"]] == [0, 2, 4]
    assert [s["label"] for s in h["series"]] == ["contrast", "training reward (saturation)",
                                                  "similarity across seeds (pixels)"]
    best = h["best_iteration"]
    assert (loras_dir / "draft" / "node_guarded_best.safetensors").exists()
    assert history["kept_iteration"] in (None, best)
    text = out.ui.as_dict()["text"][0]
    assert "held-out at update 0: contrast" in text
    assert curve.ndim == 4 and curve.shape[-1] == 3
    # the curve carries the held-out curves: the same history drawn without them differs
    from comfyui_draft_pack.training.plot import reward_curve_image
    import numpy as np
    without = np.asarray(reward_curve_image(history["reward"], title="DRaFT reward: saturation"))
    drawn = (curve[0].numpy() * 255).round().astype(np.uint8)
    assert drawn.shape == without.shape and (drawn != without).any()


def test_a_clip_vision_input_gives_the_similarity_its_embeddings(comfy_env, loras_dir, tmp_path):
    """A CLIP_VISION (ComfyUI's own class, a tiny random one from a config file) measures the
    similarity across seeds: the figure is the mean pairwise cosine of its projected embeddings."""
    from comfyui_draft_pack.nodes.heldout_check_node import HeldoutRequest
    from comfyui_draft_pack.training.heldout import HeldoutSettings, pairwise_similarity
    from reward_fixtures import tiny_clip_vision

    with torch.inference_mode():
        cv = tiny_clip_vision(tmp_path)
    request = HeldoutRequest(HeldoutSettings(every=2, seeds=3, prompts=HELDOUT_PROMPTS), (), cv)
    run, result = _run(comfy_env, _config(request, iterations=2))
    series = {s["key"]: s["label"] for s in result.heldout["series"]}
    assert series["similarity"] == "similarity across seeds (CLIP vision)"
    last = result.heldout["evaluations"][-1]["figures"]["similarity"]
    assert -1.0 <= last <= 1.0 and last != pytest.approx(1.0)
    embed = run.check.embed[1]
    with torch.no_grad():
        e = embed(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert e.shape == (3, 16)
    assert pairwise_similarity(e) < 0.999
