"""The diffusers/PEFT LoRA folder: ``<folder>/pytorch_lora_weights.safetensors``.

For diffusers users: ``pipeline.load_lora_weights(folder)`` reads it directly (the kohya file of
:mod:`.lora_file` loads in diffusers too, through its kohya converter). Keys
``<prefix>.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, alpha folded into ``lora_B``,
fused DiT layers split into their diffusers slices. Reading it back is :func:`.lora_file.load_kohya`
(which accepts this layout).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .lora import LoRASet
from .lora_file import cast_factor, check_alpha, kohya_factors
from .lora_metadata import metadata_strings
from .safe_files import LoRAFileError, atomic_save

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) reads


def diffusers_state_dict(lora: LoRASet, name_map: Mapping[str, object],
                         dtype: torch.dtype = torch.float32, prefix: str = "unet") -> dict:
    """The PEFT layout diffusers' ``load_lora_weights`` reads: ``<prefix>.<diffusers module>.lora_A.weight``
    (down: ``(rank, in)`` or ``(rank, in, kh, kw)``) and ``.lora_B.weight`` (up: ``(out, rank)`` or
    ``(out, rank, 1, 1)``) with ``alpha / rank`` folded into ``lora_B``: with no alphas in a file
    diffusers uses PEFT scale 1 for every layer (all diffusers versions), so the update is exact up
    to one float rounding of ``lora_B``.

    ``name_map`` values are a diffusers module name (one-to-one, SD UNets), or for fused layers
    (FLUX ``img_attn.qkv``, ``linear1``; MMDiT ``attn.qkv``) a list of ``(diffusers module, row
    offset, rows)`` slices of the fused weight's output rows (as ComfyUI's ``flux_to_diffusers`` /
    ``mmdit_to_diffusers`` map them): each slice gets the same ``lora_A`` and its rows of
    ``lora_B``, so the slices' updates together are exactly the fused layer's update. Prefix
    ``transformer`` for DiT pipelines."""
    if name_map is None:
        raise LoRAFileError("the diffusers layout needs the {ldm name: diffusers name} map")
    missing = [n for n in lora.names() if n not in name_map]
    if missing:
        raise LoRAFileError(f"no diffusers name for {len(missing)} LoRA layer(s), e.g. {missing[:3]}")
    sd = {}
    for name in lora.names():
        delta, target = lora[name], name_map[name]
        check_alpha(name, delta.alpha)
        down, up = kohya_factors(delta)
        up = up.detach().float() * delta.scale
        slices = [(target, 0, up.shape[0])] if isinstance(target, str) else list(target)
        covered = sorted((int(o), int(o) + int(n)) for _, o, n in slices)
        if covered[0][0] != 0 or covered[-1][1] != up.shape[0] or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise LoRAFileError(f"the diffusers slices of {name!r} do not tile its {up.shape[0]} rows")
        for path, offset, rows in slices:
            part = up[int(offset): int(offset) + int(rows)]
            # own storage per slice: safetensors refuses tensors that share memory
            sd[f"{prefix}.{path}.lora_A.weight"] = cast_factor(down, dtype, f"{name}.down").clone()
            sd[f"{prefix}.{path}.lora_B.weight"] = cast_factor(part, dtype, f"{name}.up * alpha/rank").clone()
    return sd


def save_diffusers_folder(folder: str, lora: LoRASet, name_map: Mapping[str, object],
                          metadata: Mapping | None = None, dtype: torch.dtype = torch.float32,
                          overwrite: bool = False, prefix: str = "unet") -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` (:func:`diffusers_state_dict`), which
    ``pipeline.load_lora_weights(folder)`` reads directly; returns ``folder``.

    ``metadata`` (e.g. ``draft_*`` settings) is stored as strings beside ``format: pt``; the
    ``ss_network_*`` keys are left out (alpha is folded into the factors here).
    """
    meta = {k: v for k, v in metadata_strings(metadata).items() if not k.startswith("ss_network")}
    meta["format"] = "pt"
    atomic_save(diffusers_state_dict(lora, name_map, dtype, prefix),
                os.path.join(folder, DIFFUSERS_WEIGHT_NAME), meta, overwrite)
    return folder



__all__ = ["DIFFUSERS_WEIGHT_NAME", "diffusers_state_dict", "save_diffusers_folder"]
