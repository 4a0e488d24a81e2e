"""DRaFT Trainer's optional settings inputs, in one table: the frozen dataclass each carries (its
defaults apply when nothing is connected) and the title of the node that makes it. The option nodes
read their title and dataclass here, and so does validation (defaults, naming the node in a
problem), so neither imports the other."""
from __future__ import annotations

from typing import NamedTuple

from ..training.run_options import LoRAOptions, OptimizerOptions, SavePreviewOptions, VideoOptions


class OptionInput(NamedTuple):
    title: str  # the node's display name
    options: type  # the frozen dataclass its widgets fill (training/run_options.py)


OPTION_INPUTS = {
    "lora_settings": OptionInput("DRaFT LoRA Settings", LoRAOptions),
    "optimizer": OptionInput("DRaFT Optimizer", OptimizerOptions),
    "saving": OptionInput("DRaFT Save & Preview", SavePreviewOptions),
    "video": OptionInput("DRaFT Video Settings", VideoOptions),
}
