"""Simple image statistics as rewards: no files, prompt-independent, computed in float32.

All on images in [0, 1] with luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (Rec. 601):

- ``brightness``: mean Y, in [0, 1].
- ``saturation``: mean chroma ``max(R,G,B) - min(R,G,B)``, in [0, 1] (0 for greys).
- ``contrast``: standard deviation of Y over the image, in [0, 0.5].
- ``sharpness``: mean |4-neighbour Laplacian of Y| over interior pixels, in [0, 4] (natural images
  about 0.01 to 0.1; rises with fine detail and noise).

With ``target`` set the score is ``-|stat - target|`` (highest, 0, at the target), otherwise the
statistic itself. ``weight`` multiplies the score (negative to minimise a statistic).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import RewardModel

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Rec. 601 luma."""
    w = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def brightness(images: Tensor) -> Tensor:
    """(B,) mean luminance in [0, 1]."""
    return luminance(images).mean((1, 2, 3))


def saturation(images: Tensor) -> Tensor:
    """(B,) mean chroma (max - min over RGB) in [0, 1]."""
    return (images.amax(1) - images.amin(1)).mean((1, 2))


def contrast(images: Tensor) -> Tensor:
    """(B,) standard deviation of luminance in [0, 0.5]."""
    return luminance(images).flatten(1).std(1, unbiased=False)


def sharpness(images: Tensor) -> Tensor:
    """(B,) mean absolute Laplacian of luminance over interior pixels, in [0, 4]."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
                          device=images.device, dtype=images.dtype).view(1, 1, 3, 3)
    return F.conv2d(luminance(images), kernel).abs().mean((1, 2, 3))


STATISTICS: dict[str, Callable[[Tensor], Tensor]] = {
    "brightness": brightness, "saturation": saturation, "contrast": contrast, "sharpness": sharpness,
}


class ImageStatReward(RewardModel):
    """One of ``STATISTICS`` as a reward: the statistic, or ``-|stat - target|``, times ``weight``."""

    needs_prompts = False

    def __init__(self, statistic: str = "brightness", target: float | None = None, weight: float = 1.0,
                 chunk_size: int | None = None):
        super().__init__(chunk_size)
        if statistic not in STATISTICS:
            raise ValueError(f"Unknown image statistic {statistic!r}; choose from {sorted(STATISTICS)}")
        self.statistic = statistic
        self.name = statistic
        self.target = target
        self.weight = weight

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        value = STATISTICS[self.statistic](images.float())
        if self.target is not None:
            value = -(value - self.target).abs()
        return value * self.weight
