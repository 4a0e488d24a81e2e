"""LAION aesthetic predictor v2: https://github.com/christophschuhmann/improved-aesthetic-predictor.

A linear MLP (no activations; dropout between layers, inactive at eval) 768 -> 1024 -> 128 -> 64 ->
16 -> 1 on the L2-normalised OpenAI CLIP ViT-L/14 image embedding; published as
``sac+logos+ava1-l14-linearMSE.pth``, a state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``.
Scores run roughly 1 to 10 (mean human rating on a 1-10 scale).

The backbone is either an open_clip weights file loaded into ``ViT-L-14-quickgelu`` (OpenAI's CLIP
uses QuickGELU), or any ``image_encoder(pixel_values) -> (B, 768)`` callable, e.g. ComfyUI's
CLIP_VISION model wrapped in ``OutputSelectingEncoder(clip_vision.model, index=2)``.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardModel, module_device_dtype
from .files import AESTHETIC_HEAD, CLIP_VIT_L14_OPENAI, WrongArchitectureError, load_strict, load_weights
from .open_clip_backbone import Architecture, architecture_name, image_size_of, load_open_clip
from .preprocess import ImageTransform

HIDDEN_DIMS = (1024, 128, 64, 16)


class AestheticHead(nn.Module):
    """The published MLP: (B, embed_dim) L2-normalised embeddings -> (B,) scores (about 1..10).

    Layout ``layers = Sequential(Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1),
    Linear, Linear)``; ``embed_dim``/``hidden_dims`` are parameters only so tests can pair the head
    with a tiny backbone; the real head is 768 -> (1024, 128, 64, 16) -> 1.
    """

    def __init__(self, embed_dim: int = 768, hidden_dims: Sequence[int] = HIDDEN_DIMS):
        super().__init__()
        if len(hidden_dims) != 4:
            raise ValueError(f"AestheticHead: need 4 hidden dims (published layout), got {hidden_dims}")
        h1, h2, h3, h4 = hidden_dims
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, h1), nn.Dropout(0.2),
            nn.Linear(h1, h2), nn.Dropout(0.2),
            nn.Linear(h2, h3), nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


class OutputSelectingEncoder(nn.Module):
    """Adapts ``module(**{input_name: pixels})[index]`` to ``encoder(pixels) -> (B, D)``.

    For ComfyUI's CLIP_VISION: ``OutputSelectingEncoder(clip_vision.model, index=2)`` returns the
    projected image embeddings. The wrapped module becomes a submodule (``.to()`` moves it).
    ``input_dtype``, when set, is the dtype the pixels are cast to (e.g. float32 for a model whose
    layers cast their weights to the input's dtype); otherwise the module's parameter dtype is used.
    """

    def __init__(self, module: nn.Module, index: int = 2, input_name: str = "pixel_values",
                 input_dtype: torch.dtype | None = None):
        super().__init__()
        self.module = module
        self.index = index
        self.input_name = input_name
        self.input_dtype = input_dtype

    def forward(self, pixels: Tensor) -> Tensor:
        if self.input_dtype is not None:
            pixels = pixels.to(self.input_dtype)
        return self.module(**{self.input_name: pixels})[self.index]


class AestheticReward(RewardModel):
    """Aesthetic score (about 1..10) of images; prompt-independent.

    ``image_encoder``: normalised (B, 3, S, S) pixels -> (B, D) embeddings (nn.Module or callable;
    computes on its first parameter's device/dtype, or its ``device``/``dtype`` attributes, else the
    head's). ``transform``: the CLIP eval transform (shortest side, centre crop, OpenAI mean/std).
    """

    name = "aesthetic"
    needs_prompts = False

    def __init__(self, head: AestheticHead, image_encoder: Callable[[Tensor], Tensor],
                 transform: ImageTransform = ImageTransform("crop", 224), chunk_size: int | None = None):
        super().__init__(chunk_size)
        self.head = head
        self.image_encoder = image_encoder
        self.transform = transform
        self.freeze()

    def embed(self, images: Tensor) -> Tensor:
        """(b, 3, H, W) in [0, 1] -> (b, D) L2-normalised float32 image embeddings."""
        device, dtype = module_device_dtype(self.image_encoder, fallback=self.head)
        pixels = self.transform(images.to(device, torch.float32)).to(dtype)
        return F.normalize(self.image_encoder(pixels).float(), dim=-1)

    def image_embeddings(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        head_device, head_dtype = module_device_dtype(self.head)
        return self.head(self.embed(images).to(head_device, head_dtype))


def load_aesthetic_head(path: str | os.PathLike, embed_dim: int = 768, hidden_dims: Sequence[int] = HIDDEN_DIMS,
                        dtype: torch.dtype = torch.float32) -> AestheticHead:
    """The head from ``sac+logos+ava1-l14-linearMSE.pth`` (or a ``.safetensors`` of the same keys)."""
    state_dict = load_weights(path, AESTHETIC_HEAD)
    head = AestheticHead(embed_dim, hidden_dims)
    dims = " -> ".join(str(d) for d in (embed_dim, *hidden_dims, 1))
    load_strict(head, state_dict, f"LAION aesthetic head (linear MLP {dims}, keys layers.0/2/4/6/7)",
                f"'{os.path.basename(os.fspath(path))}'")
    return head.to(dtype).eval().requires_grad_(False)


def load_aesthetic(head_path: str | os.PathLike, clip_path: str | os.PathLike | None = None, *,
                   image_encoder: Callable[[Tensor], Tensor] | None = None,
                   architecture: Architecture = "ViT-L-14-quickgelu", embed_dim: int = 768,
                   hidden_dims: Sequence[int] = HIDDEN_DIMS, image_size: int = 224,
                   chunk_size: int | None = None, dtype: torch.dtype = torch.float32) -> AestheticReward:
    """Aesthetic reward from the head file plus exactly one backbone: ``clip_path`` (open_clip-format
    weights of ``architecture``; its visual tower is kept, the text tower dropped) or
    ``image_encoder`` (a callable taking ``image_size`` x ``image_size`` normalised pixels)."""
    if (clip_path is None) == (image_encoder is None):
        raise ValueError("load_aesthetic: pass exactly one of clip_path or image_encoder")
    head = load_aesthetic_head(head_path, embed_dim, hidden_dims, dtype)
    if clip_path is not None:
        clip = load_open_clip(clip_path, architecture, CLIP_VIT_L14_OPENAI, dtype=dtype)
        out_dim = getattr(clip.visual, "output_dim", embed_dim)
        if out_dim != embed_dim:
            raise WrongArchitectureError(
                f"'{os.path.basename(os.fspath(clip_path))}' ({architecture_name(architecture)}) gives "
                f"{out_dim}-d image embeddings but the aesthetic head expects {embed_dim}-d "
                f"(OpenAI CLIP ViT-L/14: open_clip ViT-L-14-quickgelu, 'openai' weights).")
        image_encoder, image_size = clip.visual, image_size_of(clip)
    return AestheticReward(head, image_encoder, ImageTransform("crop", image_size), chunk_size)
