"""DRaFT LoRA Settings: rank, alpha and target layers of the trained LoRA (optional; default rank 8,
alpha 8, attention)."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.run_options import LoRAOptions
from .architectures import TARGET_SET_HELP, TARGET_SETS
from .options_node import OptionsNode
from .trainer_options import OPTION_INPUTS

DraftLoRASettingsType = io.Custom("DRAFT_LORA_SETTINGS")


class DraftLoRASettings(OptionsNode):
    TRAINER_INPUT, TYPE = "lora_settings", DraftLoRASettingsType
    TITLE, OPTIONS = OPTION_INPUTS[TRAINER_INPUT]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.options_schema(
            "DRaFTLoRASettings", cls.TITLE,
            ("Optional: the shape of the LoRA DRaFT Trainer trains (without this node: "
             "rank 8, alpha 8, attention layers). A resumed LoRA keeps its file's rank, "
             "alpha and layers: these must match them."),
            [
                io.Int.Input("lora_rank", default=LoRAOptions.lora_rank, min=1, max=256,
                             tooltip="LoRA rank (paper: 8 small runs, 32 large)."),
                io.Float.Input("lora_alpha", default=LoRAOptions.lora_alpha, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank (kohya convention)."),
                io.Combo.Input("target_modules", options=list(TARGET_SETS), default=LoRAOptions.target_modules,
                               tooltip="Layers that get a LoRA (inside the model's blocks): " + TARGET_SET_HELP + "."),
            ],
        )
