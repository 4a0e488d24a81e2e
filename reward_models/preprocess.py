"""Differentiable image preprocessing for the reward backbones, in pure torch.

Each published reward model was evaluated with a PIL/torchvision transform; these functions do the
same geometry on float tensors so gradients reach the decoded image:

- ``shortest_side_crop``: CLIP / open_clip / OpenAI eval transform and the HF ``CLIPImageProcessor``
  (Resize shortest side to ``size``, bicubic; CenterCrop ``size``; Normalize).
- ``longest_side_pad``: HPSv2's eval transform (``ResizeMaxSize``: longest side to ``size``,
  bicubic; pad with black to a square, fill 0 applied before Normalize).

Resizing is ``F.interpolate(mode="bicubic", antialias=True)``, PIL's filter, then clamped to [0, 1]
as PIL's uint8 output is. No PIL, no rounding of values, no uint8 on the gradient path: only output
*sizes* and crop *offsets* are rounded, each exactly as the reference transform rounds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CropOffset = Literal["round", "floor"]


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic antialiased resize of (B, C, H, W) floats to ``size`` = (h, w); clamped to [0, 1]."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision ``Resize(size)``: short side = size, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of HPSv2's ``ResizeMaxSize(size)``: long side = size, short side rounded."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def center_crop(images: Tensor, size: int, offset: CropOffset = "round") -> Tensor:
    """Square centre crop by slicing; images at least ``size`` on both sides.

    ``offset="round"``: torchvision ``CenterCrop`` (``int(round((H - size) / 2))``);
    ``offset="floor"``: the HF ``CLIPImageProcessor`` (``(H - size) // 2``).
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}")
    if offset == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    elif offset == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        raise ValueError(f"center_crop: offset must be 'round' or 'floor', got {offset!r}")
    return images[..., top:top + size, left:left + size]


def pad_to_square(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Pad (B, C, h, w) with ``fill`` to (size, size): left/top get the smaller half, as HPSv2 does."""
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"pad_to_square: image {h}x{w} is larger than {size}")
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel; mean/std of length C."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images - m) / s


def shortest_side_crop(images: Tensor, size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                       std: Sequence[float] = OPENAI_CLIP_STD, offset: CropOffset = "round") -> Tensor:
    """CLIP eval transform: (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised."""
    h, w = images.shape[-2:]
    images = resize(images, shortest_side_size(h, w, size))
    return normalize(center_crop(images, size, offset), mean, std)


def longest_side_pad(images: Tensor, size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                     std: Sequence[float] = OPENAI_CLIP_STD, fill: float = 0.0) -> Tensor:
    """HPSv2 eval transform: (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised, black padding."""
    h, w = images.shape[-2:]
    images = resize(images, longest_side_size(h, w, size))
    return normalize(pad_to_square(images, size, fill), mean, std)


@dataclass(frozen=True)
class ImageTransform:
    """A reward backbone's eval transform as data: ``mode`` "crop" (shortest side + centre crop) or
    "pad" (longest side + pad to square); ``size`` in pixels; ``mean``/``std`` per channel;
    ``crop_offset`` only for "crop". Calling it maps (B, 3, H, W) in [0, 1] to (B, 3, size, size)."""

    mode: Literal["crop", "pad"] = "crop"
    size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_offset: CropOffset = "round"

    def __call__(self, images: Tensor) -> Tensor:
        if self.mode == "crop":
            return shortest_side_crop(images, self.size, self.mean, self.std, self.crop_offset)
        if self.mode == "pad":
            return longest_side_pad(images, self.size, self.mean, self.std)
        raise ValueError(f"ImageTransform: mode must be 'crop' or 'pad', got {self.mode!r}")


OPEN_CLIP_EVAL = ImageTransform("crop", 224)                       # open_clip / OpenAI CLIP
HF_CLIP_PROCESSOR = ImageTransform("crop", 224, crop_offset="floor")  # PickScore's CLIPImageProcessor
HPSV2_EVAL = ImageTransform("pad", 224)                             # HPSv2 ResizeMaxSize + pad
