"""Write the UI-format templates in example_workflows/ from compact graph descriptions.

The node schemas (widget order, socket types, output slots) come from a running ComfyUI with this
pack installed, so the files match what the frontend would save. Run after changing a node's
inputs:  COMFYUI_PATH=... .venv/bin/python tools/make_templates.py
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from workflow_api import widget_names  # noqa: E402

SD15 = "v1-5-pruned-emaonly.safetensors"
HELD_OUT_SEED = 424242
PROMPT = "a photo of a cat"
QUICKSTART_PROMPTS = "a photo of a cat\na photo of a dog\na lighthouse at sunset\na bowl of fruit"
TRAINER_SIZE = (360, 940)  # its widgets, then the reward chart below them


class Graph:
    """Builds a UI-format workflow: ``add`` nodes with widget values by name, ``link`` sockets."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes, self.links = [], []

    def add(self, ntype: str, pos, title: str | None = None, size=(320, 200), **widgets) -> int:
        info = self.info[ntype]
        values = []
        for name, has_control in widget_names(info):
            spec = dict(info["input"].get("required", {}), **info["input"].get("optional", {}))[name]
            opts = spec[1] if len(spec) > 1 else {}
            options = spec[0] if isinstance(spec[0], list) else opts.get("options")
            default = opts.get("default", options[0] if options else None)
            values.append(widgets.pop(name, default))
            if has_control:
                values.append("fixed")
        if widgets:
            raise KeyError(f"{ntype} has no widgets {sorted(widgets)}")
        node = {
            "id": len(self.nodes) + 1, "type": ntype, "pos": list(pos), "size": list(size),
            "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {"Node name for S&R": ntype}, "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, output: str, dst: int, input_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = [o["name"] for o in s["outputs"]].index(output)
        info = self.info[d["type"]]["input"]
        spec = dict(info.get("required", {}), **info.get("optional", {}))[input_name]
        link_id = len(self.links) + 1
        ltype = s["outputs"][slot]["type"]
        inp = {"name": input_name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
               "link": link_id}
        if any(n == input_name for n, _ in widget_names(self.info[d["type"]])):
            inp["widget"] = {"name": input_name}
        d["inputs"].append(inp)
        s["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, len(d["inputs"]) - 1, ltype])

    def link_into(self, dst: int, **sources) -> None:
        """``link`` each ``input_name=(src, output)`` into node ``dst``, in the order given."""
        for input_name, (src, output) in sources.items():
            self.link(src, output, dst, input_name)

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


def _loader_and_text(g: Graph, y=0):
    ckpt = g.add("CheckpointLoaderSimple", (0, y), ckpt_name=SD15, size=(320, 100))
    pos = g.add("CLIPTextEncode", (380, y), title="Held-out prompt", text=PROMPT, size=(320, 120))
    neg = g.add("CLIPTextEncode", (380, y + 170), title="Negative", text="", size=(320, 120))
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    latent = g.add("EmptyLatentImage", (380, y + 340), width=512, height=512, batch_size=8, size=(320, 110))
    return ckpt, pos, neg, latent


def _sample_decode(g, model, pos, neg, latent, vae, x, y, title):
    ks = g.add("KSampler", (x, y), title=f"KSampler ({title})", seed=HELD_OUT_SEED, steps=30,
               cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    g.link_into(ks, model=model, positive=(pos, "CONDITIONING"), negative=(neg, "CONDITIONING"),
                latent_image=(latent, "LATENT"))
    dec = g.add("VAEDecode", (x, y + 320), title=f"Decode ({title})", size=(220, 50))
    g.link_into(dec, samples=(ks, "LATENT"), vae=(vae, "VAE"))
    return dec


def _save_and_curve(g, trainer: int, x: int, prefix: str) -> None:
    """DRaFT Save LoRA (file prefix ``prefix``) and the reward curve's preview, in a column at ``x``
    right of the trainer."""
    save = g.add("DRaFTSaveLoRA", (x, 0), filename_prefix=prefix, size=(320, 160))
    g.link(trainer, "lora", save, "lora")
    curve = g.add("PreviewImage", (x, 220), title="Reward curve", size=(320, 260))
    g.link(trainer, "reward_curve", curve, "images")


def quickstart(info) -> dict:
    """DRaFT-LV on a file-free reward; saves the LoRA; before/after on held-out samples."""
    g = Graph(info)
    ckpt, pos, neg, latent = _loader_and_text(g)
    reward = g.add("DRaFTImageStatReward", (0, 520), statistic="saturation", size=(320, 100))
    sampler = g.add("DRaFTSampler", (0, 680), method="DRaFT-LV", size=(320, 260))
    trainer = g.add("DRaFTTrainer", (760, 0), prompts=QUICKSTART_PROMPTS, iterations=100,
                    steps=50, cfg=7.5, lora_name="draft/quickstart", size=TRAINER_SIZE)
    _link_trainer(g, ckpt, trainer, reward, sampler)
    _save_and_curve(g, trainer, 1180, "draft/quickstart")
    before = _sample_decode(g, (ckpt, "MODEL"), pos, neg, latent, ckpt, 1560, 0, "before")
    lora_model = g.add("LoraModelLoader", (1560, 400), title="Apply trained LoRA", strength_model=1.0, size=(300, 80))
    g.link(ckpt, "MODEL", lora_model, "model")
    g.link(trainer, "lora", lora_model, "lora")
    after = _sample_decode(g, (lora_model, "MODEL"), pos, neg, latent, ckpt, 1900, 0, "after")
    eval_before = g.add("DRaFTEvaluate", (1560, 540), title="Score before", prompts=PROMPT, size=(300, 150))
    eval_after = g.add("DRaFTEvaluate", (1900, 540), title="Score after", prompts=PROMPT, size=(300, 150))
    for ev, dec in ((eval_before, before), (eval_after, after)):
        g.link(dec, "IMAGE", ev, "images")
        g.link(reward, "reward", ev, "reward")
    stitch = _join(g, "ImageStitch", (2240, 0), before, after, title="Before | after", direction="right",
                   match_image_size=True, spacing_width=16, spacing_color="white", size=(300, 150))
    show = g.add("PreviewImage", (2240, 200), title="Before (left) | after (right)", size=(420, 420))
    g.link(stitch, "IMAGE", show, "images")
    return g.workflow()


def _link_trainer(g, ckpt: int, trainer: int, reward: int, sampler: int, **options) -> None:
    """The checkpoint's MODEL, VAE and CLIP, the reward and the sampler into ``trainer``, and each
    optional node ``input=node`` into the trainer's input of that name (its one output)."""
    _link_parts(g, trainer, (ckpt, ckpt, ckpt), reward, sampler, **options)


def _link_parts(g, trainer: int, loaders: tuple, reward: int, sampler: int, **options) -> None:
    """``loaders``' MODEL, VAE and CLIP (the node giving each), the reward and the sampler into
    ``trainer``, then each optional node ``input=node`` into the trainer's input of that name."""
    for node, (out, inp) in zip(loaders, (("MODEL", "model"), ("VAE", "vae"), ("CLIP", "clip"))):
        g.link(node, out, trainer, inp)
    g.link(reward, "reward", trainer, "reward")
    g.link(sampler, "sampler", trainer, "sampler")
    for inp, node in options.items():
        g.link(node, inp, trainer, inp)


def _join(g, node_type: str, pos, first, second, **widgets) -> int:
    """A ``node_type`` node (ImageStitch, ImageBatch) at ``pos`` joining the IMAGE outputs of
    ``first`` (its image1) and ``second`` (its image2)."""
    node = g.add(node_type, pos, **widgets)
    g.link_into(node, image1=(first, "IMAGE"), image2=(second, "IMAGE"))
    return node


def strength_sweep(info) -> dict:
    """A saved LoRA at strengths 0, 0.5, 1, 1.5 through the stock LoraLoader."""
    g = Graph(info)
    ckpt, pos, neg, latent = _loader_and_text(g)
    g.nodes[latent - 1]["widgets_values"][2] = 1
    images = []
    for i, strength in enumerate((0.0, 0.5, 1.0, 1.5)):
        lora = g.add("LoraLoader", (760 + 340 * i, 0), title=f"LoRA strength {strength}",
                     lora_name="draft/quickstart_00001_.safetensors", strength_model=strength,
                     strength_clip=0.0, size=(320, 130))
        g.link(ckpt, "MODEL", lora, "model")
        g.link(ckpt, "CLIP", lora, "clip")
        images.append(_sample_decode(g, (lora, "MODEL"), pos, neg, latent, ckpt, 760 + 340 * i, 180,
                                     f"strength {strength}"))
    batch1 = _join(g, "ImageBatch", (760, 600), images[0], images[1], size=(220, 50))
    batch2 = _join(g, "ImageBatch", (1000, 600), images[2], images[3], size=(220, 50))
    batch = _join(g, "ImageBatch", (1240, 600), batch1, batch2, size=(220, 50))
    show = g.add("PreviewImage", (1500, 600), title="Strength 0 / 0.5 / 1 / 1.5", size=(600, 300))
    g.link(batch, "IMAGE", show, "images")
    return g.workflow()


def aesthetic_draft_k(info) -> dict:
    """DRaFT-K (K = 1) on the LAION aesthetic predictor (needs its files in models/); a save
    every 200 updates from DRaFT Save & Preview."""
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15, size=(320, 100))
    reward = g.add("DRaFTAestheticReward", (0, 160), head="sac+logos+ava1-l14-linearMSE.pth",
                   clip_weights="clip_vit_l14_openai/open_clip_model.safetensors", size=(360, 200))
    sampler = g.add("DRaFTSampler", (0, 380), method="DRaFT-K", k=1, size=(320, 260))
    saving = g.add("DRaFTSavePreview", (0, 680), save_every=200, size=(320, 110))
    trainer = g.add("DRaFTTrainer", (420, 0), prompt_set="simple animals", iterations=2000,
                    cfg=7.5, batch_size=4, lora_name="draft/aesthetic", size=TRAINER_SIZE)
    _link_trainer(g, ckpt, trainer, reward, sampler, saving=saving)
    _save_and_curve(g, trainer, 820, "draft/aesthetic")
    return g.workflow()


def flux_lv(info) -> dict:
    """FLUX.1-dev (fp8 base weights), DRaFT-LV on HPSv2.1: cfg 1 (guidance-distilled), the
    embedded guidance from DRaFT Guidance, ComfyUI's resolution-aware ModelSamplingFlux shift;
    rank 16 from DRaFT LoRA Settings, bf16 from DRaFT Optimizer, a save every 100 updates from
    DRaFT Save & Preview."""
    g = Graph(info)
    unet = g.add("UNETLoader", (0, 0), unet_name="flux1-dev.safetensors", weight_dtype="fp8_e4m3fn",
                 size=(320, 110))
    clip = g.add("DualCLIPLoader", (0, 150), clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp8_e4m3fn.safetensors", type="flux", size=(320, 130))
    vae = g.add("VAELoader", (0, 320), vae_name="ae.safetensors", size=(320, 80))
    shift = g.add("ModelSamplingFlux", (0, 440), width=1024, height=1024, size=(320, 150))
    g.link(unet, "MODEL", shift, "model")
    reward = g.add("DRaFTHPSv2Reward", (0, 630), checkpoint="HPS_v2.1_compressed.pt", size=(360, 150))
    sampler = g.add("DRaFTSampler", (0, 820), method="DRaFT-LV", size=(320, 260))
    guidance = g.add("DRaFTGuidance", (0, 1120), guidance=3.5, size=(320, 80))
    lora = g.add("DRaFTLoRASettings", (400, 0), lora_rank=16, lora_alpha=16.0, size=(320, 130))
    optimizer = g.add("DRaFTOptimizer", (400, 170), mixed_precision="bf16", size=(320, 180))
    saving = g.add("DRaFTSavePreview", (400, 390), save_every=100, size=(320, 110))
    trainer = g.add("DRaFTTrainer", (800, 0), prompt_set="custom", prompts=QUICKSTART_PROMPTS,
                    steps=28, scheduler="simple", cfg=1.0, width=1024, height=1024, iterations=400,
                    learning_rate=2e-4, lora_name="draft/flux_dev_hps", size=TRAINER_SIZE)
    _link_parts(g, trainer, (shift, vae, clip), reward, sampler, guidance=guidance,
                lora_settings=lora, optimizer=optimizer, saving=saving)
    _save_and_curve(g, trainer, 1200, "draft/flux_dev_hps")
    return g.workflow()


def guarded(info) -> dict:
    """The aesthetic score trained (DRaFT-K, K = 1), PickScore and HPSv2.1 as held-out judges of a
    DRaFT Held-out Check: the outputs carry the best LoRA by PickScore, the run stops after 3
    evaluations below it; all four reward models need their files in models/."""
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15, size=(320, 100))
    reward = g.add("DRaFTAestheticReward", (0, 160), head="sac+logos+ava1-l14-linearMSE.pth",
                   clip_weights="clip_vit_l14_openai/open_clip_model.safetensors", size=(360, 200))
    sampler = g.add("DRaFTSampler", (0, 400), method="DRaFT-K", k=1, size=(320, 260))
    pick = g.add("DRaFTPickScoreReward", (0, 700), title="Judge: PickScore", model_folder="PickScore_v1",
                 size=(360, 130))
    hps = g.add("DRaFTHPSv2Reward", (0, 870), title="Judge: HPSv2.1",
                checkpoint="HPS_v2.1_compressed.pt", size=(360, 130))
    check = g.add("DRaFTHeldoutCheck", (420, 620), every=10, seeds=4, keep="best", stop="on",
                  patience=3, size=(360, 400))
    g.link(pick, "reward", check, "judge_1")
    g.link(hps, "reward", check, "judge_2")
    trainer = g.add("DRaFTTrainer", (820, 0), prompt_set="simple animals", iterations=1000,
                    cfg=7.5, batch_size=4, lora_name="draft/aesthetic_guarded", size=TRAINER_SIZE)
    _link_trainer(g, ckpt, trainer, reward, sampler, evaluation=check)
    _save_and_curve(g, trainer, 1220, "draft/aesthetic_guarded")
    return g.workflow()


def wan_video(info) -> dict:
    """Wan 2.1 T2V 1.3B, DRaFT-K (K = 1) on HPSv2.1 scored on the frames of the first 3 latent
    frames (9 frames), plus the temporal consistency of those frames (HPSv2.1's own CLIP image
    embeddings) as a flicker penalty, both standardised in DRaFT Combine Rewards; 33-frame videos
    at 480x832 from DRaFT Video Settings, Wan's sampling shift 8 (ModelSamplingSD3), a save every
    100 updates. The diffusion model, UMT5-XXL and the Wan 2.1 VAE are ComfyUI's
    Comfy-Org/Wan_2.1_ComfyUI_repackaged files."""
    g = Graph(info)
    unet = g.add("UNETLoader", (0, 0), unet_name="wan2.1_t2v_1.3B_bf16.safetensors", size=(320, 110))
    clip = g.add("CLIPLoader", (0, 150), clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 size=(320, 110))
    vae = g.add("VAELoader", (0, 300), vae_name="wan_2.1_vae.safetensors", size=(320, 80))
    shift = g.add("ModelSamplingSD3", (0, 420), shift=8.0, size=(320, 80))
    g.link(unet, "MODEL", shift, "model")
    hps = g.add("DRaFTHPSv2Reward", (0, 540), checkpoint="HPS_v2.1_compressed.pt", size=(360, 150))
    temporal = g.add("DRaFTTemporalConsistencyReward", (0, 730), title="Temporal consistency (flicker penalty)",
                     size=(360, 120))
    g.link(hps, "reward", temporal, "embeddings_from")
    combine = g.add("DRaFTCombineRewards", (400, 540), weight_1=1.0, weight_2=0.5, standardize=True,
                    size=(320, 260))
    g.link_into(combine, reward_1=(hps, "reward"), reward_2=(temporal, "reward"))
    sampler = g.add("DRaFTSampler", (0, 900), method="DRaFT-K", k=1, size=(320, 260))
    video = g.add("DRaFTVideoSettings", (400, 0), length=33, decoded_latent_frames=3, size=(320, 200))
    saving = g.add("DRaFTSavePreview", (400, 260), save_every=100, size=(320, 110))
    trainer = g.add("DRaFTTrainer", (800, 0), prompt_set="custom", prompts=QUICKSTART_PROMPTS,
                    steps=30, scheduler="simple", cfg=5.0, width=832, height=480, iterations=500,
                    learning_rate=1e-4, lora_name="draft/wan21_hps", size=TRAINER_SIZE)
    _link_parts(g, trainer, (shift, vae, clip), combine, sampler, video=video, saving=saving)
    _save_and_curve(g, trainer, 1200, "draft/wan21_hps")
    return g.workflow()


TEMPLATES = {
    "draft_quickstart": quickstart,
    "draft_lora_strength_sweep": strength_sweep,
    "draft_aesthetic_draft_k": aesthetic_draft_k,
    "draft_flux_lv": flux_lv,
    "draft_guarded": guarded,
    "draft_wan_video": wan_video,
}


def main():
    from comfy_server import ComfyServer
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    out_dir = os.path.join(REPO, "example_workflows")
    os.makedirs(out_dir, exist_ok=True)
    with ComfyServer(comfyui) as srv:
        info = srv.get("/object_info")
    for name, build in TEMPLATES.items():
        needs = {"draft_aesthetic_draft_k": "DRaFTAestheticReward", "draft_flux_lv": "DRaFTHPSv2Reward",
                 "draft_guarded": "DRaFTPickScoreReward", "draft_wan_video": "DRaFTHPSv2Reward"}
        if name in needs and needs[name] not in info:
            print(f"skipped {name}: {needs[name]} is not installed")
            continue
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(build(info), f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
