"""The node pack inside a real ComfyUI server (marker ``comfyui``; skipped without COMFYUI_PATH).

One server serves the whole module (start-up takes ~20 s on 2 cores). Graphs run on the tiny
random SD1.5 checkpoint at 64x64 with few steps, so training takes seconds.
"""
import io
import json
import os
import sys
import time
import urllib.request

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import comfyui_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

pytestmark = pytest.mark.comfyui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "example_workflows")


@pytest.fixture(scope="module")
def server():
    from comfy_server import ComfyServer, tiny_checkpoint
    path = comfyui_path()
    with ComfyServer(path, checkpoint=tiny_checkpoint(path)) as srv:
        srv.object_info = srv.get("/object_info")
        yield srv


# The trainer's optional settings nodes in trainer_graph (ids free in the tests' other additions).
LORA_NODE, OPTIMIZER_NODE, SAVING_NODE = "11", "12", "13"


def trainer_graph(ckpt, iterations=3, seed=0, lr=0.05, lora_name="draft/test", save_every=0,
                  method="DRaFT-LV", statistic="saturation", steps=6):
    """API graph: tiny checkpoint -> DRaFT Trainer -> Save LoRA (+ reward curve preview), with
    DRaFT LoRA Settings (rank 4), Optimizer (no weight decay) and Save & Preview (a preview every
    2 iterations) connected: ids LORA_NODE, OPTIMIZER_NODE, SAVING_NODE."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "DRaFTImageStatReward", "inputs": {"statistic": statistic, "goal": "maximise", "target": 0.5}},
        "3": {"class_type": "DRaFTSampler", "inputs": {
            "method": method, "k": 2, "k_min": 1, "k_max": 3, "lv_samples": 2,
            "lv_include_original": False, "eta": 0.0, "checkpointing": True}},
        "4": {"class_type": "DRaFTTrainer", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "clip": ["1", 1], "reward": ["2", 0],
            "sampler": ["3", 0], "prompt_set": "custom", "prompts": "a cat\na dog",
            "negative_prompt": "", "steps": steps, "scheduler": "ddim_uniform", "cfg": 3.0,
            "width": 64, "height": 64, "iterations": iterations, "batch_size": 1,
            "learning_rate": lr, "seed": seed, "lora_name": lora_name, "resume_lora": "none",
            "lora_settings": [LORA_NODE, 0], "optimizer": [OPTIMIZER_NODE, 0], "saving": [SAVING_NODE, 0]}},
        LORA_NODE: {"class_type": "DRaFTLoRASettings", "inputs": {
            "lora_rank": 4, "lora_alpha": 4.0, "target_modules": "attention"}},
        OPTIMIZER_NODE: {"class_type": "DRaFTOptimizer", "inputs": {
            "weight_decay": 0.0, "grad_clip": 10.0, "grad_accumulation": 1, "kl_coeff": 0.0,
            "mixed_precision": "auto"}},
        SAVING_NODE: {"class_type": "DRaFTSavePreview", "inputs": {
            "save_every": save_every, "preview_every": 2}},
        "5": {"class_type": "DRaFTSaveLoRA", "inputs": {
            "lora": ["4", 1], "filename_prefix": lora_name, "precision": "fp32",
            "also_diffusers_folder": False}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 3]}},
    }


def sample_graph(ckpt, lora_file=None, strength=1.0, seed=424242, statistic="saturation"):
    """API graph: KSampler (optionally through the stock LoraLoader) -> decode -> Evaluate + preview."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 8}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 6, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "ddim_uniform", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "DRaFTImageStatReward", "inputs": {"statistic": statistic, "goal": "maximise", "target": 0.5}},
        "8": {"class_type": "DRaFTEvaluate", "inputs": {
            "images": ["6", 0], "reward": ["7", 0], "prompts": "a cat", "chunk_size": 8}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if lora_file:
        g["10"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_file,
            "strength_model": strength, "strength_clip": 0.0}}
        g["5"]["inputs"]["model"] = ["10", 0]
    return g


def evaluate_mean(entry, node="8") -> float:
    return float(entry["outputs"][node]["draft_mean"][0])


def preview_pixels(srv, entry, node="9") -> np.ndarray:
    imgs = entry["outputs"][node]["images"]
    arrays = []
    for im in imgs:
        q = f"/view?filename={im['filename']}&type={im['type']}&subfolder={im.get('subfolder', '')}"
        with urllib.request.urlopen(srv.url + q) as r:
            arrays.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")))
    return np.stack(arrays)


def combo_options(spec) -> list:
    """A combo's options from /object_info (V1: the list itself; V3: ["COMBO", {"options": ...}])."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def free(srv):
    """Drop ComfyUI's output cache and loaded models so the next prompt recomputes everything."""
    srv.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(1.0)


# ---------------------------------------------------------------------------------------------
def test_pack_loads_with_tooltips_on_every_input_and_output(server):
    ours = {k: v for k, v in server.object_info.items() if k.startswith("DRaFT")}
    expected = {"DRaFTSampler", "DRaFTTrainer", "DRaFTSaveLoRA", "DRaFTEvaluate", "DRaFTImageStatReward",
                "DRaFTCombineRewards", "DRaFTLoRASettings", "DRaFTOptimizer", "DRaFTSavePreview",
                "DRaFTMemoryOptions", "DRaFTGuidance"}
    assert expected <= set(ours), sorted(ours)
    for node_id, info in ours.items():
        assert info["category"].startswith("DRaFT"), node_id
        assert info["display_name"].startswith("DRaFT"), node_id
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} has an output without tooltip"


def test_trainer_trains_saves_and_lora_loader_applies_every_key(server):
    from safetensors import safe_open
    name = "draft/loader_test"
    entry = server.run_prompt(trainer_graph(server.ckpt_name, iterations=12, lora_name=name, save_every=6))
    saved = entry["outputs"]["5"]["text"][0].split("models/loras/")[-1]
    assert saved.startswith(name) and os.path.exists(os.path.join(server.loras_dir, saved))
    # The periodic save and Save LoRA's file name the same base model.
    fingerprints = []
    for rel in ("draft/loader_test_step00006.safetensors", saved):
        with safe_open(os.path.join(server.loras_dir, rel), "pt") as f:
            fingerprints.append(f.metadata()["draft_base_model_fingerprint"])
    assert len(fingerprints[0]) == 16 and fingerprints[0] == fingerprints[1], fingerprints
    log_before = server.log()
    base = server.run_prompt(sample_graph(server.ckpt_name))
    tuned = server.run_prompt(sample_graph(server.ckpt_name, lora_file=saved))
    new_log = server.log()[len(log_before):]
    assert "lora key not loaded" not in new_log, new_log[-2000:]
    assert not np.array_equal(preview_pixels(server, base), preview_pixels(server, tuned))
    assert evaluate_mean(tuned) > evaluate_mean(base), (evaluate_mean(base), evaluate_mean(tuned))


def test_base_model_is_bit_identical_after_training(server):
    free(server)
    before = preview_pixels(server, server.run_prompt(sample_graph(server.ckpt_name, seed=7)))
    server.run_prompt(trainer_graph(server.ckpt_name, iterations=2, seed=5, lora_name="draft/base_check"))
    free(server)
    after = preview_pixels(server, server.run_prompt(sample_graph(server.ckpt_name, seed=7)))
    assert np.array_equal(before, after)


def test_requeue_unchanged_graph_is_cached_and_changed_input_retrains(server):
    graph = trainer_graph(server.ckpt_name, iterations=2, seed=11, lora_name="draft/cache_check")
    server.run_prompt(graph)
    run1 = server.get("/draft/status")["4"]["run"]
    server.run_prompt(graph)
    assert server.get("/draft/status")["4"]["run"] == run1  # trainer not executed again
    graph["4"]["inputs"]["seed"] = 12
    server.run_prompt(graph)
    run2 = server.get("/draft/status")["4"]["run"]
    assert run2 != run1
    graph[OPTIMIZER_NODE]["inputs"]["grad_clip"] = 5.0  # a setting on an optional node
    server.run_prompt(graph)
    assert server.get("/draft/status")["4"]["run"] != run2


def test_interrupt_stops_within_one_iteration_and_saves_loadable_partial_lora(server):
    from safetensors import safe_open
    graph = trainer_graph(server.ckpt_name, iterations=500, seed=21, lora_name="draft/interrupted")
    prompt_id = server.queue(graph)
    deadline = time.time() + 120
    status = {}
    while time.time() < deadline:
        status = server.get("/draft/status").get("4", {})
        if status.get("status") == "running" and status.get("iteration", 0) >= 2 and status.get("sec_per_iter"):
            break
        time.sleep(0.2)
    assert status.get("iteration", 0) >= 2, status
    t0 = time.time()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=60)
    elapsed = time.time() - t0
    from comfy_server import status_messages
    assert "execution_interrupted" in status_messages(entry)
    assert elapsed < 2 * status["sec_per_iter"] + 3.0, (elapsed, status["sec_per_iter"])
    final = server.get("/draft/status")["4"]
    assert final["status"] == "interrupted" and final["iteration"] < 500
    path = final["saved"]
    assert os.path.exists(path) and "partial" in os.path.basename(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["draft_partial"] == "true" and keys
    # ...and it loads with the stock LoraLoader.
    rel = os.path.relpath(path, server.loras_dir)
    log_before = server.log()
    server.run_prompt(sample_graph(server.ckpt_name, lora_file=rel, seed=3))
    assert "lora key not loaded" not in server.log()[len(log_before):]


def test_sampler_node_works_in_sampler_custom_advanced(server):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "DRaFTSampler", "inputs": {
            "method": "DRaFT-K", "k": 1, "k_min": 1, "k_max": 3, "lv_samples": 2,
            "lv_include_original": False, "eta": 0.0, "checkpointing": True}},
        "6": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                   "negative": ["3", 0], "cfg": 3.0}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "ddim_uniform",
                                                        "steps": 6, "denoise": 1.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "9": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["8", 0], "guider": ["6", 0], "sampler": ["5", 0], "sigmas": ["7", 0],
            "latent_image": ["4", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        # the same with ComfyUI's own Euler sampler: eta = 0 DDIM must match it
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["8", 0], "guider": ["6", 0], "sampler": ["12", 0], "sigmas": ["7", 0],
            "latent_image": ["4", 0]}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
    }
    entry = server.run_prompt(g)
    ours, euler = preview_pixels(server, entry, "11"), preview_pixels(server, entry, "15")
    assert np.abs(ours.astype(int) - euler.astype(int)).max() <= 1


def test_reward_without_files_says_what_to_put_where(server):
    info = server.object_info["DRaFTAestheticReward"]["input"]["required"]
    assert combo_options(info["head"]) == ["(missing) sac+logos+ava1-l14-linearMSE.pth"]
    graph = sample_graph(server.ckpt_name)
    graph["7"] = {"class_type": "DRaFTAestheticReward", "inputs": {
        "head": combo_options(info["head"])[0], "clip_weights": "(use clip_vision input)",
        "architecture": "ViT-L-14-quickgelu", "dtype": "fp32", "chunk_size": 4}}
    # Refused when queued (issue 12): the reward node's error comes back from /prompt, before
    # anything runs, and names the file, the folder and where its authors publish it.
    from comfy_server import post_prompt
    status, body = post_prompt(server, graph)
    text = json.dumps(body.get("node_errors", {})) + json.dumps(body.get("error", {}))
    assert "7" in body.get("node_errors", {}) or status == 400, body
    for expected in ("sac+logos+ava1-l14-linearMSE.pth", "reward_models",
                     "github.com/christophschuhmann/improved-aesthetic-predictor", "ViT-L/14"):
        assert expected in text, text


@pytest.mark.parametrize("sampling", ["v_prediction", "flow"])
def test_trainer_follows_the_models_own_sampling(server, sampling):
    """v-prediction and flow (CONST) models train through their own model_sampling: the tiny
    checkpoint is patched with ComfyUI's ModelSamplingDiscrete / ModelSamplingSD3 nodes."""
    graph = trainer_graph(server.ckpt_name, iterations=2, lora_name=f"draft/{sampling}")
    if sampling == "flow":
        graph["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    else:
        graph["20"] = {"class_type": "ModelSamplingDiscrete", "inputs": {
            "model": ["1", 0], "sampling": "v_prediction", "zsnr": False}}
    graph["4"]["inputs"]["model"] = ["20", 0]
    graph["4"]["inputs"]["scheduler"] = "simple"
    server.run_prompt(graph)
    status = server.get("/draft/status")["4"]
    assert status["status"] == "finished" and len(status["rewards"]) == 2
    assert all(r is not None for r in status["rewards"])


def test_resume_from_saved_lora_continues_exactly(server):
    """3 iterations + resume to 5 give the same LoRA as 5 straight iterations (CPU, fp32 files)."""
    from safetensors.torch import load_file
    straight = server.run_prompt(trainer_graph(server.ckpt_name, iterations=5, seed=31, lora_name="draft/straight"))
    first = trainer_graph(server.ckpt_name, iterations=3, seed=31, lora_name="draft/part", save_every=3)
    server.run_prompt(first)
    assert os.path.exists(os.path.join(server.loras_dir, "draft", "part_step00003.draft_state"))
    resumed_graph = trainer_graph(server.ckpt_name, iterations=5, seed=31, lora_name="draft/resumed")
    resumed_graph["4"]["inputs"]["resume_lora"] = "draft/part_step00003.safetensors"
    resumed = server.run_prompt(resumed_graph)
    status = server.get("/draft/status")["4"]
    assert status["iteration"] == 5 and len(status["rewards"]) == 5
    a = load_file(os.path.join(server.loras_dir, straight["outputs"]["5"]["text"][0].split("models/loras/")[-1]))
    b = load_file(os.path.join(server.loras_dir, resumed["outputs"]["5"]["text"][0].split("models/loras/")[-1]))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefix", ["../escaped", "/tmp/absolute", "draft/../../escaped", "a/./b", ""])
def test_save_lora_never_writes_outside_models_loras(server, prefix):
    graph = trainer_graph(server.ckpt_name, iterations=1, seed=41, lora_name="draft/safe")
    graph["5"]["inputs"]["filename_prefix"] = prefix
    before = set(os.listdir(os.path.dirname(server.loras_dir))) | set(os.listdir(server.base))
    with pytest.raises(RuntimeError, match="models/loras|empty"):
        server.run_prompt(graph)
    after = set(os.listdir(os.path.dirname(server.loras_dir))) | set(os.listdir(server.base))
    assert before == after
    assert not os.path.exists("/tmp/absolute_00001_.safetensors")
