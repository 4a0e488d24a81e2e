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
    return {"model": model, "glue": comfy_glue, "cond": cond}


def unet_forward(patcher, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g)
    t = torch.tensor([500.0])
    return patcher.model.apply_model(x, t, c_crossattn=cond.clone())


def train_forward(env, lowvram: bool):
    glue = env["glue"]
    patcher = env["model"].clone()
    dm = patcher.model.diffusion_model
    names = glue.target_module_names(dm, "kohya default")
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
