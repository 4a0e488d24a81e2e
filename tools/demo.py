"""``make demo``: run the quick-start template headless through the real ComfyUI engine.

* ComfyUI: ``COMFYUI_PATH``, or the ComfyUI this folder is installed in (``custom_nodes/..``),
  or else a clone of ``COMFYUI_GIT_URL`` at ``COMFYUI_REF`` (default: the official repository
  at v0.3.64) in ``.cache/ComfyUI`` with its requirements minus torch (tools/comfyui_bootstrap.py).
* Checkpoint: ``CKPT=/path/to/model.safetensors`` for a real one (the template's settings are used
  as they are); otherwise a tiny random SD1.5 checkpoint is generated and the template is shrunk
  to 64 px, 10 steps, so the demo takes a couple of minutes on a CPU.
* Adds a DRaFT Held-out Check to the template's trainer (every 10 updates, 2 seeds per held-out
  prompt, no judge: the training reward on the held-out prompts ranks; keep the best) and prints
  its figures at every evaluation.
* Prints the reward per iteration and, as its last line, one JSON object:
  ``{"reward_before": mean over 8 held-out samples, "reward_after": ..., "lora": file written,
  "heldout": the check's summary (evaluations, best update, kept update)}``.
* Exit status: 0 on success, 1 on any failure, 2 when ComfyUI cannot be found or set up.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from comfy_server import ComfyServer, tiny_checkpoint  # noqa: E402
from comfyui_bootstrap import BootstrapError, ensure_comfyui  # noqa: E402
from workflow_api import to_api  # noqa: E402

TEMPLATE = os.path.join(REPO, "example_workflows", "draft_quickstart.json")
TINY_OVERRIDES = {
    # (a fixed-seed preview every 10 iterations: the trainer's default without DRaFT Save & Preview)
    "DRaFTTrainer": dict(width=64, height=64, steps=10, iterations=40, learning_rate=1e-2, cfg=3.0),
    "KSampler": dict(steps=10, cfg=3.0),
    "EmptyLatentImage": dict(width=64, height=64),
}


HELDOUT_CHECK = dict(every=10, seeds=2)


def add_heldout_check(api: dict, object_info: dict, trainer: str) -> str:
    """A DRaFT Held-out Check node (its defaults and HELDOUT_CHECK) into the trainer's
    ``evaluation`` input; returns its id."""
    info = object_info["DRaFTHeldoutCheck"]["input"]
    inputs = {name: spec[1]["default"] for name, spec in info["required"].items()}
    inputs.update(HELDOUT_CHECK)
    node = str(max(int(k) for k in api) + 1)
    api[node] = {"class_type": "DRaFTHeldoutCheck", "inputs": inputs,
                 "_meta": {"title": "DRaFT Held-out Check"}}
    api[trainer]["inputs"]["evaluation"] = [node, 0]
    return node


def heldout_line(summary: dict, evaluation: dict) -> str:
    labels = {s["key"]: s["label"] for s in summary["series"]}
    figures = ", ".join(f"{labels[k]} {v:.5f}" for k, v in evaluation["figures"].items()
                        if v is not None)
    return f"held-out at update {evaluation['iteration']:4d}: {figures}"


def watch(srv: ComfyServer, node: str, stop: threading.Event):
    """Print each new reward point and held-out evaluation of trainer ``node`` as it arrives
    (polls /draft/status)."""
    shown, run, evaluated = 0, None, 0
    while not stop.is_set():
        try:
            st = srv.get("/draft/status").get(node)
        except Exception:
            st = None
        if st:
            if st["run"] != run:
                run, shown, evaluated = st["run"], 0, 0
            rewards = st["rewards"]
            for i in range(shown, len(rewards)):
                r = rewards[i]
                text = "skipped (non-finite)" if r is None else f"{r:.5f}"
                print(f"iteration {i + 1:4d}/{st['total']}  reward {text}", flush=True)
            shown = len(rewards)
            heldout = st.get("heldout") or {"evaluations": []}
            for e in heldout["evaluations"][evaluated:]:
                print(heldout_line(heldout, e), flush=True)
            evaluated = len(heldout["evaluations"])
        stop.wait(0.25)


def main() -> int:
    try:
        comfyui = ensure_comfyui()
    except BootstrapError as e:
        print(f"make demo could not set up ComfyUI: {e}", file=sys.stderr)
        return 2
    real_ckpt = os.environ.get("CKPT")
    if real_ckpt and not os.path.isfile(real_ckpt):
        print(f"CKPT={real_ckpt}: no such file", file=sys.stderr)
        return 1
    print(f"ComfyUI: {comfyui}")
    ckpt = os.path.abspath(real_ckpt) if real_ckpt else tiny_checkpoint(comfyui)
    print(f"checkpoint: {ckpt}{'' if real_ckpt else ' (tiny, random weights, generated)'}")
    base = os.path.join(REPO, "demo_out")
    os.makedirs(base, exist_ok=True)
    with open(TEMPLATE) as f:
        workflow = json.load(f)
    with ComfyServer(comfyui, checkpoint=ckpt, base_dir=base) as srv:
        api = to_api(workflow, srv.get("/object_info"))
        for node in api.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = os.path.basename(ckpt)
            if not real_ckpt:
                node["inputs"].update(TINY_OVERRIDES.get(node["class_type"], {}))
        trainer = next(k for k, v in api.items() if v["class_type"] == "DRaFTTrainer")
        add_heldout_check(api, srv.get("/object_info"), trainer)
        save = next(k for k, v in api.items() if v["class_type"] == "DRaFTSaveLoRA")
        evals = {v["_meta"]["title"]: k for k, v in api.items() if v["class_type"] == "DRaFTEvaluate"}
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(srv, trainer, stop), daemon=True)
        watcher.start()
        t0 = time.time()
        try:
            entry = srv.run_prompt(api, timeout=3600)
        except Exception as e:
            stop.set()
            print(f"demo failed: {e}", file=sys.stderr)
            print(srv.log()[-3000:], file=sys.stderr)
            return 1
        stop.set()
        watcher.join(2)
        out = entry["outputs"]
        before = float(out[evals["Score before"]]["draft_mean"][0])
        after = float(out[evals["Score after"]]["draft_mean"][0])
        lora = os.path.join(srv.loras_dir, out[save]["text"][0].split("models/loras/")[-1])
        heldout = srv.get("/draft/status")[trainer].get("heldout") or {}
        print(f"trained in {time.time() - t0:.0f}s; reward on 8 held-out samples: "
              f"{before:.5f} -> {after:.5f}")
        for line in out[trainer].get("text", [""])[0].splitlines():
            print(f"trainer: {line}")
        print(json.dumps({"reward_before": before, "reward_after": after, "lora": lora,
                          "heldout": heldout}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
