"""DRaFT Sampler: the differentiable sampler's settings as a ComfyUI ``SAMPLER``.

The object it outputs is a regular ``comfy.samplers.KSAMPLER``: plugged into
SamplerCustomAdvanced it samples (deterministic DDIM at eta = 0, ancestral DDIM above) with
ComfyUI's own noise scaling, inpainting masks and previews. The DRaFT Trainer reads its
``draft_settings`` to know which steps carry gradients.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.samplers

from ..training.sampler import SamplerSettings, ddim_step, signal_scale
from .checked_node import CheckedNode

METHOD_CHOICES = {
    "DRaFT-LV": "draft_lv",
    "DRaFT-K": "draft_k",
    "DRaFT (full)": "draft",
    "random K (AlignProp)": "random_k",
}


@torch.no_grad()
def sample_draft_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0):
    """k-diffusion-style sampler function: DDIM in sigma space (see training.sampler.ddim_step).

    ``model`` is ComfyUI's KSamplerX0Inpaint; the signal scale ``a(sigma)`` is read off the model's
    own ``noise_scaling`` so EPS, v-prediction and flow models are all handled.
    """
    extra_args = {} if extra_args is None else extra_args
    model_sampling = model.inner_model.inner_model.model_sampling
    renoise = lambda s, n, x0: model_sampling.noise_scaling(s, n, x0)  # noqa: E731
    seed = extra_args.get("seed", None)
    generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        z = None
        if eta > 0 and float(sigma_next) > 0:
            z = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x = ddim_step(x, x0, sigma, sigma_next, signal_scale(renoise, sigma, x),
                      signal_scale(renoise, sigma_next, x), eta, z)
    return x


class DraftKSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER running :func:`sample_draft_ddim`, carrying the DRaFT settings."""

    def __init__(self, settings: SamplerSettings):
        super().__init__(sample_draft_ddim, extra_options={"eta": settings.eta})
        self.draft_settings = settings


class DraftSamplerNode(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRaFTSampler",
            display_name="DRaFT Sampler",
            category="DRaFT",
            description=(
                "Settings of DRaFT's differentiable DDIM sampler: which sampling steps carry "
                "gradients during training. Also works as a plain sampler in SamplerCustomAdvanced."),
            inputs=[
                io.Combo.Input("method", options=list(METHOD_CHOICES), default="DRaFT-LV",
                               tooltip=("DRaFT-LV: gradient through the last step only, averaged over n "
                                        "re-noised copies (the paper's most efficient variant). DRaFT-K: "
                                        "gradient through the last K steps. DRaFT (full): through all steps "
                                        "(slow, can explode). Random K: K drawn per update (AlignProp).")),
                io.Int.Input("k", default=1, min=1, max=1000,
                             tooltip="DRaFT-K: number of final sampling steps that carry gradients (paper: K = 1 works best)."),
                io.Int.Input("k_min", default=1, min=1, max=1000,
                             tooltip="Random K: smallest K drawn per update."),
                io.Int.Input("k_max", default=10, min=1, max=1000,
                             tooltip="Random K: largest K drawn per update (AlignProp's mean is about 8)."),
                io.Int.Input("lv_samples", default=2, min=1, max=16,
                             tooltip="DRaFT-LV: n re-noised single-step samples per rollout (paper: 2)."),
                io.Boolean.Input("lv_include_original", default=False,
                                 tooltip="DRaFT-LV: also differentiate the chain's own last step (n + 1 terms, as one public implementation does)."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="DDIM stochasticity: 0 is deterministic DDIM (the paper), 1 is ancestral (AlignProp)."),
                io.Boolean.Input("checkpointing", default=True,
                                 tooltip="Recompute each differentiated step's activations in the backward pass: memory stays flat in K for about one extra forward per step."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="A SAMPLER for DRaFT Trainer, or for SamplerCustomAdvanced as a plain DDIM sampler.")],
        )

    @classmethod
    def execute(cls, method, k, k_min, k_max, lv_samples, lv_include_original, eta,
                checkpointing) -> io.NodeOutput:
        settings = SamplerSettings(method=METHOD_CHOICES[method], k=k, k_min=k_min,
                                   k_max=k_max, lv_samples=lv_samples,
                                   lv_include_original=lv_include_original, eta=eta,
                                   checkpointing=checkpointing)
        return io.NodeOutput(DraftKSampler(settings))
