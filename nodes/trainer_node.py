"""DRaFT Trainer: fine-tune a LoRA on the loaded checkpoint to maximise a differentiable reward."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

import comfy.samplers

from ..training.plot import reward_curve_image
from ..training.prompt_sets import PROMPT_SETS
from ..training.memory_plan import MemoryOptions
from . import lora_files, progress_events, validation
from .checked_node import CheckedNode
from .experts_node import DraftExpertsType
from .guidance_node import DraftGuidance
from .heldout_check_node import DraftHeldoutType
from .lora_settings_node import DraftLoRASettingsType
from .memory_options_node import DraftMemory
from .optimizer_node import DraftOptimizerType
from .reward_types import DraftReward
from .save_preview_node import DraftSavePreviewType
from .training_run import RunConfig, TrainingRun, clip_encoder
from .video_settings_node import DraftVideoSettingsType

DraftHistory = io.Custom("DRAFT_HISTORY")


def _pil_to_image(pil) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


class DraftTrainerNode(CheckedNode):  # inputs checked when queued; the rest at the start of execute
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTTrainer",
            display_name="DRaFT Trainer",
            category="DRaFT",
            description=("Trains a LoRA on this checkpoint so that its samples score higher on the "
                         "reward, by backpropagating through the last sampling steps (DRaFT, "
                         "arXiv 2309.17400). Rewards can be gamed: a DRaFT Held-out Check judges "
                         "the LoRA with rewards it never trains on, keeps the best and can stop "
                         "early. Optional nodes set the rest: DRaFT LoRA Settings, Optimizer, Save "
                         "& Preview, Memory Options, Guidance (FLUX), Held-out Check, Video Settings."),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's diffusion model (SD1.x, SD2.x, SDXL, SD3/SD3.5, FLUX.1 dev/schnell, Chroma, Qwen-Image, Lumina 2, HunyuanImage 2.1, Wan 2.1 T2V and Wan 2.2 TI2V-5B: video, see DRaFT Video Settings; Wan 2.2 A14B: the expert to train, see DRaFT Wan 2.2 Experts). It is not modified: the LoRA is trained on a clone."),
                io.Vae.Input("vae", tooltip="Decodes samples for the reward; gradients flow through it."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts."),
                DraftReward.Input("reward", tooltip="What to maximise (a DRaFT reward node, or Combine)."),
                io.Sampler.Input("sampler", tooltip="A DRaFT Sampler: method (DRaFT-LV / DRaFT-K / full / random K), K, n, eta."),
                io.Combo.Input("prompt_set", options=["custom", *PROMPT_SETS], default="custom",
                               tooltip="Train on the prompts below ('custom') or on a bundled set."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na photo of a dog\na lighthouse at sunset",
                                tooltip="One training prompt per line (used when prompt_set is 'custom'); '#' starts a comment line."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt for classifier-free guidance."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps per rollout (paper: DDIM 50). Ignored when SIGMAS are connected."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Sigma schedule (ddim_uniform = the paper's DDIM timesteps). Ignored when SIGMAS are connected."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale during training; 0 = the model family's default (7.5 for SD1.x/2.x/SDXL as in the paper, 4.5 SD3, 1 for guidance-distilled FLUX.1: no negative branch)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Training image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Training image height in pixels."),
                io.Int.Input("iterations", default=200, min=1, max=100000,
                             tooltip="Optimizer updates in total (a resumed run continues up to this number). Paper: 2k small, 10k large."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Prompts per micro-batch (paper: 4 small / 16 large; when VRAM is short, DRaFT Optimizer's grad_accumulation adds micro-batches)."),
                io.Float.Input("learning_rate", default=4e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (paper: 4e-4 small runs, 2e-4 large)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds LoRA init, prompts, noises; same seed and settings give the same LoRA."),
                io.String.Input("lora_name", default="draft/draft_lora",
                                tooltip="File prefix inside models/loras for periodic saves (DRaFT Save & Preview) and the partial save on Cancel (sub-folders allowed)."),
                io.Combo.Input("resume_lora", options=lora_files.resume_choices(), default="none",
                               tooltip="Continue training from a LoRA in models/loras (our files resume optimizer state and step count too); its rank, alpha and layers must match DRaFT LoRA Settings (or its defaults)."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sigma schedule from a scheduler node (overrides steps/scheduler); must end at 0."),
                DraftMemory.Input("memory", optional=True,
                                  tooltip="Optional DRaFT Memory Options (default: automatic: lean settings only when the fast way does not fit the free VRAM)."),
                DraftGuidance.Input("guidance", optional=True,
                                    tooltip="Optional DRaFT Guidance node: FLUX.1 dev's embedded guidance (default 3.5 without it)."),
                DraftLoRASettingsType.Input("lora_settings", optional=True,
                                            tooltip="Optional DRaFT LoRA Settings: rank, alpha, target layers (default rank 8, alpha 8, attention)."),
                DraftOptimizerType.Input("optimizer", optional=True,
                                         tooltip="Optional DRaFT Optimizer: weight decay, gradient clipping and accumulation, KL penalty, mixed precision (default AdamW decay 0.1, clip 10, no accumulation, no KL, auto precision)."),
                DraftSavePreviewType.Input("saving", optional=True,
                                           tooltip="Optional DRaFT Save & Preview: periodic saves and previews (default: no periodic saves, a preview every 10 iterations)."),
                DraftVideoSettingsType.Input("video", optional=True,
                                             tooltip="Optional DRaFT Video Settings, for video models (Wan 2.1, Wan 2.2): frames per training video, decoded latent frames, and which decoded frames the reward scores (default: the family's usual length, 33 for Wan, 3 decoded latent frames, every decoded frame scored). Image models ignore it."),
                DraftHeldoutType.Input("evaluation", optional=True,
                                       tooltip="Optional DRaFT Held-out Check: judges the LoRA every N updates on held-out prompts and seeds with rewards it never trains on, charts them, keeps the best LoRA (<lora_name>_best.safetensors) and can stop early. Without it: no held-out check, the last LoRA."),
                DraftExpertsType.Input("experts", optional=True,
                                       tooltip="Optional DRaFT Wan 2.2 Experts, for Wan 2.2 A14B: the other expert (not trained) and the boundary; the model above is the expert trained."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied (strength 1): the best evaluated one when a DRaFT Held-out Check with keep = best is connected, else the last."),
                io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA (for Save LoRA, or ComfyUI's Load LoRA Model): the best evaluated one with a Held-out Check keeping the best, else the last."),
                DraftHistory.Output(display_name="history", tooltip="Reward per iteration (NaN for skipped steps), the held-out evaluations (with a Held-out Check) and run details."),
                io.Image.Output(display_name="reward_curve", tooltip="The reward curve with its moving average, labelled axes; the held-out curves (each scaled to its range) and the best update when a Held-out Check is connected."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, resume_lora="none", **kwargs):
        # Re-run when the resume file changes on disk (other inputs are compared by ComfyUI).
        return lora_files.file_fingerprint(resume_lora)

    @classmethod
    def execute(cls, model, vae, clip, reward, sampler, prompt_set, prompts, negative_prompt,
                steps, scheduler, cfg, width, height, iterations, batch_size, learning_rate, seed,
                lora_name, resume_lora, sigmas=None, memory=None, guidance=None,
                lora_settings=None, optimizer=None, saving=None, evaluation=None,
                video=None, experts=None) -> io.NodeOutput:
        values = dict(locals())
        checked = validation.check_trainer(cls, values, model, vae, sampler, sigmas,
                                           prompt=cls.hidden.prompt, node_id=cls.hidden.unique_id)
        lora, opt, save, video_options = (checked["options"][k] for k in
                                          ("lora_settings", "optimizer", "saving", "video"))
        config = RunConfig(
            prompts=checked["prompts"], negative_prompt=negative_prompt,
            sampler=sampler.draft_settings, steps=steps, scheduler=scheduler, cfg=cfg, width=width,
            height=height, train=opt.train_settings(iterations=iterations, batch_size=batch_size,
                                                    learning_rate=learning_rate, seed=seed),
            rank=lora.lora_rank, alpha=lora.lora_alpha, target_set=lora.target_modules,
            mixed_precision=opt.mixed_precision, save_every=save.save_every,
            preview_every=save.preview_every, lora_name=lora_name,
            resume_lora=None if resume_lora in (None, "none") else resume_lora,
            sigmas=sigmas, node_id=cls.hidden.unique_id, reward_label=reward.label,
            memory=memory if memory is not None else MemoryOptions(), guidance=guidance,
            heldout=evaluation, video=video_options, experts=experts)
        with torch.inference_mode(False), torch.enable_grad():
            run = TrainingRun(model, vae, clip_encoder(clip), reward, config)
            result = run.run()
            model_out, lora_sd = run.model_with_lora()
            result.lora.to("cpu").requires_grad_(False)  # release VRAM; outputs are cached
        lora_out = lora_files.DraftLoRA(lora_sd, lora_set=result.lora,
                                        facts=lora_files.lora_file_facts(model),
                                        metadata=result.metadata,
                                        diffusers=lora_files.diffusers_folder_facts(model))
        history = {"reward": list(result.history), "skipped": list(result.skipped),
                   "iterations": result.iteration, "saved": list(result.saved),
                   "heldout": result.heldout, "kept_iteration": result.kept_iteration}
        curve = reward_curve_image(result.history, title=f"DRaFT reward: {reward.label}",
                                   heldout=result.heldout)
        finite = [r for r in result.history if r == r]
        text = (f"{result.iteration} iterations, reward {finite[0]:.4f} -> {finite[-1]:.4f}"
                if finite else "no finite reward")
        if result.skipped:
            text += f", {len(result.skipped)} skipped (non-finite)"
        heldout_lines = run.check.lines() if run.check is not None else []
        if result.kept_iteration is not None:
            heldout_lines.append(f"outputs carry the best evaluated LoRA, update "
                                 f"{result.kept_iteration} (the last is saved too)")
        text = "\n".join([text, *heldout_lines, *result.notes])
        progress_events.set_summary(cls.hidden.unique_id, text)
        return io.NodeOutput(model_out, lora_out, history, _pil_to_image(curve),
                             ui=ui.PreviewText(text))
