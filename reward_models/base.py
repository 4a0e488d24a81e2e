"""The reward interface every reward model implements.

``reward(images, prompts) -> scores``: images (B, 3, H, W) float in [0, 1], any size, device and
dtype; prompts a list of B strings (ignored by prompt-independent rewards, which also accept None);
scores (B,) float32 on the images' device, higher is better, differentiable w.r.t. the images.

Subclasses implement ``score(images, prompts)`` on one chunk; ``forward`` validates, splits the
batch into chunks of at most ``chunk_size`` images (None = all at once) and concatenates.

Videos: ``reward(frames, prompts, frames_per_video=F) -> (B,)`` scores ``B`` videos whose ``F``
frames each are consecutive images of ``frames`` (B*F, 3, H, W), video ``b``'s at
``b*F ... b*F+F-1``, with one prompt per video. An image reward scores every frame with its
video's prompt and returns each video's mean. A reward that scores whole videos (temporal
consistency) says so with ``scores_videos = True`` and implements ``score_videos(frames, prompts,
F)`` on whole videos (chunks of whole videos, at most ``chunk_size`` frames but at least one
video); it cannot score single images: called without ``frames_per_video`` it refuses. Callers
that hold any reward callable (the trainer) use ``scores_videos`` to know which call to make. A reward
is frozen: its parameters never require grad and it always stays in eval mode (``train()`` does not
switch dropout on), so it is a deterministic function of the images.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor


class RewardModel(torch.nn.Module):
    """Base class: differentiable, frozen, chunked reward. See the module docstring."""

    name: str = "reward"
    needs_prompts: bool = False
    scores_videos: bool = False  # True: scores whole videos only (see the module docstring)

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        self.chunk_size = chunk_size
        super().train(False)

    # -- interface -----------------------------------------------------------------------------
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(b, 3, H, W) images of one chunk (caller's device/dtype) -> (b,) scores."""
        raise NotImplementedError

    def score_videos(self, frames: Tensor, prompts: Sequence[str], frames_per_video: int) -> Tensor:
        """(b*F, 3, H, W) frames of ``b`` whole videos of one chunk -> (b,) scores (rewards with
        ``scores_videos`` only)."""
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str] | str | None = None,
                frames_per_video: int | None = None) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        batch = images.shape[0]
        step = self.chunk_size or batch
        if step < 1:
            raise ValueError(f"{self.name}: chunk_size must be a positive int or None, got {self.chunk_size}")
        if frames_per_video is None and self.scores_videos:
            raise ValueError(f"{self.name}: this reward scores whole videos (it compares a video's "
                             "frames) and cannot score single images: call it with frames_per_video")
        if frames_per_video is None:
            return self._scores(self.score, images, self._prompts_for(batch, prompts), 1, step)
        frames = int(frames_per_video)
        if frames < 1 or batch % frames:
            raise ValueError(f"{self.name}: {batch} frames are not whole videos of {frames_per_video}")
        videos = batch // frames
        prompts = self._prompts_for(videos, prompts)
        if not self.scores_videos:  # an image reward: each frame, averaged per video
            per_frame = [p for p in prompts for _ in range(frames)]
            return self._scores(self.score, images, per_frame, 1, step).view(videos, frames).mean(1)
        return self._scores(lambda x, p: self.score_videos(x, p, frames), images, prompts, frames,
                            max(1, step // frames))

    def _scores(self, fn, images: Tensor, prompts: list, frames: int, step: int) -> Tensor:
        """``fn`` on chunks of ``step`` samples of ``frames`` images each, concatenated (float32)."""
        samples = len(prompts)
        parts = [fn(images[i * frames:(i + step) * frames], prompts[i:i + step])
                 for i in range(0, samples, step)]
        if not parts:
            return images.new_zeros(0, dtype=torch.float32)
        out = torch.cat([p.reshape(-1).to(device=images.device, dtype=torch.float32) for p in parts])
        if out.shape[0] != samples:  # pragma: no cover - guards subclasses
            raise RuntimeError(f"{self.name}: returned {out.shape[0]} values for {samples} samples")
        return out

    def image_embeddings(self, images: Tensor) -> Tensor | None:
        """(B, 3, H, W) in [0, 1] -> (B, D) image embeddings of the reward's own image encoder
        (a CLIP tower), or None for rewards without one. The held-out check measures diversity
        with them (cosine similarity across seeds)."""
        return None

    def checkpoint_units(self) -> list:
        """The reward's transformer blocks, for block-level activation checkpointing while it is
        differentiated: the elements of every ``resblocks`` (open_clip) or ``layers``
        (transformers' and ComfyUI's CLIP encoders) list inside it."""
        units = []
        for module in self.modules():
            for name in ("resblocks", "layers"):
                blocks = getattr(module, name, None)
                if isinstance(blocks, torch.nn.ModuleList):
                    units += list(blocks)
        return units

    @contextlib.contextmanager
    def deferred_statistics(self):
        """Score several chunks of one update (e.g. one row at a time) and fold them into any
        running statistics (Combine's standardisation) once, on exit, as one batch would be.
        Inside, scores are standardised with the statistics as they were on entry."""
        holders = [m for m in self.modules() if hasattr(m, "_begin_deferred_stats")]
        for m in holders:
            m._begin_deferred_stats()
        try:
            yield
        finally:
            for m in holders:
                m._end_deferred_stats()

    # -- helpers -------------------------------------------------------------------------------
    def _prompts_for(self, batch: int, prompts) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts] * batch
        if prompts is None:
            if self.needs_prompts:
                raise ValueError(f"{self.name}: this reward is text-conditioned and needs one prompt per image")
            return [""] * batch
        prompts = list(prompts)
        if len(prompts) != batch:
            if len(prompts) == 1:
                return prompts * batch
            if self.needs_prompts:
                raise ValueError(f"{self.name}: got {len(prompts)} prompts for {batch} images")
            return [""] * batch
        return prompts

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU when there is none)."""
        for t in self._tensors():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the first floating parameter or buffer (float32 when there is none)."""
        for t in self._tensors():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _tensors(self):
        yield from self.parameters()
        yield from self.buffers()

    def set_gradient_checkpointing(self, enable: bool = True) -> bool:
        """Recompute the backbone's transformer blocks in the backward pass (less activation memory,
        same gradients) where the backbone supports it (open_clip towers). Returns whether any did."""
        found = False
        for module in self.modules():
            if module is not self and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)
                found = True
        return found

    def freeze(self) -> "RewardModel":
        """No parameter requires grad; eval mode. Returns self."""
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "RewardModel":
        """Rewards stay in eval mode (no dropout); ``train()`` is accepted and ignored."""
        return super().train(False)


def module_device_dtype(module, fallback: torch.nn.Module | None = None) -> tuple[torch.device, torch.dtype]:
    """Where a (possibly foreign) module computes: its first floating parameter's device/dtype, or
    its ``device``/``dtype`` attributes, else ``fallback``'s, else CPU float32."""
    if isinstance(module, torch.nn.Module):
        for tensors in (module.parameters(), module.buffers()):
            for t in tensors:
                if t.is_floating_point():
                    return t.device, t.dtype
    device, dtype = getattr(module, "device", None), getattr(module, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    if fallback is not None and fallback is not module:
        return module_device_dtype(fallback)
    return torch.device("cpu"), torch.float32
