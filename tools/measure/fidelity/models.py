"""The small networks: an EPS UNet for 16x16 digits, a digit classifier, and their training.

* :class:`TinyUNet` -- ``eps(x_t (B,1,16,16), t (B,) in [0, 1000)) -> (B,1,16,16)``; plain
  ``nn.Conv2d`` / ``nn.Linear`` layers so :func:`training.lora.wrap_module` can wrap them.
* :class:`DigitClassifier` -- ``(B,1,16,16) in [0, 1] -> logits (B, 10)``; ``features`` gives the
  penultimate layer.
* :class:`SigmaDenoiser` -- the UNet as the engine's denoiser: ``(x, sigma (B,), idx) -> x0`` with
  ``x0 = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))`` (a VP/EPS model in sigma space, like
  ComfyUI's ``ModelSamplingDiscrete``; ``t`` is the nearest of the 1000 training timesteps), ``x0``
  clipped to the data range [-1, 1] as DDPM/DDIM pixel-space samplers do (``clip_sample``; without
  it about one sample in six ends as speckle noise).
* ``train_denoiser`` / ``train_classifier`` -- seeded training, cached as ``.pt`` files.
"""
from __future__ import annotations

import json
import math
import os
import time
import torch
from torch import nn
import torch.nn.functional as F

from .data import Split, to_unit

NUM_TIMESTEPS = 1000


def ddpm_alphas_cumprod(n: int = NUM_TIMESTEPS) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020: beta 1e-4 -> 0.02 over 1000 steps), float64."""
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_sigmas(steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas of ``steps`` evenly spaced DDIM timesteps from 999 down to 0, then 0."""
    from training.sampler import vp_sigmas_from_alphas_cumprod

    ts = torch.linspace(NUM_TIMESTEPS - 1, 0, steps).round().long().tolist()
    return vp_sigmas_from_alphas_cumprod(ddpm_alphas_cumprod(), ts)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps ``t`` (B,) float."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None].to(t.device)
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 UNet, widths ``(c, 2c, 2c)``, one ResBlock per level, EPS output."""

    def __init__(self, width: int = 32, temb: int = 128):
        super().__init__()
        c1, c2 = width, 2 * width
        self.temb_dim = temb
        self.time_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, temb)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, temb)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, temb)
        self.up2 = ResBlock(2 * c2, c2, temb)
        self.up1 = ResBlock(c2 + c1, c1, temb)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.temb_dim))
        h1 = self.down1(self.conv_in(x), emb)                      # (B, c1, 16, 16)
        h2 = self.down2(self.pool1(h1), emb)                       # (B, c2, 8, 8)
        h = self.mid(self.pool2(h2), emb)                          # (B, c2, 4, 4)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up2(torch.cat([h, h2], 1), emb)                   # (B, c2, 8, 8)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), emb)                   # (B, c1, 16, 16)
        return self.conv_out(F.silu(self.norm_out(h)))


def lora_targets(unet: TinyUNet) -> list:
    """Names of the layers LoRA wraps: every 3x3 conv inside the ResBlocks (the bulk of the
    weights), as SD LoRAs wrap the UNet's projections."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and (".conv1" in name or ".conv2" in name)]


class SigmaDenoiser(nn.Module):
    """The EPS UNet as the engine's ``(x, sigma (B,), prompt_index (B,)) -> x0`` (see module doc).

    The prompt index is ignored: the model is unconditional. ``x0`` is clipped to [-1, 1] (zero
    gradient where a pixel is clipped)."""

    def __init__(self, unet: TinyUNet):
        super().__init__()
        self.unet = unet
        ac = ddpm_alphas_cumprod()
        self.register_buffer("log_sigmas", ((1 - ac) / ac).sqrt().log().float(), persistent=False)

    def forward(self, x, sigma, prompt_index=None):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        t = (sigma.float().log()[None, :] - self.log_sigmas[:, None]).abs().argmin(dim=0)
        eps = self.unet(x / torch.sqrt(1.0 + s ** 2), t)
        return (x - s * eps).clamp(-1.0, 1.0)


def vp_initial_latent(sigma_max: float):
    """``noise -> sqrt(1 + sigma_max^2) * noise`` (x_T of a VP model in sigma space)."""
    scale = math.sqrt(1.0 + float(sigma_max) ** 2)
    return lambda noise: noise * scale


class DigitClassifier(nn.Module):
    """Small CNN: (B,1,16,16) in [0,1] -> logits (B,10)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.SiLU(),        # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),  # 4x4
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x * 2.0 - 1.0)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (x in [-1, 1], background -1)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = F.pad(x, (1, 1, 1, 1), value=-1.0)
    return x[:, :, 1 + dy:17 + dy, 1 + dx:17 + dx]


def train_denoiser(data: Split, steps: int, seed: int = 0, batch: int = 128, lr: float = 2e-3,
                   width: int = 32, ema: float = 0.999, log=print) -> TinyUNet:
    """EPS objective ``|eps - eps_theta(sqrt(ab) x0 + sqrt(1-ab) eps, t)|^2``, t uniform,
    AdamW with cosine decay; returns the EMA weights in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyUNet(width)
    ema_model = TinyUNet(width)
    ema_model.load_state_dict(model.state_dict())
    ac = ddpm_alphas_cumprod().float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, i / max(1, steps)))))
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x0 = _augment(data.images[idx], g)
        t = torch.randint(NUM_TIMESTEPS, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].reshape(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema_model.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step else lv
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  denoiser step {step + 1}/{steps}  loss {running:.4f}  "
                f"{time.perf_counter() - start:.0f}s")
    return ema_model.eval().requires_grad_(False)


def train_classifier(data: Split, steps: int, seed: int, batch: int = 64, lr: float = 2e-3,
                     log=print) -> DigitClassifier:
    """Cross-entropy with one-pixel shifts, AdamW; returns the model in eval mode, frozen."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x = to_unit(_augment(data.images[idx], g))
        loss = F.cross_entropy(model(x), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, data: Split) -> float:
    """Top-1 accuracy on ``data``."""
    return float((model(to_unit(data.images)).argmax(1) == data.labels).float().mean())


def cached(path: str, build, make_empty, log=print):
    """Load ``make_empty()``'s state dict from ``path`` if it exists, else ``build()`` and save it
    (with ``<path>.json`` recording the build time).

    Returns ``(model, seconds the build took (recorded one when loaded), loaded: bool)``."""
    meta_path = path + ".json"
    if os.path.exists(path):
        model = make_empty()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        seconds = 0.0
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                seconds = float(json.load(f).get("build_seconds", 0.0))
        log(f"  loaded {path} (built in {seconds:.0f} s)")
        return model.eval().requires_grad_(False), seconds, True
    start = time.perf_counter()
    model = build()
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(meta_path, "w") as f:
        json.dump({"build_seconds": seconds, "threads": torch.get_num_threads(),
                   "load_average": list(os.getloadavg())}, f)
    return model, seconds, False
