"""Reward nodes: each outputs a ``DRAFT_REWARD`` (a reward_models RewardModel + its patchers)."""
from __future__ import annotations

from comfy_api.latest import io

from ..reward_models import STATISTICS, CombinedReward, ImageStatReward
from .checked_node import CheckedNode
from .reward_types import DraftReward, RewardHandle

COMBINE_SLOTS = 4


class DraftImageStatReward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTImageStatReward",
            display_name="DRaFT Image Statistic Reward",
            category="DRaFT/rewards",
            description=("A reward that needs no model files: brightness, saturation, contrast or "
                         "sharpness of the decoded image. For quick starts, tests and as a penalty in Combine."),
            inputs=[
                io.Combo.Input("statistic", options=list(STATISTICS), default="saturation",
                               tooltip=("brightness: mean luma in [0,1]; saturation: mean max-min of RGB in [0,1]; "
                                        "contrast: luma standard deviation in [0,0.5]; sharpness: mean |Laplacian| of luma.")),
                io.Combo.Input("goal", options=["maximise", "minimise", "match target"], default="maximise",
                               tooltip="Push the statistic up, down, or towards the target value (score -|stat - target|)."),
                io.Float.Input("target", default=0.5, min=0.0, max=4.0, step=0.01,
                               tooltip="Target value for 'match target' (same units as the statistic)."),
            ],
            outputs=[DraftReward.Output(display_name="reward", tooltip="The reward, for DRaFT Trainer, Combine or Evaluate.")],
        )

    @classmethod
    def execute(cls, statistic, goal, target) -> io.NodeOutput:
        model = ImageStatReward(statistic, target=target if goal == "match target" else None,
                                weight=-1.0 if goal == "minimise" else 1.0)
        label = {"maximise": statistic, "minimise": f"-{statistic}",
                 "match target": f"{statistic}~{target:g}"}[goal]
        return io.NodeOutput(RewardHandle(model=model, patchers=[], label=label))


class DraftCombineRewards(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for i in range(1, COMBINE_SLOTS + 1):
            inputs.append(DraftReward.Input(f"reward_{i}", optional=i > 1,
                                            tooltip=f"Reward {i} of the weighted sum" + (" (optional)." if i > 1 else ".")))
            inputs.append(io.Float.Input(f"weight_{i}", default=1.0, min=-100.0, max=100.0, step=0.01,
                                         tooltip=f"Weight of reward {i}; negative turns it into a penalty."))
        inputs.append(io.Boolean.Input(
            "standardize", default=False,
            tooltip=("Divide each reward by a running estimate of its spread (and centre it) before "
                     "weighting, so rewards on different scales (aesthetic ~5, HPSv2 ~0.27) can be mixed.")))
        return io.Schema(
            node_id="DRaFTCombineRewards",
            display_name="DRaFT Combine Rewards",
            category="DRaFT/rewards",
            description="Weighted sum of up to four rewards (negative weights are penalties).",
            inputs=inputs,
            outputs=[DraftReward.Output(display_name="reward", tooltip="The combined reward.")],
        )

    @classmethod
    def execute(cls, reward_1, weight_1, weight_2=1.0, weight_3=1.0, weight_4=1.0,
                standardize=False, reward_2=None, reward_3=None, reward_4=None) -> io.NodeOutput:
        pairs = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2),
                                     (reward_3, weight_3), (reward_4, weight_4)) if r is not None]
        model = CombinedReward([r.model for r, _ in pairs], [w for _, w in pairs],
                               standardize=standardize)
        patchers = [p for r, _ in pairs for p in r.patchers]
        label = " + ".join(f"{w:g}*{r.label}" for r, w in pairs)
        return io.NodeOutput(RewardHandle(model=model, patchers=patchers, label=label))


NODES = [DraftImageStatReward, DraftCombineRewards]
