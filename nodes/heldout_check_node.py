"""DRaFT Held-out Check: judge the LoRA while it trains, on prompts, seeds and rewards it never
trains on; keep the best LoRA; optionally stop when the judge falls (training/heldout.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from comfy_api.latest import io

from ..training.heldout import KEEP, STOP, HeldoutSettings
from ..training.prompt_sets import HELDOUT_PROMPTS, parse_prompt_lines
from .reward_types import DraftReward
from .checked_node import CheckedNode

DraftHeldoutType = io.Custom("DRAFT_HELDOUT")


@dataclass(frozen=True)
class HeldoutRequest:
    """What flows into the trainer's ``evaluation`` input: the settings, the judges
    (:class:`nodes.reward_types.RewardHandle`, in order) and an optional CLIP_VISION for the
    similarity figure."""

    settings: HeldoutSettings
    judges: tuple = field(default_factory=tuple)
    clip_vision: Optional[object] = None


class DraftHeldoutCheck(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = HeldoutSettings()
        return io.Schema(
            node_id="DRaFTHeldoutCheck",
            display_name="DRaFT Held-out Check",
            category="DRaFT",
            description=(
                "Optional: catches reward hacking while it happens. Every N updates (and before the "
                "first, on the base model) the trainer samples held-out prompts on fixed seeds and "
                "scores them with judge rewards it never trains on, with its own reward and with a "
                "diversity figure; the chart draws them beside the training reward. Keeps the best "
                "LoRA (saved as <lora_name>_best.safetensors) and can stop the run when the judge "
                "falls. Videos (Wan) are judged as the trainer scores them: per video, on the "
                "frames DRaFT Video Settings picks, the similarity on each video's middle frame. "
                "Connect to DRaFT Trainer's 'evaluation' input."),
            inputs=[
                io.Int.Input("every", default=d.every, min=1, max=100000,
                             tooltip="Evaluate every N updates (and at update 0, the base model, and at the last). Each evaluation samples prompts x seeds images without gradient: with the defaults (4 prompts x 4 seeds every 10 updates) about 1.6 samples per update."),
                io.Int.Input("seeds", default=d.seeds, min=1, max=64,
                             tooltip="Fixed noise seeds per held-out prompt (the same noise at every evaluation, so the curves compare like with like). 2 or more for the similarity figure."),
                io.String.Input("prompts", multiline=True, default="\n".join(HELDOUT_PROMPTS),
                                tooltip="Held-out prompts, one per line ('#' starts a comment); never trained on. The default set shares no prompt with the bundled training sets."),
                DraftReward.Input("judge_1", optional=True,
                                  tooltip="A reward the trainer never optimises (e.g. PickScore or HPSv2 while training on the aesthetic score); scored without gradient. The first judge ranks the evaluations for 'keep' and 'stop' (without judges: the training reward on the held-out images)."),
                DraftReward.Input("judge_2", optional=True, tooltip="A second judge (charted and recorded; does not rank)."),
                DraftReward.Input("judge_3", optional=True, tooltip="A third judge (charted and recorded; does not rank)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model for the similarity figure (mean cosine similarity of image embeddings across the seeds of each prompt; rising = mode collapse, the same face for every seed). Without it: the first judge's CLIP, else the training reward's, else the pixels."),
                io.Combo.Input("keep", options=list(KEEP), default=d.keep,
                               tooltip="best: the trainer's model and lora outputs carry the best evaluated LoRA (by the first judge); last: the last one. Both are saved either way (<lora_name>_best, and the last as <lora_name>_stepNNNNN)."),
                io.Combo.Input("stop", options=list(STOP), default=d.stop,
                               tooltip="on: end the run once the ranking figure has stayed more than 'tolerance' below its best for 'patience' evaluations in a row (twice as many while nothing has beaten update 0, where the run started: judges often dip before they rise)."),
                io.Int.Input("patience", default=d.patience, min=1, max=1000,
                             tooltip="Evaluations in a row below the best before 'stop' ends the run."),
                io.Float.Input("tolerance", default=d.tolerance, min=0.0, max=1e6, step=0.001,
                               tooltip="How far below its best the ranking figure must be to count, in that figure's own units (e.g. PickScore points); 0: any drop counts."),
            ],
            outputs=[DraftHeldoutType.Output(display_name="evaluation",
                                             tooltip="Connect to DRaFT Trainer's 'evaluation' input.")],
        )

    @classmethod
    def execute(cls, every, seeds, prompts, keep, stop, patience, tolerance, judge_1=None,
                judge_2=None, judge_3=None, clip_vision=None) -> io.NodeOutput:
        lines = parse_prompt_lines(prompts)
        if not lines:
            raise ValueError("DRaFT Held-out Check: 'prompts' is empty: write one held-out prompt "
                             "per line")
        settings = HeldoutSettings(every=every, seeds=seeds, prompts=tuple(lines), keep=keep,
                                   stop=stop, patience=patience, tolerance=tolerance)
        judges = tuple(j for j in (judge_1, judge_2, judge_3) if j is not None)
        return io.NodeOutput(HeldoutRequest(settings, judges, clip_vision))
