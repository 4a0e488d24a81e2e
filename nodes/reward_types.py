"""The ``DRAFT_REWARD`` socket type: a differentiable reward plus what model management needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from comfy_api.latest import io

DraftReward = io.Custom("DRAFT_REWARD")


@dataclass
class RewardHandle:
    """What flows through a ``DRAFT_REWARD`` socket.

    Attributes:
        model: a ``reward_models`` RewardModel: ``(images (B,3,H,W) in [0,1], prompts) -> (B,)``.
        patchers: ComfyUI ModelPatchers of the weights it uses (empty for weight-free rewards), so
            ``load_models_gpu`` loads them together with the UNet and VAE.
        label: a short description for metadata and the UI ("aesthetic", "0.5*hpsv2+1*brightness").
    """

    model: torch.nn.Module
    patchers: list = field(default_factory=list)
    label: str = ""

    @property
    def device(self) -> Optional[torch.device]:
        for p in self.model.parameters():
            return p.device
        return None
