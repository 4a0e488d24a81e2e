"""The digits: scikit-learn's ``load_digits`` upsampled to 16x16, in three disjoint splits.

Images are float32 (N, 1, 16, 16) in [-1, 1] (the denoiser's space); ``to_unit`` maps them to
[0, 1] (what the reward and the guards see). The splits are fixed by a seed:

* ``denoiser``: what the diffusion model learns from (60 %);
* ``reward``: what the reward classifier learns from (20 %), never seen by the denoiser;
* ``judge``: what the judge classifier and the realism guard's reference set come from (20 %),
  seen by neither the denoiser nor the reward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (differentiable inside the range)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


@dataclass
class Split:
    """Images (N, 1, 16, 16) in [-1, 1] and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def load_digits_16(size: int = SIZE) -> Split:
    """All 1,797 digits, bilinearly upsampled from 8x8 to ``size`` x ``size``, in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return Split(images=x * 2.0 - 1.0, labels=torch.tensor(d.target, dtype=torch.long))


def splits(seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict:
    """``{"denoiser", "reward", "judge"}`` -> :class:`Split`, disjoint, stratified by label."""
    data = load_digits_16()
    rng = np.random.default_rng(seed)
    parts = {name: [] for name in ("denoiser", "reward", "judge")}
    labels = data.labels.numpy()
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        a = int(round(fractions[0] * len(idx)))
        b = a + int(round(fractions[1] * len(idx)))
        parts["denoiser"] += idx[:a].tolist()
        parts["reward"] += idx[a:b].tolist()
        parts["judge"] += idx[b:].tolist()
    out = {}
    for name, idx in parts.items():
        idx = torch.tensor(sorted(idx))
        out[name] = Split(images=data.images[idx], labels=data.labels[idx])
    return out
