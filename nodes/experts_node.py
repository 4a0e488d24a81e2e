"""DRaFT Wan 2.2 Experts: the expert that is not trained (Wan 2.2 A14B), for DRaFT Trainer's
optional ``experts`` input.

Wan 2.2 A14B ships as two models, a high-noise and a low-noise expert; ComfyUI loads each as a Wan
2.1 14B (``WAN21_T2V``) and nothing in the weights says which is which, so the user says it here.
The trainer's ``model`` is the expert it trains; this node's ``other_expert`` denoises the steps on
its own side of the boundary (sigma >= boundary: the high-noise expert, as Wan 2.2 switches on
``t >= boundary * 1000``), without gradient into its weights (``training.sampler.OtherExpert``).
"""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from ..training.sampler import EXPERT_SIDES
from .checked_node import CheckedNode

DraftExpertsType = io.Custom("DRAFT_WAN22_EXPERTS")
WAN22_T2V_BOUNDARY = 0.875  # Wan 2.2 T2V A14B's (its configs: wan_t2v_A14B.py; I2V A14B: 0.9)


@dataclass(frozen=True)
class WanExperts:
    """What DRaFT Wan 2.2 Experts says: the other expert (a MODEL), which side the trainer's own
    model is on, the sigma boundary."""

    model: object
    trained: str
    boundary: float

    @property
    def other(self) -> str:
        return EXPERT_SIDES[1 - EXPERT_SIDES.index(self.trained)]


class DraftWan22Experts(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTWan22Experts", display_name="DRaFT Wan 2.2 Experts", category="DRaFT",
            description=(
                "Optional, for Wan 2.2 A14B (two experts): connect the trainer's model to the "
                "expert you train and this node's other_expert to the other one (each loaded as "
                "usual, e.g. Load Diffusion Model, with the same ModelSamplingSD3 shift). The "
                "other expert denoises the steps on its side of the boundary, as Wan 2.2 and two "
                "chained KSamplerAdvanced do, and is never trained. The steps DRaFT differentiates "
                "(the last K) must include some of the trained expert's: the low-noise expert "
                "takes every method; the high-noise one needs DRaFT-K with K reaching back past "
                "the boundary."),
            inputs=[
                io.Model.Input("other_expert", tooltip="The Wan 2.2 A14B expert that is NOT trained (the trainer's model is the one trained)."),
                io.Combo.Input("trained_expert", options=list(EXPERT_SIDES), default=EXPERT_SIDES[0],
                               tooltip="Which expert the trainer's model is: low noise (the usual choice: DRaFT's differentiated last steps are its own) or high noise (the other expert is then the low-noise one)."),
                io.Float.Input("boundary", default=WAN22_T2V_BOUNDARY, min=0.0, max=1.0, step=0.005,
                               tooltip="Steps whose sigma (timestep / 1000) is at least this go to the high-noise expert: 0.875 for Wan 2.2 T2V A14B, 0.9 for I2V A14B (Wan 2.2's own boundaries)."),
            ],
            outputs=[DraftExpertsType.Output(display_name="experts",
                                             tooltip="Connect to DRaFT Trainer's 'experts' input.")])

    @classmethod
    def execute(cls, other_expert, trained_expert, boundary) -> io.NodeOutput:
        return io.NodeOutput(WanExperts(other_expert, trained_expert, float(boundary)))
