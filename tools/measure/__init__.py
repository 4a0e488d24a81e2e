"""The measuring tools, one folder per thing measured (run from the repository root):

* :mod:`.speed` -- time and memory of an update against plain sampling (``make bench``:
  ``python -m tools.measure.speed.bench``), side by side with TRL's AlignProp and ComfyUI's
  KSampler (:mod:`.speed.peers`, part of ``make bench``), and the conditional-only CFG gradient
  (:mod:`.speed.cfg_gradient_study`);
* :mod:`.memory` -- the peak memory of one update on the full-size architectures, traced on fake
  tensors (``make vram``: ``python -m tools.measure.memory.vram``; the DiT rows in
  :mod:`.memory.vram_dit`);
* :mod:`.fidelity` -- the paper's findings on a diffusion model trained on real digits
  (``make fidelity``: ``python -m tools.measure.fidelity.run``).

What several of them use is in :mod:`.setup`; a folder imports nothing of another, and inside one
the driver imports its helpers, never the reverse (tests/test_tools_layout.py checks both).
"""
