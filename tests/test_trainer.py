"""The training loop: rewards rise, NaN guard, determinism, accumulation, mixed precision."""
import copy
import math

import pytest
import torch

from training import (DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings,
                      karras_sigmas, wrap_module)
from training.toy_models import TOY_LORA_TARGETS, build_toy_model, colour_reward

PROMPTS = ["a red fox", "a castle", "a bowl of fruit", "a lighthouse"]
HELD_OUT = list(range(1000, 1008))


def make_trainer(method="draft_lv", reward=colour_reward, steps=10, **train):
    denoiser, decoder = build_toy_model(seed=0)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=4, alpha=4, seed=train.get("seed", 0))
    sampler = DifferentiableSampler(denoiser, karras_sigmas(steps),
                                    SamplerSettings(method=method, k=2, lv_samples=2))
    settings = TrainSettings(**{"batch_size": 2, "learning_rate": 3e-3, "seed": 0, **train})
    return DraftTrainer(sampler, decoder, reward, PROMPTS, lora, (4, 8, 8), settings), lora


def weights(lora):
    return [p.detach().clone() for p in lora.trainable_parameters()]


@pytest.mark.parametrize("method", ["draft_lv", "draft_k"])
def test_training_raises_reward_on_held_out_seeds(method):
    trainer, _ = make_trainer(method)
    before = trainer.evaluate(HELD_OUT).mean().item()
    reports = [trainer.step() for _ in range(30)]
    after = trainer.evaluate(HELD_OUT).mean().item()
    assert not any(r.skipped for r in reports)
    assert after > before + 0.05, (before, after)


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not():
    runs = []
    for seed in (7, 7, 8):
        trainer, lora = make_trainer(seed=seed)
        for _ in range(4):
            trainer.step()
        runs.append(weights(lora))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, c) for a, c in zip(runs[0], runs[2]))


def test_nan_reward_skips_step_and_leaves_weights_untouched():
    calls = {"n": 0}

    def flaky_reward(images, prompts):
        calls["n"] += 1
        r = colour_reward(images)
        return r * float("nan") if calls["n"] == 2 else r

    trainer, lora = make_trainer(reward=flaky_reward)
    trainer.step()
    w1 = weights(lora)
    opt_state = {k: v.clone() for k, v in trainer.optimizer.state[lora.trainable_parameters()[1]].items()}
    report = trainer.step()
    assert report.skipped and "non-finite" in report.skip_reason and math.isnan(report.reward)
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(w1, weights(lora)))
    state_after = trainer.optimizer.state[lora.trainable_parameters()[1]]
    assert all(torch.equal(opt_state[k], state_after[k]) for k in opt_state)
    assert not trainer.step().skipped
    assert not all(torch.equal(a, b) for a, b in zip(w1, weights(lora)))


def test_nan_gradient_skips_step():
    def nan_grad_reward(images, prompts):
        # finite value, NaN gradient: sqrt at 0 of a negative slope
        return colour_reward(images) + 0.0 * torch.sqrt(images.mean() * 0)

    trainer, lora = make_trainer(reward=nan_grad_reward)
    w0 = weights(lora)
    report = trainer.step()
    assert report.skipped and report.skip_reason == "non-finite gradient"
    assert all(torch.equal(a, b) for a, b in zip(w0, weights(lora)))


def test_gradient_accumulation_matches_larger_batch_gradient():
    """Two micro-batches of 1 accumulate to the mean of their two gradients."""
    trainer, lora = make_trainer(method="draft_k", batch_size=1, grad_accum=2, grad_clip=0,
                                 learning_rate=1.0, weight_decay=0.0)
    captured = []
    trainer.optimizer.step = lambda *a, **k: captured.append(
        [p.grad.clone() for p in lora.trainable_parameters()])
    trainer.step()
    accumulated = captured[0]
    # Recompute each micro-batch's gradient alone, with the same derived generators.
    from training.trainer import ROW_STREAM, derived_generator
    per_micro = []
    for micro in range(2):
        g = derived_generator(0, 1, micro)
        row = derived_generator(0, 1, micro, ROW_STREAM, 0)  # the micro-batch's one row
        index = torch.randint(len(PROMPTS), (1,), generator=row)
        noise = torch.randn((1, 4, 8, 8), generator=row)
        out = trainer.sampler.tail(trainer.sampler.prefix(noise, index, generator=g,
                                                          row_generators=[row]))
        loss = -colour_reward(trainer.decode(out.latents)).mean()
        per_micro.append(torch.autograd.grad(loss, lora.trainable_parameters()))
    for acc, g0, g1 in zip(accumulated, *per_micro):
        assert torch.allclose(acc, (g0 + g1) / 2, atol=1e-7, rtol=1e-5)


def test_gradient_clipping_bounds_update_norm():
    trainer, lora = make_trainer(method="draft_k", grad_clip=1e-4)
    seen = []
    original = trainer.optimizer.step

    def spy(*a, **k):
        seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in lora.trainable_parameters())))
        return original(*a, **k)
    trainer.optimizer.step = spy
    report = trainer.step()
    assert report.grad_norm > 1e-4
    assert float(seen[0]) <= 1e-4 * 1.001


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_lora(precision):
    trainer, lora = make_trainer(mixed_precision=precision)
    reports = [trainer.step() for _ in range(3)]
    assert all(math.isfinite(r.reward) for r in reports)
    assert all(p.dtype == torch.float32 for p in lora.trainable_parameters())


def test_kl_regulariser_pulls_towards_base_model():
    """DRaFT+'s KL term is zero at the start (LoRA up = 0) and grows only as the LoRA moves."""
    denoiser, decoder = build_toy_model(seed=0)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=4, alpha=4)

    def reference(x, s, i):
        with lora.disabled():
            return denoiser(x, s, i)

    sampler = DifferentiableSampler(denoiser, karras_sigmas(6), SamplerSettings(method="draft_k", k=2),
                                    reference_denoise=reference)
    out = sampler.rollout(torch.randn(1, 4, 8, 8), torch.tensor([0]))
    assert float(out.kl.detach()) == 0.0
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.05)
    out = sampler.rollout(torch.randn(1, 4, 8, 8), torch.tensor([0]))
    assert float(out.kl.detach()) > 0 and out.kl.requires_grad


def test_state_dict_round_trip_continues_identically():
    a, lora_a = make_trainer()
    for _ in range(3):
        a.step()
    state = copy.deepcopy(a.state_dict())  # torch state dicts hold live references
    saved = weights(lora_a)
    a.step()
    b, lora_b = make_trainer()
    with torch.no_grad():
        for p, w in zip(lora_b.trainable_parameters(), saved):
            p.copy_(w)
    b.load_state_dict(state)
    assert b.iteration == 3
    b.step()
    assert all(torch.equal(x, y) for x, y in zip(weights(lora_a), weights(lora_b)))


def test_optional_settings_nodes_defaults_are_the_trainers():
    """The dataclasses DRaFT LoRA Settings / Optimizer / Save & Preview output: their defaults are
    the trainer's (a node left out trains as the node at its defaults); immutable; checked."""
    import dataclasses
    from training.run_options import LoRAOptions, OptimizerOptions, SavePreviewOptions
    settings = OptimizerOptions().train_settings(iterations=7, batch_size=2, learning_rate=1e-3, seed=3)
    assert settings == TrainSettings(iterations=7, batch_size=2, learning_rate=1e-3, seed=3)
    assert (settings.weight_decay, settings.grad_clip, settings.grad_accum, settings.kl_coeff) == (0.1, 10.0, 1, 0.0)
    custom = OptimizerOptions(weight_decay=0.0, grad_clip=1.0, grad_accumulation=4, kl_coeff=0.5)
    assert custom.train_settings(iterations=1) == TrainSettings(iterations=1, weight_decay=0.0, grad_clip=1.0,
                                                                grad_accum=4, kl_coeff=0.5)
    assert (LoRAOptions().lora_rank, LoRAOptions().lora_alpha, LoRAOptions().target_modules) == (8, 8.0, "attention")
    assert (SavePreviewOptions().save_every, SavePreviewOptions().preview_every) == (0, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRAOptions().lora_rank = 4
    with pytest.raises(ValueError, match="mixed_precision"):
        OptimizerOptions(mixed_precision="fp8")
