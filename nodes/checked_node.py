"""The base class of the DRaFT nodes whose inputs are checked when a prompt is queued."""
from __future__ import annotations

from comfy_api.latest import io

from . import validation


class CheckedNode(io.ComfyNode):
    """A V3 node whose ``validate_inputs`` is :func:`validation.check_queued`: every input, once,
    all problems in one error (nodes/validation.py says why), when the prompt is queued, not after
    what runs upstream (a trainer: hours) has run. ComfyUI looks the override up along the class's
    MRO (``comfy_api.internal.first_real_override``), so subclasses inherit it."""

    @classmethod
    def validate_inputs(cls, **kwargs):
        return validation.check_queued(cls, kwargs)
