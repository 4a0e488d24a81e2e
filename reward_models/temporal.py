"""Temporal consistency of a video: how alike its consecutive frames are. A whole-video reward
(``scores_videos``): it needs each video's frames together, in order, 2 or more of them.

``score = mean over i of sim(frame_i, frame_i+1)`` over the video's frames (those the trainer
scores: DRaFT Video Settings' ``reward_frames`` / ``frame_pick``; consecutive among those), with

* an image encoder (a CLIP vision tower, or another reward's own, ``image_embeddings``): the
  cosine similarity of the frames' embeddings, in [-1, 1] (1: frames the encoder cannot tell
  apart); semantic consistency: the subject stays the same subject;
* without one, pixels: ``1 - mean |frame_i+1 - frame_i|`` over pixels and channels (frames in
  [0, 1]), in [0, 1] (1: identical frames); every change counts, motion included.

Higher is more consistent. Its use is as a flicker penalty beside an image reward in Combine: a
positive weight ``w`` on consistency is a penalty of ``w`` on inconsistency (``1 - consistency``;
the constant changes nothing, and Combine's standardisation removes it anyway); a negative weight
would reward change. Alone it would reward a still video. Prompt-independent.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardModel, module_device_dtype
from .preprocess import ImageTransform


class TemporalConsistencyReward(RewardModel):
    """See the module docstring.

    Args:
        image_encoder: normalised pixels (b, 3, S, S) -> (b, D) embeddings (e.g. ComfyUI's
            CLIP_VISION through ``OutputSelectingEncoder``), with ``transform`` (the encoder's
            resize, crop and normalisation); differentiable.
        embeddings_of: a reward whose ``image_embeddings`` (its own image encoder, with its own
            preprocessing) are used instead.
        Neither: pixels.
        chunk_size: frames scored per forward pass (whole videos: at least one video).
    """

    name = "temporal"
    needs_prompts = False
    scores_videos = True

    def __init__(self, image_encoder: nn.Module | None = None, transform: ImageTransform | None = None,
                 embeddings_of: RewardModel | None = None, chunk_size: int | None = None):
        super().__init__(chunk_size)
        if image_encoder is not None and embeddings_of is not None:
            raise ValueError(f"{self.name}: give an image encoder or a reward to take embeddings "
                             "from, not both")
        if image_encoder is not None and transform is None:
            raise ValueError(f"{self.name}: an image encoder needs its transform")
        self.image_encoder = image_encoder
        self.transform = transform
        self.embeddings_of = embeddings_of
        self.freeze()

    @property
    def source(self) -> str:
        """What the similarity compares: ``image encoder``, the reward's name, or ``pixels``."""
        if self.image_encoder is not None:
            return "image encoder"
        return self.embeddings_of.name if self.embeddings_of is not None else "pixels"

    def image_embeddings(self, images: Tensor) -> Tensor | None:
        if self.embeddings_of is not None:
            return self.embeddings_of.image_embeddings(images)
        if self.image_encoder is None:
            return None
        device, dtype = module_device_dtype(self.image_encoder)
        pixels = self.transform(images.to(device, torch.float32)).to(dtype)
        return self.image_encoder(pixels).float()

    def score_videos(self, frames: Tensor, prompts: Sequence[str], frames_per_video: int) -> Tensor:
        if frames_per_video < 2:
            raise ValueError(
                f"{self.name}: temporal consistency compares consecutive frames of a video and "
                f"needs 2 or more frames per video, got {frames_per_video} (an image model, or "
                "DRaFT Video Settings' reward_frames = 1)")
        videos = frames.shape[0] // frames_per_video
        if self.image_encoder is None and self.embeddings_of is None:
            x = frames.float().reshape(videos, frames_per_video, -1)
            return 1.0 - (x[:, 1:] - x[:, :-1]).abs().mean(-1).mean(1)
        e = self.image_embeddings(frames)
        if e is None:
            raise ValueError(f"{self.name}: {self.embeddings_of.name} has no image encoder to take "
                             "embeddings from")
        e = F.normalize(e.float(), dim=-1).reshape(videos, frames_per_video, -1)
        return (e[:, 1:] * e[:, :-1]).sum(-1).mean(1).to(frames.device)


__all__ = ["TemporalConsistencyReward"]
