"""Weighted combination of rewards: ``score = sum_i w_i * s_i`` (negative weights allowed).

With ``standardize=True`` each component is replaced by ``(s_i - mean_i) / sqrt(var_i + eps)``,
where ``mean_i``/``var_i`` are running statistics (exponential moving averages over batches,
``momentum`` = weight kept by the old value, default 0.9, i.e. roughly the last 10 batches) updated
without gradient *before* standardising the batch; they are constants for autograd, so
``d score / d images = sum_i w_i / sqrt(var_i + eps) * d s_i / d images``. Weights then express
importance in units of each reward's recent spread. Batch standardisation is deliberately not
offered: centring by the batch's own mean makes the batch-mean reward constant and kills the
training gradient. Set ``track_stats = False`` to freeze the statistics (e.g. for evaluation).

Videos: when a component scores whole videos (``scores_videos``: temporal consistency) the
combination does too: every component is called with ``frames_per_video`` (image rewards give
each video's mean over its frames), so each component's score, its running statistics and the
weighted sum are per video. A negative weight on such a component makes it a penalty.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import RewardModel


class CombinedReward(RewardModel):
    """Weighted sum of rewards; ``last_scores`` holds each component's raw (B,) scores, detached."""

    name = "combined"

    def __init__(self, rewards: Sequence[RewardModel], weights: Sequence[float] | None = None, *,
                 standardize: bool = False, momentum: float = 0.9, eps: float = 1e-6,
                 chunk_size: int | None = None):
        super().__init__(chunk_size)
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"CombinedReward: {len(weights)} weights for {len(rewards)} rewards")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CombinedReward: momentum must be in [0, 1), got {momentum}")
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights
        self.standardize = standardize
        self.momentum = momentum
        self.eps = eps
        self.track_stats = True
        self.register_buffer("running_mean", torch.zeros(len(rewards)))
        self.register_buffer("running_var", torch.ones(len(rewards)))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.component_names = _unique([r.name for r in rewards])
        self.last_scores: dict[str, Tensor] = {}
        self._deferred: list | None = None  # component scores awaiting one stats update

    def _begin_deferred_stats(self) -> None:
        self._deferred = []

    def _end_deferred_stats(self) -> None:
        collected, self._deferred = self._deferred, None
        if collected:
            self.update_stats(torch.cat(collected))

    @property
    def needs_prompts(self) -> bool:  # type: ignore[override]
        return any(r.needs_prompts for r in self.rewards)

    @property
    def scores_videos(self) -> bool:  # type: ignore[override]
        return any(r.scores_videos for r in self.rewards)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def image_embeddings(self, images: Tensor) -> Tensor | None:
        """The first component's that has an image encoder."""
        for r in self.rewards:
            e = r.image_embeddings(images)
            if e is not None:
                return e
        return None

    @torch.no_grad()
    def update_stats(self, scores: Tensor) -> None:
        """Fold a (B, n) batch of component scores into the running mean/variance."""
        scores = scores.to(self.running_mean.device, torch.float32)
        batch_mean = scores.mean(0)
        batch_var = scores.var(0, unbiased=False) if scores.shape[0] > 1 else None
        if int(self.num_batches) == 0:
            self.running_mean.copy_(batch_mean)
            if batch_var is not None:
                self.running_var.copy_(batch_var)
        else:
            m = self.momentum
            delta = batch_mean - self.running_mean
            self.running_mean.add_((1 - m) * delta)
            spread = batch_var if batch_var is not None else torch.zeros_like(delta)
            self.running_var.copy_(m * (self.running_var + (1 - m) * delta ** 2) + (1 - m) * spread)
        self.num_batches += 1

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self._combine(torch.stack([r(images, prompts) for r in self.rewards], dim=1))

    def score_videos(self, frames: Tensor, prompts: Sequence[str], frames_per_video: int) -> Tensor:
        return self._combine(torch.stack([r(frames, prompts, frames_per_video=frames_per_video)
                                          for r in self.rewards], dim=1))

    def _combine(self, parts: Tensor) -> Tensor:
        """(b, n) float32 component scores -> (b,) weighted (standardised) sum."""
        self.last_scores = {n: parts[:, i].detach() for i, n in enumerate(self.component_names)}
        if self.standardize:
            if self.track_stats and self._deferred is not None:
                self._deferred.append(parts.detach())
            elif self.track_stats:
                self.update_stats(parts.detach())
            mean = self.running_mean.to(parts.device)
            std = (self.running_var.to(parts.device) + self.eps).sqrt()
            parts = (parts - mean) / std
        weights = torch.tensor(self.weights, device=parts.device, dtype=parts.dtype)
        return (parts * weights).sum(1)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
