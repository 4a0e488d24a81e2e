"""Lean memory on ComfyUI's own models (marker ``comfyui``): block checkpointing of ComfyUI's UNet
layers and VAE decoder blocks and rows one at a time give the plain gradient; every shared module
has its own ``forward`` back after a run and after an error; the memory plan is applied and a run
that cannot fit is refused before its first iteration."""
import pytest
import torch

from test_comfyui_inprocess import comfy_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.comfyui


def _lora_model(env):
    glue = env["glue"]
    patcher = env["model"].clone()
    dm = patcher.model.diffusion_model
    lora = glue.build_lora(dm, glue.target_module_names(dm, "attention"), rank=2, alpha=2.0, seed=1)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    glue.attach_lora(patcher, lora)
    patcher.load(torch.device("cpu"), full_load=True)
    glue.de_inference_(patcher.model)
    glue.de_inference_(env["vae"].first_stage_model)
    return patcher, lora


def _grads(env, patcher, lora, lean: bool, method="draft_k"):
    from comfyui_draft_pack.training import DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings
    from comfyui_draft_pack.training.sampler import karras_sigmas
    glue = env["glue"]
    model, vae, cond = patcher.model, env["vae"], env["cond"]

    def denoise(x, sigma, index):
        return model.apply_model(x, sigma, c_crossattn=cond.clone().expand(x.shape[0], -1, -1))

    ms = model.model_sampling
    sampler = DifferentiableSampler(denoise, karras_sigmas(4, sigma_max=10.0),
                                    SamplerSettings(method=method, k=2, lv_samples=2),
                                    renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0))
    units = []
    if lean:
        units = (glue.denoiser_checkpoint_units(model.diffusion_model)
                 + glue.decoder_checkpoint_units(vae.first_stage_model))
    colour = lambda images, prompts: -((images - 0.7) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    trainer = DraftTrainer(sampler, glue.make_decoder(vae, model), colour, ["a", "b"], lora,
                           (4, 8, 8), TrainSettings(batch_size=2, seed=0), block_units=units,
                           row_by_row=lean)
    captured = []
    trainer.optimizer.step = lambda *a, **k: captured.append(
        [p.grad.detach().clone() for p in trainer.params])
    report = trainer.step()
    assert not report.skipped
    return captured[0], units


@pytest.mark.parametrize("method", ["draft_k", "draft_lv"])
def test_comfy_unet_and_vae_block_checkpointing_and_rows_give_the_plain_gradient(comfy_env, method):
    patcher, lora = _lora_model(comfy_env)
    with torch.inference_mode(False), torch.enable_grad():
        plain, _ = _grads(comfy_env, patcher, lora, lean=False, method=method)
        lean, units = _grads(comfy_env, patcher, lora, lean=True, method=method)
    # UNet layers (res blocks, transformers, resamplers) and the VAE decoder's blocks
    assert len(units) > 10
    for a, b in zip(plain, lean):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert any(g.abs().max() > 0 for g in plain)
    modules = list(patcher.model.modules()) + list(comfy_env["vae"].first_stage_model.modules())
    assert not any("forward" in m.__dict__ for m in modules)
    comfy_env["glue"].detach_lora(patcher.model)


def _run(comfy_env, memory, width=64, iterations=2, reward=None, seed=0):
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.training_run import RunConfig, TrainingRun
    from comfyui_draft_pack.reward_models import ImageStatReward
    from comfyui_draft_pack.training import SamplerSettings, TrainSettings
    from test_comfyui_inprocess import sdxl_conditioning, tiny_sdxl_patcher

    cfg = RunConfig(prompts=["a cat", "a dog"], negative_prompt="", sampler=SamplerSettings("draft_lv"),
                    steps=4, scheduler="normal", cfg=3.0, width=width, height=width,
                    train=TrainSettings(iterations=iterations, learning_rate=1e-2, seed=seed,
                                        batch_size=2),
                    rank=4, alpha=4.0, target_set="attention", mixed_precision="auto", save_every=0,
                    preview_every=0, lora_name="draft/lean", memory=memory)
    patcher = tiny_sdxl_patcher()
    run = TrainingRun(patcher, comfy_env["vae"], sdxl_conditioning,
                      reward or RewardHandle(ImageStatReward("contrast"), [], "contrast"), cfg)
    with torch.inference_mode(False), torch.enable_grad():
        return run.run(), patcher


def test_memory_options_reach_the_run_and_conditional_only_changes_the_gradient(comfy_env, caplog):
    import logging
    from comfyui_draft_pack.training.memory_plan import MemoryOptions
    with caplog.at_level(logging.INFO, logger="ComfyUI-DRaFT"):
        exact, patcher = _run(comfy_env, MemoryOptions("on", "one at a time", "both branches"))
    assert "block checkpointing on, rows one at a time, CFG gradient both branches" in caplog.text
    modules = list(patcher.model.modules()) + list(comfy_env["vae"].first_stage_model.modules())
    assert not any("forward" in m.__dict__ for m in modules)
    batched, _ = _run(comfy_env, MemoryOptions("off", "all at once", "both branches"))
    cond_only, _ = _run(comfy_env, MemoryOptions("on", "one at a time", "conditional only"))
    assert exact.history == pytest.approx(batched.history, abs=1e-5)
    deltas = lambda r: torch.cat([d.delta().flatten() for _, d in r.lora.items()])  # noqa: E731
    # On the CPU the decode runs channels-last, whose oneDNN kernels round differently at batch 1
    # and 2 (1.3e-5 after two AdamW steps at lr 1e-2; 1e-5 passed with NCHW): the tolerance allows
    # that, and conditional-only CFG must still differ by more than it.
    assert torch.allclose(deltas(exact), deltas(batched), atol=3e-5), (deltas(exact) - deltas(batched)).abs().max()
    assert not torch.allclose(deltas(exact), deltas(cond_only), atol=3e-5)
    assert all(r == r for r in cond_only.history)


def test_a_run_that_cannot_fit_is_refused_before_its_first_iteration(comfy_env):
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.reward_models import ImageStatReward
    from comfyui_draft_pack.training.memory_plan import DoesNotFit, MemoryOptions

    class Counting(ImageStatReward):
        calls = 0

        def score(self, images, prompts):
            Counting.calls += 1
            return super().score(images, prompts)
    reward = RewardHandle(Counting("contrast"), [], "contrast")
    with pytest.raises(DoesNotFit, match="Lower the resolution"):
        _run(comfy_env, MemoryOptions(), width=16384, reward=reward)  # a 16k image: TBs to decode
    assert Counting.calls == 0


def test_checkpoint_units_restored_after_an_error_mid_update(comfy_env):
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.reward_models import ImageStatReward
    from comfyui_draft_pack.training.memory_plan import MemoryOptions

    class Failing(ImageStatReward):
        def score(self, images, prompts):
            raise RuntimeError("reward failed mid-update")
    with pytest.raises(RuntimeError, match="mid-update"):
        _, _ = _run(comfy_env, MemoryOptions("on", "one at a time"),
                    reward=RewardHandle(Failing("contrast"), [], "contrast"))
    import gc
    import warnings
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch aliases warns
        modules = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    assert len(modules) > 100  # the UNet's and the VAE's modules are among them
    for module in modules:
        assert not getattr(module.__dict__.get("forward"), "__draft_checkpointed__", False), module
