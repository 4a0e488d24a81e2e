"""DRaFT Optimizer: AdamW's weight decay, gradient clipping and accumulation, the KL penalty and
mixed precision (optional; the learning rate stays on the trainer)."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.run_options import PRECISION_CHOICES, OptimizerOptions
from .options_node import OptionsNode
from .trainer_options import OPTION_INPUTS

DraftOptimizerType = io.Custom("DRAFT_OPTIMIZER")


class DraftOptimizer(OptionsNode):
    TRAINER_INPUT, TYPE = "optimizer", DraftOptimizerType
    TITLE, OPTIONS = OPTION_INPUTS[TRAINER_INPUT]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.options_schema(
            "DRaFTOptimizer", cls.TITLE,
            ("Optional: how DRaFT Trainer updates the LoRA beyond the learning rate "
             "(without this node: AdamW weight decay 0.1, gradient clipping at 10, no "
             "accumulation, no KL penalty, automatic mixed precision)."),
            [
                io.Float.Input("weight_decay", default=OptimizerOptions.weight_decay, min=0.0, max=1.0, step=0.01,
                               tooltip="AdamW weight decay (paper: 0.1)."),
                io.Float.Input("grad_clip", default=OptimizerOptions.grad_clip, min=0.0, max=1000.0, step=0.1,
                               tooltip="Max gradient norm; 0 disables (DRaFT+ uses 10)."),
                io.Int.Input("grad_accumulation", default=OptimizerOptions.grad_accumulation, min=1, max=256,
                             tooltip="Micro-batches per update: effective batch = the trainer's batch_size x grad_accumulation."),
                io.Float.Input("kl_coeff", default=OptimizerOptions.kl_coeff, min=0.0, max=100.0, step=0.01,
                               tooltip="DRaFT+ penalty on the LoRA model drifting from the base model's predictions (0 = off; costs one extra forward per differentiated step)."),
                io.Combo.Input("mixed_precision", options=list(PRECISION_CHOICES), default=OptimizerOptions.mixed_precision,
                               tooltip="Autocast dtype; LoRA weights stay float32. auto follows the model's dtype (fp16 uses loss scaling)."),
            ],
        )
