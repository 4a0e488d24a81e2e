"""Tiny plain-torch stand-ins for a latent diffusion model, for the engine's tests, bench and demo.

* :class:`ToyEpsNet`: an EPS-prediction conv net on (B, 4, h, w) latents, conditioned on the noise
  level and a prompt index; it follows the EPS/VP convention of Stable Diffusion
  (``c_in = 1 / sqrt(1 + sigma^2)``, ``x0 = x - sigma * eps``).
* :class:`ToyDecoder`: latent (B, 4, h, w) -> image (B, 3, 2h, 2w) in [0, 1].
* :func:`colour_reward`: a differentiable reward, higher when the image is closer to a target
  colour; range (-3, 0].

Random weights: nothing here is a trained model. They exist so that gradients, truncation and the
training loop can be checked exactly and quickly on a CPU.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


class ToyEpsNet(nn.Module):
    """``eps(x_in, sigma, prompt_index)``; ``x_in`` is the VP-scaled latent (B, C, h, w).

    LoRA targets: ``conv_in``, ``mid.0``, ``mid.2``, ``conv_out`` (convs) and ``time_proj``,
    ``prompt_proj`` (linears).
    """

    def __init__(self, channels: int = 4, width: int = 32, num_prompts: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time_proj = nn.Linear(16, width)
        self.prompt_embed = nn.Embedding(num_prompts, 16)
        self.prompt_proj = nn.Linear(16, width)
        self.mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1))
        self.norm = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    @staticmethod
    def sigma_features(sigma: torch.Tensor) -> torch.Tensor:
        """(B,) noise levels -> (B, 16) sinusoidal features of log(sigma)."""
        t = torch.log(sigma.float().clamp_min(1e-4))[:, None]
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=sigma.device))[None]
        return torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], dim=1)

    def forward(self, x_in: torch.Tensor, sigma: torch.Tensor,
                prompt_index: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_in)
        emb = self.time_proj(self.sigma_features(sigma).to(h.dtype))
        emb = emb + self.prompt_proj(self.prompt_embed(prompt_index))
        h = F.silu(self.norm(h + emb[:, :, None, None]))
        h = h + self.mid(h)
        return self.conv_out(F.silu(h))


class ToyDenoiser(nn.Module):
    """Wraps :class:`ToyEpsNet` as a sigma-space denoiser ``(x, sigma, prompt_index) -> x0``."""

    def __init__(self, eps_net: ToyEpsNet):
        super().__init__()
        self.eps_net = eps_net

    def forward(self, x: torch.Tensor, sigma: torch.Tensor,
                prompt_index: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_in = 1.0 / torch.sqrt(1.0 + s ** 2)
        return x - s * self.eps_net(x * c_in, sigma, prompt_index)


class ToyDecoder(nn.Module):
    """Latent (B, 4, h, w) -> image (B, 3, 2h, 2w) in [0, 1] (sigmoid output)."""

    def __init__(self, channels: int = 4, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(latent))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return torch.sigmoid(self.conv2(h))


def colour_reward(images: torch.Tensor, prompts: Sequence[str] = (),
                  target: Sequence[float] = (0.9, 0.3, 0.1)) -> torch.Tensor:
    """Minus the mean squared distance of each pixel to ``target`` (RGB in [0,1]); (B,) in (-3, 0]."""
    t = torch.as_tensor(target, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return -((images - t) ** 2).sum(dim=1).mean(dim=(1, 2))


def build_toy_model(seed: int = 0, num_prompts: int = 8, width: int = 32):
    """(denoiser, decoder) with seeded random weights, frozen (requires_grad False)."""
    g = torch.Generator().manual_seed(seed)
    eps = ToyEpsNet(width=width, num_prompts=num_prompts)
    dec = ToyDecoder()
    for module in (eps, dec):
        for p in module.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))))
            p.requires_grad_(False)
    return ToyDenoiser(eps), dec


TOY_LORA_TARGETS = ("eps_net.conv_in", "eps_net.mid.0", "eps_net.mid.2", "eps_net.conv_out",
                    "eps_net.time_proj", "eps_net.prompt_proj")


def toy_lora(denoiser: nn.Module, rank: int = 2, seed: int = 5):
    """A rank-``rank`` LoRA (alpha = rank) on :data:`TOY_LORA_TARGETS` of ``denoiser`` with both
    factors seeded non-zero (N(0, 0.05^2), generator ``seed``), so every factor gets a gradient."""
    from .lora import wrap_module
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=rank, alpha=rank, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora
