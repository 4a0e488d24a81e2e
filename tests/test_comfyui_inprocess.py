"""ComfyUI internals the trainer relies on, checked in-process (marker ``comfyui``).

* LoRA weight wrappers train under lowvram partial loading (weights cast per forward) exactly as
  under full loading; on a CPU ComfyUI never chooses lowvram, so the partial load is forced.
* Weights loaded under ``inference_mode`` (as every node runs) train after ``de_inference_``.
* The shared model's output is bit-identical after training and ``detach_lora``.
"""
import importlib.util
import os
import sys

import pytest
import torch

from conftest import comfyui_path

pytestmark = pytest.mark.comfyui
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def comfy_env():
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.sd  # noqa: F401
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from comfy_server import tiny_checkpoint
    ckpt = tiny_checkpoint(path)
    spec = importlib.util.spec_from_file_location(
        "comfyui_draft_pack", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_draft_pack"] = pack
    spec.loader.exec_module(pack)
    from comfyui_draft_pack.nodes import comfy_glue
    with torch.inference_mode():  # as ComfyUI's executor loads it
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))[0][0]
    return {"model": model, "vae": vae, "clip": clip, "glue": comfy_glue, "cond": cond}


def unet_forward(patcher, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g)
    t = torch.tensor([500.0])
    return patcher.model.apply_model(x, t, c_crossattn=cond.clone())


def train_forward(env, lowvram: bool):
    glue = env["glue"]
    patcher = env["model"].clone()
    dm = patcher.model.diffusion_model
    names = glue.target_module_names(patcher, "kohya default")
    lora = glue.build_lora(dm, names, rank=4, alpha=4.0, seed=1)
    with torch.no_grad():
        for _, d in lora.items():
            d.up.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    glue.attach_lora(patcher, lora)
    with torch.inference_mode(False), torch.enable_grad():
        patcher.load(torch.device("cpu"), lowvram_model_memory=1024 if lowvram else 0,
                     full_load=not lowvram)
        assert bool(patcher.model.model_lowvram) == lowvram
        glue.de_inference_(patcher.model)
        out = unet_forward(patcher, env["cond"])
        out.square().mean().backward()
        grads = [p.grad.clone() for p in lora.trainable_parameters()]
    patcher.detach()
    glue.detach_lora(patcher.model)
    return out.detach(), grads, names


def test_lora_trains_identically_under_lowvram_and_full_load(comfy_env):
    with torch.no_grad():
        base_before = unet_forward(comfy_env["model"], comfy_env["cond"]).detach()
    out_full, g_full, names = train_forward(comfy_env, lowvram=False)
    out_low, g_low, _ = train_forward(comfy_env, lowvram=True)
    assert len(names) == 36  # 3 transformers x 12 kohya targets (proj_in/out, 8 attention, 2 ff)
    assert not torch.allclose(out_full, base_before)  # the LoRA is active
    assert torch.allclose(out_full, out_low, atol=1e-5)
    assert all(g.abs().max() > 0 for g in g_full)
    for a, b in zip(g_full, g_low):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # The shared model is untouched: no wrapper left behind, same output bit for bit.
    with torch.no_grad():
        base_after = unet_forward(comfy_env["model"], comfy_env["cond"]).detach()
    assert torch.equal(base_before, base_after)
    assert not any(getattr(m, "weight_function", None) for m in comfy_env["model"].model.modules())


TINY_SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
    channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=1, num_head_channels=32, use_linear_in_transformer=True,
    context_dim=2048, adm_in_channels=2816, num_classes="sequential", use_spatial_transformer=True,
    legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
)


def tiny_sdxl_patcher():
    """ComfyUI's own SDXL model class (model_base.SDXL, SDXL latent format, adm conditioning) around
    a small UNet of the SDXL layout (linear proj_in, 2048-d context, 2816-d adm), random weights."""
    import math

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def sdxl_conditioning(text: str):
    """What CLIPTextEncode gives an SDXL model: (1, 77, 2048) tokens + a 1280-d pooled vector (here a
    fixed pseudo-random function of the text: the SDXL text encoders are too large to generate)."""
    g = torch.Generator().manual_seed(sum(map(ord, text)) + 1)
    return [[torch.randn(1, 77, 2048, generator=g) * 0.5,
             {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64}]]


def test_sdxl_layout_trains_and_exports_keys_comfy_loads(comfy_env, tmp_path, caplog):
    import logging

    import comfy.lora
    import comfy.sd
    from comfyui_draft_pack.nodes.lora_keys import ldm_to_diffusers_module_names
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.training_run import RunConfig, TrainingRun
    from comfyui_draft_pack.reward_models import ImageStatReward
    from comfyui_draft_pack.training import SamplerSettings, TrainSettings, lora_file

    patcher = tiny_sdxl_patcher()
    vae = comfy_env["vae"]
    cfg = RunConfig(prompts=["a cat", "a dog"], negative_prompt="", sampler=SamplerSettings("draft_lv"),
                    steps=4, scheduler="normal", cfg=3.0, width=64, height=64,
                    train=TrainSettings(iterations=2, learning_rate=1e-2, seed=0), rank=4, alpha=4.0,
                    target_set="kohya default", mixed_precision="auto", save_every=0, preview_every=0,
                    lora_name="draft/sdxl")
    with torch.inference_mode(False), torch.enable_grad():
        result = TrainingRun(patcher, vae, sdxl_conditioning,
                             RewardHandle(ImageStatReward("contrast"), [], "contrast"), cfg).run()
    assert len(result.history) == 2 and all(r == r for r in result.history)
    assert all(float(d.up.detach().abs().max()) > 0 for _, d in result.lora.items())  # every layer trained
    assert len(result.lora) == 4 * 12  # 1 input, 1 middle, 2 output transformers: 12 kohya targets each

    name_map = ldm_to_diffusers_module_names(patcher.model.model_config.unet_config)
    path = lora_file.save_kohya(str(tmp_path / "sdxl.safetensors"), result.lora, name_map,
                                base_model="sdxl_base_v1-0", dtype=torch.float32)
    sd = comfy.utils.load_torch_file(path)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len(result.lora)


def test_cancel_during_the_preview_keeps_the_finished_update_logged_charted_and_counted(
        comfy_env, loras_dir, monkeypatch, caplog):
    """Cancel lands while the preview is sampled right after update 2 finished: the partial LoRA
    holds 2 updates, and update 2's log line, chart point and progress-bar step were all emitted
    (the bar hook checks for an interrupt first, as the server's does)."""
    import logging

    import comfy.model_management
    import comfy.utils
    from safetensors import safe_open

    from comfyui_draft_pack.nodes import progress_events
    from comfyui_draft_pack.nodes.reward_types import RewardHandle
    from comfyui_draft_pack.nodes.training_run import RunConfig, TrainingRun
    from comfyui_draft_pack.reward_models import ImageStatReward
    from comfyui_draft_pack.training import SamplerSettings, TrainSettings
    from comfyui_draft_pack.training.trainer import DraftTrainer

    bar = []

    def hook(value, total, preview, node_id=None):  # main.py's hook: the interrupt check comes first
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.append(value)

    events = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    monkeypatch.setattr(progress_events, "_send", lambda event, data: events.append((event, data)))
    generate = DraftTrainer.generate

    def cancel_then_generate(self, *args, **kwargs):
        if self.iteration == 2:
            comfy.model_management.interrupt_current_processing(True)  # what /interrupt does
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(DraftTrainer, "generate", cancel_then_generate)
    cfg = RunConfig(prompts=["a cat"], negative_prompt="", sampler=SamplerSettings("draft_lv"),
                    steps=4, scheduler="normal", cfg=3.0, width=64, height=64,
                    train=TrainSettings(iterations=5, learning_rate=1e-2, seed=0), rank=4, alpha=4.0,
                    target_set="attention", mixed_precision="auto", save_every=0, preview_every=2,
                    lora_name="draft/cancelled")
    run = TrainingRun(tiny_sdxl_patcher(), comfy_env["vae"], sdxl_conditioning,
                      RewardHandle(ImageStatReward("contrast"), [], "contrast"), cfg)
    with caplog.at_level(logging.INFO, logger="ComfyUI-DRaFT"), torch.inference_mode(False), \
            torch.enable_grad(), pytest.raises(comfy.model_management.InterruptProcessingException):
        run.run()
    assert not comfy.model_management.processing_interrupted()
    saved = sorted(p.name for p in (loras_dir / "draft").iterdir() if p.suffix == ".safetensors")
    assert saved == ["cancelled_step00002_partial.safetensors"]
    with safe_open(str(loras_dir / "draft" / saved[0]), "pt") as f:
        assert f.metadata()["draft_iteration"] == "2"
    assert "DRaFT iteration 2/5" in caplog.text and "DRaFT iteration 3/5" not in caplog.text
    points = [d["iteration"] for e, d in events if e == "draft.progress"]
    assert points == [1, 2]
    assert events[-1][0] == "draft.finished" and events[-1][1]["status"] == "interrupted"
    assert max(bar) == 2 and bar.count(2) == 1  # update 2 counted; its preview never finished
