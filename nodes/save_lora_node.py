"""DRaFT Save LoRA: a portable kohya-format LoRA file in models/loras (atomic write)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import lora_files, validation
from .checked_node import CheckedNode


class DraftSaveLoRA(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTSaveLoRA",
            display_name="DRaFT Save LoRA",
            category="DRaFT",
            description=("Saves a trained LoRA into models/loras as a kohya-format .safetensors with "
                         "metadata: it loads in ComfyUI's LoraLoader, A1111, Forge, kohya and diffusers."),
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA from DRaFT Trainer (or ComfyUI's Train LoRA, with the model connected)."),
                io.String.Input("filename_prefix", default="draft/draft_lora",
                                tooltip="Name inside models/loras; sub-folders allowed, never outside it. A counter is appended: existing files are never overwritten."),
                io.Combo.Input("precision", options=["fp16", "fp32"], default="fp16",
                               tooltip="Storage precision of the LoRA factors (fp16 halves the file; alpha is kept exactly)."),
                io.Boolean.Input("also_diffusers_folder", default=False,
                                 tooltip="Also write a folder in the diffusers/PEFT layout that pipeline.load_lora_weights(folder) reads."),
                io.Model.Input("model", optional=True,
                               tooltip="The model the LoRA was trained on; needed only for LoRAs that did not come from DRaFT Trainer (to map module names)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The file written (relative to models/loras).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, precision, also_diffusers_folder, model=None) -> io.NodeOutput:
        validation.check_save_lora(filename_prefix)
        path = lora_files.save_final(lora, filename_prefix, precision, also_diffusers_folder, model)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved models/loras/{path}"))
