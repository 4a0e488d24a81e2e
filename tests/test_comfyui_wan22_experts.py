"""Wan 2.2 A14B's two experts in DRaFT Trainer (marker ``comfyui``): DRaFT Wan 2.2 Experts wires
the expert that is not trained; tiny ``WAN21_T2V`` models stand in for the experts (ComfyUI loads
each A14B expert as one).

* Each expert denoises exactly its steps (sigma >= boundary: the high-noise one), in training
  and in ComfyUI's own calls through its CFGGuider; the trainer's notes say which expert trains
  on which steps; the file's metadata says it too.
* Gradients reach only the trained expert's LoRA, also when K reaches back past the boundary
  (training the high-noise expert: the gradient passes through the low-noise expert's steps).
* A DRaFT tail entirely on the other expert's side is refused before anything loads.
"""
import pytest
import torch

import dit_fixtures as D
import lora_fixtures as F

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
STEPS = 6  # shift 8 "simple": sigmas 1, .976, .941, .889 (high noise) | .8, .615 (low noise)


@pytest.fixture(scope="module")
def pack():
    F.import_comfy()
    return {name: F.import_pack_module(f"nodes.{name}") for name in
            ("training_run", "reward_types", "experts_node", "trainer_node", "sampler_node")}


def _recording(model, seen):
    """A clone whose every diffusion-model call records its sigma (a unet function wrapper sees
    the sigma apply_model is called with)."""
    clone = model.clone()

    def record(apply_model, args):
        seen.append(round(float(args["timestep"].flatten()[0]), 4))
        return apply_model(args["input"], args["timestep"], **args["c"])
    clone.set_model_unet_function_wrapper(record)
    return clone


def _run(pack, trained, sampler, iterations=1):
    from reward_models import ImageStatReward
    from training import TrainSettings
    from training.run_options import VideoOptions
    import comfy.samplers
    rc = pack["training_run"]
    seen_trained, seen_other = [], []
    model = _recording(D.tiny_model("wan21_t2v", seed=0), seen_trained)
    other = _recording(D.tiny_model("wan21_t2v", seed=1), seen_other)
    experts = pack["experts_node"].WanExperts(other, trained, 0.875)
    reward = pack["reward_types"].RewardHandle(ImageStatReward("brightness"), [], "brightness")
    config = rc.RunConfig(
        prompts=["a cat", "a dog"], negative_prompt="", sampler=sampler, steps=STEPS,
        scheduler="simple", cfg=0.0, width=64, height=64,
        train=TrainSettings(iterations=iterations, learning_rate=3e-2, seed=0, grad_clip=0.0),
        rank=4, alpha=4.0, target_set="attention", mixed_precision="no", save_every=0,
        preview_every=0, lora_name="draft/wan22", video=VideoOptions(9, 2), experts=experts)
    with torch.inference_mode(False), torch.enable_grad():
        run = rc.TrainingRun(model, D.tiny_vae("wan21_t2v"), D.conditioning("wan21_t2v"), reward, config)
        result = run.run()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return result, seen_trained, seen_other, other, [round(float(s), 4) for s in sigmas[:-1]]


def test_each_expert_denoises_its_steps_and_only_the_low_noise_lora_trains(pack, loras_dir):
    from training import SamplerSettings
    result, mine, theirs, other, sigmas = _run(pack, "low noise", SamplerSettings("draft_lv", lv_samples=2))
    high = {s for s in sigmas if s >= 0.875}
    assert len(high) == 4 and len(sigmas) - len(high) == 2
    assert set(theirs) == high and set(mine) == set(sigmas) - high  # each exactly its own steps
    assert all(float(d.up.detach().abs().max()) > 0 for _, d in result.lora.items())
    assert all(p.grad is None for p in other.model.diffusion_model.parameters())
    note = [n for n in result.notes if n.startswith("Wan 2.2 experts")]
    assert note and "training the low noise expert" in note[0], result.notes
    assert "denoises steps 5-6 of 6" in note[0] and "expert (DRaFT Wan 2.2 Experts) denoises steps 1-4" \
        in note[0] and "differentiated steps: 6" in note[0], note[0]
    assert result.metadata["wan22_expert"] == "low noise" and result.metadata["wan22_boundary"] == 0.875


def test_training_the_high_noise_expert_reaches_back_through_the_low_noise_steps(pack, loras_dir):
    """DRaFT-K with K = 3 while training the high-noise expert: steps 4 (its own) to 6 (the
    low-noise expert's) are differentiated; its LoRA gets the gradient through them."""
    from training import SamplerSettings
    result, mine, theirs, other, sigmas = _run(pack, "high noise", SamplerSettings("draft_k", k=3))
    high = {s for s in sigmas if s >= 0.875}
    assert set(mine) == high and set(theirs) == set(sigmas) - high
    assert all(float(d.up.detach().abs().max()) > 0 for _, d in result.lora.items())
    assert all(p.grad is None for p in other.model.diffusion_model.parameters())
    note = [n for n in result.notes if n.startswith("Wan 2.2 experts")][0]
    assert "training the high noise expert" in note and "differentiated steps: 4-6" in note, note


def test_a_tail_on_the_other_experts_side_is_refused_before_anything_runs(pack):
    node_cls = pack["sampler_node"].DraftSamplerNode
    sampler = node_cls.PREPARE_CLASS_CLONE({}).execute(  # its defaults: DRaFT-LV
        **{i.id: i.default for i in node_cls.define_schema().inputs}).args[0]
    assert sampler.draft_settings.method == "draft_lv"
    experts = pack["experts_node"].DraftWan22Experts.PREPARE_CLASS_CLONE({}).execute(
        other_expert=D.tiny_model("wan21_t2v", seed=1), trained_expert="high noise",
        boundary=0.875).args[0]
    values = dict(prompt_set="custom", prompts="a cat", negative_prompt="", steps=STEPS,
                  scheduler="simple", cfg=0.0, width=64, height=64, iterations=1, batch_size=1,
                  learning_rate=1e-3, seed=0, lora_name="draft/wan22", resume_lora="none")
    node = pack["trainer_node"].DraftTrainerNode.PREPARE_CLASS_CLONE({})
    with pytest.raises(ValueError) as e:
        node.execute(model=D.tiny_model("wan21_t2v"), vae=D.tiny_vae("wan21_t2v"), clip=None,
                     reward=None, sampler=sampler, experts=experts, **values)
    text = str(e.value)
    assert "- sampler: DRaFT-LV differentiates only the last step" in text, text
    assert "the trainer's model is the high noise expert" in text and "K >= 3" in text, text
    # an expert of another kind (Wan 2.2 TI2V-5B) is refused too
    with pytest.raises(ValueError, match="for Wan 2.2 A14B's two experts"):
        node.execute(model=D.tiny_model("wan22_ti2v_5b"), vae=D.tiny_vae("wan22_ti2v_5b"), clip=None,
                     reward=None, sampler=sampler, experts=experts, **values)
