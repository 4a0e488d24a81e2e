"""Which frames of a video the reward scores (video families: Wan 2.1 T2V). ComfyUI-free.

A causal video VAE (Wan 2.1: ``time_compression`` 4) decodes the first ``k`` latent frames into
``1 + 4 (k - 1)`` frames, the same frames a decode of the whole video starts with; frame ``f`` needs
latent frames ``0 .. ceil(f / 4)``. The trainer decodes at most ``k`` latent frames
(``decoded_latent_frames``, VideoX-Fun's ``num_decoded_latents``) and the reward scores ``count`` of
those frames (0: every decoded frame), chosen by ``pick``:

* ``first``: frames ``0 .. count - 1``; only ``ceil((count - 1) / 4) + 1`` latent frames are decoded;
* ``evenly spaced``: ``count`` frames spread over the decoded frames, the first and the last
  included (``count = 1``: the middle frame); decoded up to the last picked frame's latent frame;
* ``random``: ``count`` distinct frames drawn afresh every update (sorted), one draw per update
  shared by every video of the update and every data-parallel process, from a generator derived
  from the run's seed and the update (:meth:`training.trainer.DraftTrainer.frames_for_update`);
  all ``k`` latent frames are decoded (the memory plan counts the worst case). Held-out
  evaluations and previews score every decoded frame instead (the expectation of a random pick,
  fixed, so evaluations compare like with like).

A video's reward is the mean of an image reward over its scored frames, or a video reward's
score of them in order (``reward_models`` ``scores_videos``: temporal consistency).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

FRAME_PICKS = ("first", "evenly spaced", "random")
FRAME_PICK_STREAM = 0x46524D  # tags the random pick's generators (seed, update, tag)


@dataclass(frozen=True)
class FrameChoice:
    """The scored frames of each video; see the module docstring.

    Attributes:
        latent_frames: ``k``, the latent frames the decoder decodes at most.
        time_compression: frames per latent frame after the first (Wan 2.1: 4).
        count: frames scored per video; 0 = every decoded frame.
        pick: one of :data:`FRAME_PICKS`.
    """

    latent_frames: int
    time_compression: int = 4
    count: int = 0
    pick: str = "first"

    def __post_init__(self):
        if self.latent_frames < 1 or self.time_compression < 1:
            raise ValueError("latent_frames and time_compression must be >= 1")
        if self.pick not in FRAME_PICKS:
            raise ValueError(f"frame_pick must be one of {FRAME_PICKS}, got {self.pick!r}")
        if self.count < 0:
            raise ValueError("reward_frames must be >= 0")
        if self.count > self.decoded_frames:
            raise ValueError(
                f"reward_frames {self.count} is more than the {self.decoded_frames} frames decoded "
                f"from {self.latent_frames} latent frame(s) (1 + {self.time_compression} (k - 1)): "
                f"lower it (0 = every decoded frame) or raise decoded_latent_frames")

    @property
    def decoded_frames(self) -> int:
        """Frames the ``latent_frames`` decode into."""
        return 1 + self.time_compression * (self.latent_frames - 1)

    @property
    def frames_per_video(self) -> int:
        """Frames each video's reward sees."""
        return self.count or self.decoded_frames

    @property
    def every_frame(self) -> bool:
        return self.frames_per_video == self.decoded_frames

    def frames(self, generator: Optional[torch.Generator] = None) -> tuple:
        """The scored frames' indices among the decoded frames, ascending. ``random`` draws them
        with ``generator`` (required)."""
        n, total = self.frames_per_video, self.decoded_frames
        if n == total:
            return tuple(range(total))
        if self.pick == "first":
            return tuple(range(n))
        if self.pick == "evenly spaced":
            if n == 1:
                return ((total - 1) // 2,)
            return tuple((i * (total - 1) + (n - 1) // 2) // (n - 1) for i in range(n))
        if generator is None:
            raise ValueError("a random frame pick needs a generator")
        return tuple(sorted(torch.randperm(total, generator=generator)[:n].tolist()))

    def evaluation_frames(self) -> tuple:
        """The frames held-out evaluations and previews score: :meth:`frames`, except that a
        random pick evaluates every decoded frame."""
        return tuple(range(self.decoded_frames)) if self.pick == "random" else self.frames()

    def latent_frames_for(self, frames: Sequence[int]) -> int:
        """Latent frames to decode for ``frames``: up to the last one's (``ceil(f / tc) + 1``)."""
        return -(-max(frames) // self.time_compression) + 1

    @property
    def most_latent_frames(self) -> int:
        """The most latent frames any update (or evaluation) decodes: what memory is planned for."""
        if self.pick == "random":
            return self.latent_frames
        return self.latent_frames_for(self.frames())


__all__ = ["FrameChoice", "FRAME_PICKS", "FRAME_PICK_STREAM"]
