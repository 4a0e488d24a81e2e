"""DRaFT Evaluate: score a batch of images with a reward (before/after comparisons)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management

from ..training.prompt_sets import parse_prompt_lines
from .checked_node import CheckedNode
from .reward_types import DraftReward


class DraftEvaluate(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTEvaluate",
            display_name="DRaFT Evaluate",
            category="DRaFT",
            description="Scores images with a DRaFT reward; shows per-image scores and outputs their mean.",
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch)."),
                DraftReward.Input("reward", tooltip="The reward to score them with."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt of each image, one per line; a single line applies to all images. Only text-conditioned rewards use it."),
                io.Int.Input("chunk_size", default=8, min=1, max=256,
                             tooltip="Images scored per forward pass (lower it if VRAM is short)."),
            ],
            outputs=[io.Float.Output(display_name="mean_score", tooltip="Mean reward over the batch.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, reward, prompts, chunk_size) -> io.NodeOutput:
        lines = parse_prompt_lines(prompts) or [""]
        n = images.shape[0]
        if len(lines) not in (1, n):
            raise ValueError(f"{len(lines)} prompt lines for {n} images: give one line, or one per image")
        lines = lines * n if len(lines) == 1 else lines
        comfy.model_management.load_models_gpu(reward.patchers)
        device = reward.device or comfy.model_management.get_torch_device()
        scores = []
        with torch.no_grad():
            for i in range(0, n, chunk_size):
                batch = images[i:i + chunk_size].movedim(-1, 1).to(device, torch.float32)
                scores.append(reward.model(batch, lines[i:i + chunk_size]).float().cpu())
        scores = torch.cat(scores)
        mean = float(scores.mean())
        text = f"{reward.label}: mean {mean:.5f}\n" + "\n".join(
            f"image {i}: {s:.5f}" for i, s in enumerate(scores.tolist()))
        # "text" is what ComfyUI's text previews show; the draft_* keys are for scripts (make demo).
        return io.NodeOutput(mean, ui={"text": [text], "draft_mean": [mean],
                                       "draft_scores": scores.tolist()})
