"""Block-level activation checkpointing on modules that belong to someone else.

The models DRaFT trains are shared (in ComfyUI every clone of a MODEL shares one ``nn.Module``), so
checkpointing cannot be configured on them once and for all. :func:`checkpoint_blocks` instead
gives each chosen module an instance-level ``forward`` that runs the module's own forward
checkpointed while gradients are on (and as is otherwise), and removes it on exit -- after a
normal end, an exception or a Cancel alike -- so every module has its class's ``forward`` back.

Inside a checkpointed block only the block's inputs are kept for backward; its activations are
recomputed, one block at a time, in the backward pass. Nested inside DRaFT-K's per-step
checkpointing, the peak of a differentiated step becomes one block's activations plus the blocks'
inputs, instead of the whole network's activations. Values and gradients are unchanged (same
operations, RNG and autocast states of the forward).

Blocks of a causal video VAE (Wan 2.1's decoder, ``block(x, feat_cache, feat_idx)``) carry a
mutable cache of the previous latent frame from call to call; they are checkpointed as pure
functions of their input and a snapshot of the cache slots they use (:func:`_cached_checkpoint`).
The decoder itself, called once per latent frame the same way, is a unit too: its blocks'
checkpoints nest inside it, so the backward pass recomputes one latent frame at a time and, inside
it, one block at a time. Wan's blocks given several frames (every latent frame after the first
becomes 4) are recomputed one frame at a time, last first (:class:`_FrameByFrame`), and a cache
slot's gradient is copied out of its convolution input's (:class:`_CompactGradient`).

**Blocks that write in place.** ComfyUI's FLUX and Chroma blocks add residuals in place
(``txt += ...``, ``x += ...``, ``img.addcmul_(...)``): into the block's own argument, and into
tensors a layer norm saved for its backward. Plain autograd refuses that. torch's non-reentrant
checkpoint recomputes such a block from its overwritten argument and keeps aliases of the tensors
it saves, so the recompute's later writes reach them: on the tiny FLUX and Chroma of the tests the
LoRA gradient came out 25 % and 79 % off (DRaFT-K, K = 3: the blocks nested in the step
checkpoint), or the backward was refused (K = 1). So a block is checkpointed one of two ways:

* a block that does not write into its arguments (the UNets', SD3's, Qwen-Image's, the VAE
  decoders', CLIP's) by torch's non-reentrant checkpoint, as always: nothing changes for it;
* a block that does by :class:`_RecomputedBlock`, an autograd Function in the manner of
  :mod:`training.step_checkpoint`: its forward runs without a graph on copies of the arguments the
  block writes into (the copies become its outputs, the untouched originals are what is kept: the
  same tensors an out-of-place block keeps); its backward recomputes the block with gradients on,
  noting the version of every tensor autograd saves, and runs the recompute again with copies of
  those the block overwrote (by their position in the order of saving, remembered per block), then
  returns the gradients of the block's tensor arguments and of the trainable tensors it uses: its
  own parameters that require grad and those of ``params`` (the LoRA factors, which ComfyUI
  applies as weight wrappers outside the block's modules) it was found to use on its first
  backward (:class:`_Unit`; a tensor requiring grad reached otherwise is refused there, not
  dropped). Beside torch's way this holds, during one block's backward, its output gradients and
  its recomputed outputs (a Function's backward cannot free them).

Which arguments a block writes into is learnt, per module and layout of tensor arguments (found
through lists, tuples, dicts and dataclass instances), on its first call with gradients: that call
runs under :class:`_WriteWatch`, which stops it just before its first write into an argument's
storage (a block that never writes in place runs once, copying nothing), and the Function's
forward then finds the rest the same way. Later calls check by the arguments' version counters
that no other argument was written (:class:`_Notes`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

# Selective checkpointing of convolutional blocks (the VAE decoder's): the outputs of these ops are
# kept for backward, everything else (group norms, activations, additions, attention) is
# recomputed. In the SD VAE decoder the convolutions are 88 % of the forward time and a third of
# the activations, so the recompute costs a few percent of a decode instead of a whole decode.
KEEP_CONVOLUTIONS = (torch.ops.aten.convolution.default,)

_RECOMPUTE_TRIES = 4  # a recompute that still finds new overwritten saved tensors after this fails


def _frozen(value):
    """A shallow copy of a dict argument (ComfyUI's ``transformer_options``), so the recompute in
    the backward pass sees the values of the forward even if the caller mutates the dict later."""
    return dict(value) if isinstance(value, dict) else value


@dataclass
class _Notes:
    """What a block does with one layout of tensor arguments (learnt; see the module docstring).

    ``written``: positions (in the layout) of the arguments it writes into; None until probed.
    ``copy_saved``: positions, in the order autograd saves them during the block's forward, of the
    saved tensors the block overwrites later in that forward (copied when saved in the recompute).
    """

    written: Optional[frozenset] = None
    copy_saved: set = field(default_factory=set)


# module -> {layout of tensor arguments: _Notes}: what the module's code does, for the process
_NOTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Unit:
    """One checkpointed module: the trainable tensors it may use (``params`` given to
    :func:`checkpoint_blocks`, plus its own parameters that require grad) until its first backward
    through the Function finds those it does use; from then on only those are passed to (and
    through) the Function. ``notes``: the module's :class:`_Notes` per layout."""

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor] = ()):
        self.module, self.given, self.used = module, list(params), None
        self.notes: dict = _NOTES.setdefault(module, {})

    def params(self) -> list:
        if self.used is not None:
            return [p for p in self.used if p.requires_grad]
        seen, out = set(), []
        for p in list(self.module.parameters()) + self.given:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out


def _split(obj, name: str, tensors: list, names: list, depth: int = 0):
    """Take every tensor out of ``obj`` (through lists, tuples, dicts and dataclass instances, as
    Chroma's modulation vectors come) into ``tensors`` (and a readable path each into ``names``).
    Returns ``rebuild(new_tensors)``, which makes ``obj`` again with ``new_tensors`` in their
    places and keeps no reference to a tensor of ``obj`` (dicts are always shallow-copied: a
    caller's later change to a dict does not reach the recompute), or None when ``obj`` holds no
    tensor and is no dict (then it is used as is)."""
    if isinstance(obj, torch.Tensor):
        i = len(tensors)
        tensors.append(obj)
        names.append(name)
        return lambda new: new[i]
    if depth > 8:
        return None
    if isinstance(obj, dict):
        parts = {k: _split(v, f"{name}[{k!r}]", tensors, names, depth + 1) for k, v in obj.items()}
        parts = {k: part for k, part in parts.items() if part is not None}
        skeleton = copy.copy(obj)
        for k in parts:
            skeleton[k] = None

        def rebuild_dict(new):
            out = copy.copy(skeleton)
            for k, part in parts.items():
                out[k] = part(new)
            return out
        return rebuild_dict
    if isinstance(obj, (list, tuple)):
        parts = [_split(v, f"{name}[{k}]", tensors, names, depth + 1) for k, v in enumerate(obj)]
        if all(part is None for part in parts):
            return None
        kept = [v if part is None else None for v, part in zip(obj, parts)]

        def items(new):
            return [v if part is None else part(new) for v, part in zip(kept, parts)]
        if isinstance(obj, list):
            return items
        if hasattr(obj, "_fields"):  # a namedtuple
            return lambda new, kind=type(obj): kind(*items(new))
        return lambda new, kind=type(obj): kind(items(new))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        parts = {f.name: _split(getattr(obj, f.name), f"{name}.{f.name}", tensors, names, depth + 1)
                 for f in dataclasses.fields(obj)}
        parts = {k: part for k, part in parts.items() if part is not None}
        if not parts:
            return None
        skeleton = copy.copy(obj)
        for k in parts:
            object.__setattr__(skeleton, k, None)

        def rebuild_dataclass(new):
            out = copy.copy(skeleton)
            for k, part in parts.items():
                object.__setattr__(out, k, part(new))
            return out
        return rebuild_dataclass
    return None


def _taken_apart(obj, name: str = "") -> tuple:
    """``(tensors, names, rebuild)`` of ``obj`` (see :func:`_split`; ``rebuild`` always given)."""
    tensors, names = [], []
    part = _split(obj, name, tensors, names)
    return tensors, names, (part if part is not None else (lambda new: obj))


class _Call:
    """One checkpointed call of a block: its forward, how to rebuild its arguments around new
    tensors, its tensor arguments' names, the notes of this layout, its unit; after its first
    run, how to rebuild its output around the Function's outputs."""

    def __init__(self, forward, rebuild, names, notes, unit, written=()):
        self.forward, self.rebuild, self.names = forward, rebuild, names
        self.notes, self.unit = notes, unit
        self.written = set(written)  # (arguments known to be written before the notes are)
        self.rebuild_output = None

    def run(self, tensors) -> list:
        """The block on ``tensors`` in the places of its tensor arguments; its output's tensors."""
        args, kwargs = self.rebuild(tensors)
        output = self.forward(*args, **kwargs)
        outputs, _, rebuild = _taken_apart(output)
        if self.rebuild_output is None:
            self.rebuild_output = rebuild
        return outputs


class _WritesArgument(Exception):
    """Raised by :class:`_WriteWatch` before an op writes into a watched argument."""

    def __init__(self, positions):
        super().__init__(f"writes into the arguments at {sorted(positions)}")
        self.positions = set(positions)


def _storage(t: torch.Tensor):
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):  # no storage (e.g. a sparse tensor)
        return None


class _WriteWatch(TorchDispatchMode):
    """Stops the code it watches (:class:`_WritesArgument`) just before an op writes into the
    storage of one of ``tensors`` (not those at the positions ``skip``), in place or as ``out=``."""

    def __init__(self, tensors, skip=()):
        super().__init__()
        self.storages: dict = {}
        for i, t in enumerate(tensors):
            ref = _storage(t) if i not in skip else None
            if ref is not None:
                self.storages.setdefault(ref, set()).add(i)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable and self.storages:
            for i, argument in enumerate(schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                for t in (value if isinstance(value, (list, tuple)) else (value,)):
                    hit = self.storages.get(_storage(t)) if isinstance(t, torch.Tensor) else None
                    if hit:
                        raise _WritesArgument(hit)
        return func(*args, **kwargs)


def _copies(tensors, positions) -> list:
    """``tensors`` with those at ``positions`` copied (a tensor passed twice, copied once)."""
    made: dict = {}
    out = []
    for i, t in enumerate(tensors):
        if i in positions:
            if id(t) not in made:
                made[id(t)] = t.clone()
            t = made[id(t)]
        out.append(t)
    return out


def _autocast_states(device_type: str) -> list:
    """``(device type, enabled, dtype)`` of autocast for the CPU and ``device_type``."""
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in dict.fromkeys(("cpu", device_type))]


class _SavedTracker:
    """Saved-tensor hooks of a recompute: each saved tensor's version noted when saved, those at
    the positions ``copy`` copied; :meth:`overwritten` gives the positions written since.
    ``originals``: ``id(copy of an argument) -> (weak reference to it, its version, the saved
    argument)``. It holds the graph's tensors weakly: autograd keeps the hooks as long as the
    graph, so a strong reference would keep every activation of the block until its whole
    backward is done, or, through a copy's ``grad_fn``, keep a discarded recompute for good."""

    def __init__(self, copy, originals: dict):
        self.copy, self.originals, self.saved = copy, originals, []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        known = self.originals.get(id(t))
        if known is not None and known[0]() is t and t._version == known[1]:
            # a copy of an argument, not yet written: the saved argument has the same values
            self.saved.append(None)
            return known[2]
        kept = t.detach()  # (detached, as torch's checkpoint keeps them: no reference cycle)
        if len(self.saved) in self.copy:
            kept = kept.clone()
        self.saved.append((weakref.ref(kept), kept._version))
        return kept

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def release(self) -> None:
        self.originals, self.saved = {}, []

    def overwritten(self) -> set:
        return {i for i, entry in enumerate(self.saved)
                if entry is not None and entry[0]() is not None and entry[0]()._version != entry[1]}


def _trainable_leaves(outputs) -> list:
    """The tensors requiring grad that the graph of ``outputs`` accumulates gradients into."""
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen, found = set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if variable is not None:
            found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


class _RecomputedBlock(torch.autograd.Function):
    """``call`` on its tensor arguments: forward without a graph, recomputed for the backward."""

    @staticmethod
    def forward(ctx, call: _Call, *inputs: torch.Tensor):
        n = len(call.names)
        tensors = inputs[:n]
        ctx.call, ctx.params = call, inputs[n:]
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        ctx.rng = _rng_states(tensors)
        devices = ctx.rng[1]
        ctx.autocast = _autocast_states(devices[0].type if devices else "cpu")
        notes = call.notes
        if notes.written is None:  # the first call with this layout: find what it writes into
            written = set(call.written)
            while True:
                try:
                    with _WriteWatch(tensors, skip=written):
                        flat = call.run(_copies(tensors, written))
                    break
                except _WritesArgument as stop:  # stopped before writing: run again, copying
                    written |= stop.positions
                    _set_rng_states(ctx.rng)
            notes.written = frozenset(written)
            return _RecomputedBlock._outputs(ctx, flat)
        given = _copies(tensors, notes.written)
        versions = [t._version for t in given]
        flat = call.run(given)
        written = frozenset(i for i, (t, v) in enumerate(zip(given, versions)) if t._version != v)
        if written - notes.written:
            names = [call.names[i] for i in sorted(written - notes.written)]
            notes.written = notes.written | written  # (the next call copies them too)
            raise _written_error(call.unit, names)
        return _RecomputedBlock._outputs(ctx, flat)

    @staticmethod
    def _outputs(ctx, outputs: list) -> tuple:
        """The block's output tensors, those of no floating dtype marked non-differentiable."""
        outputs = tuple(outputs)
        frozen = [o for o in outputs if not (o.is_floating_point() or o.is_complex())]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        n, notes, unit = len(call.names), call.notes, call.unit
        saved = ctx.saved_tensors
        need_in, need_params = ctx.needs_input_grad[1:1 + n], ctx.needs_input_grad[1 + n:]
        for _ in range(_RECOMPUTE_TRIES):
            leaves = [t.detach().requires_grad_(need) for t, need in zip(saved, need_in)]
            with torch.random.fork_rng(devices=ctx.rng[1]), contextlib.ExitStack() as recompute:
                _set_rng_states(ctx.rng)
                recompute.enter_context(torch.enable_grad())
                for device, on, dtype in ctx.autocast:  # the forward's autocast states
                    recompute.enter_context(torch.autocast(device, dtype=dtype, enabled=on))
                # the block writes into copies of the arguments it writes into (made with
                # gradients on: a copy of a leaf passes its gradient on to the leaf)
                inputs = _copies(leaves, notes.written)
                originals = {id(c): (weakref.ref(c), c._version, t.detach())
                             for c, t, leaf in zip(inputs, saved, leaves) if c is not leaf}
                tracker = _SavedTracker(set(notes.copy_saved), originals)
                recompute.enter_context(
                    torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack))
                flat = call.run(inputs)
                inputs = originals = None
            overwritten = tracker.overwritten()
            tracker.release()  # (autograd keeps the hooks with the graph: they must hold nothing)
            tracker = None
            if not overwritten:
                break
            notes.copy_saved |= overwritten
            flat = None  # (this recompute's graph goes before the next is built)
        else:
            raise RuntimeError(f"block checkpointing: the recompute of "
                               f"{type(unit.module).__name__} kept overwriting what it saved")
        outputs = flat
        learning = unit.used is None
        pairs = []
        for o, g in zip(outputs, grads):
            if o.requires_grad and (g is not None or learning):
                # learning: every output, so that every tensor the block can use is found
                pairs.append((o, torch.zeros_like(o) if g is None else g))
        wanted = ([leaf for leaf, need in zip(leaves, need_in) if need]
                  + [p for p, need in zip(ctx.params, need_params) if need])
        if not pairs or not wanted:
            return (None,) * (1 + n + len(ctx.params))
        if learning:  # a trainable tensor reached that the Function does not pass would be lost
            known = {id(t) for t in list(leaves) + list(ctx.params)}
            missed = [t for t in _trainable_leaves([o for o, _ in pairs]) if id(t) not in known]
            if missed:
                raise RuntimeError(
                    f"block checkpointing: {type(unit.module).__name__} uses tensors that require "
                    f"grad and were not given to checkpoint_blocks (shapes "
                    f"{[tuple(t.shape) for t in missed][:4]}): their gradient would be lost")
        got = list(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                       allow_unused=True))
        grad_in = [got.pop(0) if need else None for need in need_in]
        grad_params = [got.pop(0) if need else None for need in need_params]
        if learning:
            unit.used = [p for p, g in zip(ctx.params, grad_params) if g is not None]
        return (None, *grad_in, *grad_params)


def _torch_checkpoint(forward, args, kwargs, context_fn=None):
    """torch's non-reentrant checkpoint of ``forward(*args, **kwargs)``, dict arguments frozen."""
    args = tuple(_frozen(a) for a in args)
    kwargs = {k: _frozen(v) for k, v in kwargs.items()}
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def _rng_states(tensors) -> tuple:
    """The CPU RNG state and those of the CUDA devices of ``tensors``."""
    devices = list(dict.fromkeys(t.device for t in tensors if t.is_cuda))
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_states(states: tuple) -> None:
    cpu, devices, cuda = states
    torch.set_rng_state(cpu)
    for device, state in zip(devices, cuda):
        torch.cuda.set_rng_state(state, device)


def _written_error(unit: "_Unit", names) -> RuntimeError:
    return RuntimeError(
        f"block checkpointing: {type(unit.module).__name__} wrote into its argument(s) {names} in "
        f"place, which it did not on its first call with these arguments; the value kept for its "
        f"backward was overwritten")


def _checkpointed_call(forward, unit: _Unit, args, kwargs):
    """``forward(*args, **kwargs)`` checkpointed whole: by torch's checkpoint if the block does not
    write into its arguments, else by :class:`_RecomputedBlock` (see the module docstring)."""
    tensors, names, rebuild = _taken_apart((args, kwargs))
    layout = tuple(names)
    notes = unit.notes.setdefault(layout, _Notes())
    written: set = set()
    if notes.written is None:  # the first call with this layout: torch's, stopped by a write
        states, pending = _rng_states(tensors), [True]

        def watched(*a, **k):  # (the checkpoint's forward under the watch, not its recompute)
            if pending:
                pending.clear()
                with _WriteWatch(tensors):
                    return forward(*a, **k)
            return forward(*a, **k)
        try:
            output = _torch_checkpoint(watched, args, kwargs)
        except _WritesArgument as stop:  # stopped before its first write: the Function's way
            written = stop.positions
            _set_rng_states(states)
        else:
            notes.written = frozenset()
            return output
    elif not notes.written:
        versions = [t._version for t in tensors]
        output = _torch_checkpoint(forward, args, kwargs)
        changed = [layout[i] for i, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
        if changed:
            notes.written = None  # (found again on the next call)
            raise _written_error(unit, changed)
        return output
    params = unit.params()
    if not params and not any(t.requires_grad for t in tensors):
        return forward(*args, **kwargs)  # nothing to differentiate: nothing to keep
    call = _Call(forward, rebuild, layout, notes, unit, written)
    outputs = _RecomputedBlock.apply(call, *tensors, *params)
    return call.rebuild_output(outputs)


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


class _CompactGradient(torch.autograd.Function):
    """The identity, whose backward hands on its gradient in a storage of its own size.

    A causal convolution concatenates its cache slot (the previous latent frame's last input
    frames) in front of its input along time and pads it; the gradient autograd gives the slot is
    a slice (a view) of the gradient of that whole padded input, several times the slot's size at
    full resolution. Such gradients wait until the previous latent frame's backward runs, so
    every slot of a frame would keep its whole convolution input's gradient alive. Copied, only
    the slot's own frames are kept (the same values)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad is not None and grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            grad = grad.clone(memory_format=torch.contiguous_format)
        return grad


def _compact_gradients(slots) -> tuple:
    """``slots`` (cache entries: tensors, None or markers), those requiring grad passed through
    :class:`_CompactGradient`."""
    return tuple(_CompactGradient.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad
                 else t for t in slots)


# Causal-cache blocks whose run on frames ``[a, b]`` equals their run on ``[a]`` then ``[b]`` with the
# cache carried between (Wan 2.1's residual blocks and resamplers, ComfyUI's and diffusers': causal
# convolutions, per-frame norms, 2-D resampling, the temporal upsampler's causal convolution; the
# very property Wan's frame-by-frame decode rests on; a temporal upsampler's first use after a
# first chunk, its cache the "Rep" marker, pads with zeros and leaves zeros before the frame in the
# cache, the same in both ways). Wan 2.2's residual up blocks (ComfyUI's ``Up_ResidualBlock``,
# diffusers' ``WanResidualUpBlock``: those blocks and resamplers, plus a shortcut that repeats each
# input frame ``factor_t`` times) are, except on a first chunk, where the shortcut drops the first
# ``factor_t - 1`` output frames: a call with ``first_chunk`` true is never split
# (:func:`_first_chunk`; a first chunk is one latent frame anyway).
_WAN = "diffusers.models.autoencoders.autoencoder_kl_wan"
_TIME_CHUNKED = {("comfy.ldm.wan.vae", "ResidualBlock"), ("comfy.ldm.wan.vae", "Resample"),
                 ("comfy.ldm.wan.vae2_2", "ResidualBlock"), ("comfy.ldm.wan.vae2_2", "Resample"),
                 ("comfy.ldm.wan.vae2_2", "Up_ResidualBlock"),
                 (_WAN, "WanResidualBlock"), (_WAN, "WanResample"), (_WAN, "WanResidualUpBlock")}


def _time_chunked(module: Optional[nn.Module]) -> bool:
    """Whether ``module``'s backward may recompute it frame by frame (:data:`_TIME_CHUNKED`)."""
    return module is not None and (type(module).__module__, type(module).__name__) in _TIME_CHUNKED


def _first_chunk(rest: tuple, kwargs: dict) -> bool:
    """Whether a causal-cache call (``block(x, feat_cache, feat_idx, *rest, **kwargs)``) is on a
    first chunk: Wan 2.2's up blocks take ``first_chunk`` after ``feat_idx`` (ComfyUI passes it by
    position, diffusers by name); other blocks take nothing more (False)."""
    return bool(kwargs.get("first_chunk", rest[0] if rest else False))


_A_TENSOR = object()  # a tensor's place in the layout of a cache snapshot


def _slots_with(layout: tuple, tensors) -> list:
    """Cache entries: ``layout``'s, with ``tensors``, in order, in the places it marks
    :data:`_A_TENSOR`."""
    tensors = iter(tensors)
    return [next(tensors) if t is _A_TENSOR else t for t in layout]


class _FrameByFrame(torch.autograd.Function):
    """A time-chunked causal-cache block (:data:`_TIME_CHUNKED`) on ``T > 1`` frames: the forward
    runs it whole without a graph (the values of the block's own run); the backward recomputes it
    one input frame at a time, last frame first, each from the cache the frames before it leave
    (found by a run without a graph): only one frame's activations are alive at once instead of
    ``T``'s. The cache a frame starts from is rebuilt for it from the block's first (``j`` frames
    run without a graph for frame ``j``: ``T (T - 1) / 2`` frame runs, 6 at 4 frames, against 3
    when every frame's cache was kept at once, which held ``T`` sets of cache slots beside the
    recompute). Inputs: ``run(x, slots) -> (out, new slots)``, the snapshot's layout (its non-tensor
    entries), ``x`` and the snapshot's tensors; outputs: ``out`` and the new slots."""

    @staticmethod
    def forward(ctx, run, layout: tuple, x: torch.Tensor, *old: torch.Tensor):
        ctx.run, ctx.layout = run, layout
        ctx.save_for_backward(x, *old)
        ctx.set_materialize_grads(False)
        ctx.autocast = _autocast_states(x.device.type)
        out, new = run(x, _slots_with(layout, old))
        if out.shape[2] % x.shape[2] or not all(isinstance(t, torch.Tensor) for t in new) \
                or any(t is o for t in new for o in (x, *old)):
            raise RuntimeError("frame-by-frame recompute: the block's output frames or new cache "
                               "slots are not those of a time-chunked block")
        return (out, *new)

    @staticmethod
    def backward(ctx, grad_out, *grad_new):
        x, *old = ctx.saved_tensors
        frames, run = x.shape[2], ctx.run
        with contextlib.ExitStack() as modes:
            for device, on, dtype in ctx.autocast:  # the forward's autocast states
                modes.enter_context(torch.autocast(device, dtype=dtype, enabled=on))
            grad_x, carry = [None] * frames, list(grad_new)
            for j in reversed(range(frames)):
                # the cache frame j starts from, rebuilt (not kept for every frame at once)
                cache = _slots_with(ctx.layout, old)
                with torch.no_grad():
                    for i in range(j):
                        cache = list(run(x[:, :, i:i + 1], cache)[1])
                xj = x[:, :, j:j + 1].detach().requires_grad_(ctx.needs_input_grad[2])
                cj = [c.detach().requires_grad_() if isinstance(c, torch.Tensor) else c
                      for c in cache]
                cache = None
                with torch.enable_grad():
                    out, new = run(xj, cj)
                per = out.shape[2]
                pairs = [(o, g) for o, g in zip([out, *new], [
                    None if grad_out is None else grad_out[:, :, j * per:(j + 1) * per], *carry])
                    if g is not None and o.requires_grad]
                slots = [c for c in cj if isinstance(c, torch.Tensor)]
                leaves = ([xj] if xj.requires_grad else []) + slots
                got = list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                               allow_unused=True) if pairs else [None] * len(leaves))
                if xj.requires_grad:
                    grad = got.pop(0)
                    grad_x[j] = grad if grad is not None else torch.zeros_like(xj)
                carry = got
                out = new = pairs = None
        grad_input = torch.cat(grad_x, dim=2) if ctx.needs_input_grad[2] else None
        return (None, None, grad_input, *carry)


def _cached_checkpoint(forward, args: tuple, kwargs: dict, cache: list, index: list, extra: dict,
                       slots: list, chunked: bool = False):
    """Checkpoint a causal-cache block as a pure function of its input and a snapshot of the cache
    slots it uses: the block reads and replaces the slots from ``index[0]`` on; the recompute in
    the backward pass runs on the snapshot (the shared list has moved on by then), and the new
    slots (tensors that carry the gradient into the next latent frame) come out of the checkpoint
    and are written back, as the block itself would have. ``slots``: ``[upper bound, exact or
    None]``, the exact count learnt from the first call (the snapshot holds only those slots, so
    no earlier frame's cache outlives its use). ``chunked``: a time-chunked block
    (:data:`_TIME_CHUNKED`) given more than one frame is recomputed frame by frame
    (:class:`_FrameByFrame`) once its slot count is known, unless the call is on a first chunk."""
    start = index[0]
    width = slots[1] if slots[1] is not None else slots[0]
    snapshot = tuple(cache[start:start + width])
    size, rest = len(cache), args[3:]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("feat_cache", "feat_idx")}

    def pure(x, old, first):
        local = [None] * size
        local[first:first + len(old)] = _compact_gradients(old)
        position = [first]
        out = forward(x, local, position, *rest, **kwargs)
        return out, position[0], tuple(local[first:position[0]])
    x = args[0]
    if chunked and not extra and slots[1] is not None and x.shape[2] > 1 \
            and not _first_chunk(rest, kwargs):
        def run(frames, old):
            out, stop, new = pure(frames, old, start)
            if stop != start + len(old):
                raise RuntimeError("frame-by-frame recompute: the block used another number of "
                                   "cache slots")
            return out, new
        layout = tuple(_A_TENSOR if isinstance(t, torch.Tensor) else t for t in snapshot)
        out, *new = _FrameByFrame.apply(run, layout, x,
                                        *[t for t in snapshot if isinstance(t, torch.Tensor)])
        end = start + len(new)
    else:
        out, end, new = checkpoint(pure, x, snapshot, start, use_reentrant=False, **extra)
    if end - start > width:
        raise RuntimeError(f"a causal-cache block used {end - start} cache slots, more than its "
                           f"{width} causal convolutions")
    slots[1] = end - start
    cache[start:end] = list(new)
    index[0] = end
    return out


def _checkpointed_forward(forward, keep: Optional[tuple] = None, unit: Optional[_Unit] = None,
                          module: Optional[nn.Module] = None):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, list(keep)) if keep
                  else None)
    slots = [_causal_slots(module) if module is not None else 0, None]
    chunked = _time_chunked(module)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        causal = _causal_cache(args, kwargs)
        if causal is not None:  # a causal video VAE's block (Wan): a pure function of a snapshot
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return _cached_checkpoint(forward, args, kwargs, *causal, extra, slots, chunked)
        if keep:  # selective (the decoder's convolutions kept): torch's checkpoint with a policy
            return _torch_checkpoint(forward, args, kwargs, context_fn)
        return _checkpointed_call(forward, unit, args, kwargs)
    run.__draft_checkpointed__ = True
    return run


@contextlib.contextmanager
def checkpoint_blocks(modules: Iterable[nn.Module], keep: Optional[tuple] = None,
                      params: Sequence[torch.Tensor] = (),
                      state: Optional[dict] = None) -> Iterator[int]:
    """Checkpoint each of ``modules`` (distinct; nested only as a causal video decoder and its
    blocks are) while the block runs.

    ``keep``: ops whose outputs are saved for backward instead of recomputed (selective
    checkpointing by torch's checkpoint, e.g. :data:`KEEP_CONVOLUTIONS`; for blocks that do not
    write in place: the VAE decoder's); None: the whole block is recomputed and only its inputs
    are kept (see the module docstring). ``params``: the trained tensors (the LoRA factors) the
    blocks may use without owning them; a block's own parameters that require grad need not be
    listed.
    ``state``: a dict that keeps, across uses with the same ``params``, which of them each block
    uses (else they are found again on each block's first backward through the Function).
    Yields the number of modules wrapped. A module already wrapped (re-entrant use) is skipped.
    On exit every wrapped module's instance ``forward`` is deleted, or restored if it had one.
    """
    state = {} if state is None else state
    wrapped: list = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            if own is not None and getattr(own, "__draft_checkpointed__", False):
                continue
            unit = None if keep else state.setdefault(module, _Unit(module, params))
            module.forward = _checkpointed_forward(module.forward, keep, unit, module)
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
    ``up_blocks`` of ``AutoencoderKLHunyuanImage``'s decoder) is a unit itself. A causal video
    decoder (``AutoencoderKLWan``'s ``WanDecoder3d``, called once per latent frame with the cache
    of the previous one) is a unit itself too, its blocks nested in it, as the ComfyUI side makes
    Wan's (``nodes/comfy_glue.py`` ``decoder_checkpoint_units``)."""
    units = [decoder] if "feat_cache" in inspect.signature(decoder.forward).parameters else []
    for block in [decoder.mid_block] + list(decoder.up_blocks):
        if hasattr(block, "avg_shortcut"):  # Wan 2.2's residual up block
            # with a shortcut: a unit, its resnets and upsampler nested in it; the last (no
            # shortcut, no upsampler): its resnets alone, each recomputed frame by frame on its own;
            # as ComfyUI's Up_ResidualBlock (comfy_glue)
            inner = list(block.resnets) + [m for m in (block.upsampler,) if m is not None]
            units += ([block] if block.avg_shortcut is not None else []) + inner
            continue
        parts = [m for attr in ("resnets", "attentions", "upsamplers")
                 for m in (getattr(block, attr, None) or []) if m is not None]
        units += parts or ([block] if block is not decoder.mid_block else [])
    return units


__all__ = ["checkpoint_blocks", "is_wrapped", "diffusers_unet_units", "diffusers_decoder_units",
           "KEEP_CONVOLUTIONS"]
