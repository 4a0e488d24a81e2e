"""``make fidelity``: the paper's findings on a small diffusion model trained on real digits.

scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits from UCI, shipped offline) upsampled to
16x16; a small UNet of ours trained as an EPS model on a standard DDPM schedule; a classifier
reward; DRaFT, DRaFT-K, DRaFT-LV and random K run through the project's own engine
(``training.sampler``, ``training.trainer``, ``training.lora``). Nothing here imports ComfyUI and
nothing digit-specific lives in ``training/``.

Modules: :mod:`.data` (splits), :mod:`.models` (UNet, classifier, sigma-space denoiser, caching),
:mod:`.metrics` (reward, judge, realism guard, grids), :mod:`.experiments` (the measurements),
:mod:`.report` (plots, docs/fidelity.md, claims), :mod:`.run` (the command line).
"""
