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


class DeviceReward:
    """A reward model as the engine calls it (``training.trainer`` ``Reward``): images moved to
    the reward's ``device`` (None: left where they are), scores to ``out_device`` (None: left on
    the reward's); ``scores_videos`` passed on, and ``frames_per_video`` with it, so the trainer and
    the held-out check score whole videos with a video reward (``reward_models.base``)."""

    def __init__(self, model: torch.nn.Module, device: Optional[torch.device] = None,
                 out_device: Optional[torch.device] = None):
        self.model, self.device, self.out_device = model, device, out_device

    @property
    def scores_videos(self) -> bool:
        return bool(getattr(self.model, "scores_videos", False))

    def __call__(self, images: torch.Tensor, prompts, **video) -> torch.Tensor:
        if self.device is not None:
            images = images.to(self.device)
        scores = self.model(images, prompts, **video)
        return scores.to(self.out_device) if self.out_device is not None else scores


def own_image_encoder(handle: RewardHandle):
    """``images (N,3,H,W) in [0, 1] -> embeddings (N, D)`` (float32) by the reward's own image
    encoder (``RewardModel.image_embeddings``: its CLIP tower), images moved to its device; None
    when it has none (found by one grey image, without gradient)."""
    model, device = handle.model, handle.device

    def embed(images: torch.Tensor):
        return model.image_embeddings(images.to(device) if device is not None else images)
    with torch.no_grad():
        if getattr(model, "image_embeddings", None) is None or embed(torch.full((1, 3, 64, 64), 0.5)) is None:
            return None
    return lambda images: embed(images).float()


class InPlaceSafeEncoder(torch.nn.Module):
    """An image encoder of ComfyUI's whose transformer layers add their residuals in place
    (``comfy/clip_model.py`` ``CLIPLayer``: ``x += ...``, into the tensor its layer norm saved),
    made differentiable: under gradient its layers run through
    :func:`training.checkpointing.checkpoint_blocks`, which recomputes blocks that write in place
    correctly (plain autograd refuses their backward). Layers already wrapped (the lean memory
    way checkpoints the reward's blocks itself) are left as they are; without gradient (held-out
    check, Evaluate) it is the encoder."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.encoder(pixels)
        from ..reward_models import RewardModel
        from ..training.checkpointing import checkpoint_blocks
        with checkpoint_blocks(RewardModel.checkpoint_units(self)):  # its ``layers`` lists
            return self.encoder(pixels)


def clip_vision_encoder(clip_vision) -> tuple:
    """``(encoder, transform)`` for ComfyUI's CLIP_VISION: its projected image embeddings (output
    2, as the aesthetic reward node uses them; differentiable: :class:`InPlaceSafeEncoder`) and its
    own resize, crop and normalisation, done in torch (``clip_preprocess`` rounds: no gradient).
    Not through ``encode_image``, whose ``load_model_gpu`` could evict the models being trained."""
    from ..reward_models import ImageTransform, OutputSelectingEncoder
    encoder = InPlaceSafeEncoder(OutputSelectingEncoder(clip_vision.model, 2, input_dtype=torch.float32))
    transform = ImageTransform("crop", clip_vision.image_size, tuple(clip_vision.image_mean),
                               tuple(clip_vision.image_std))
    return encoder, transform
