"""Reward nodes: each outputs a ``DRAFT_REWARD`` (a reward_models RewardModel + its patchers)."""
from __future__ import annotations

from comfy_api.latest import io

from ..reward_models import STATISTICS, CombinedReward, ImageStatReward, TemporalConsistencyReward
from . import validation
from .checked_node import CheckedNode
from .reward_types import DraftReward, RewardHandle, clip_vision_encoder, own_image_encoder

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
                     "weighting, so rewards on different scales (aesthetic ~5, HPSv2 ~0.27) can be "
                     "mixed. With a video reward (Temporal Consistency) every reward is taken per "
                     "video (an image reward: its mean over the video's frames) and so are the "
                     "statistics.")))
        return io.Schema(
            node_id="DRaFTCombineRewards",
            display_name="DRaFT Combine Rewards",
            category="DRaFT/rewards",
            description=("Weighted sum of up to four rewards (negative weights are penalties). "
                         "A video reward among them (Temporal Consistency) makes the sum score "
                         "whole videos; give it a positive weight to penalise flicker."),
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


class DraftTemporalConsistencyReward(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTTemporalConsistencyReward",
            display_name="DRaFT Temporal Consistency Reward",
            category="DRaFT/rewards",
            description=(
                "Video models only (Wan 2.1, Wan 2.2): how alike a video's consecutive scored frames are "
                "(the frames DRaFT Video Settings' reward_frames and frame_pick choose). With a "
                "CLIP vision model, or the image encoder of a connected reward: the mean cosine "
                "similarity of consecutive frames' embeddings, in [-1, 1]; without: pixels, "
                "1 - mean |difference| of consecutive frames, in [0, 1] (1 = identical). Higher is "
                "steadier: in DRaFT Combine Rewards, beside an image reward, a positive weight "
                "penalises flicker (alone it would reward a still video). Refused on image models."),
            inputs=[
                io.Int.Input("chunk_size", default=16, min=1, max=1024,
                             tooltip="Frames embedded per forward pass (whole videos, at least one video at a time); lower it if VRAM is short."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model (CLIPVisionLoader): compare the frames' CLIP image embeddings (what the frames show, not every pixel). Leave empty to use 'embeddings_from', or the pixels."),
                DraftReward.Input("embeddings_from", optional=True,
                                  tooltip="Optional reward whose own image encoder gives the embeddings (Aesthetic, HPSv2, PickScore, CLIP Score: their CLIP tower; it is not scored). Not together with clip_vision."),
            ],
            outputs=[DraftReward.Output(display_name="reward",
                                        tooltip="The temporal consistency reward (scores whole videos): for DRaFT Combine Rewards, the trainer or Evaluate with frames_per_video.")],
        )

    @classmethod
    def execute(cls, chunk_size, clip_vision=None, embeddings_from=None) -> io.NodeOutput:
        if clip_vision is not None and embeddings_from is not None:
            raise ValueError("DRaFT Temporal Consistency Reward: connect clip_vision or "
                             "embeddings_from, not both")
        if clip_vision is not None:
            encoder, transform = clip_vision_encoder(clip_vision)
            model = TemporalConsistencyReward(encoder, transform, chunk_size=chunk_size)
            return io.NodeOutput(RewardHandle(model=model, patchers=[clip_vision.patcher],
                                              label="temporal(CLIP vision)"))
        if embeddings_from is not None:
            if own_image_encoder(embeddings_from) is None:
                raise ValueError(f"DRaFT Temporal Consistency Reward: embeddings_from: "
                                 f"{embeddings_from.label} has no image encoder (connect Aesthetic, "
                                 "HPSv2, PickScore or CLIP Score, or a CLIP vision model)")
            model = TemporalConsistencyReward(embeddings_of=embeddings_from.model, chunk_size=chunk_size)
            return io.NodeOutput(RewardHandle(model=model, patchers=list(embeddings_from.patchers),
                                              label=f"temporal({embeddings_from.label})"))
        return io.NodeOutput(RewardHandle(model=TemporalConsistencyReward(chunk_size=chunk_size),
                                          patchers=[], label="temporal(pixels)"))


def _temporal_rule(values: dict) -> list:
    # a linked input's value is None when queued: present means connected
    if "clip_vision" in values and "embeddings_from" in values:
        return [("embeddings_from", "connect clip_vision or embeddings_from, not both")]
    return []


validation.NODE_RULES["DRaFTTemporalConsistencyReward"] = _temporal_rule

NODES = [DraftImageStatReward, DraftCombineRewards, DraftTemporalConsistencyReward]
