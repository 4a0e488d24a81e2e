"""DRaFT Memory Options: how the trainer trades time for memory (optional; default automatic)."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.memory_plan import (BLOCK_CHOICES, CFG_GRADIENT_CHOICES, ROW_CHOICES,
                                    MemoryOptions)
from .options_node import OptionsNode

DraftMemory = io.Custom("DRAFT_MEMORY")


class DraftMemoryOptions(OptionsNode):
    OPTIONS, TYPE, TRAINER_INPUT = MemoryOptions, DraftMemory, "memory"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.options_schema(
            "DRaFTMemoryOptions", "DRaFT Memory Options",
            ("Optional settings for DRaFT Trainer's memory use. 'auto' runs the fastest way "
             "that fits the free VRAM: all rows at once, then rows one at a time, then "
             "the decoder's and reward's blocks checkpointed, then every block; the "
             "trainer logs what it chose and refuses before the first iteration when "
             "nothing fits."),
            [
                io.Combo.Input("block_checkpointing", options=list(BLOCK_CHOICES), default="auto",
                               tooltip="Recompute blocks one by one in the backward pass, so the peak becomes one block's activations. on: the UNet's/DiT's, the VAE decoder's and the reward's blocks (about one extra denoiser forward per differentiated step); decoder and reward: only theirs, the decoder's selectively (its convolutions' outputs kept: a few percent of a decode, once per update whatever K); auto: as little as fits the free VRAM. Same gradient."),
                io.Combo.Input("rows", options=list(ROW_CHOICES), default="auto",
                               tooltip="Differentiate the batch rows and DRaFT-LV copies one at a time (each backpropagated before the next) or all at once. Same gradient; one at a time bounds the peak to one row."),
                io.Combo.Input("cfg_gradient", options=list(CFG_GRADIENT_CHOICES), default="both branches",
                               tooltip="Both branches: the exact gradient through classifier-free guidance. Conditional only: the unconditional prediction runs without gradient (less memory and time; a different gradient, as some peers do)."),
            ],
        )
