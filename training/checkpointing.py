"""Block-level activation checkpointing on modules that belong to someone else.

The models DRaFT trains are shared (in ComfyUI every clone of a MODEL shares one ``nn.Module``), so
checkpointing cannot be configured on them once and for all. :func:`checkpoint_blocks` instead
gives each chosen module an instance-level ``forward`` that runs the module's own forward under
non-reentrant activation checkpointing while gradients are on (and as is otherwise), and removes it
on exit -- after a normal end, an exception or a Cancel alike -- so every module has its class's
``forward`` back.

Blocks of a causal video VAE (Wan 2.1's decoder, ``block(x, feat_cache, feat_idx)``) carry a
mutable cache of the previous latent frame from call to call; they are checkpointed as pure
functions of their input and a snapshot of the cache slots they use (:func:`_cached_checkpoint`).
The decoder itself, called once per latent frame the same way, is a unit too: its blocks'
checkpoints nest inside it, so the backward pass recomputes one latent frame at a time and, inside
it, one block at a time.

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


def _causal_cache(args: tuple, kwargs: dict):
    """``(feat_cache, feat_idx)`` when a call follows the causal video VAEs' convention (Wan 2.1 in
    ComfyUI and diffusers: ``block(x, feat_cache, feat_idx)``, a list of per-convolution caches
    of the previous latent frame and a one-int list counting the slots used), else None."""
    cache = kwargs.get("feat_cache", args[1] if len(args) > 1 else None)
    index = kwargs.get("feat_idx", args[2] if len(args) > 2 else None)
    if isinstance(cache, list) and isinstance(index, list) and len(index) == 1 \
            and isinstance(index[0], int):
        return cache, index
    return None


def _causal_slots(module: nn.Module) -> int:
    """At most how many cache slots a causal-cache block uses in one call: its causal convolutions
    (ComfyUI's ``CausalConv3d``, diffusers' ``WanCausalConv3d``; a 1x1 shortcut among them uses
    none, so this can be more)."""
    return sum(1 for m in module.modules() if type(m).__name__.endswith("CausalConv3d"))


def _cached_checkpoint(forward, args: tuple, kwargs: dict, cache: list, index: list, extra: dict,
                       slots: list):
    """Checkpoint a causal-cache block as a pure function of its input and a snapshot of the cache
    slots it uses: the block reads and replaces the slots from ``index[0]`` on; the recompute in
    the backward pass runs on the snapshot (the shared list has moved on by then), and the new
    slots (tensors that carry the gradient into the next latent frame) come out of the checkpoint
    and are written back, as the block itself would have. ``slots``: ``[upper bound, exact or
    None]``, the exact count learnt from the first call (the snapshot holds only those slots, so
    no earlier frame's cache outlives its use)."""
    start = index[0]
    width = slots[1] if slots[1] is not None else slots[0]
    snapshot = tuple(cache[start:start + width])
    size, rest = len(cache), args[3:]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("feat_cache", "feat_idx")}

    def pure(x, old, first):
        local = [None] * size
        local[first:first + len(old)] = old
        position = [first]
        out = forward(x, local, position, *rest, **kwargs)
        return out, position[0], tuple(local[first:position[0]])
    out, end, new = checkpoint(pure, args[0], snapshot, start, use_reentrant=False, **extra)
    if end - start > width:
        raise RuntimeError(f"a causal-cache block used {end - start} cache slots, more than its "
                           f"{width} causal convolutions")
    slots[1] = end - start
    cache[start:end] = list(new)
    index[0] = end
    return out


def _checkpointed_forward(forward, keep: Optional[tuple] = None, module: Optional[nn.Module] = None):
    extra = {}
    slots = [_causal_slots(module) if module is not None else 0, None]
    if keep:
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, list(keep))

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            causal = _causal_cache(args, kwargs)
            if causal is not None:
                return _cached_checkpoint(forward, args, kwargs, *causal, extra, slots)
            args = tuple(_frozen(a) for a in args)
            kwargs = {k: _frozen(v) for k, v in kwargs.items()}
            return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
        return forward(*args, **kwargs)
    run.__draft_checkpointed__ = True
    return run


@contextlib.contextmanager
def checkpoint_blocks(modules: Iterable[nn.Module], keep: Optional[tuple] = None) -> Iterator[int]:
    """Checkpoint each of ``modules`` (distinct; nested only as a causal video decoder and its
    blocks are) while the block runs.

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
            module.forward = _checkpointed_forward(module.forward, keep, module)
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
    up block's resnets and upsampler; a causal video decoder (Wan's ``WanDecoder3d``, called once
    per latent frame) is also a unit itself, its blocks checkpointed inside it."""
    units = [decoder] if _causal_slots(decoder) else []  # Wan's: one unit per latent frame too
    for block in [decoder.mid_block] + list(decoder.up_blocks):
        for attr in ("resnets", "attentions", "upsamplers"):
            units += [m for m in (getattr(block, attr, None) or []) if m is not None]
    return units


__all__ = ["checkpoint_blocks", "is_wrapped", "diffusers_unet_units", "diffusers_decoder_units",
           "KEEP_CONVOLUTIONS"]
