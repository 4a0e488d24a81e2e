"""Portable LoRA files: kohya format out (plus a diffusers/PEFT folder), kohya/ComfyUI formats in.

Export (what kohya sd-scripts, A1111, Forge, ComfyUI's LoraLoader and diffusers all read):

* per module ``lora_unet_<diffusers module path, '.' -> '_'>`` three tensors:
  ``.lora_down.weight`` ``(rank, in)`` for a Linear, ``(rank, in, kh, kw)`` for a conv;
  ``.lora_up.weight`` ``(out, rank)`` for a Linear, ``(out, rank, 1, 1)`` for a conv;
  ``.alpha``, a 0-dim float32 tensor holding alpha exactly as trained (not folded into the factors);
  the update is ``alpha / rank * (up @ down).reshape(weight_shape)`` (kohya's convention);
* safetensors metadata, all values strings: ``ss_network_module`` (``networks.lora``; the
  family's kohya network module for DiTs: ``networks.lora_flux``, ``networks.lora_sd3``,
  ``networks.lora_qwen_image``),
  ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``, ``modelspec.*`` and the
  caller's training settings (``draft_*``).

The module names come from a ``{ldm module name: diffusers module name}`` map the caller builds
(in ComfyUI: ``nodes/lora_keys.py`` inverts ``comfy.utils.unet_to_diffusers``); this module never
imports ComfyUI. ``name_map=None`` keeps the names as they are (kohya's convention for UNets that
have no diffusers twin; ComfyUI still loads such a file).

Import (:func:`load_kohya`) accepts kohya keys with diffusers OR ldm/SGM module names, ComfyUI's
``diffusion_model.<ldm name>.lora_up.weight`` keys and the PEFT folder layout written here;
``.alpha`` is optional (default: rank), conv factors may be 4-D or flattened 2-D. Anything that maps
to no target layer, has the wrong shape or is not a plain LoRA raises :class:`LoRAFileError` naming
the problem: never a silent partial load.

Every file is written to a hidden temporary file in the same folder, flushed to disk and renamed
into place, so an interrupted save never leaves a truncated file; an existing file is replaced only
when ``overwrite=True``.

The optimizer side file for resume lives in :mod:`training.lora_resume` (re-exported here).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import safe_files
from .lora import LoRADelta, LoRASet

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) reads
EXACT_ALPHA_KEY = "draft_alpha_exact"  # alphas that float32 cannot hold exactly (JSON)

# base model -> (ss_base_model_version, modelspec.architecture, modelspec.implementation).
# Spellings follow kohya sd-scripts (library/sai_model_spec.py, train_util.py); "sd_v2" alone is
# ambiguous (512 eps or 768 v-prediction): :func:`base_model_entry` resolves it.
_GENERATIVE_MODELS = "https://github.com/Stability-AI/generative-models"
_BFL_FLUX = "https://github.com/black-forest-labs/flux"
BASE_MODELS = {
    "sd_v1": ("sd_v1", "stable-diffusion-v1/lora", "diffusers"),
    "sd_v2_512": ("sd_v2", "stable-diffusion-v2-512/lora", "diffusers"),
    "sd_v2_768_v": ("sd_v2", "stable-diffusion-v2-768-v/lora", "diffusers"),
    "sdxl_base_v1-0": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", _GENERATIVE_MODELS),
    "sdxl_refiner_v1-0": ("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner/lora", _GENERATIVE_MODELS),
    # DiT families. kohya sd-scripts: ss_base_model_version is what its loader returns (flux_utils
    # MODEL_VERSION_FLUX_V1 "flux1", "chroma"; sd3_utils' MMDiT model_type "medium", "5-medium",
    # "5-large"); architecture "stable-diffusion-3-<model_type>", "flux-1-dev", "flux-1-schnell",
    # "chroma" + "/lora"; implementation per determine_implementation (SD3 LoRA: "diffusers").
    # Qwen-Image is not in sd-scripts; musubi-tuner (the kohya trainer for it) writes
    # ss_base_model_version = architecture_full_name = "qwen_image" (dataset/architectures.py
    # ARCHITECTURE_QWEN_IMAGE_FULL; training/trainer_base.py), architecture "Qwen-Image/lora" and
    # implementation "https://github.com/QwenLM/Qwen-Image" (utils/sai_model_spec.py).
    # tests/test_kohya_tools.py checks these against kohya's / musubi's own code.
    "sd3_medium": ("medium", "stable-diffusion-3-medium/lora", "diffusers"),
    "sd3_5_medium": ("5-medium", "stable-diffusion-3-5-medium/lora", "diffusers"),
    "sd3_5_large": ("5-large", "stable-diffusion-3-5-large/lora", "diffusers"),
    "flux1_dev": ("flux1", "flux-1-dev/lora", _BFL_FLUX),
    "flux1_schnell": ("flux1", "flux-1-schnell/lora", _BFL_FLUX),
    "chroma": ("chroma", "chroma/lora", "https://huggingface.co/lodestones/Chroma"),
    "qwen_image": ("qwen_image", "Qwen-Image/lora", "https://github.com/QwenLM/Qwen-Image"),
}
ARCHITECTURES = {k: v[1] for k, v in BASE_MODELS.items()}
# base model -> ss_network_module: the --network_module kohya's trainer for that family runs and
# writes (sd-scripts train_network.py: "ss_network_module": args.network_module). FLUX/Chroma:
# networks.lora_flux (docs/flux_train_network.md); SD3: networks.lora_sd3, the module with MMDiT
# targets (sd3_minimal_inference.py reads only it; networks/lora.py finds no layer in an MMDiT,
# though docs/sd3_train_network.md's example names it); Qwen-Image: musubi-tuner's
# networks.lora_qwen_image (its trainer_base.py writes args.network_module; docs/qwen_image.md).
# SD UNets: networks.lora.
NETWORK_MODULES = {
    "sd3_medium": "networks.lora_sd3", "sd3_5_medium": "networks.lora_sd3",
    "sd3_5_large": "networks.lora_sd3",
    "flux1_dev": "networks.lora_flux", "flux1_schnell": "networks.lora_flux", "chroma": "networks.lora_flux",
    "qwen_image": "networks.lora_qwen_image",
}
DEFAULT_NETWORK_MODULE = "networks.lora"

# ComfyUI model_config class name -> base model (see base_model_version_from_config).
_CONFIG_CLASSES = {
    "SD15": "sd_v1", "SD15_instructpix2pix": "sd_v1",
    "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
    "SDXL": "sdxl_base_v1-0", "SDXL_instructpix2pix": "sdxl_base_v1-0",
    "SDXLRefiner": "sdxl_refiner_v1-0",
}


class LoRAFileError(ValueError):
    """A LoRA (or resume state) file is unreadable, truncated, foreign or does not fit the model."""


# -- names ----------------------------------------------------------------------------------------
def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def _export_names(lora: LoRASet, name_map: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``[(ldm name, exported module path)]``; every LoRA module must be in ``name_map``."""
    if name_map is None:
        return [(name, name) for name in lora.names()]
    missing = [n for n in lora.names() if n not in name_map]
    if missing:
        raise LoRAFileError(
            f"no diffusers name for {len(missing)} LoRA layer(s), e.g. {missing[:3]}: the name map "
            "does not fit this LoRA (built for another UNet layout?)")
    return [(name, name_map[name]) for name in lora.names()]


# -- base model facts -----------------------------------------------------------------------------
def base_model_entry(base_model: str | None, v_prediction: bool | None = None) -> tuple | None:
    """``(ss_base_model_version, modelspec.architecture, modelspec.implementation)`` or None.

    ``base_model`` is a key of :data:`BASE_MODELS` or ``"sd_v2"``, which ``v_prediction`` resolves
    (``None`` means unknown and picks the 768-v architecture, as kohya does for an unknown SD2).
    Unknown names give None (no architecture is claimed).
    """
    if not base_model:
        return None
    if base_model == "sd_v2":
        base_model = "sd_v2_512" if v_prediction is False else "sd_v2_768_v"
    return BASE_MODELS.get(base_model)


def network_module(base_model: str | None) -> str:
    """``ss_network_module`` for a :data:`BASE_MODELS` key (``networks.lora`` for SD UNets and
    unknown models; see :data:`NETWORK_MODULES`)."""
    return NETWORK_MODULES.get(base_model or "", DEFAULT_NETWORK_MODULE)


def base_model_version_from_config(model_config) -> str | None:
    """kohya's ``ss_base_model_version`` from a ComfyUI ``model_config`` (duck-typed, no ComfyUI
    import): its class name (``SD15``, ``SD20``, ``SDXL``, ...), or the class name as a string, or a
    ``unet_config`` dict (SD1.x/SD2.x/SDXL recognised by their context width and channels).
    Returns ``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, ``sdxl_refiner_v1-0`` or None (unknown: e.g.
    SSD-1B or a flow model, whose LoRAs no SD tool would load)."""
    if model_config is None:
        return None
    if isinstance(model_config, Mapping):
        return _base_model_from_unet_config(model_config)
    name = model_config if isinstance(model_config, str) else type(model_config).__name__
    return _CONFIG_CLASSES.get(name)


def _base_model_from_unet_config(cfg: Mapping) -> str | None:
    ctx, ch = cfg.get("context_dim"), cfg.get("model_channels")
    depth = list(cfg.get("transformer_depth") or [])
    if ch == 320 and ctx == 768 and not cfg.get("use_linear_in_transformer"):
        return "sd_v1"
    if ch == 320 and ctx == 1024 and cfg.get("adm_in_channels") is None:
        return "sd_v2"
    if ch == 320 and ctx == 2048 and cfg.get("adm_in_channels") == 2816 and depth == [0, 0, 2, 2, 10, 10]:
        return "sdxl_base_v1-0"
    if ch == 384 and ctx == 1280 and cfg.get("adm_in_channels") == 2560:
        return "sdxl_refiner_v1-0"
    return None


# -- writing --------------------------------------------------------------------------------------
def atomic_save(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None,
                overwrite: bool = False) -> str:
    """``safetensors`` ``save_file`` through a hidden temporary file in the same folder
    (:func:`training.safe_files.temp_path_for`; left-overs of saves killed mid-write in that
    folder are removed first).

    The temporary file is flushed to disk, then moved into place: with ``os.replace`` when
    ``overwrite``, else with ``os.link`` (atomic: fails if ``path`` appeared meanwhile). An
    interruption leaves either the old file or the complete new one, never a truncated file.
    Raises FileExistsError when ``path`` exists and ``overwrite`` is False. Returns ``path``.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    safe_files.remove_leftovers(folder)  # temporary files of saves killed mid-write
    tmp = safe_files.temp_path_for(path)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a models folder is shared: plain umask permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # no-clobber
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
            except OSError:  # a filesystem without hard links
                if os.path.exists(path):
                    raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
                os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        safe_files.release_temp(tmp)
    return path


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def metadata_value(value) -> str:
    """A metadata value as a string: bools ``true``/``false``, containers JSON, integral floats
    without ``.0`` (``3.0`` -> ``"3"``), other floats as the shortest exact repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return metadata_value(value.item())
    return str(value)


def _metadata_strings(metadata: Mapping | None) -> dict:
    return {str(k): metadata_value(v) for k, v in (metadata or {}).items() if v is not None}


def draft_metadata(settings: Mapping) -> dict:
    """Training settings as ``draft_<key>`` metadata strings (keys already prefixed stay as they
    are; lists such as prompts become JSON; None values are left out)."""
    return {(k if str(k).startswith("draft_") else f"draft_{k}"): metadata_value(v)
            for k, v in settings.items() if v is not None}


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file (e.g. the base checkpoint, for ``draft_base_model_sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def _cast_factor(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = t.detach().to(device="cpu", dtype=torch.float32).to(dtype).contiguous()
    if not torch.isfinite(out).all():
        problem = "is not finite" if not torch.isfinite(t.detach()).all() else f"overflows {dtype}"
        raise LoRAFileError(f"LoRA factor {what} {problem}; refusing to write it")
    return out


def _factors(delta: LoRADelta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` in kohya's layout: 4-D for conv weights, 2-D for Linear weights."""
    down, up = delta.down, delta.up
    if len(delta.weight_shape) == 4:
        down = down.reshape(delta.rank, *delta.weight_shape[1:])
        up = up.reshape(delta.weight_shape[0], delta.rank, 1, 1)
    return down, up


def _check_alpha(name: str, alpha: float) -> None:
    if not math.isfinite(alpha):
        raise LoRAFileError(f"LoRA layer {name!r} has a non-finite alpha {alpha}")


def kohya_state_dict(lora: LoRASet, name_map: Mapping[str, str] | None,
                     dtype: torch.dtype = torch.float16) -> dict:
    """The kohya-format tensors of ``lora`` (see the module docstring); factors in ``dtype``
    (float16, bfloat16 or float32), alphas always 0-dim float32."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LoRA factors are stored as float16, bfloat16 or float32, not {dtype}")
    sd = {}
    for name, path in _export_names(lora, name_map):
        delta = lora[name]
        key = kohya_name(path)
        if f"{key}.alpha" in sd:
            raise LoRAFileError(f"two LoRA layers map to the same kohya key {key!r}")
        _check_alpha(name, delta.alpha)
        down, up = _factors(delta)
        sd[f"{key}.lora_down.weight"] = _cast_factor(down, dtype, f"{name}.down")
        sd[f"{key}.lora_up.weight"] = _cast_factor(up, dtype, f"{name}.up")
        sd[f"{key}.alpha"] = torch.tensor(float(delta.alpha), dtype=torch.float32)
    if not sd:
        raise LoRAFileError("the LoRA has no layers; nothing to write")
    return sd


def _uniform(values: Iterable) -> str:
    values = set(values)
    return metadata_value(values.pop()) if len(values) == 1 else "Dynamic"


def kohya_metadata(lora: LoRASet, base_model: str | None = None, extra: Mapping | None = None, *,
                   v_prediction: bool | None = None, title: str | None = None,
                   date: str | None = None, name_map: Mapping[str, str] | None = None) -> dict:
    """The safetensors metadata of a kohya file (all strings).

    Computed: ``ss_network_module`` (:func:`network_module`), ``ss_network_dim`` /
    ``ss_network_alpha`` (the rank/alpha, ``Dynamic`` when layers differ),
    ``ss_base_model_version``, ``ss_v2``, ``modelspec.sai_model_spec`` ``1.0.0``,
    ``modelspec.architecture``/``implementation`` (see :func:`base_model_entry`),
    ``modelspec.title``, ``modelspec.date`` (ISO 8601, now unless given).
    ``extra`` (e.g. :func:`draft_metadata`) may override anything but the ``ss_network_*`` keys,
    which always describe the tensors. Alphas float32 cannot hold exactly are kept in
    ``draft_alpha_exact`` (JSON ``{kohya module: repr(alpha)}``) so a resume is exact.
    """
    deltas = [d for _, d in lora.items()]
    meta = {
        "ss_network_module": DEFAULT_NETWORK_MODULE,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title or "DRaFT LoRA",
        "modelspec.date": date or datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    extra = _metadata_strings(extra)
    requested = extra.get("ss_base_model_version", base_model)
    if requested in BASE_MODELS or requested == "sd_v2":  # an alias such as sd_v2_768_v
        base_model = requested
    entry = base_model_entry(base_model, v_prediction)
    if entry is not None:
        version, architecture, implementation = entry
        meta["ss_base_model_version"] = version
        meta["modelspec.architecture"] = architecture
        meta["modelspec.implementation"] = implementation
        meta["ss_v2"] = "True" if entry[0] == "sd_v2" else "False"
        extra.pop("ss_base_model_version", None)
    elif base_model:
        meta["ss_base_model_version"] = base_model
    meta.update(extra)
    meta["ss_network_module"] = network_module(base_model)
    meta["ss_network_dim"] = _uniform(d.rank for d in deltas) if deltas else "0"
    meta["ss_network_alpha"] = _uniform(float(d.alpha) for d in deltas) if deltas else "0"
    exact = {}
    for name, path in _export_names(lora, name_map):
        alpha = float(lora[name].alpha)
        if float(torch.tensor(alpha, dtype=torch.float32)) != alpha:
            exact[kohya_name(path)] = repr(alpha)
    meta.pop(EXACT_ALPHA_KEY, None)
    if exact:
        meta[EXACT_ALPHA_KEY] = json.dumps(exact)
    return meta


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
            are stringified by :func:`metadata_value`.
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
        _check_alpha(name, delta.alpha)
        down, up = _factors(delta)
        up = up.detach().float() * delta.scale
        slices = [(target, 0, up.shape[0])] if isinstance(target, str) else list(target)
        covered = sorted((int(o), int(o) + int(n)) for _, o, n in slices)
        if covered[0][0] != 0 or covered[-1][1] != up.shape[0] or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise LoRAFileError(f"the diffusers slices of {name!r} do not tile its {up.shape[0]} rows")
        for path, offset, rows in slices:
            part = up[int(offset): int(offset) + int(rows)]
            # own storage per slice: safetensors refuses tensors that share memory
            sd[f"{prefix}.{path}.lora_A.weight"] = _cast_factor(down, dtype, f"{name}.down").clone()
            sd[f"{prefix}.{path}.lora_B.weight"] = _cast_factor(part, dtype, f"{name}.up * alpha/rank").clone()
    return sd


def save_diffusers_folder(folder: str, lora: LoRASet, name_map: Mapping[str, object],
                          metadata: Mapping | None = None, dtype: torch.dtype = torch.float32,
                          overwrite: bool = False, prefix: str = "unet") -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` (:func:`diffusers_state_dict`), which
    ``pipeline.load_lora_weights(folder)`` reads directly; returns ``folder``.

    ``metadata`` (e.g. ``draft_*`` settings) is stored as strings beside ``format: pt``; the
    ``ss_network_*`` keys are left out (alpha is folded into the factors here).
    """
    meta = {k: v for k, v in _metadata_strings(metadata).items() if not k.startswith("ss_network")}
    meta["format"] = "pt"
    atomic_save(diffusers_state_dict(lora, name_map, dtype, prefix),
                os.path.join(folder, DIFFUSERS_WEIGHT_NAME), meta, overwrite)
    return folder


# -- reading --------------------------------------------------------------------------------------
def read_safetensors(path: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file on the CPU; LoRAFileError if it is truncated,
    corrupt or not safetensors; FileNotFoundError if it does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    name = os.path.basename(path)
    try:
        with safe_open(path, "pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LoRAFileError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata


_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def _split_key(key: str, file: str) -> tuple[str, str, str]:
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


def _resolver(name_map: Mapping[str, str] | None, candidates: list[str] | None):
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
        style, stem, part = _split_key(key, source)
        styles.add(style)
        parts.setdefault((style, stem), {})[part] = value
    if "kohya" in styles and candidates is None:
        raise LoRAFileError(f"{source}: kohya keys name modules with '_' for '.'; pass the name map "
                            "or the layer shapes to resolve them")
    resolve = _resolver(name_map, candidates)
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


# The resume side file (optimizer state, step count) lives in lora_resume (which imports this
# module); its functions are reachable here too, resolved on first use (PEP 562).
_RESUME_NAMES = ("STATE_SUFFIX", "state_path_for", "param_names", "lora_digest",
                 "save_training_state", "load_training_state")


def __getattr__(name: str):
    if name in _RESUME_NAMES:
        from . import lora_resume
        return getattr(lora_resume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LoRAFileError", "KOHYA_PREFIX", "DIFFUSERS_WEIGHT_NAME", "BASE_MODELS", "ARCHITECTURES",
    "NETWORK_MODULES", "network_module",
    "kohya_name", "base_model_entry", "base_model_version_from_config", "atomic_save",
    "metadata_value", "draft_metadata", "sha256_file", "kohya_state_dict", "kohya_metadata",
    "save_kohya", "diffusers_state_dict", "save_diffusers_folder", "read_safetensors",
    "lora_from_state_dict", "load_kohya", "STATE_SUFFIX", "state_path_for", "param_names",
    "lora_digest", "save_training_state", "load_training_state",
]
