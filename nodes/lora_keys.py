"""Module names and base-model facts from ComfyUI, for the portable LoRA files.

Thin glue: the maps come from ComfyUI itself (``comfy.utils.unet_to_diffusers``, the model classes);
the file formats live in ``training/`` (``lora_file.py``, ``lora_diffusers.py``,
``lora_metadata.py``), which take these results as plain values.
"""
from __future__ import annotations

import comfy.model_base
import comfy.utils

from ..training.lora_metadata import base_model_version_from_config
from . import architectures

_SUFFIXES = (".weight", ".bias")
# ComfyUI's map sends both diffusers class_embedding.* and add_embedding.* to ldm label_emb.0.*;
# diffusers calls it add_embedding in SDXL-family UNets (text_time conditioning; no attention in
# the first level) and class_embedding elsewhere (SD2 unCLIP, attention from the first level).
_AMBIGUOUS = {"add_embedding", "class_embedding"}


def ldm_to_diffusers_module_names(unet_config: dict) -> dict:
    """``{ldm module name: diffusers module name}`` for every weight-bearing UNet module.

    Built by inverting ``comfy.utils.unet_to_diffusers(unet_config)`` (diffusers tensor key -> ldm
    tensor key) and stripping ``.weight``/``.bias``; e.g.
    ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. Empty for non-UNet models.
    """
    candidates: dict = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        for suffix in _SUFFIXES:
            if diffusers_key.endswith(suffix) and ldm_key.endswith(suffix):
                candidates.setdefault(ldm_key[: -len(suffix)], set()).add(diffusers_key[: -len(suffix)])
    depth = list(unet_config.get("transformer_depth") or [1])
    sdxl_like = unet_config.get("adm_in_channels") is not None and depth[0] == 0
    out = {}
    for ldm in sorted(candidates, key=_natural):
        names = candidates[ldm]
        if len(names) > 1:
            heads = {n.split(".", 1)[0] for n in names}
            if heads != _AMBIGUOUS:
                raise ValueError(f"ComfyUI maps several diffusers modules to {ldm!r}: {sorted(names)}")
            want = "add_embedding" if sdxl_like else "class_embedding"
            names = {n for n in names if n.startswith(want)}
        out[ldm] = names.pop()
    return out


def diffusers_to_ldm_module_names(unet_config: dict) -> dict:
    """The inverse of :func:`ldm_to_diffusers_module_names`."""
    return {d: ldm for ldm, d in ldm_to_diffusers_module_names(unet_config).items()}


def _natural(name: str):
    """Sort key: numeric parts as numbers (``input_blocks.2`` before ``input_blocks.10``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _base_model(model_patcher_or_model):
    """The ``comfy.model_base.BaseModel`` of a MODEL (ModelPatcher) or of itself."""
    model = model_patcher_or_model
    if not isinstance(model, comfy.model_base.BaseModel):
        model = getattr(model, "model", None)
    if not isinstance(model, comfy.model_base.BaseModel):
        raise TypeError(f"expected a ComfyUI MODEL or BaseModel, got {type(model_patcher_or_model).__name__}")
    return model


def base_model_version(model_patcher_or_model) -> str | None:
    """The ``training.lora_metadata.BASE_MODELS`` key of a ComfyUI model (``sd_v1``, ``sd_v2``,
    ``sdxl_base_v1-0``, ``sd3_5_large``, ``flux1_dev``, ``qwen_image``, ...), or None when the
    family has no such name.

    Decided by the ``model_config`` class through ``architectures.FAMILIES``; a subclass variant
    of a family (SSD-1B, Segmind Vega, KOALA: SDXL subclasses) gives None, their LoRAs do not fit
    SDXL tools. Configs of no known class fall back to the exact ``comfy.model_base`` class
    (``SD21UNCLIP``, ``SDXL``, ``SDXLRefiner``), then to the UNet config of a plain ``BaseModel``.
    """
    model = _base_model(model_patcher_or_model)
    config = getattr(model, "model_config", None)
    if config is not None:
        try:
            architectures.family_of(config)
            return architectures.base_model(config)  # None for a variant (subclass)
        except architectures.UnsupportedModelError:
            pass
    exact = {comfy.model_base.SD21UNCLIP: "sd_v2", comfy.model_base.SDXL: "sdxl_base_v1-0",
             comfy.model_base.SDXLRefiner: "sdxl_refiner_v1-0"}
    if type(model) in exact:
        return exact[type(model)]
    if type(model) is comfy.model_base.BaseModel and config is not None:
        return base_model_version_from_config(getattr(config, "unet_config", None))
    return None


def is_v_prediction(model_patcher_or_model) -> bool:
    """Whether the model predicts v (SD 2.x 768-v, v-pred SDXL finetunes)."""
    model_type = getattr(_base_model(model_patcher_or_model), "model_type", None)
    return getattr(model_type, "name", "") in ("V_PREDICTION", "V_PREDICTION_EDM",
                                               "V_PREDICTION_CONTINUOUS")


def lora_file_facts(model_patcher_or_model) -> dict:
    """``{"name_map", "base_model", "v_prediction"}``: the keyword arguments that
    ``training.lora_file.save_kohya`` needs from a ComfyUI model (pass ``**facts``).

    ``name_map`` follows the family's file naming (``architectures.Family.naming``): the
    ``{ldm: diffusers}`` UNet map for SD UNets, None for DiT families, whose kohya keys carry the
    native module path (``lora_unet_double_blocks_0_img_attn_qkv``, as kohya sd-scripts writes).
    """
    model = _base_model(model_patcher_or_model)
    try:
        naming = architectures.family_of(model.model_config).naming
    except architectures.UnsupportedModelError:
        naming = "diffusers"
    name_map = (ldm_to_diffusers_module_names(model.model_config.unet_config)
                if naming == "diffusers" else None)
    return {"name_map": name_map or None,
            "base_model": base_model_version(model), "v_prediction": is_v_prediction(model)}


def _diffusers_slices(key_map: dict) -> dict:
    """``{native module: [(diffusers module, row offset, rows)]}`` from ComfyUI's
    ``flux_to_diffusers`` / ``mmdit_to_diffusers`` (diffusers tensor key -> native key, or
    ``(native key, (dim, offset, size))`` for a slice of a fused weight). Entries that transform
    the weight (a function as third element: adaLN scale/shift swaps) are left out: no LoRA target
    maps through them."""
    out: dict = {}
    for diffusers_key, target in key_map.items():
        if not diffusers_key.endswith(".weight"):
            continue
        path = diffusers_key[: -len(".weight")]
        if isinstance(target, str):
            out.setdefault(target[: -len(".weight")], []).append((path, 0, None))
        elif len(target) == 2 and target[1] is not None and target[1][0] == 0:
            _, offset, rows = target[1]
            out.setdefault(target[0][: -len(".weight")], []).append((path, offset, rows))
    return out


def diffusers_folder_facts(model_patcher_or_model) -> dict | None:
    """``{"name_map", "prefix"}`` for ``training.lora_diffusers.save_diffusers_folder``, from the
    family's ``diffusers_layout`` (architectures table): the UNet map (prefix ``unet``), or FLUX /
    MMDiT slices of fused layers from ComfyUI's own maps (prefix ``transformer``); None when the
    family has no diffusers layout here."""
    model = _base_model(model_patcher_or_model)
    try:
        layout = architectures.family_of(model.model_config).diffusers_layout
    except architectures.UnsupportedModelError:
        layout = "unet"
    config = model.model_config.unet_config
    if layout == "unet":
        names = ldm_to_diffusers_module_names(config)
        return {"name_map": names, "prefix": "unet"} if names else None
    if layout not in ("flux", "mmdit"):
        return None
    convert = comfy.utils.flux_to_diffusers if layout == "flux" else comfy.utils.mmdit_to_diffusers
    slices = _diffusers_slices(convert(config))
    shapes = {n: m.weight.shape[0] for n, m in model.diffusion_model.named_modules()
              if n in slices and getattr(m, "weight", None) is not None}
    name_map = {}
    for native, parts in slices.items():
        if native not in shapes:
            continue
        if len(parts) == 1 and parts[0][2] is None:
            name_map[native] = parts[0][0]
        else:
            name_map[native] = sorted(((p, o, r if r is not None else shapes[native] - o)
                                       for p, o, r in parts), key=lambda t: t[1])
    return {"name_map": name_map, "prefix": "transformer"}
