"""The portable LoRA file: kohya-format ``.safetensors`` out, kohya/ComfyUI/PEFT keys in.

Export (what kohya sd-scripts, A1111, Forge, ComfyUI's LoraLoader and diffusers all read):

* per module ``lora_unet_<diffusers module path, '.' -> '_'>`` three tensors
  (names: :mod:`.lora_naming`):
  ``.lora_down.weight`` ``(rank, in)`` for a Linear, ``(rank, in, kh, kw)`` for a conv;
  ``.lora_up.weight`` ``(out, rank)`` for a Linear, ``(out, rank, 1, 1)`` for a conv;
  ``.alpha``, a 0-dim float32 tensor holding alpha exactly as trained (not folded into the factors);
  the update is ``alpha / rank * (up @ down).reshape(weight_shape)`` (kohya's convention);
* safetensors metadata, all values strings (:func:`.lora_metadata.kohya_metadata`).

Import (:func:`load_kohya`) accepts kohya keys with diffusers OR ldm/SGM module names, ComfyUI's
``diffusion_model.<ldm name>.lora_up.weight`` keys and the PEFT folder layout of
:mod:`.lora_diffusers`; ``.alpha`` is optional (default: rank), conv factors may be 4-D or flattened
2-D. Anything that maps to no target layer, has the wrong shape or is not a plain LoRA raises
:class:`~.safe_files.LoRAFileError` naming the problem: never a silent partial load.

Every file is written with :func:`.safe_files.atomic_save` (a hidden temporary file in the same
folder, flushed to disk and renamed into place), so an interrupted save never leaves a truncated
file; an existing file is replaced only when ``overwrite=True``. The optimizer side file for
resume is :mod:`.lora_resume`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import torch

from .lora import LoRADelta, LoRASet
from .lora_metadata import EXACT_ALPHA_KEY, kohya_metadata
from .lora_naming import export_names, key_resolver, kohya_name, split_key
from .safe_files import LoRAFileError, atomic_save, read_safetensors


# -- writing --------------------------------------------------------------------------------------
def cast_factor(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor of the storage ``dtype`` (through float32); LoRAFileError
    naming ``what`` if it is not finite or overflows ``dtype``."""
    out = t.detach().to(device="cpu", dtype=torch.float32).to(dtype).contiguous()
    if not torch.isfinite(out).all():
        problem = "is not finite" if not torch.isfinite(t.detach()).all() else f"overflows {dtype}"
        raise LoRAFileError(f"LoRA factor {what} {problem}; refusing to write it")
    return out


def kohya_factors(delta: LoRADelta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` in kohya's layout: 4-D for conv weights, 2-D for Linear weights."""
    down, up = delta.down, delta.up
    if len(delta.weight_shape) == 4:
        down = down.reshape(delta.rank, *delta.weight_shape[1:])
        up = up.reshape(delta.weight_shape[0], delta.rank, 1, 1)
    return down, up


def check_alpha(name: str, alpha: float) -> None:
    """LoRAFileError if layer ``name``'s alpha is NaN or infinite."""
    if not math.isfinite(alpha):
        raise LoRAFileError(f"LoRA layer {name!r} has a non-finite alpha {alpha}")


def kohya_state_dict(lora: LoRASet, name_map: Mapping[str, str] | None,
                     dtype: torch.dtype = torch.float16) -> dict:
    """The kohya-format tensors of ``lora`` (see the module docstring); factors in ``dtype``
    (float16, bfloat16 or float32), alphas always 0-dim float32."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LoRA factors are stored as float16, bfloat16 or float32, not {dtype}")
    sd = {}
    for name, path in export_names(lora, name_map):
        delta = lora[name]
        key = kohya_name(path)
        if f"{key}.alpha" in sd:
            raise LoRAFileError(f"two LoRA layers map to the same kohya key {key!r}")
        check_alpha(name, delta.alpha)
        down, up = kohya_factors(delta)
        sd[f"{key}.lora_down.weight"] = cast_factor(down, dtype, f"{name}.down")
        sd[f"{key}.lora_up.weight"] = cast_factor(up, dtype, f"{name}.up")
        sd[f"{key}.alpha"] = torch.tensor(float(delta.alpha), dtype=torch.float32)
    if not sd:
        raise LoRAFileError("the LoRA has no layers; nothing to write")
    return sd


def save_kohya(path: str, lora: LoRASet, name_map: Mapping[str, str] | None,
               metadata: Mapping | None = None, base_model: str | None = None,
               dtype: torch.dtype = torch.float16, overwrite: bool = False, *,
               v_prediction: bool | None = None, title: str | None = None) -> str:
    """Write ``lora`` as a kohya-format ``.safetensors`` at ``path`` (atomically); returns ``path``.

    Args:
        lora: the deltas, keyed by ldm module name.
        name_map: ``{ldm module name: diffusers module name}`` covering every layer of ``lora``
            (None: write the names as they are).
        metadata: extra metadata (``draft_*`` training settings, ``modelspec.*`` overrides); values
            are stringified by :func:`.lora_metadata.metadata_value`.
        base_model: ``sd_v1``, ``sd_v2`` (+ ``v_prediction``), ``sd_v2_512``, ``sd_v2_768_v``,
            ``sdxl_base_v1-0``, ``sdxl_refiner_v1-0``, or None/unknown (no architecture claimed).
        dtype: storage dtype of the factors (float16 halves the file; alpha stays float32 exactly).
        overwrite: replace an existing file; otherwise FileExistsError.
        title: ``modelspec.title`` (default: the file name without extension).
    """
    title = title or os.path.splitext(os.path.basename(path))[0]
    tensors = kohya_state_dict(lora, name_map, dtype)
    meta = kohya_metadata(lora, base_model, metadata, v_prediction=v_prediction, title=title,
                          name_map=name_map)
    return atomic_save(tensors, path, meta, overwrite)


# -- reading --------------------------------------------------------------------------------------
def _weight_shape(down: torch.Tensor, up: torch.Tensor) -> tuple:
    if down.ndim == 4:
        return (up.shape[0], *down.shape[1:])
    return (up.shape[0], down.shape[1])


def _fit(stem: str, file: str, down: torch.Tensor, up: torch.Tensor, shape: tuple) -> tuple:
    """``(rank, down 2-D, up 2-D)`` checked against the layer's weight ``shape``."""
    def bad(why: str):
        return LoRAFileError(f"{file}: {stem!r} has shapes up {tuple(up.shape)}, down "
                             f"{tuple(down.shape)} that do not fit the layer's weight {shape} ({why})")

    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise bad("LoRA factors are 2-D or 4-D")
    rank = down.shape[0]
    if rank < 1 or up.shape[1] != rank:
        raise bad("the ranks of up and down differ")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise bad("a conv lora_up must be (out, rank, 1, 1)")
    if up.shape[0] != shape[0]:
        raise bad("output width")
    in_flat = math.prod(shape[1:])
    if down.ndim == 4 and tuple(down.shape[1:]) != tuple(shape[1:]) and not (
            len(shape) == 2 and tuple(down.shape[2:]) == (1, 1) and down.shape[1] == shape[1]):
        raise bad("input channels or kernel")
    if down[0].numel() != in_flat:
        raise bad("input width")
    return rank, down.reshape(rank, in_flat), up.reshape(shape[0], rank)


def lora_from_state_dict(sd: Mapping[str, torch.Tensor], name_map: Mapping[str, str] | None = None,
                         shapes: Mapping[str, Iterable[int]] | None = None, *, strict: bool = True,
                         metadata: Mapping[str, str] | None = None, source: str = "LoRA") -> LoRASet:
    """A float32 :class:`LoRASet` keyed by ldm module name from LoRA tensors (see :func:`load_kohya`)."""
    name_map = dict(name_map) if name_map is not None else None
    shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()} if shapes is not None else None
    candidates = list(shapes) if shapes is not None else (list(name_map) if name_map is not None else None)
    if not sd:
        raise LoRAFileError(f"{source} holds no tensors")
    parts: dict = {}
    styles = set()
    for key, value in sd.items():
        style, stem, part = split_key(key, source)
        styles.add(style)
        parts.setdefault((style, stem), {})[part] = value
    if "kohya" in styles and candidates is None:
        raise LoRAFileError(f"{source}: kohya keys name modules with '_' for '.'; pass the name map "
                            "or the layer shapes to resolve them")
    resolve = key_resolver(name_map, candidates)
    exact = json.loads((metadata or {}).get(EXACT_ALPHA_KEY, "{}") or "{}")

    found: dict = {}
    unmatched = []
    for (style, stem), p in parts.items():
        ldm = resolve(style, stem)
        if ldm is None:
            unmatched.append(stem)
            continue
        if ldm in found:
            raise LoRAFileError(f"{source}: layer {ldm!r} appears twice ({found[ldm][0]!r} and {stem!r})")
        found[ldm] = (stem, style, p)
    if unmatched:
        unmatched.sort()
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise LoRAFileError(
            f"{source}: {unmatched[0]!r}{more} matches no target layer of this model (a LoRA for "
            "another architecture, other target modules, or a name map that does not fit?)")
    if shapes is not None and strict:
        missing = [n for n in shapes if n not in found]
        if missing:
            raise LoRAFileError(
                f"{source} has LoRA weights for {len(found)} of the {len(shapes)} target layers; "
                f"missing e.g. {missing[:3]} (trained with other target modules? choose those, or "
                "load with strict=False)")

    order = candidates if candidates is not None else sorted(found)
    lora = LoRASet()
    init = torch.Generator().manual_seed(0)  # LoRADelta's init is overwritten; keep the global RNG
    for ldm in order:
        if ldm not in found:
            continue
        stem, style, p = found[ldm]
        if "lora_up.weight" not in p or "lora_down.weight" not in p:
            raise LoRAFileError(f"{source}: {stem!r} lacks lora_up or lora_down")
        down, up = p["lora_down.weight"].float(), p["lora_up.weight"].float()
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoRAFileError(f"{source}: {stem!r} holds NaN or Inf values")
        shape = shapes[ldm] if shapes is not None else _weight_shape(down, up)
        rank, down2, up2 = _fit(stem, source, down, up, shape)
        if "alpha" in p:
            a = p["alpha"]
            if a.numel() != 1:
                raise LoRAFileError(f"{source}: {stem!r}.alpha has shape {tuple(a.shape)}, not a scalar")
            alpha = float(a.float().item())
            if stem in exact and float(torch.tensor(float(exact[stem]), dtype=torch.float32)) == alpha:
                alpha = float(exact[stem])
        else:
            alpha = float(rank)  # kohya's default when a file has no alpha; PEFT folder: scale 1
        if not math.isfinite(alpha):
            raise LoRAFileError(f"{source}: {stem!r}.alpha is not finite")
        delta = LoRADelta(shape, rank, alpha, generator=init)
        with torch.no_grad():
            delta.down.copy_(down2)
            delta.up.copy_(up2)
        lora.add(ldm, delta)
    if not len(lora):
        raise LoRAFileError(f"{source} holds no UNet LoRA weights")
    return lora


def load_kohya(path: str, name_map: Mapping[str, str] | None = None,
               shapes: Mapping[str, Iterable[int]] | None = None, *, strict: bool = True) -> LoRASet:
    """Read a LoRA file back into a float32 :class:`LoRASet` keyed by ldm module name.

    Args:
        path: a ``.safetensors`` LoRA: ours, kohya's (``lora_unet_*`` with diffusers or ldm/SGM
            names, ``.alpha`` optional, conv factors 4-D or 2-D), ComfyUI's
            (``diffusion_model.<ldm>.lora_up.weight``) or our diffusers folder file (``unet.*.lora_A``;
            alpha is folded there, so it reads back with alpha = rank and the same update).
        name_map: ``{ldm module name: diffusers module name}``, the same map the export used.
        shapes: ``{ldm module name: weight shape}`` of the layers the model may train; the result
            follows its order (the model's). None: every module of ``name_map``, shapes from the file.
        strict: with ``shapes``, also require every layer of ``shapes`` to be in the file.

    Raises:
        LoRAFileError: truncated/corrupt file, non-LoRA or text-encoder keys, modules matching no
            layer, factors whose shapes do not fit, NaN/Inf values, missing layers (``strict``).
    """
    sd, metadata = read_safetensors(path)
    return lora_from_state_dict(sd, name_map, shapes, strict=strict, metadata=metadata,
                                source=os.path.basename(path))



__all__ = ["cast_factor", "kohya_factors", "check_alpha", "kohya_state_dict", "save_kohya",
           "lora_from_state_dict", "load_kohya"]
