# ComfyUI-DRaFT developer commands. Everything runs in ./.venv, created on first use.
#   make test    whole suite, every tier: ComfyUI (COMFYUI_PATH, else cloned into .cache/ComfyUI as for
#                make demo), browser (Chromium), kohya and musubi (KOHYA_SD_SCRIPTS_PATH / MUSUBI_TUNER_PATH,
#                else cloned into .cache/); a tier whose source cannot be had is skipped, saying why in one line
#   make test-fast  the CPU tier only (no ComfyUI, browser, kohya or musubi tests): the quick loop
#   make demo    the quick-start workflow headless through real ComfyUI on a tiny generated checkpoint
#                (no COMFYUI_PATH: clones ComfyUI v0.3.64 into .cache/ComfyUI; COMFYUI_GIT_URL, COMFYUI_REF)
#   make bench   memory/time of DRaFT-K / DRaFT-LV vs plain sampling (not run in CI)
#   make vram    peak memory of one update on the full-size SD1.5/SD2.1/SDXL/FLUX.1-dev/SD3.5-medium/Wan 2.1/Wan 2.2/Lumina 2/HunyuanImage 2.1 architectures (fake tensors)
#   make gpu-check  one prepared check for a lent GPU (full-size SD1.5/SDXL through the real trainer:
#                memory per way vs make vram and the estimate, emulated 8-24 GiB cards, speed vs KSampler);
#                on the device: make gpu-check PY=python3 ARGS="--comfyui PATH --out DIR" (tools/measure/gpu_check.py)
#   make fidelity  DRaFT variants on a diffusion model trained on real digits -> docs/fidelity.md (not in CI)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.draft-deps
COMFY_STAMP := $(VENV)/.draft-comfyui-deps

.PHONY: test test-fast demo bench vram gpu-check fidelity deps comfyui-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements.txt
	# TRL only for make bench's side-by-side with its AlignProp update: its one function we call
	# needs diffusers and accelerate (above), not TRL's own pins (datasets ...), hence --no-deps.
	$(PY) -m pip install -q --no-deps trl==0.23.1 accelerate
	touch $@

deps: $(DEPS_STAMP)

# ComfyUI's own requirements minus torch/torchvision/torchaudio (never replace the torch we pinned).
comfyui-deps: deps
	@if [ -n "$$COMFYUI_PATH" ] && [ -f "$$COMFYUI_PATH/requirements.txt" ]; then \
	  if [ ! -f $(COMFY_STAMP) ] || [ "$$COMFYUI_PATH/requirements.txt" -nt $(COMFY_STAMP) ]; then \
	    grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$$' "$$COMFYUI_PATH/requirements.txt" > $(VENV)/comfyui-requirements.txt && \
	    $(PY) -m pip install -q -r $(VENV)/comfyui-requirements.txt && touch $(COMFY_STAMP); \
	  fi; \
	fi

# tools/test_sources.py prints the export lines of the checkouts it found or cloned (see its docstring).
test: comfyui-deps
	@sources=$$($(PY) tools/test_sources.py) || exit 1; eval "$$sources"; \
	  echo "$(PY) -m pytest $(PYTEST_ARGS)"; $(PY) -m pytest $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -m "not (comfyui or browser or kohya or musubi)" $(PYTEST_ARGS)

demo: comfyui-deps
	$(PY) tools/demo.py

bench: deps
	$(PY) -m tools.measure.speed.bench

vram: comfyui-deps
	$(PY) -m tools.measure.memory.vram

# No deps prerequisite: the venv's python when there is one, else $(PYTHON) (python3); on the lent GPU
# machine it runs with what that has plus the carried wheels (tools/measure/gpu_check.py docstring).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m tools.measure.gpu_check $(ARGS)

fidelity: deps
	$(PY) -m tools.measure.fidelity.run

clean:
	rm -rf .cache bench_out demo_out .pytest_cache
