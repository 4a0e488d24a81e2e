"""Every reward node end to end in a real ComfyUI (marker ``comfyui``): tiny weights in the published
file formats under models/reward_models, two training iterations each, Evaluate on a generated batch,
and the error a user without the files sees."""
import os

import pytest

from conftest import comfyui_path
import json

from test_comfyui_nodes import EXAMPLES, sample_graph, trainer_graph

pytestmark = pytest.mark.comfyui

REWARD_NODES = ["DRaFTAestheticReward", "DRaFTHPSv2Reward", "DRaFTPickScoreReward",
                "DRaFTClipScoreReward"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfy_server import ComfyServer, tiny_checkpoint
    from reward_fixtures import install_reward_files
    path = comfyui_path()
    ckpt = tiny_checkpoint(path)
    base = str(tmp_path_factory.mktemp("comfy-rewards"))
    widgets = install_reward_files(os.path.join(base, "models"))
    with ComfyServer(path, checkpoint=ckpt, base_dir=base) as srv:
        srv.reward_widgets = widgets
        yield srv


def with_reward(graph, node_id, class_type, widgets, chunk_size=2):
    graph[node_id] = {"class_type": class_type, "inputs": {**widgets, "chunk_size": chunk_size}}
    return graph


@pytest.mark.parametrize("reward", REWARD_NODES)
def test_trainer_runs_two_iterations_and_evaluate_scores(server, reward):
    widgets = server.reward_widgets[reward]
    graph = with_reward(trainer_graph(server.ckpt_name, iterations=2, lora_name=f"draft/{reward}"),
                        "2", reward, widgets)
    if reward == "DRaFTAestheticReward":
        graph["2"]["inputs"]["clip_weights"] = widgets["clip_weights"]
    entry = server.run_prompt(graph)
    status = server.get("/draft/status")["4"]
    assert status["status"] == "finished" and len(status["rewards"]) == 2
    assert all(r is not None for r in status["rewards"]), status["rewards"]
    assert entry["outputs"]["5"]["text"][0].startswith("saved models/loras/draft/")

    ev = with_reward(sample_graph(server.ckpt_name), "7", reward, widgets)
    out = server.run_prompt(ev)["outputs"]["8"]
    scores = out["draft_scores"]
    assert len(scores) == 8 and all(isinstance(s, float) for s in scores)
    assert abs(sum(scores) / 8 - out["draft_mean"][0]) < 1e-5
    assert len(set(round(s, 7) for s in scores)) > 1  # per-image, not one broadcast number


def test_every_template_runs_through_prompt(server):
    from workflow_api import to_api
    names = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".json"))
    assert {"draft_quickstart.json", "draft_lora_strength_sweep.json"} <= set(names)
    for name in names:
        assert os.path.exists(os.path.join(EXAMPLES, name[:-5] + ".jpg")), f"{name} has no thumbnail"
    reward_widgets = server.reward_widgets
    server.object_info = server.get("/object_info")
    ran = []
    quick_lora = None
    for name in ["draft_quickstart.json", "draft_lora_strength_sweep.json"] + [
            n for n in names if n not in ("draft_quickstart.json", "draft_lora_strength_sweep.json")]:
        with open(os.path.join(EXAMPLES, name)) as f:
            api = to_api(json.load(f), server.object_info)
        shrink_for_tiny_model(api, server.ckpt_name, quick_lora)
        for node in api.values():
            if node["class_type"] in reward_widgets:
                node["inputs"].update(reward_widgets[node["class_type"]])
        if any(node["class_type"] == "DRaFTVideoSettings" for node in api.values()):
            # a video model's template: the tiny SD1.5 checkpoint cannot stand in for its model
            # (test_comfyui_families.py::test_wan_video_template_runs_on_the_tiny_wan runs its
            # DRaFT nodes on a tiny Wan); here the server takes every node's inputs, and the trainer
            # refuses the image model for the temporal reward, clearly, before anything runs
            with pytest.raises(RuntimeError, match="compares the frames of videos; SD1.x is an image model"):
                server.run_prompt(api, timeout=900)
            ran.append(name)
            continue
        entry = server.run_prompt(api, timeout=900)
        ran.append(name)
        if name == "draft_quickstart.json":
            save = next(k for k, v in api.items() if v["class_type"] == "DRaFTSaveLoRA")
            quick_lora = entry["outputs"][save]["text"][0].split("models/loras/")[-1]
    assert len(ran) == len(names)


def _single_file_loaders_to_tiny_checkpoint(api, ckpt):
    """A template's separate diffusion-model / text-encoder / VAE loaders (FLUX: UNETLoader,
    DualCLIPLoader, VAELoader) replaced by the tiny checkpoint's MODEL, CLIP and VAE: ComfyUI's
    loaders detect FLUX and T5-XXL only at full size, so the graph's DRaFT part is what runs."""
    loaders = {"UNETLoader": 0, "DualCLIPLoader": 1, "CLIPLoader": 1, "VAELoader": 2}
    found = {k: v["class_type"] for k, v in api.items() if v["class_type"] in loaders}
    if not found:
        return
    ckpt_id = next(k for k, t in found.items() if t == "UNETLoader")
    for node_id, class_type in found.items():
        slot = loaders[class_type]
        for node in api.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] == node_id:
                    node["inputs"][name] = [ckpt_id, slot]
        if node_id != ckpt_id:
            del api[node_id]
    api[ckpt_id] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}


def shrink_for_tiny_model(api, ckpt, lora_file):
    """Same graph, tiny settings: the tiny checkpoint, 64 px, few steps and iterations."""
    _single_file_loaders_to_tiny_checkpoint(api, ckpt)
    for node in api.values():
        inp, t = node["inputs"], node["class_type"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = ckpt
        if t == "EmptyLatentImage":
            inp.update(width=64, height=64)
        if t == "KSampler":
            inp["steps"] = 6
        if t == "DRaFTTrainer":
            inp.update(width=64, height=64, steps=6, iterations=3, batch_size=1)
        if t == "DRaFTSavePreview":
            inp["save_every"] = 0
        if t == "DRaFTHeldoutCheck":
            inp.update(every=1, seeds=2)
        if t == "DRaFTOptimizer":
            inp["mixed_precision"] = "auto"
        if t == "LoraLoader" and lora_file:
            inp["lora_name"] = lora_file

