"""DRaFT Evaluate: score a batch of images, or of videos' frames, with a reward (before/after
comparisons)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management

from ..training.prompt_sets import parse_prompt_lines
from ..training.trainer import score_samples
from .checked_node import CheckedNode
from .reward_types import DraftReward


class DraftEvaluate(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTEvaluate",
            display_name="DRaFT Evaluate",
            category="DRaFT",
            description=("Scores images, or videos, with a DRaFT reward; shows per-image (per-video) "
                         "scores and outputs their mean. A video (a video VAE decode's frames, "
                         "e.g. Wan's) is scored as the trainer scores it: an image reward's mean "
                         "over its frames, a video reward (Temporal Consistency) on its frames in "
                         "order."),
            inputs=[
                io.Image.Input("images", tooltip="The images to score (a batch), or the frames of one or more videos, each video's frames in order, one video after the other (what VAE Decode gives for a video latent batch)."),
                DraftReward.Input("reward", tooltip="The reward to score them with."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt of each image (each video, with frames_per_video), one per line; a single line applies to all. Only text-conditioned rewards use it."),
                io.Int.Input("chunk_size", default=8, min=1, max=256,
                             tooltip="Images (frames) scored per forward pass, whole videos at a time (at least one); lower it if VRAM is short."),
                # optional: graphs saved before this input existed (API format) still run
                io.Int.Input("frames_per_video", default=0, min=0, max=4096, optional=True,
                             tooltip="0: the batch is images, each scored on its own. N: the batch is videos of N frames each (the batch size must be a multiple of N); each video's score is the mean over its frames (a video reward such as Temporal Consistency scores the video as a whole), shown per video."),
            ],
            outputs=[io.Float.Output(display_name="mean_score", tooltip="Mean reward over the batch (over the videos, with frames_per_video).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, reward, prompts, chunk_size, frames_per_video=0) -> io.NodeOutput:
        lines = parse_prompt_lines(prompts) or [""]
        frames = frames_per_video or 1
        what = "video" if frames_per_video else "image"
        if images.shape[0] % frames:
            raise ValueError(f"DRaFT Evaluate: {images.shape[0]} images are not whole videos of "
                             f"frames_per_video = {frames_per_video} frames")
        if not frames_per_video and getattr(reward.model, "scores_videos", False):
            raise ValueError(f"DRaFT Evaluate: {reward.label} scores whole videos: set "
                             "frames_per_video to the frames of each video")
        n = images.shape[0] // frames
        if len(lines) not in (1, n):
            raise ValueError(f"{len(lines)} prompt lines for {n} {what}s: give one line, or one per {what}")
        lines = lines * n if len(lines) == 1 else lines
        comfy.model_management.load_models_gpu(reward.patchers)
        device = reward.device or comfy.model_management.get_torch_device()
        step = max(1, chunk_size // frames)  # samples (whole videos) per forward pass
        scores = []
        with torch.no_grad():
            for i in range(0, n, step):
                batch = images[i * frames:(i + step) * frames].movedim(-1, 1).to(device, torch.float32)
                scores.append(score_samples(reward.model, batch, lines[i:i + step]).cpu())
        scores = torch.cat(scores)
        mean = float(scores.mean())
        text = f"{reward.label}: mean {mean:.5f}" + (
            f" over {n} videos of {frames} frames" if frames_per_video else "") + "\n" + "\n".join(
            f"{what} {i}: {s:.5f}" for i, s in enumerate(scores.tolist()))
        # "text" is what ComfyUI's text previews show; the draft_* keys are for scripts (make demo).
        return io.NodeOutput(mean, ui={"text": [text], "draft_mean": [mean],
                                       "draft_scores": scores.tolist()})
