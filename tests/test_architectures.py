"""The architecture table without ComfyUI (runs in CI): every family's target patterns are anchored
inside its block lists, and family lookup walks the model-config class's bases.

``nodes/architectures.py`` imports nothing from ComfyUI, so it is loaded here from its file; the
ComfyUI tier (test_comfyui_families.py) checks the same table against real models."""
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("draft_architectures",
                                                  os.path.join(REPO, "nodes", "architectures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Module names that must never be selected: top-level layers and modulation/embedding layers.
NEVER = ["proj_out", "img_in", "txt_in", "final_layer.linear", "norm_out.linear", "context_embedder",
         "x_embedder.proj", "time_in.in_layer", "out.2", "label_emb.0.0", "time_embed.0",
         "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin",
         "joint_blocks.0.x_block.adaLN_modulation.1", "transformer_blocks.0.img_mod.1",
         "input_blocks.0.0", "input_blocks.1.0.in_layers.2", "distilled_guidance_layer.in_proj",
         "layers.0.adaLN_modulation.1", "noise_refiner.1.adaLN_modulation.1", "cap_embedder.1",
         "final_layer.adaLN_modulation.1", "txt_in.individual_token_refiner.blocks.0.self_attn.qkv"]


def test_patterns_never_pick_top_level_or_modulation_layers(arch):
    for family in arch.FAMILIES:
        assert set(family.patterns) == set(arch.TARGET_SET_NAMES)
        for target_set, pattern in family.patterns.items():
            picked = [n for n in NEVER if pattern.search(n)]
            assert not picked, (family.name, target_set, picked)
            assert pattern.pattern.startswith("^"), (family.name, target_set)


@pytest.mark.parametrize("name,family,attention,broad", [
    ("double_blocks.3.img_attn.qkv", "FLUX.1 dev", True, True),
    ("double_blocks.3.txt_mlp.2", "FLUX.1 dev", False, True),
    ("single_blocks.11.linear1", "FLUX.1 schnell", True, True),
    ("joint_blocks.0.x_block.attn2.qkv", "SD3 / SD3.5", True, True),
    ("joint_blocks.5.context_block.mlp.fc1", "SD3 / SD3.5", False, True),
    ("transformer_blocks.7.attn.add_k_proj", "Qwen-Image", True, True),
    ("transformer_blocks.7.img_mlp.net.0.proj", "Qwen-Image", False, True),
    ("layers.25.attention.qkv", "Lumina 2", True, True),
    ("context_refiner.1.attention.out", "Lumina 2", True, True),
    ("noise_refiner.0.feed_forward.w3", "Lumina 2", False, True),
    ("double_blocks.19.txt_attn.proj", "HunyuanImage 2.1", True, True),
    ("double_blocks.0.img_mlp.0", "HunyuanImage 2.1", False, True),
    ("single_blocks.39.linear2", "HunyuanImage 2.1", True, True),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_out.0", "SD1.x", True, True),
    ("output_blocks.5.1.proj_out", "SDXL", False, True),
    ("middle_block.1.transformer_blocks.0.ff.net.0.proj", "SD2.x", False, True),
])
def test_patterns_pick_block_layers(arch, name, family, attention, broad):
    fam = next(f for f in arch.FAMILIES if f.name == family)
    assert bool(fam.patterns["attention"].search(name)) == attention
    assert bool(fam.patterns["kohya default"].search(name)) == broad


def test_family_lookup_walks_bases_and_refuses_unknown_classes(arch):
    SDXL = type("SDXL", (), {"unet_config": {}})
    SSD1B = type("SSD1B", (SDXL,), {})  # a variant: SDXL layout, no SDXL metadata claim
    SD3 = type("SD3", (), {})
    AuraFlow = type("AuraFlow", (), {})
    assert arch.family_of(SDXL()).name == "SDXL" and arch.base_model(SDXL()) == "sdxl_base_v1-0"
    assert arch.family_of(SSD1B()).name == "SDXL" and arch.base_model(SSD1B()) is None
    sd3 = SD3()
    for cfg, base in [({}, "sd3_medium"), ({"qk_norm": "rms"}, "sd3_5_large"),
                      ({"qk_norm": "rms", "x_block_self_attn_layers": [0, 1]}, "sd3_5_medium")]:
        sd3.unet_config = cfg
        assert arch.base_model(sd3) == base
    with pytest.raises(arch.UnsupportedModelError, match="AuraFlow.*SD1.x.*FLUX.1 dev.*Qwen-Image"):
        arch.family_of(AuraFlow())
    flux = next(f for f in arch.FAMILIES if f.name == "FLUX.1 dev")
    assert flux.guidance_distilled and flux.default_cfg == 1.0 and flux.guidance == 3.5
    assert flux.block_lists == ("double_blocks", "single_blocks")
