"""DRaFT Save & Preview: periodic LoRA saves and fixed-seed previews while the trainer runs
(optional; default: no periodic saves, a preview every 10 iterations)."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.run_options import SavePreviewOptions
from .options_node import OptionsNode
from .trainer_options import OPTION_INPUTS

DraftSavePreviewType = io.Custom("DRAFT_SAVE_PREVIEW")


class DraftSavePreview(OptionsNode):
    TRAINER_INPUT, TYPE = "saving", DraftSavePreviewType
    TITLE, OPTIONS = OPTION_INPUTS[TRAINER_INPUT]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.options_schema(
            "DRaFTSavePreview", cls.TITLE,
            ("Optional: what DRaFT Trainer saves and shows while it runs (without this "
             "node: no periodic saves, a fixed-seed preview every 10 iterations). Files "
             "go to models/loras under the trainer's lora_name; Cancel always saves a "
             "partial LoRA."),
            [
                io.Int.Input("save_every", default=SavePreviewOptions.save_every, min=0, max=100000,
                             tooltip="Also save the LoRA (with its resume side file) into models/loras every N iterations (0 = never; Cancel always saves a partial LoRA)."),
                io.Int.Input("preview_every", default=SavePreviewOptions.preview_every, min=0, max=100000,
                             tooltip="Every N iterations, preview a fixed-seed sample on the trainer node (0 = show the latest training sample only)."),
            ],
        )
