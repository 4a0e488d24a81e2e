"""Peak live tensor memory of a piece of code, measured without running it on a GPU.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every tensor an operator returns, adds the
byte size of each storage it has not seen yet to a running total, and subtracts it when that
storage is freed (``weakref.finalize`` on the storage object, which PyTorch keeps alive exactly as
long as the storage itself). Its ``peak`` is therefore the high-water mark of tensor bytes created
inside the ``with`` block that were alive at the same time: the quantity
``torch.cuda.max_memory_allocated() - memory_allocated()`` measures on a GPU, less the caching
allocator's rounding (blocks of 512 bytes) and fragmentation.

Run under :class:`torch._subclasses.fake_tensor.FakeTensorMode` the same code allocates and computes
nothing: a full-size SDXL UNet runs forward and backward in seconds on a CPU, and the counter gives
its peak as if it had run. Tensors that existed before the block (model weights) are not counted;
count them with :func:`tensor_bytes`.

An output that shares an input's storage (a view, an in-place result) allocates nothing and is not
counted. Only storages on ``device_type`` are counted (default: every device), so a weight streamed from the
CPU (ComfyUI's lowvram mode) counts once its copy exists on the GPU.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024 ** 3


class LiveBytes(TorchDispatchMode):
    """Counts live bytes of the tensor storages created while active.

    Attributes:
        live: bytes alive now (created inside the mode, not yet freed).
        peak: the largest ``live`` seen since construction or :meth:`reset_peak`.
        device_type: count only storages on this device type (``"cuda"``, ``"cpu"``), or all (None).
    """

    def __init__(self, device_type: Optional[str] = None):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._seen: set = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, t: torch.Tensor) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            # a view or an in-place result shares an input's storage: nothing new was allocated
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (parameters, buffers, optimizer state)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


@contextlib.contextmanager
def fake_mode():
    """``FakeTensorMode`` that accepts real tensors created before it (generators, constants)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


__all__ = ["LiveBytes", "tensor_bytes", "module_bytes", "fake_mode", "GIB"]
