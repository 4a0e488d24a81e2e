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
