"""training/step_checkpoint.py: a checkpointed step whose forward builds no autograd graph.

The gradient equals plain autograd's and the non-reentrant checkpoint's (under ``backward`` and
``torch.autograd.grad``, with eta noise, DRaFT-LV, bf16 autocast and randomness inside the
denoiser); the forward runs without gradients and only the recompute with them.
"""
import pytest
import torch

from training import DifferentiableSampler, SamplerSettings, karras_sigmas
from training.toy_models import build_toy_model, colour_reward, toy_lora

T = 6


class Recording(torch.nn.Module):
    """The toy denoiser, noting whether gradients were on at each call; ``jitter`` adds a random
    draw inside the denoiser (as a model with dropout or noise augmentation would)."""

    def __init__(self, inner, jitter: bool = False):
        super().__init__()
        self.inner, self.jitter, self.grad_modes = inner, jitter, []

    def forward(self, x, sigma, index):
        self.grad_modes.append(torch.is_grad_enabled())
        out = self.inner(x, sigma, index)
        return out + 0.01 * torch.randn_like(out) if self.jitter else out


def _setup(method="draft_k", k=3, eta=0.0, jitter=False):
    denoiser, decoder = build_toy_model(seed=0)
    lora = toy_lora(denoiser)
    recording = Recording(denoiser, jitter)
    sampler = DifferentiableSampler(recording, karras_sigmas(T), SamplerSettings(
        method=method, k=k, lv_samples=2, eta=eta))
    return sampler, decoder, lora.trainable_parameters(), recording


def _gradient(way: str, method="draft_k", k=3, eta=0.0, jitter=False, autocast=False,
              use_backward=False):
    sampler, decoder, params, recording = _setup(method, k, eta, jitter)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    index = torch.tensor([0, 3])
    torch.manual_seed(11)  # the jitter's draws
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sampler.rollout(noise, index, generator=torch.Generator().manual_seed(7),
                              step_checkpoint=way != "plain",
                              params=params if way == "recomputed" else None)
        loss = -colour_reward(decoder(out.latents)).float().mean()
    if use_backward:
        loss.backward()
        grads = [p.grad.clone() for p in params]
    else:
        grads = list(torch.autograd.grad(loss, params))
    return grads, recording.grad_modes


@pytest.mark.parametrize("case", [
    dict(), dict(k=1), dict(k=T), dict(eta=0.7), dict(method="draft_lv"), dict(jitter=True),
    dict(use_backward=True)], ids=["k3", "k1", "full", "eta", "lv", "random_inside", "backward"])
def test_gradient_equals_plain_autograd_and_the_non_reentrant_checkpoint(case):
    plain, _ = _gradient("plain", **case)
    nonreentrant, _ = _gradient("non_reentrant", **case)
    recomputed, _ = _gradient("recomputed", **case)
    assert any(float(g.abs().max()) > 0 for g in plain)
    for a, b, c in zip(plain, nonreentrant, recomputed):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-8)


def _reentrant_gradient(monkeypatch, **case):
    """The gradient with torch's own reentrant checkpoint (whose forward also runs without
    gradients; it accumulates into ``.grad``, hence ``backward``)."""
    import training.sampler as sampler_module
    from torch.utils.checkpoint import checkpoint
    dummy = torch.empty(0, requires_grad=True)  # so that the step's output requires grad
    monkeypatch.setattr(sampler_module, "checkpoint", lambda fn, *a, use_reentrant: checkpoint(
        lambda _, *b: fn(*b), dummy, *a, use_reentrant=True))
    grads, _ = _gradient("non_reentrant", use_backward=True, **case)
    monkeypatch.undo()
    return grads


def test_under_bf16_autocast_the_recompute_runs_in_bf16_as_the_forward_did(monkeypatch):
    recomputed, _ = _gradient("recomputed", autocast=True)
    reentrant = _reentrant_gradient(monkeypatch, autocast=True)
    nonreentrant, _ = _gradient("non_reentrant", autocast=True)
    plain32, _ = _gradient("plain")
    for a, b, c, d in zip(recomputed, reentrant, nonreentrant, plain32):
        # bit for bit torch's reentrant checkpoint, the same forward without gradients
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        # a forward without gradients rounds a few bf16 values differently from one with them:
        # within bf16's precision of the non-reentrant checkpoint
        torch.testing.assert_close(a, c, rtol=2e-2, atol=1e-6)
    # and autocast really acted (a float32 recompute would give float32's gradient)
    assert any(not torch.allclose(a, d, rtol=1e-3, atol=0) for a, d in zip(recomputed, plain32))


def test_the_forward_builds_no_graph_only_the_recompute_does():
    k = 3
    _, modes = _gradient("recomputed", k=k)
    # T - k no-grad prefix steps, k differentiated forwards (no grad), k recomputes (grad)
    assert modes == [False] * T + [True] * k
    _, modes = _gradient("non_reentrant", k=k)
    assert modes == [False] * (T - k) + [True] * (2 * k)


def test_a_step_without_anything_requiring_grad_returns_no_gradient():
    sampler, decoder, params, _ = _setup(k=2)
    for p in params:
        p.requires_grad_(False)
    out = sampler.rollout(torch.randn(1, 4, 8, 8), torch.tensor([0]), step_checkpoint=True,
                          params=params)
    assert not out.latents.requires_grad


class InPlaceResidual(torch.nn.Module):
    """The toy denoiser followed by a block that writes its residual in place into a tensor a layer
    norm saved (as ComfyUI's FLUX and Chroma blocks do: ``txt += ...``), or out of place."""

    def __init__(self, inner, in_place: bool):
        super().__init__()
        self.inner, self.in_place = inner, in_place

    def forward(self, x, sigma, index):
        h = self.inner(x, sigma, index) * 1.0
        normed = torch.nn.functional.layer_norm(h, h.shape[-1:])
        if self.in_place:
            h += 0.5 * torch.tanh(normed)
        else:
            h = h + 0.5 * torch.tanh(normed)
        return torch.nn.functional.layer_norm(h, h.shape[-1:]) * 3.0


def _in_place_gradient(in_place: bool, k: int = 3):
    denoiser, decoder = build_toy_model(seed=0)
    lora = toy_lora(denoiser)
    params = lora.trainable_parameters()
    sampler = DifferentiableSampler(InPlaceResidual(denoiser, in_place), karras_sigmas(T),
                                    SamplerSettings(method="draft_k", k=k))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = sampler.rollout(noise, torch.tensor([0, 3]), step_checkpoint=True, params=params)
    loss = -colour_reward(decoder(out.latents)).mean()
    return torch.autograd.grad(loss, params), sampler.step_checkpoint_state


def test_a_model_writing_saved_tensors_in_place_gets_the_exact_gradient():
    with pytest.raises(RuntimeError, match="inplace"):  # plain autograd refuses such a model
        sampler, decoder, params, _ = _setup(k=1)
        sampler.denoise = InPlaceResidual(sampler.denoise, True)
        out = sampler.rollout(torch.randn(1, 4, 8, 8), torch.tensor([0]), step_checkpoint=False)
        torch.autograd.grad(colour_reward(decoder(out.latents)).mean(), params)
    reference, state = _in_place_gradient(in_place=False)
    assert not state  # an out-of-place model never needs the copies
    ours, state = _in_place_gradient(in_place=True)
    assert state == {"copy_activations": True}
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(float(g.abs().max()) > 0 for g in ours)


class CFGDenoiser(torch.nn.Module):
    """Classifier-free guidance over the toy denoiser (prompt 7 the unconditional branch): both
    branches in one batched call, or (``apart``) each a recomputed step of its own under gradient
    (``branches_apart``, as the trainer node's ``comfy_glue.branches_apart_cfg``). Notes each
    call's batch size and whether gradients were on."""

    def __init__(self, inner, params, apart: bool, cfg: float = 4.0):
        super().__init__()
        self.inner, self.params, self.apart, self.cfg, self.calls = inner, params, apart, cfg, []

    def _call(self, x, sigma, index):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.inner(x, sigma, index)

    def forward(self, x, sigma, index):
        from training.step_checkpoint import branches_apart
        uncond = torch.full_like(index, 7)
        if self.apart:
            out_u, out_c = branches_apart(
                [lambda x_in, i=i: self._call(x_in, sigma, i) for i in (uncond, index)], x,
                self.params)
        else:
            out_u, out_c = self._call(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                      torch.cat([uncond, index])).chunk(2)
        return out_u + self.cfg * (out_c - out_u)


def _cfg_run(apart: bool, method: str, k: int):
    """x0 of the last step and the LoRA gradient: ``apart``, each differentiated step checkpointed
    whole (recomputed) with the branches apart inside it, as the lean way with a video decoder;
    else the plain un-checkpointed run with both branches batched."""
    denoiser, decoder = build_toy_model(seed=0)
    params = toy_lora(denoiser).trainable_parameters()
    cfg = CFGDenoiser(denoiser, params, apart)
    sampler = DifferentiableSampler(cfg, karras_sigmas(T), SamplerSettings(
        method=method, k=k, lv_samples=2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = sampler.rollout(noise, torch.tensor([0, 3]), generator=torch.Generator().manual_seed(7),
                          step_checkpoint=apart, params=params if apart else None)
    loss = -colour_reward(decoder(out.latents)).mean()
    return out.latents.detach(), torch.autograd.grad(loss, params), cfg.calls


@pytest.mark.parametrize("method,k", [("draft_k", 1), ("draft_k", 3), ("draft_lv", 1)])
def test_cfg_branches_apart_give_the_plain_values_and_gradient(method, k):
    """``branches_apart`` nested in a recomputed step (the lean way with a video decoder): the
    step's backward recomputes each CFG branch alone, and the latents and LoRA gradient are the
    plain run's with both branches batched (cfg 4, so a mix-up of the branches shows)."""
    plain, plain_grads, plain_calls = _cfg_run(False, method, k)
    got, grads, calls = _cfg_run(True, method, k)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in plain_grads)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the plain run: both branches in each call under gradient; apart: each branch alone (half
    # the rows), under gradient only in its own recompute: the step's recompute runs each branch
    # without a graph (a recomputed step's forward), then each is recomputed with one, so a
    # differentiated step makes 2 + 2 calls without gradient (its forward, its recompute's) and 2
    # with; nothing else has gradient
    batched = {rows for rows, grad in plain_calls if grad}
    with_grad = [rows for rows, grad in calls if grad]
    assert len(batched) == 1 and with_grad and set(with_grad) == {batched.pop() // 2}
    steps = sum(grad for _, grad in plain_calls)
    assert len(with_grad) == 2 * steps
    assert len(calls) - len(with_grad) == 2 * (len(plain_calls) - steps) + 4 * steps
    half = with_grad[0]
    assert calls[-4:] == [(half, False), (half, False), (half, True), (half, True)]
