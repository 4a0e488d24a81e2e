"""Tiny reward-model weights in the real published formats, and natural-looking test images.

Real key names and layouts, small widths: an open_clip CLIP (vision width 32, 2 layers, patch 16 at
32 px; real 49408-token vocabulary so open_clip's tokenizer works), a transformers CLIPModel saved
with ``save_pretrained``, and the LAION aesthetic head at its real size (768 -> ... -> 1).
"""
from __future__ import annotations

import os

import numpy as np
import torch

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# Same, with the 768-d embeddings of OpenAI CLIP ViT-L/14, for the real-size aesthetic head.
TINY_OPEN_CLIP_768 = {**TINY_OPEN_CLIP, "embed_dim": 768}

TINY_HF_CLIP = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
}

PROMPTS = ["a watercolor painting of a fox", "a photo of a red car at night", "abstract geometric art"]


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients, filled discs, fine texture and slight noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 1 + seed), 0.3 + 0.5 * y, 0.6 - 0.3 * x * y], -1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        img[((y - cy) ** 2 + (x - cx) ** 2) < r * r] = rng.uniform(0, 1, 3)
    img += (0.03 * np.sin(40 * x) * np.cos(35 * y))[..., None]
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def image_batch(n: int, height: int, width: int) -> torch.Tensor:
    """(n, 3, H, W) float batch of natural-looking images."""
    return torch.cat([to_tensor(natural_image(height, width, seed=i)) for i in range(n)])


def tiny_open_clip(config=TINY_OPEN_CLIP, seed: int = 0):
    from reward_models.open_clip_backbone import build_open_clip

    torch.manual_seed(seed)
    model = build_open_clip(config).eval()
    with torch.no_grad():  # a non-trivial logit scale, as trained models have
        model.logit_scale.fill_(3.0)
    return model


def write_hps_checkpoint(path: str, model) -> str:
    """As HPSv2 publishes it: ``torch.save({"state_dict": ...})`` with DataParallel's ``module.``."""
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return path


def write_aesthetic_head(path: str, seed: int = 0, embed_dim: int = 768):
    """The real-size head (``layers.0/2/4/6/7``) saved as a plain state dict (.pth) or safetensors."""
    from reward_models.aesthetic import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(embed_dim)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(head.state_dict(), path)
    else:
        torch.save(head.state_dict(), path)
    return head.eval()


def write_hf_clip(folder: str, seed: int = 0):
    """A tiny transformers CLIPModel folder (config.json + model.safetensors)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**TINY_HF_CLIP)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    return model


def install_reward_files(models_dir: str) -> dict:
    """Tiny reward weights, in the published formats and names, under ``<models_dir>/reward_models``
    for the ComfyUI tests. Returns the widget values that select them (file names and the tiny
    open_clip architecture JSONs, which replace the published ViT-L/ViT-H architectures)."""
    import json

    from safetensors.torch import save_file

    root = os.path.join(models_dir, "reward_models")
    os.makedirs(root, exist_ok=True)
    for name, cfg in (("draft_tiny_clip.json", TINY_OPEN_CLIP), ("draft_tiny_clip768.json", TINY_OPEN_CLIP_768)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(cfg, f)
    write_aesthetic_head(os.path.join(root, "sac+logos+ava1-l14-linearMSE.pth"))
    os.makedirs(os.path.join(root, "tiny_clip768"), exist_ok=True)
    save_file(tiny_open_clip(TINY_OPEN_CLIP_768).state_dict(),
              os.path.join(root, "tiny_clip768", "open_clip_model.safetensors"))
    tiny = tiny_open_clip(TINY_OPEN_CLIP)
    write_hps_checkpoint(os.path.join(root, "HPS_v2.1_compressed.pt"), tiny)
    os.makedirs(os.path.join(root, "tiny_clip"), exist_ok=True)
    save_file(tiny.state_dict(), os.path.join(root, "tiny_clip", "open_clip_model.safetensors"))
    write_hf_clip(os.path.join(root, "PickScore_v1"))
    return {
        "DRaFTAestheticReward": {"head": "sac+logos+ava1-l14-linearMSE.pth",
                                 "clip_weights": "tiny_clip768/open_clip_model.safetensors",
                                 "architecture": "draft_tiny_clip768.json", "dtype": "fp32"},
        "DRaFTHPSv2Reward": {"checkpoint": "HPS_v2.1_compressed.pt",
                             "architecture": "draft_tiny_clip.json", "dtype": "fp32"},
        "DRaFTPickScoreReward": {"model_folder": "PickScore_v1", "dtype": "fp32"},
        "DRaFTClipScoreReward": {"weights": "tiny_clip/open_clip_model.safetensors",
                                 "architecture": "draft_tiny_clip.json", "dtype": "fp32"},
    }


def tiny_clip_vision(folder, seed: int = 0, projection_dim: int = 16):
    """ComfyUI's own CLIP_VISION class (``comfy.clip_vision.ClipVisionModel``) at a tiny width
    (32 px, one layer, ``projection_dim``-d projected embeddings: 768 for the aesthetic head) from a
    config file written into ``folder``, with random weights (ComfyUI must be importable)."""
    import json

    import comfy.clip_vision
    config = dict(attention_dropout=0.0, dropout=0.0, hidden_act="quick_gelu", hidden_size=32,
                  image_size=32, initializer_factor=1.0, initializer_range=0.02,
                  intermediate_size=64, layer_norm_eps=1e-5, model_type="clip_vision_model",
                  num_attention_heads=2, num_channels=3, num_hidden_layers=1, patch_size=16,
                  projection_dim=projection_dim, torch_dtype="float32")
    path = os.path.join(str(folder), "tiny_clip_vision.json")
    with open(path, "w") as f:
        json.dump(config, f)
    cv = comfy.clip_vision.ClipVisionModel(path)
    g = torch.Generator().manual_seed(seed)
    cv.load_sd({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in cv.get_sd().items()})
    return cv
