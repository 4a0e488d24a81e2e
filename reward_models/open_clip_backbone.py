"""open_clip CLIP models for the rewards: build an architecture, load a weights file strictly.

``architecture`` is an open_clip model name (``"ViT-H-14"``, ``"ViT-L-14-quickgelu"``, ...) or a
config dict of the same shape as open_clip's ``model_configs/*.json`` (``embed_dim``,
``vision_cfg``, ``text_cfg``, optional ``quick_gelu``/``custom_text``), e.g. a tiny one in tests.
Nothing is downloaded: weights come from the local file given.

The model is built on the meta device and the file's tensors are assigned into it (no random
initialisation of a billion parameters, no second copy in memory); the only non-persistent buffers
of open_clip CLIPs, the causal text ``attn_mask``, are rebuilt. Any other architecture is built
normally on the CPU and loaded by copy.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from .files import PublishedWeights, load_strict, load_weights, strip_prefix

Architecture = Union[str, Mapping[str, Any]]

_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def architecture_config(architecture: Architecture) -> dict:
    """A deep copy of the open_clip config dict for ``architecture`` (name or dict)."""
    import open_clip

    if isinstance(architecture, str):
        cfg = open_clip.get_model_config(architecture)
        if cfg is None:
            raise ValueError(f"Unknown open_clip architecture '{architecture}'. "
                             f"Known: {', '.join(open_clip.list_models()[:12])}, ...")
        return copy.deepcopy(cfg)
    return copy.deepcopy(dict(architecture))


def architecture_name(architecture: Architecture) -> str:
    """Human-readable name for error messages."""
    if isinstance(architecture, str):
        return f"open_clip {architecture}"
    cfg = dict(architecture)
    vision = cfg.get("vision_cfg", {})
    return (f"open_clip custom config (embed_dim={cfg.get('embed_dim')}, vision width="
            f"{vision.get('width')}, layers={vision.get('layers')}, image_size={vision.get('image_size')})")


def build_open_clip(architecture: Architecture, *, empty: bool = False) -> torch.nn.Module:
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` of ``architecture``; random weights, or
    uninitialised on the meta device with ``empty=True``."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = architecture_config(architecture)
    if "multimodal_cfg" in cfg:
        raise ValueError(f"{architecture_name(architecture)}: CoCa models are not supported as rewards")
    text_cfg, vision_cfg = cfg.setdefault("text_cfg", {}), cfg.setdefault("vision_cfg", {})
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    cls = CustomTextCLIP if custom_text else CLIP
    if empty:
        with torch.device("meta"):
            return cls(**cfg)
    return cls(**cfg)


def open_clip_tokenizer(architecture: Architecture):
    """open_clip's tokenizer for ``architecture``: ``tokenizer(list_of_str) -> (B, context) int64``.
    CLIP's BPE vocabulary ships inside open_clip, so no download is needed."""
    import open_clip

    if isinstance(architecture, str):
        return open_clip.get_tokenizer(architecture)
    text_cfg = dict(architecture).get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


def image_size_of(model: torch.nn.Module) -> int:
    """Square input size in pixels of an open_clip model's (or its visual tower's) image encoder."""
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _normalise_keys(state_dict: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    sd = strip_prefix(state_dict, "module.")
    for key in _JIT_EXTRAS + ("text.transformer.embeddings.position_ids",):
        sd.pop(key, None)
    scale = getattr(model, "logit_scale", None)
    if "logit_scale" in sd and scale is not None and sd["logit_scale"].ndim != scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(scale.shape)
    return sd


def _causal_mask(n: int) -> Tensor:
    return torch.full((n, n), float("-inf")).triu_(1)


def load_open_clip(path: str | os.PathLike, architecture: Architecture, spec: PublishedWeights | None = None,
                   *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build ``architecture`` and load the open_clip-format weights file ``path`` into it (strict).

    Accepts plain state dicts, ``{"state_dict": ...}`` checkpoints and a ``module.`` prefix.
    Returns the model in eval mode, frozen, in ``dtype`` on the CPU.
    """
    state_dict = load_weights(path, spec)
    name = architecture_name(architecture)
    source = f"'{os.path.basename(os.fspath(path))}'"
    model = build_open_clip(architecture, empty=True)
    persistent = set(model.state_dict())
    extra = {n: b for n, b in model.named_buffers() if n not in persistent}
    fast = all(n.rsplit(".", 1)[-1] == "attn_mask" and b.ndim == 2 for n, b in extra.items())
    if not fast:
        model = build_open_clip(architecture)
    load_strict(model, _normalise_keys(state_dict, model), name, source, assign=fast, dtype=dtype)
    if fast:
        for full_name, buf in extra.items():
            owner_name, _, leaf = full_name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner.register_buffer(leaf, _causal_mask(buf.shape[0]), persistent=False)
    model.to(dtype).eval().requires_grad_(False)
    return model
