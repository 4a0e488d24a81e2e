"""The trainer's optional setting groups, one small frozen dataclass per optional DRaFT node.

DRaFT Trainer shows only what a first run needs; the rest comes from optional nodes, each of which
outputs one of these (DRaFT LoRA Settings, DRaFT Optimizer, DRaFT Save & Preview; DRaFT Memory
Options outputs :class:`training.memory_plan.MemoryOptions` the same way). Field names are the
nodes' widget names, and the nodes take their widget defaults from here, so a trainer with a node
left out trains exactly as with that node connected at its defaults. ComfyUI-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from .trainer import MIXED_PRECISION, TrainSettings
from .video_frames import FRAME_PICKS, FrameChoice

PRECISION_CHOICES = ("auto", *MIXED_PRECISION)


@dataclass(frozen=True)
class LoRAOptions:
    """The LoRA's shape. ``target_modules`` names a target set of the model family's table
    (``nodes/architectures.py``: ``attention``, ``kohya default``)."""

    lora_rank: int = 8  # paper: 8 small runs, 32 large
    lora_alpha: float = 8.0  # the update is scaled by alpha / rank (kohya convention)
    target_modules: str = "attention"


@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW and the update beyond the learning rate (which stays on the trainer); ``auto``
    mixed precision is resolved by the ComfyUI front end from the model's device."""

    weight_decay: float = TrainSettings.weight_decay
    grad_clip: float = TrainSettings.grad_clip
    grad_accumulation: int = TrainSettings.grad_accum
    kl_coeff: float = TrainSettings.kl_coeff
    mixed_precision: str = "auto"

    def __post_init__(self):
        if self.mixed_precision not in PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {PRECISION_CHOICES}, "
                             f"got {self.mixed_precision!r}")

    def train_settings(self, **trainer) -> TrainSettings:
        """:class:`TrainSettings` from these options plus the trainer's own (iterations,
        batch_size, learning_rate, seed). Mixed precision is left to the caller to resolve."""
        return TrainSettings(grad_accum=self.grad_accumulation, weight_decay=self.weight_decay,
                             grad_clip=self.grad_clip, kl_coeff=self.kl_coeff, **trainer)


@dataclass(frozen=True)
class SavePreviewOptions:
    """What the trainer writes and shows while it runs (Cancel always saves a partial LoRA)."""

    save_every: int = 0  # 0: no periodic saves
    preview_every: int = 10  # 0: show the latest training sample only


@dataclass(frozen=True)
class VideoOptions:
    """How a video family (Wan 2.1) trains; image families ignore it.

    ``length``: frames per training video, ``1 + time_compression * k`` (Wan: 4k + 1); 0 takes the
    family's usual (``nodes/architectures.py`` ``video_frames``: 33 for Wan 2.1). Latent frames:
    ``(length - 1) / time_compression + 1``.
    ``decoded_latent_frames``: the reward sees only the first this many latent frames, decoded
    (Wan's causal VAE gives ``1 + 4 (k - 1)`` frames from the first ``k``; VideoX-Fun's reward
    training decodes 3, ``num_decoded_latents``). 0 decodes every latent frame.
    ``reward_frames``: how many of the decoded frames the reward scores (0: every one), chosen by
    ``frame_pick`` (``first``, ``evenly spaced``, ``random``: :mod:`training.video_frames`); only
    the latent frames the picked frames need are decoded. An image reward scores each picked frame
    and a video's reward is the mean over them; a video reward (temporal consistency) scores them
    in order."""

    length: int = 0
    decoded_latent_frames: int = 3
    reward_frames: int = 0
    frame_pick: str = "first"

    def __post_init__(self):
        if self.length < 0 or self.decoded_latent_frames < 0 or self.reward_frames < 0:
            raise ValueError("length, decoded_latent_frames and reward_frames must be >= 0")
        if self.frame_pick not in FRAME_PICKS:
            raise ValueError(f"frame_pick must be one of {FRAME_PICKS}, got {self.frame_pick!r}")

    def frames(self, family_frames: int) -> int:
        """The training length in frames for a family whose usual length is ``family_frames``."""
        return self.length or family_frames

    def latent_frames(self, family_frames: int, time_compression: int) -> int:
        """Latent frames of a training video (ValueError when the length does not fit the VAE)."""
        frames = self.frames(family_frames)
        if (frames - 1) % time_compression:
            raise ValueError(f"length {frames} is not {time_compression}k + 1 frames (the video "
                             f"VAE encodes {time_compression} frames per latent frame after the first)")
        return (frames - 1) // time_compression + 1

    def decoded(self, latent_frames: int) -> int:
        """How many of ``latent_frames`` are decoded for the reward."""
        return min(self.decoded_latent_frames or latent_frames, latent_frames)

    def frame_choice(self, latent_frames: int, time_compression: int) -> FrameChoice:
        """The scored frames of a video of ``latent_frames`` latent frames (ValueError naming
        ``reward_frames`` when it asks for more frames than are decoded)."""
        return FrameChoice(self.decoded(latent_frames), time_compression, self.reward_frames,
                           self.frame_pick)
