"""Generate a tiny SD1.5-format checkpoint with random weights (for tests and ``make demo``).

The file has the original (LDM) SD1.5 layout that ComfyUI's CheckpointLoaderSimple detects as
SD1.5 (../shared/COMFYUI_NOTES.md section 9):

* ``model.diffusion_model.*``: ComfyUI's own ``UNetModel`` with SD1.5's ``model_channels=320``,
  ``context_dim=768`` and conv ``proj_in``, but one level (``channel_mult=[1]``), one res-block and
  one transformer per block: about 19 M parameters;
* ``first_stage_model.taesd_*``: a TAESD decoder/encoder (ComfyUI's class), ``vae_scale``/``vae_shift``;
* ``cond_stage_model.transformer.text_model.*``: a full-size CLIP ViT-L/14 text encoder (the SD1
  loader always builds CLIP-L) with random float16 weights.

Random weights make random images; the point is the real file format and the real loading code.
Needs ComfyUI importable (``COMFYUI_PATH``). Usage: ``python tools/tiny_checkpoint.py OUT.safetensors``.
"""
from __future__ import annotations

import math
import os
import sys

import torch
from safetensors.torch import save_file

TINY_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=-1, num_head_channels=64,
    use_spatial_transformer=True, use_linear_in_transformer=False, context_dim=768, legacy=False,
)
VERSION = "tiny-sd15-v1"


def _import_comfy():
    path = os.environ.get("COMFYUI_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        from comfy.cli_args import args
        if not torch.cuda.is_available():
            args.cpu = True  # comfy.model_management probes CUDA at import otherwise
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel  # noqa: F401
        import comfy.ops  # noqa: F401
        import comfy.taesd.taesd  # noqa: F401
    except ImportError as e:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout "
                         f"(could not import comfy: {e})")
    return sys.modules["comfy.ldm.modules.diffusionmodules.openaimodel"], sys.modules["comfy.ops"], \
        sys.modules["comfy.taesd.taesd"]


def _fill(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init: fan-in-scaled normals for weights, zeros for biases, ones for norm scales."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                fan_in = max(1, math.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def _clip_l_state_dict(generator: torch.Generator) -> dict:
    """Random float16 CLIP ViT-L/14 text-encoder weights under SD1's key names."""
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):
        model = CLIPTextModel(config)
    sd = {}
    for name, p in model.state_dict().items():
        if "position_ids" in name:
            continue
        if name.endswith("bias"):
            t = torch.zeros(p.shape)
        elif "layer_norm" in name or "final_layer_norm" in name:
            t = torch.ones(p.shape)
        else:
            t = torch.randn(p.shape, generator=generator) * 0.02
        sd[f"cond_stage_model.transformer.{name}"] = t.half()
    return sd


def make_tiny_sd15(path: str, seed: int = 0) -> str:
    """Write the checkpoint to ``path`` (atomically) and return ``path``."""
    openaimodel, ops, taesd = _import_comfy()
    g = torch.Generator().manual_seed(seed)
    unet = openaimodel.UNetModel(**TINY_UNET, operations=ops.disable_weight_init)
    _fill(unet, g)
    vae = taesd.TAESD()
    _fill(vae, g)
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        sd[f"first_stage_model.{k}"] = v.contiguous()
    sd["first_stage_model.vae_scale"] = torch.tensor(0.18215)
    sd["first_stage_model.vae_shift"] = torch.tensor(0.0)
    sd.update(_clip_l_state_dict(g))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata={"comfyui_draft": VERSION, "seed": str(seed)})
    os.replace(tmp, path)
    return path


def cached_tiny_sd15(cache_dir: str, seed: int = 0) -> str:
    """The cached checkpoint path, generated on first use."""
    path = os.path.join(cache_dir, f"draft_tiny_sd15_{VERSION}_seed{seed}.safetensors")
    if not os.path.exists(path):
        make_tiny_sd15(path, seed)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(make_tiny_sd15(sys.argv[1]))
