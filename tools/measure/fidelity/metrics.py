"""Reward, held-out judge, realism guard and sample grids.

All take images (B, 1, 16, 16) in [0, 1]:

* :class:`ClassifierReward` -- the training reward, ``log p_reward(target | image)`` (B,), in
  (-inf, 0], differentiable;
* :func:`judge_scores` -- the same quantity under the judge classifier (other seed, other split,
  never used in training) and the fraction the judge labels ``target``;
* :func:`nn_distance` -- the realism guard: for each image, the RMS pixel distance (in [0, 1] units)
  to its nearest real digit of the judge split (any class). Real held-out digits score about 0.1;
  patterns that fool a classifier without looking like a digit score higher.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ClassifierReward:
    """``(images (B,1,16,16) in [0,1], prompts) -> log p(target | image)`` (B,), differentiable."""

    def __init__(self, classifier, target: int):
        self.classifier = classifier
        self.target = int(target)

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return F.log_softmax(self.classifier(images), dim=1)[:, self.target]


@torch.no_grad()
def judge_scores(judge, images: torch.Tensor, target: int) -> dict:
    """``{"judge_logp": mean log p_judge(target), "judge_frac": fraction argmax == target}``."""
    logits = judge(images)
    logp = F.log_softmax(logits, dim=1)[:, target]
    return {"judge_logp": float(logp.mean()),
            "judge_frac": float((logits.argmax(1) == target).float().mean())}


@torch.no_grad()
def nn_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) RMS distance from each image to its nearest image in ``reference`` (M,1,16,16)."""
    a = images.flatten(1)
    b = reference.flatten(1)
    d2 = (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)
    return (d2.min(dim=1).values / a.shape[1]).sqrt()


def grid_image(images: torch.Tensor, cols: int = 8, scale: int = 4, pad: int = 2) -> Image.Image:
    """Tile images (N,1,H,W) in [0,1] into a grayscale PIL image, ``scale``x nearest upsampling."""
    imgs = images.detach().float().clamp(0, 1).cpu().numpy()[:, 0]
    n, h, w = imgs.shape
    rows = (n + cols - 1) // cols
    H, W = h * scale, w * scale
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad), 128, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        tile = np.kron(im, np.ones((scale, scale))) * 255
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[y:y + H, x:x + W] = tile.astype(np.uint8)
    return Image.fromarray(canvas, mode="L")
