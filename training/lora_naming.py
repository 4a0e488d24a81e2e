"""LoRA file key names: module names <-> kohya, ComfyUI and PEFT tensor keys.

* Export: a module ``down_blocks.0.attentions.0.proj_in`` is stored under the kohya stem
  ``lora_unet_down_blocks_0_attentions_0_proj_in`` (:func:`kohya_name`). The module names come from
  a ``{ldm module name: diffusers module name}`` map the caller builds (in ComfyUI:
  ``nodes/lora_keys.py`` inverts ``comfy.utils.unet_to_diffusers``); this module never imports
  ComfyUI. ``name_map=None`` keeps the names as they are (kohya's convention for UNets that have no
  diffusers twin; ComfyUI still loads such a file) (:func:`export_names`).
* Import: :func:`split_key` tells the key styles apart (kohya ``lora_unet_<stem>.<part>``, ComfyUI
  ``diffusion_model.<ldm name>.<part>``, PEFT ``unet.<diffusers name>.lora_A/B.weight``) and
  refuses anything that is not a plain UNet LoRA factor; :func:`key_resolver` maps a stem back to
  the ldm module name, accepting kohya stems of diffusers OR ldm/SGM module names.

The files themselves: :mod:`.lora_file` (kohya), :mod:`.lora_diffusers` (diffusers/PEFT folder).
"""
from __future__ import annotations

from typing import Mapping

from .lora import LoRASet
from .safe_files import LoRAFileError

KOHYA_PREFIX = "lora_unet_"


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def export_names(lora: LoRASet, name_map: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``[(ldm name, exported module path)]``; every LoRA module must be in ``name_map``."""
    if name_map is None:
        return [(name, name) for name in lora.names()]
    missing = [n for n in lora.names() if n not in name_map]
    if missing:
        raise LoRAFileError(
            f"no diffusers name for {len(missing)} LoRA layer(s), e.g. {missing[:3]}: the name map "
            "does not fit this LoRA (built for another UNet layout?)")
    return [(name, name_map[name]) for name in lora.names()]


_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def split_key(key: str, file: str) -> tuple[str, str, str]:
    """``(style, module stem, part)`` of a LoRA file key; style ``kohya``, ``comfy`` or ``peft``."""
    if key.startswith(_TEXT_ENCODER_PREFIXES):
        raise LoRAFileError(f"{file}: key {key!r} is a text-encoder LoRA weight; only UNet LoRAs "
                            "can be loaded here (remove the lora_te* keys to use its UNet part)")
    if key.startswith(KOHYA_PREFIX):
        stem, _, part = key.partition(".")
        if part in _KOHYA_PARTS:
            return "kohya", stem, part
        raise LoRAFileError(f"{file}: key {key!r} is not a LoRA factor ({part!r}: only plain "
                            "lora_up/lora_down/alpha LoRAs are supported, not LoCon mid weights, "
                            "LoHa/LoKr, DoRA or full diffs)")
    if key.startswith("diffusion_model."):
        for part in _KOHYA_PARTS:
            if key.endswith("." + part):
                return "comfy", key[len("diffusion_model."):-len(part) - 1], part
    if key.startswith("unet."):
        for part, kohya_part in _PEFT_PARTS.items():
            if key.endswith("." + part):
                return "peft", key[len("unet."):-len(part) - 1], kohya_part
    raise LoRAFileError(f"{file}: key {key!r} is not a LoRA factor (expected lora_unet_*.lora_up/"
                        "lora_down/alpha, diffusion_model.*.lora_up.weight or unet.*.lora_A/B.weight)")


def key_resolver(name_map: Mapping[str, str] | None, candidates: list[str] | None):
    """A function ``(style, stem) -> ldm name or None``."""
    kohya, peft = {}, {}
    if candidates is not None:
        for ldm in candidates:
            keys = {kohya_name(ldm)}
            if name_map is not None and ldm in name_map:
                keys.add(kohya_name(name_map[ldm]))
                peft[name_map[ldm]] = ldm
            for k in keys:
                if kohya.setdefault(k, ldm) != ldm:
                    raise LoRAFileError(f"layers {kohya[k]!r} and {ldm!r} share the kohya key {k!r}")
        allowed = set(candidates)

    def resolve(style: str, stem: str) -> str | None:
        if style == "kohya":
            return kohya.get(stem)
        if style == "peft":
            return peft.get(stem)
        return stem if candidates is None or stem in allowed else None

    return resolve


__all__ = ["KOHYA_PREFIX", "kohya_name", "export_names", "split_key", "key_resolver"]
