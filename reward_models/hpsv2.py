"""HPSv2 / HPSv2.1 (Human Preference Score v2): Wu et al. 2023, https://github.com/tgxs002/HPSv2.

An open_clip ViT-H-14 fine-tuned on human preferences; published as ``HPS_v2_compressed.pt`` (v2.0)
and ``HPS_v2.1_compressed.pt`` (v2.1) on https://huggingface.co/xswu/HPSv2, the weights under the
key ``state_dict``. Score = cos(image_emb, text_emb), no logit scale: about 0.25 to 0.30 on
real weights (the benchmark reports it x100). Eval transform: longest side to 224 (bicubic), pad
with black to 224 x 224, OpenAI mean/std. Text: open_clip's tokenizer (the ``hpsv2`` pip package
is not used).
"""
from __future__ import annotations

import os

import torch

from .clip_score import ClipSimilarityReward
from .files import HPSV2
from .open_clip_backbone import Architecture, image_size_of, load_open_clip, open_clip_tokenizer
from .preprocess import ImageTransform


class HPSv2Reward(ClipSimilarityReward):
    """HPSv2 score (cosine in [-1, 1]; ~0.25-0.30 for real images) of (images, prompts)."""

    name = "hpsv2"


def load_hpsv2(path: str | os.PathLike, architecture: Architecture = "ViT-H-14", *,
               chunk_size: int | None = None, dtype: torch.dtype = torch.float32) -> HPSv2Reward:
    """HPSv2 from ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (or a safetensors copy).

    ``architecture`` defaults to the published one; tests pass a tiny open_clip config dict.
    """
    model = load_open_clip(path, architecture, HPSV2, dtype=dtype)
    transform = ImageTransform("pad", image_size_of(model))
    return HPSv2Reward(model, open_clip_tokenizer(architecture), transform, chunk_size=chunk_size)
