"""Block-level activation checkpointing on modules that belong to someone else.

The models DRaFT trains are shared (in ComfyUI every clone of a MODEL shares one ``nn.Module``), so
checkpointing cannot be configured on them once and for all. :func:`checkpoint_blocks` instead
gives each chosen module an instance-level ``forward`` that runs the module's own forward under
non-reentrant activation checkpointing while gradients are on (and as is otherwise), and removes it
on exit -- after a normal end, an exception or a Cancel alike -- so every module has its class's
``forward`` back.

Inside a checkpointed block only the block's inputs are kept for backward; its activations are
recomputed, one block at a time, in the backward pass. Nested inside DRaFT-K's per-step
checkpointing (``torch.utils.checkpoint`` nests), the peak of a differentiated step becomes one
block's activations plus the blocks' inputs, instead of the whole network's activations. Values
and gradients are unchanged (same operations, RNG state preserved).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

# Selective checkpointing of convolutional blocks (the VAE decoder's): the outputs of these ops are
# kept for backward, everything else (group norms, activations, additions, attention) is
# recomputed. In the SD VAE decoder the convolutions are 88 % of the forward time and a third of
# the activations, so the recompute costs a few percent of a decode instead of a whole decode.
KEEP_CONVOLUTIONS = (torch.ops.aten.convolution.default,)


def _frozen(value):
    """A shallow copy of a dict argument (ComfyUI's ``transformer_options``), so the recompute in
    the backward pass sees the values of the forward even if the caller mutates the dict later."""
    return dict(value) if isinstance(value, dict) else value


def _checkpointed_forward(forward, keep: Optional[tuple] = None):
    extra = {}
    if keep:
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, list(keep))

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            args = tuple(_frozen(a) for a in args)
            kwargs = {k: _frozen(v) for k, v in kwargs.items()}
            return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
        return forward(*args, **kwargs)
    run.__draft_checkpointed__ = True
    return run


@contextlib.contextmanager
def checkpoint_blocks(modules: Iterable[nn.Module], keep: Optional[tuple] = None) -> Iterator[int]:
    """Checkpoint each of ``modules`` (distinct, not nested in one another) while the block runs.

    ``keep``: ops whose outputs are saved for backward instead of recomputed (selective
    checkpointing, e.g. :data:`KEEP_CONVOLUTIONS`); None: only the block's inputs are kept.
    Yields the number of modules wrapped. A module already wrapped (re-entrant use) is skipped.
    On exit every wrapped module's instance ``forward`` is deleted, or restored if it had one.
    """
    wrapped: list = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            if own is not None and getattr(own, "__draft_checkpointed__", False):
                continue
            module.forward = _checkpointed_forward(module.forward, keep)
            wrapped.append((module, own))
        yield len(wrapped)
    finally:
        for module, own in reversed(wrapped):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own


def is_wrapped(module: nn.Module) -> bool:
    """True while ``module`` carries a checkpointing ``forward`` of :func:`checkpoint_blocks`."""
    return getattr(module.__dict__.get("forward"), "__draft_checkpointed__", False)


def diffusers_unet_units(unet: nn.Module) -> list:
    """Checkpoint units of a diffusers ``UNet2DConditionModel``: every resnet, attention
    (transformer) and down/up-sampler of its down, mid and up blocks (the modules those blocks
    call), the same granularity as :func:`comfy`-side units (a UNet's layers inside its blocks)."""
    units = []
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    for block in blocks:
        if block is None:
            continue
        for attr in ("resnets", "attentions", "downsamplers", "upsamplers"):
            units += list(getattr(block, attr, None) or [])
    return units


def diffusers_decoder_units(decoder: nn.Module) -> list:
    """Checkpoint units of a diffusers VAE ``Decoder``: the mid block's resnets and attention, every
    up block's resnets and upsampler; an up block that is itself one resnet or upsampler (the flat
    ``up_blocks`` of ``AutoencoderKLHunyuanImage``'s decoder) is a unit itself."""
    units = []
    for block in [decoder.mid_block] + list(decoder.up_blocks):
        parts = [m for attr in ("resnets", "attentions", "upsamplers")
                 for m in (getattr(block, attr, None) or []) if m is not None]
        units += parts or ([block] if block is not decoder.mid_block else [])
    return units


__all__ = ["checkpoint_blocks", "is_wrapped", "diffusers_unet_units", "diffusers_decoder_units",
           "KEEP_CONVOLUTIONS"]
