"""Each reward loads through its real loader from files in the published formats, scores like the
authors' computation, and is differentiable, chunkable and usable in bf16."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import reward_models as R
from reward_models.open_clip_backbone import load_open_clip
from reward_fixtures import (PROMPTS, TINY_HF_CLIP, TINY_OPEN_CLIP, TINY_OPEN_CLIP_768, image_batch, natural_image, to_tensor,
                             tiny_open_clip, write_aesthetic_head, write_hf_clip, write_hps_checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """All reward files, written once for this module."""
    d = tmp_path_factory.mktemp("reward_files")
    clip = tiny_open_clip()
    clip768 = tiny_open_clip(TINY_OPEN_CLIP_768, seed=1)
    save_file(clip768.state_dict(), str(d / "open_clip_model.safetensors"))
    head = write_aesthetic_head(str(d / "sac+logos+ava1-l14-linearMSE.pth"))
    write_hps_checkpoint(str(d / "HPS_v2.1_compressed.pt"), clip)
    torch.save(clip.state_dict(), str(d / "clip.bin"))
    hf = write_hf_clip(str(d / "PickScore_v1"))
    return {"dir": d, "clip": clip, "clip768": clip768, "head": head, "hf": hf}


def _loaders(files):
    d = files["dir"]
    return {
        "aesthetic": lambda: R.load_aesthetic(d / "sac+logos+ava1-l14-linearMSE.pth", d / "open_clip_model.safetensors",
                                              architecture=TINY_OPEN_CLIP_768),
        "hpsv2": lambda: R.load_hpsv2(d / "HPS_v2.1_compressed.pt", TINY_OPEN_CLIP),
        "pickscore": lambda: R.load_pickscore(d / "PickScore_v1"),
        "clip_score": lambda: R.load_clip_score(d / "clip.bin", TINY_OPEN_CLIP),
        "brightness": lambda: R.ImageStatReward("brightness"),
    }


NAMES = ["aesthetic", "hpsv2", "pickscore", "clip_score", "brightness"]


@pytest.mark.parametrize("name", NAMES)
def test_reward_scores_and_gradients(files, name):
    reward = _loaders(files)[name]()
    assert isinstance(reward, R.RewardModel) and reward.name == name
    assert reward.needs_prompts == (name in ("hpsv2", "pickscore", "clip_score"))
    images = image_batch(3, 48, 40).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_and_chunking(files, name):
    reward = _loaders(files)[name]()
    images = image_batch(3, 40, 40)
    full = reward(images, PROMPTS)
    reward.chunk_size = 2
    assert torch.allclose(reward(images, PROMPTS), full, atol=1e-5, rtol=1e-5)
    reward.chunk_size = None
    bf16 = reward.to(torch.bfloat16)
    inputs = images.to(torch.bfloat16).requires_grad_(True)
    scores = bf16(inputs, PROMPTS)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.allclose(scores, full, atol=0.05 * full.abs().max().item() + 1e-3)
    scores.sum().backward()
    assert torch.isfinite(inputs.grad.float()).all()


def test_prompts_are_checked(files):
    hps = _loaders(files)["hpsv2"]()
    images = image_batch(2, 32, 32)
    with pytest.raises(ValueError, match="prompt"):
        hps(images, None)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        hps(images, PROMPTS)
    assert torch.allclose(hps(images, "a fox"), hps(images, ["a fox", "a fox"]))
    assert not torch.allclose(hps(images, PROMPTS[:2]), hps(images, PROMPTS[1:]))


# -- aesthetic ----------------------------------------------------------------------------------

def test_aesthetic_head_matches_hand_computation(files):
    head = R.load_aesthetic_head(files["dir"] / "sac+logos+ava1-l14-linearMSE.pth")
    assert [tuple(v.shape) for v in head.state_dict().values()] == [
        (1024, 768), (1024,), (128, 1024), (128,), (64, 128), (64,), (16, 64), (16,), (1, 16), (1,)]
    embed = F.normalize(torch.randn(2, 768, generator=torch.Generator().manual_seed(5)), dim=-1)
    sd = {k: v.double().numpy() for k, v in files["head"].state_dict().items()}
    x = embed.double().numpy()
    for i in (0, 2, 4, 6, 7):  # linear layers only, no activations, dropout inactive
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert np.allclose(head(embed).double().numpy(), x[:, 0], atol=1e-5)


def test_aesthetic_reward_is_head_on_normalised_clip_embedding(files):
    reward = _loaders(files)["aesthetic"]()
    images = image_batch(2, 64, 48)
    visual = files["clip768"].visual
    with torch.no_grad():
        embed = F.normalize(visual(R.shortest_side_crop(images, 32)), dim=-1)
        expected = files["head"](embed)
    reward.train()  # rewards ignore train(): dropout stays off, scores stay deterministic
    assert torch.allclose(reward(images), expected, atol=1e-5)
    assert torch.allclose(reward(images), expected, atol=1e-5)


def test_aesthetic_with_external_image_encoder(files):
    """The ComfyUI route: a module returning (hidden, intermediate, projected, extra) and a plain callable."""
    d, visual = files["dir"], files["clip768"].visual

    class ComfyLikeVision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = visual

        def forward(self, pixel_values=None):
            return None, None, self.inner(pixel_values), None

    head_path = d / "sac+logos+ava1-l14-linearMSE.pth"
    images = image_batch(2, 40, 40).requires_grad_(True)
    reference = _loaders(files)["aesthetic"]()(images)
    wrapped = R.load_aesthetic(head_path, image_encoder=R.OutputSelectingEncoder(ComfyLikeVision(), 2, input_dtype=torch.float32),
                               image_size=32)
    plain = R.load_aesthetic(head_path, image_encoder=lambda px: visual(px), image_size=32)
    for reward in (wrapped, plain):
        scores = reward(images)
        assert torch.allclose(scores, reference, atol=1e-5)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one"):
        R.load_aesthetic(head_path)


def test_aesthetic_head_from_safetensors(tmp_path):
    head = write_aesthetic_head(str(tmp_path / "head.safetensors"), seed=3)
    loaded = R.load_aesthetic_head(tmp_path / "head.safetensors")
    e = F.normalize(torch.randn(1, 768), dim=-1)
    assert torch.allclose(loaded(e), head(e))


# -- open_clip rewards --------------------------------------------------------------------------

def test_meta_device_loading_equals_plain_loading(files):
    """The fast path (build on meta, assign the file's tensors, rebuild attn_mask) is exact."""
    d, clip = files["dir"], files["clip"]
    loaded = load_open_clip(d / "clip.bin", TINY_OPEN_CLIP)
    assert torch.equal(loaded.attn_mask, clip.attn_mask)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    tokens = torch.randint(1, 49000, (2, 77))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens), clip.encode_text(tokens), atol=1e-5)
        assert torch.allclose(loaded.encode_image(pixels), clip.encode_image(pixels), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), clip.state_dict().values()))


def test_hpsv2_matches_published_pipeline(files):
    """Score = cosine of open_clip embeddings, images through HPSv2's PIL transform (pad)."""
    import open_clip

    reward = _loaders(files)["hpsv2"]()
    clip = files["clip"]
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    arrays = [natural_image(64, 40, seed=i) for i in range(3)]
    with torch.no_grad():
        pixels = torch.stack([transform(Image.fromarray(a)) for a in arrays])
        text = clip.encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
        expected = F.cosine_similarity(clip.encode_image(pixels), text)
    ours = reward(torch.cat([to_tensor(a) for a in arrays]), PROMPTS)
    assert torch.allclose(ours, expected, atol=1e-2)
    assert reward.transform.mode == "pad"


def test_gradient_checkpointing_changes_nothing_but_memory(files):
    images = image_batch(2, 40, 40)
    grads = []
    for enable in (False, True):
        reward = _loaders(files)["hpsv2"]()
        assert reward.set_gradient_checkpointing(enable)
        x = images.clone().requires_grad_(True)
        reward(x, PROMPTS[:2]).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    assert not R.ImageStatReward("contrast").set_gradient_checkpointing()


def test_clip_score_is_plain_cosine(files):
    reward = _loaders(files)["clip_score"]()
    clip = files["clip"]
    images = image_batch(2, 40, 40)
    with torch.no_grad():
        image_emb = clip.encode_image(R.shortest_side_crop(images, 32))
        text_emb = clip.encode_text(reward.tokenizer(PROMPTS[:2]))
    assert torch.allclose(reward(images, PROMPTS[:2]), F.cosine_similarity(image_emb, text_emb), atol=1e-5)


# -- PickScore ----------------------------------------------------------------------------------

def test_pickscore_matches_transformers_pipeline(files):
    """logit_scale.exp() * cosine, as CLIPModel's logits_per_image with the PIL processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reward = _loaders(files)["pickscore"]()
    model = files["hf"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    arrays = [natural_image(60, 44, seed=i) for i in range(3)]
    pixels = torch.as_tensor(processor([Image.fromarray(a) for a in arrays], return_tensors="np")["pixel_values"])
    tokens = reward.tokenizer(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids=tokens, pixel_values=pixels).logits_per_image.diagonal()
    ours = reward(torch.cat([to_tensor(a) for a in arrays]), PROMPTS)
    assert torch.allclose(ours, expected, atol=1e-2 * expected.abs().max().item())
    assert abs(reward.model.logit_scale.exp().item() - np.exp(3.0)) < 1e-4


def test_pickscore_other_formats(files, tmp_path):
    """pytorch_model.bin with old-style position_ids keys; a lone HF file with a config; an open_clip
    conversion (keys visual.*) scored with its logit scale."""
    model, images = files["hf"], image_batch(2, 40, 40)
    reference = _loaders(files)["pickscore"]()(images, PROMPTS[:2])

    folder = tmp_path / "PickScore_v1"
    folder.mkdir()
    (folder / "config.json").write_text((files["dir"] / "PickScore_v1" / "config.json").read_text())
    old = dict(model.state_dict())
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    old["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(old, folder / "pytorch_model.bin")
    assert torch.allclose(R.load_pickscore(folder)(images, PROMPTS[:2]), reference, atol=1e-5)

    save_file(model.state_dict(), str(tmp_path / "pickscore_hf.safetensors"))
    lone = R.load_pickscore(tmp_path / "pickscore_hf.safetensors", config=TINY_HF_CLIP)
    assert torch.allclose(lone(images, PROMPTS[:2]), reference, atol=1e-5)

    clip = files["clip"]
    save_file(clip.state_dict(), str(tmp_path / "pickscore_open_clip.safetensors"))
    converted = R.load_pickscore(tmp_path / "pickscore_open_clip.safetensors", open_clip_architecture=TINY_OPEN_CLIP)
    assert isinstance(converted, R.OpenClipPickScoreReward) and converted.name == "pickscore"
    with torch.no_grad():
        cos = F.cosine_similarity(clip.encode_image(R.shortest_side_crop(images, 32, offset="floor")),
                                  clip.encode_text(converted.tokenizer(PROMPTS[:2])))
    assert torch.allclose(converted(images, PROMPTS[:2]), np.exp(3.0) * cos, atol=1e-4)


# -- image statistics ---------------------------------------------------------------------------

def test_image_statistics_values_and_ranges():
    grey = torch.full((1, 3, 16, 16), 0.5)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    stat = {n: R.ImageStatReward(n) for n in R.STATISTICS}
    assert torch.allclose(stat["brightness"](grey), torch.tensor([0.5]))
    assert torch.allclose(stat["brightness"](red), torch.tensor([0.299]))
    assert stat["saturation"](grey).item() == 0 and stat["saturation"](red).item() == 1
    assert stat["contrast"](grey).item() == 0 and abs(stat["contrast"](checker).item() - 0.5) < 1e-6
    assert stat["sharpness"](grey).item() == 0 and abs(stat["sharpness"](checker).item() - 4.0) < 1e-5
    natural = image_batch(2, 32, 32)
    for name, reward in stat.items():
        assert reward.name == name and not reward.needs_prompts
        s = reward(natural)
        assert (s >= 0).all() and (s <= {"contrast": 0.5, "sharpness": 4.0}.get(name, 1.0)).all()
    target = R.ImageStatReward("brightness", target=0.5)
    assert target(grey).item() == 0 and target(red).item() < 0
    with pytest.raises(ValueError, match="Unknown image statistic"):
        R.ImageStatReward("loudness")
