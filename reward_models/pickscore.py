"""PickScore_v1: Kirstain et al. 2023, https://huggingface.co/yuvalkirstain/PickScore_v1.

A CLIP-ViT-H-14 fine-tuned on Pick-a-Pic preferences, published in transformers format (a folder
with ``config.json`` and ``model.safetensors``). Score = ``logit_scale.exp() * cos(image, text)``
(about 20 to 23 on real weights). Eval transform: the ``CLIP-ViT-H-14-laion2B-s32B-b79K`` processor
(shortest side 224 bicubic, centre crop 224 with the HF floor offset, OpenAI mean/std).

Text uses open_clip's tokenizer: the same CLIP BPE vocabulary and lower-casing as ``CLIPTokenizer``,
padded with 0 to 77 tokens. CLIP's text tower is causal and pools at the end-of-text token, so the
padding after it does not change the embedding. ``transformers`` is imported only by the loader.
"""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from .base import RewardModel
from .clip_score import ClipSimilarityReward
from .files import (PICKSCORE, MissingWeightsFileError, RewardModelFileError, check_state_dict,
                    load_weights, require_path, strip_prefix)
from .open_clip_backbone import Architecture, image_size_of, load_open_clip, open_clip_tokenizer
from .preprocess import HF_CLIP_PROCESSOR, ImageTransform

HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")

# transformers CLIPConfig of CLIP-ViT-H-14 (PickScore_v1's architecture), used for a lone weights
# file with no config.json beside it.
PICKSCORE_CONFIG = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-5},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "image_size": 224, "patch_size": 14,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5},
}


class PickScoreReward(ClipSimilarityReward):
    """PickScore of (images, prompts): ``logit_scale.exp() * cos`` with a transformers ``CLIPModel``
    (its pooled tower outputs through ``visual_projection`` / ``text_projection``)."""

    name = "pickscore"

    def __init__(self, model: torch.nn.Module, tokenizer, transform: ImageTransform = HF_CLIP_PROCESSOR,
                 chunk_size: int | None = None):
        super().__init__(model, tokenizer, transform, use_logit_scale=True, chunk_size=chunk_size)

    def image_features(self, pixels: Tensor) -> Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, tokens: Tensor) -> Tensor:
        pooled = self.model.text_model(input_ids=tokens).pooler_output
        return self.model.text_projection(pooled)


class OpenClipPickScoreReward(ClipSimilarityReward):
    """PickScore from an open_clip conversion of PickScore_v1 (same score and transform)."""

    name = "pickscore"


def load_pickscore(path: str | os.PathLike, *, config: dict | None = None,
                   open_clip_architecture: Architecture = "ViT-H-14", chunk_size: int | None = None,
                   dtype: torch.dtype = torch.float32) -> RewardModel:
    """PickScore from ``path``:

    - a transformers folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``);
    - a lone transformers-format weights file (keys ``text_model.*``), with ``config`` (a CLIPConfig
      dict), else the ``config.json`` beside it, else ``PICKSCORE_CONFIG``;
    - an open_clip-format conversion (keys ``visual.*``) of ``open_clip_architecture``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise MissingWeightsFileError(f"PickScore_v1: file 'config.json' not found in folder "
                                          f"'{os.path.abspath(path)}' (a transformers CLIPModel folder). "
                                          f"Its authors publish it at {PICKSCORE.source}.")
        weights = next((os.path.join(path, n) for n in HF_WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))), None)
        if weights is None:
            raise MissingWeightsFileError(f"PickScore_v1: none of {list(HF_WEIGHT_NAMES)} found in folder "
                                          f"'{os.path.abspath(path)}'. Its authors publish model.safetensors "
                                          f"at {PICKSCORE.source}.")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        return _load_transformers(weights, config, chunk_size, dtype)
    require_path(path, PICKSCORE)
    state_dict = load_weights(path, PICKSCORE)
    keys = strip_prefix(state_dict, "module.")
    if any(k.startswith("text_model.") for k in keys):
        if config is None:
            sibling = os.path.join(os.path.dirname(path), "config.json")
            if os.path.isfile(sibling):
                with open(sibling, encoding="utf-8") as f:
                    config = json.load(f)
        return _load_transformers(path, config or PICKSCORE_CONFIG, chunk_size, dtype, state_dict)
    model = load_open_clip(path, open_clip_architecture, PICKSCORE, dtype=dtype)
    transform = ImageTransform("crop", image_size_of(model), crop_offset="floor")
    return OpenClipPickScoreReward(model, open_clip_tokenizer(open_clip_architecture), transform,
                                   use_logit_scale=True, chunk_size=chunk_size)


def _load_transformers(weights: str, config: dict, chunk_size, dtype, state_dict=None) -> PickScoreReward:
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RewardModelFileError("PickScore in transformers format needs the transformers package "
                                   "(ComfyUI installs it).") from exc
    import open_clip

    clip_config = CLIPConfig.from_dict(dict(config))
    state_dict = strip_prefix(load_weights(weights, PICKSCORE) if state_dict is None else state_dict, "module.")
    with torch.device("meta"):
        expected = CLIPModel(clip_config).state_dict()
    for key in [k for k in state_dict if k.endswith("position_ids") and k not in expected]:
        state_dict.pop(key)  # persistent buffers in old transformers, not in new
    architecture = (f"transformers CLIPModel (vision {clip_config.vision_config.hidden_size} x "
                    f"{clip_config.vision_config.num_hidden_layers} layers, text "
                    f"{clip_config.text_config.hidden_size} x {clip_config.text_config.num_hidden_layers})")
    check_state_dict(expected, state_dict, architecture, f"'{os.path.basename(weights)}'")
    import transformers

    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, info = CLIPModel.from_pretrained(None, config=clip_config, state_dict=state_dict,
                                            output_loading_info=True, **{dtype_arg: dtype})
    problems = {k: v for k, v in info.items() if v}
    if problems:  # pragma: no cover - check_state_dict catches these first
        raise RewardModelFileError(f"'{os.path.basename(weights)}' did not load cleanly into {architecture}: {problems}")
    model.to(dtype).eval().requires_grad_(False)
    tokenizer = open_clip.SimpleTokenizer(context_length=clip_config.text_config.max_position_embeddings)
    size = clip_config.vision_config.image_size
    return PickScoreReward(model, tokenizer, ImageTransform("crop", size, crop_offset="floor"), chunk_size)
