"""The base of DRaFT's small optional settings nodes (LoRA Settings, Optimizer, Save & Preview,
Memory Options): each turns its widgets into one frozen dataclass (``OPTIONS``, fields named as
the widgets) that goes into one of DRaFT Trainer's optional inputs, in ComfyUI's own idiom of
small nodes feeding a custom type."""
from __future__ import annotations

from comfy_api.latest import io

from .checked_node import CheckedNode


class OptionsNode(CheckedNode):
    OPTIONS: type = None  # the frozen dataclass the widgets fill (training/run_options.py, ...)
    TYPE: io.Custom = None  # its socket type
    TRAINER_INPUT: str = ""  # the trainer's input it goes into

    @classmethod
    def options_schema(cls, node_id: str, display_name: str, description: str, inputs: list) -> io.Schema:
        """The node's schema: its widgets, one output into the trainer's ``TRAINER_INPUT``."""
        return io.Schema(
            node_id=node_id, display_name=display_name, category="DRaFT", description=description,
            inputs=inputs,
            outputs=[cls.TYPE.Output(display_name=cls.TRAINER_INPUT,
                                     tooltip=f"Connect to DRaFT Trainer's '{cls.TRAINER_INPUT}' input.")])

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        return io.NodeOutput(cls.OPTIONS(**widgets))
