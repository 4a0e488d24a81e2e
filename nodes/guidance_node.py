"""DRaFT Guidance: the embedded guidance value for guidance-distilled models (FLUX.1 dev)."""
from __future__ import annotations

from comfy_api.latest import io

DraftGuidance = io.Custom("DRAFT_GUIDANCE")


class DraftGuidanceNode(io.ComfyNode):
    """Outputs a float the DRaFT Trainer puts on every prompt's conditioning as ``guidance``,
    exactly as ComfyUI's FluxGuidance node does (``node_helpers.conditioning_set_values``). Without
    it the trainer uses the model family's default (3.5 for FLUX.1 dev); models without a guidance
    input (FLUX.1 schnell, SD, SD3, Qwen-Image) ignore it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTGuidance",
            display_name="DRaFT Guidance (FLUX)",
            category="DRaFT",
            description=("Embedded guidance for guidance-distilled models such as FLUX.1 dev, applied "
                         "to the trainer's prompts like ComfyUI's FluxGuidance node."),
            inputs=[io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                                   tooltip="FluxGuidance's value (FLUX.1 dev default 3.5). Ignored by models without a guidance input.")],
            outputs=[DraftGuidance.Output(display_name="guidance", tooltip="Connect to DRaFT Trainer's 'guidance' input.")],
        )

    @classmethod
    def execute(cls, guidance) -> io.NodeOutput:
        return io.NodeOutput(float(guidance))
