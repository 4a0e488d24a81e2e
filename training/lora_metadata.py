"""What a LoRA file says about itself: safetensors metadata and the base-model facts behind it.

All values are strings (what kohya sd-scripts, A1111, Forge, ComfyUI and diffusers read):
``ss_network_module`` (``networks.lora``; the family's kohya network module for DiTs:
``networks.lora_flux``, ``networks.lora_sd3``, ``networks.lora_qwen_image``), ``ss_network_dim``,
``ss_network_alpha``, ``ss_base_model_version``, ``modelspec.*`` and the caller's training settings
(``draft_*``). :func:`kohya_metadata` builds them for a kohya file (:mod:`.lora_file`);
:data:`BASE_MODELS` / :data:`NETWORK_MODULES` hold the per-family spellings kohya's tools use.
Never imports ComfyUI: :func:`base_model_version_from_config` reads a ``model_config`` duck-typed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from typing import Iterable, Mapping

import torch

from .lora import LoRASet
from .lora_naming import export_names, kohya_name

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
    # Wan 2.1: musubi-tuner's wan_train_network.py writes architecture_full_name "wan"
    # (ARCHITECTURE_WAN_FULL), sai_model_spec's ARCH_WAN "wan2.1" + "/lora" and IMPL_WAN.
    # tests/test_kohya_tools.py checks these against kohya's / musubi's own code.
    "sd3_medium": ("medium", "stable-diffusion-3-medium/lora", "diffusers"),
    "sd3_5_medium": ("5-medium", "stable-diffusion-3-5-medium/lora", "diffusers"),
    "sd3_5_large": ("5-large", "stable-diffusion-3-5-large/lora", "diffusers"),
    "flux1_dev": ("flux1", "flux-1-dev/lora", _BFL_FLUX),
    "flux1_schnell": ("flux1", "flux-1-schnell/lora", _BFL_FLUX),
    "chroma": ("chroma", "chroma/lora", "https://huggingface.co/lodestones/Chroma"),
    "qwen_image": ("qwen_image", "Qwen-Image/lora", "https://github.com/QwenLM/Qwen-Image"),
    "wan21_t2v": ("wan", "wan2.1/lora", "https://github.com/Wan-Video/Wan2.1"),
    # Wan 2.2: musubi's wan_train_network.py writes the same for its Wan 2.2 tasks (t2v-A14B,
    # i2v-A14B: architecture "wan", ARCH_WAN "wan2.1"), so an A14B expert's LoRA (ComfyUI loads each
    # expert as WAN21_T2V) carries exactly that. musubi has no TI2V-5B task; its LoRAs fit no Wan
    # 2.1 model (3072 wide, 48 channels), so they take musubi's metadata with its own custom
    # architecture (--metadata_arch wan2.2-ti2v-5b: build_metadata's custom_arch + "/lora").
    "wan22_ti2v_5b": ("wan", "wan2.2-ti2v-5b/lora", "https://github.com/Wan-Video/Wan2.1"),
    # sd-scripts' lumina_train_network.py / hunyuan_image_train_network.py: model version
    # lumina_util.MODEL_VERSION_LUMINA_V2 "lumina2" / hunyuan_image_utils.MODEL_VERSION_2_1
    # "hunyuan-image-2.1"; sai_model_spec ARCH_LUMINA_2 / ARCH_HUNYUAN_IMAGE_2_1 + "/lora";
    # implementation IMPL_LUMINA, and "diffusers" for HunyuanImage (determine_implementation has
    # no HunyuanImage branch).
    "lumina2": ("lumina2", "lumina-2/lora", "https://github.com/Alpha-VLLM/Lumina-Image-2.0"),
    "hunyuan_image_2_1": ("hunyuan-image-2.1", "hunyuan-image-2.1/lora", "diffusers"),
}
ARCHITECTURES = {k: v[1] for k, v in BASE_MODELS.items()}
# base model -> ss_network_module: the --network_module kohya's trainer for that family runs and
# writes (sd-scripts train_network.py: "ss_network_module": args.network_module). FLUX/Chroma:
# networks.lora_flux (docs/flux_train_network.md); SD3: networks.lora_sd3, the module with MMDiT
# targets (sd3_minimal_inference.py reads only it; networks/lora.py finds no layer in an MMDiT,
# though docs/sd3_train_network.md's example names it); Qwen-Image: musubi-tuner's
# networks.lora_qwen_image (its trainer_base.py writes args.network_module; docs/qwen_image.md);
# Wan 2.1: musubi's networks.lora_wan (docs/wan.md).
# SD UNets: networks.lora.
NETWORK_MODULES = {
    "sd3_medium": "networks.lora_sd3", "sd3_5_medium": "networks.lora_sd3",
    "sd3_5_large": "networks.lora_sd3",
    "flux1_dev": "networks.lora_flux", "flux1_schnell": "networks.lora_flux", "chroma": "networks.lora_flux",
    "qwen_image": "networks.lora_qwen_image", "wan21_t2v": "networks.lora_wan",
    "wan22_ti2v_5b": "networks.lora_wan",
    "lumina2": "networks.lora_lumina", "hunyuan_image_2_1": "networks.lora_hunyuan_image",
}
DEFAULT_NETWORK_MODULE = "networks.lora"

# ComfyUI model_config class name -> base model (see base_model_version_from_config).
_CONFIG_CLASSES = {
    "SD15": "sd_v1", "SD15_instructpix2pix": "sd_v1",
    "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
    "SDXL": "sdxl_base_v1-0", "SDXL_instructpix2pix": "sdxl_base_v1-0",
    "SDXLRefiner": "sdxl_refiner_v1-0",
}


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


# -- metadata strings -----------------------------------------------------------------------------
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


def metadata_strings(metadata: Mapping | None) -> dict:
    """Every entry but the None ones, keys and values as strings (:func:`metadata_value`)."""
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
    extra = metadata_strings(extra)
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
    for name, path in export_names(lora, name_map):
        alpha = float(lora[name].alpha)
        if float(torch.tensor(alpha, dtype=torch.float32)) != alpha:
            exact[kohya_name(path)] = repr(alpha)
    meta.pop(EXACT_ALPHA_KEY, None)
    if exact:
        meta[EXACT_ALPHA_KEY] = json.dumps(exact)
    return meta


__all__ = [
    "EXACT_ALPHA_KEY", "BASE_MODELS", "ARCHITECTURES", "NETWORK_MODULES", "DEFAULT_NETWORK_MODULE",
    "base_model_entry", "network_module", "base_model_version_from_config", "metadata_value",
    "metadata_strings", "draft_metadata", "sha256_file", "kohya_metadata",
]
