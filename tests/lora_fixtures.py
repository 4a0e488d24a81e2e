"""Shared helpers for the LoRA file tests (test_lora_io*.py).

* a plain-torch stand-in with ldm-like layer names and a made-up name map (no ComfyUI);
* tiny UNets of the SD1.5 and SDXL layouts built with ComfyUI's own classes (``supported_models``
  config -> ``model_base`` model -> ``ModelPatcher``), seeded explicit initialisation, and the same
  weights in a diffusers ``UNet2DConditionModel`` (converted with ComfyUI's ``unet_to_diffusers``);
* kohya's default target rule, applied independently to ldm and diffusers modules;
* A1111's ``convert_diffusers_name_to_compvis`` rule (extensions-builtin/Lora/networks.py), a test
  oracle for how A1111/Forge resolve kohya keys.

Nothing here is imported by the project; ComfyUI is imported only by the functions that need it.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
import types

import torch
from torch import nn

from conftest import import_comfy  # noqa: F401  (also used as lora_fixtures.import_comfy)
from training.lora import LoRADelta, LoRASet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACK = "draft_lora_io_testpack"


# -- a plain-torch stand-in (no ComfyUI) ----------------------------------------------------------
def tiny_model() -> nn.Module:
    """A plain-torch stand-in for the engine-only tests, layers named like an ldm UNet: a 1x1 conv,
    Linear attention layers, a 3x3 conv."""
    def block(cin):
        return nn.ModuleDict({
            "proj_in": nn.Conv2d(cin, 16, 1),
            "attn1": nn.ModuleDict({"to_q": nn.Linear(16, 16, bias=False),
                                    "to_out": nn.ModuleList([nn.Linear(16, 12)])}),
            "conv": nn.Conv2d(12, 12, 3, padding=1),
        })
    return nn.ModuleDict({"input_blocks": nn.ModuleDict({"1": block(8), "2": block(12)})})


# its LoRA targets and a made-up {ldm name: diffusers name} map
TARGETS = [f"input_blocks.{b}.{n}" for b in (1, 2)
           for n in ("proj_in", "attn1.to_q", "attn1.to_out.0", "conv")]
NAME_MAP = {n: n.replace("input_blocks.1.", "down_blocks.0.attentions.0.")
                .replace("input_blocks.2.", "down_blocks.0.attentions.1.") for n in TARGETS}


def make_lora(rank=4, alpha=3.0, seed=0, targets=TARGETS) -> LoRASet:
    """A seeded LoRASet on ``targets`` of :func:`tiny_model` with non-zero ``up``."""
    modules = dict(tiny_model().named_modules())
    g = torch.Generator().manual_seed(seed)
    lora = LoRASet()
    for n in targets:
        d = lora.add(n, LoRADelta(modules[n].weight.shape, rank, alpha, generator=g))
        with torch.no_grad():
            d.up.normal_(0, 0.1, generator=g)
    return lora


# -- ComfyUI imports ------------------------------------------------------------------------------
def import_pack_module(relative: str):
    """Import ``nodes/<x>.py`` of this repository as a package submodule (its relative imports
    work) without running ``nodes/__init__.py`` (which needs a running ComfyUI's ``comfy_api``)."""
    import_comfy()
    if _PACK not in sys.modules:
        pack = types.ModuleType(_PACK)
        pack.__path__ = [REPO]
        sys.modules[_PACK] = pack
        sub = types.ModuleType(f"{_PACK}.nodes")
        sub.__path__ = [os.path.join(REPO, "nodes")]
        sys.modules[f"{_PACK}.nodes"] = sub
    return importlib.import_module(f"{_PACK}.{relative}")


# -- tiny UNets -----------------------------------------------------------------------------------
# SD1.5 layout: conv proj_in/out, attention in level 0, a plain level 1, a mid transformer,
# 2 res-blocks per level (so A1111's "3 input blocks per level" arithmetic holds).
SD15_TINY_LDM = dict(
    use_checkpoint=False, image_size=8, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2], channel_mult=[1, 2], transformer_depth=[1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_spatial_transformer=True, use_linear_in_transformer=False, context_dim=64, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
SD15_TINY_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8,  # SD15's config forces num_heads=8
)
# SDXL layout: linear proj_in/out, no attention in level 0, depths 1 and 2 below, a depth-2 mid
# block, SDXL's "text_time" added conditioning (label_emb <-> add_embedding), 64-channel heads.
SDXL_TEXT_EMBED, SDXL_TIME_EMBED = 32, 8
SDXL_TINY_LDM = dict(
    use_checkpoint=False, image_size=8, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 1, 1, 2, 2],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2,
    use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=64, legacy=False,
    num_classes="sequential", adm_in_channels=SDXL_TEXT_EMBED + 6 * SDXL_TIME_EMBED,
    use_temporal_attention=False, use_temporal_resblock=False,
)
SDXL_TINY_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2),  # heads of 64 channels
    use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_EMBED,
    projection_class_embeddings_input_dim=SDXL_TEXT_EMBED + 6 * SDXL_TIME_EMBED,
)
TINY = {
    "sd15": ("SD15", SD15_TINY_LDM, SD15_TINY_DIFFUSERS),
    "sdxl": ("SDXL", SDXL_TINY_LDM, SDXL_TINY_DIFFUSERS),
}


def fill_(module: nn.Module, seed: int) -> torch.Generator:
    """Seeded explicit init (ComfyUI's ops leave weights empty): fan-in-scaled normals for
    matrices, 1 + noise for norm scales, small non-zero biases (so a mis-mapped bias shows).
    Returns the generator, for what a caller fills next."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(max(1, math.prod(p.shape[1:]))))
    return g


def comfy_tiny_model(kind: str, seed: int = 0):
    """A ``ModelPatcher`` around a tiny ComfyUI model of ``kind`` (``sd15`` or ``sdxl``) whose
    ``model_config`` is ComfyUI's own ``SD15``/``SDXL`` class."""
    config_class, ldm, _ = TINY[kind]
    return tiny_patcher(config_class, ldm, seed)


def tiny_patcher(config_class: str, unet_config: dict, seed: int, fill=None):
    """A CPU ``ModelPatcher`` around ComfyUI's model class ``comfy.supported_models.<config_class>``
    built from ``unet_config``, its weights set by ``fill(module, seed)`` (default :func:`fill_`)."""
    comfy = import_comfy()
    model = getattr(comfy.supported_models, config_class)(dict(unet_config)).get_model({})
    (fill or fill_)(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def diffusers_twin(patcher, kind: str):
    """A diffusers ``UNet2DConditionModel`` holding the ComfyUI model's weights (keys converted with
    ``comfy.utils.unet_to_diffusers``; strict load, so every tensor is accounted for)."""
    comfy = import_comfy()
    from diffusers import UNet2DConditionModel
    _, _, config = TINY[kind]
    unet = UNet2DConditionModel(**config)
    ldm_sd = patcher.model.diffusion_model.state_dict()
    wanted = unet.state_dict()
    converted = {d: ldm_sd[l] for d, l in comfy.utils.unet_to_diffusers(
        patcher.model.model_config.unet_config).items() if d in wanted}
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def unet_inputs(kind: str, seed: int = 1, batch: int = 2):
    """``(x, t, context, diffusers added_cond_kwargs or None)`` for the tiny UNets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 250.0][:batch])
    ctx = torch.randn(batch, 5, 64, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(batch, SDXL_TEXT_EMBED, generator=g),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return x, t, ctx, added


def comfy_forward(patcher, kind: str, unet=None, seed: int = 1) -> torch.Tensor:
    """ComfyUI's UNet output; SDXL's ``y`` is built the way diffusers builds its added embedding
    input (text embeds, then sinusoidal embeddings of the 6 time ids), using ``unet.add_time_proj``."""
    x, t, ctx, added = unet_inputs(kind, seed)
    y = None
    if added is not None:
        time = unet.add_time_proj(added["time_ids"].flatten()).reshape(x.shape[0], -1)
        y = torch.cat([added["text_embeds"], time], dim=-1)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, timesteps=t, context=ctx, y=y).float()


def diffusers_forward(unet, kind: str, seed: int = 1) -> torch.Tensor:
    x, t, ctx, added = unet_inputs(kind, seed)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


# -- kohya's default targets ----------------------------------------------------------------------
def _is_kohya_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))


def kohya_targets(model: nn.Module, container_class: type) -> list[str]:
    """kohya sd-scripts' default UNet targets: every Linear and 1x1 Conv2d inside a module of
    ``container_class`` (diffusers ``Transformer2DModel``; ComfyUI ``SpatialTransformer``)."""
    names = []
    for prefix, container in model.named_modules():
        if isinstance(container, container_class):
            names += [f"{prefix}.{n}" for n, m in container.named_modules() if n and _is_kohya_layer(m)]
    return names


def ldm_kohya_targets(diffusion_model: nn.Module) -> list[str]:
    from comfy.ldm.modules.attention import SpatialTransformer
    return kohya_targets(diffusion_model, SpatialTransformer)


def random_lora(diffusion_model: nn.Module, names, rank: int = 4, alpha: float = 2.0,
                seed: int = 3, std: float = 0.2) -> LoRASet:
    """A LoRASet on ``names`` with random (non-zero) ``down`` and ``up``."""
    modules = dict(diffusion_model.named_modules())
    g = torch.Generator().manual_seed(seed)
    lora = LoRASet()
    for name in names:
        delta = LoRADelta(modules[name].weight.shape, rank, alpha, generator=g)
        with torch.no_grad():
            delta.up.normal_(0, std, generator=g)
        lora.add(name, delta)
    return lora


def shapes_of(diffusion_model: nn.Module, names) -> dict:
    modules = dict(diffusion_model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


# -- A1111's parsing rule (extensions-builtin/Lora/networks.py) -----------------------------------
_SUFFIX_CONVERSION = {
    "attentions": {},
    "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                "conv_shortcut": "skip_connection"},
}


def a1111_convert_diffusers_name_to_compvis(key: str, is_sd2: bool = False) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` for UNet keys (the network name, i.e. the
    part of a file key before the first '.'); returns the compvis module name with '_' for '.'."""
    def match(regex):
        r = re.match(regex, key)
        return None if not r else [int(x) if re.match(r"\d+", x) else x for x in r.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        inner = 1 if m[1] == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{inner}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    return key


def a1111_network_name(file_key: str) -> str:
    """A1111 splits a file key at the FIRST '.' (``key.partition('.')``): the network name."""
    return file_key.partition(".")[0]
