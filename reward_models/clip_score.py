"""CLIP score: cosine similarity of an open_clip model's image and prompt embeddings.

Score = cos(image_emb, text_emb), unitless in [-1, 1] (about 0.2 to 0.35 for matching pairs on real
CLIPs). It is *not* multiplied by 100 nor clamped at 0 as torchmetrics' CLIPScore is: the clamp
would zero the gradient of poorly matching samples, and the unit matches HPSv2's. Multiply by 100
to compare with CLIPScore numbers where the cosine is positive.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import RewardModel
from .open_clip_backbone import Architecture, image_size_of, load_open_clip, open_clip_tokenizer
from .files import PublishedWeights
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform


class ClipSimilarityReward(RewardModel):
    """Image-prompt similarity with a two-tower CLIP model.

    ``score = scale * cos(image_emb, text_emb)`` where ``scale`` is 1, or ``logit_scale.exp()`` of
    the model when ``use_logit_scale`` (PickScore's convention). The image tower runs in the model's
    dtype with gradients; the text tower runs without gradients (prompts are constants); the cosine
    is taken in float32. The towers are open_clip's ``encode_image``/``encode_text``; a subclass for
    another model layout overrides :meth:`image_features` / :meth:`text_features`.
    """

    name = "clip_score"
    needs_prompts = True

    def __init__(self, model: torch.nn.Module, tokenizer, transform: ImageTransform,
                 use_logit_scale: bool = False, chunk_size: int | None = None):
        super().__init__(chunk_size)
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.use_logit_scale = use_logit_scale
        self.freeze()

    def encode_images(self, images: Tensor) -> Tensor:
        """(b, 3, H, W) in [0, 1] -> (b, D) L2-normalised float32 embeddings (with grad)."""
        pixels = self.transform(images.to(self.device, torch.float32)).to(self.dtype)
        return F.normalize(self.image_features(pixels).float(), dim=-1)

    def image_embeddings(self, images: Tensor) -> Tensor:
        return self.encode_images(images)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """b prompts -> (b, D) L2-normalised float32 embeddings (no grad)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.text_features(tokens).float(), dim=-1)

    def image_features(self, pixels: Tensor) -> Tensor:
        """Normalised pixels -> (b, D) image embeddings, not yet L2-normalised."""
        return self.model.encode_image(pixels)

    def text_features(self, tokens: Tensor) -> Tensor:
        """Token ids -> (b, D) text embeddings, not yet L2-normalised."""
        return self.model.encode_text(tokens)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        cos = (self.encode_images(images) * self.encode_prompts(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.float().exp().reshape(())
        return cos


class ClipScoreReward(ClipSimilarityReward):
    """CLIP score (cosine, unit-free, in [-1, 1]) with any open_clip architecture."""

    name = "clip_score"


def load_clip_score(path: str | os.PathLike, architecture: Architecture = "ViT-L-14-quickgelu", *,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    resize_mode: str = "crop", spec: PublishedWeights | None = None,
                    chunk_size: int | None = None, dtype: torch.dtype = torch.float32) -> ClipScoreReward:
    """CLIP score from an open_clip-format weights file (``.safetensors``/``.bin``/``.pt``).

    ``architecture``: open_clip name or config dict the file must fit (e.g. ``"ViT-L-14-quickgelu"``
    for OpenAI's weights, ``"ViT-H-14"`` for laion2B-s32B-b79K). ``mean``/``std``/``resize_mode``
    ("crop" or "pad") describe the model's eval transform; the OpenAI constants suit OpenAI and
    LAION CLIPs (SigLIP-style models use mean = std = 0.5).
    """
    model = load_open_clip(path, architecture, spec, dtype=dtype)
    transform = ImageTransform(resize_mode, image_size_of(model), tuple(mean), tuple(std))
    return ClipScoreReward(model, open_clip_tokenizer(architecture), transform, chunk_size=chunk_size)
