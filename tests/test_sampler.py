"""The differentiable sampler: truncated gradients are exact, DDIM matches diffusers."""
import pytest
import torch

from training import DifferentiableSampler, SamplerSettings, karras_sigmas, wrap_module
from training.sampler import ddim_step, signal_scale
from training.toy_models import TOY_LORA_TARGETS, build_toy_model, colour_reward

T = 8


def toy_setup(seed=0):
    denoiser, decoder = build_toy_model(seed=seed)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=2, alpha=2)
    # Non-zero LoRA so every factor gets gradient (a fresh LoRA has up = 0).
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return denoiser, decoder, lora


def euler_reference(denoiser, x, sigmas, index, first_grad):
    """Plain autograd through the Euler (= DDIM, eta 0) chain, written out independently."""
    with torch.no_grad():
        for i in range(first_grad):
            x0 = denoiser(x, sigmas[i].expand(x.shape[0]), index)
            x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    x = x.detach()
    for i in range(first_grad, len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i].expand(x.shape[0]), index)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def grads_of(params, loss):
    return [g.clone() for g in torch.autograd.grad(loss, params)]


def rel_err(a, b):
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)).sqrt()
    den = sum((y ** 2).sum() for y in b).sqrt()
    return float(num / den)


@pytest.mark.parametrize("k", [1, 4, T])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_draft_k_gradient_equals_plain_autograd(k, checkpointing):
    denoiser, decoder, lora = toy_setup()
    params = lora.trainable_parameters()
    sigmas = karras_sigmas(T)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    index = torch.tensor([0, 3])
    sampler = DifferentiableSampler(denoiser, sigmas, SamplerSettings(
        method="draft_k", k=k, checkpointing=checkpointing))
    out = sampler.rollout(noise, index)
    assert out.k == k
    ours = grads_of(params, colour_reward(decoder(out.latents)).mean())

    x_T = noise * sigmas[0]
    ref_latent = euler_reference(denoiser, x_T, sigmas, index, T - k)
    ref = grads_of(params, colour_reward(decoder(ref_latent)).mean())
    assert torch.allclose(out.latents, ref_latent, atol=1e-6)
    assert all(float(g.abs().max()) > 0 for g in ref)
    assert rel_err(ours, ref) < 1e-5


def test_full_draft_equals_untruncated_backprop():
    denoiser, decoder, lora = toy_setup()
    params = lora.trainable_parameters()
    sigmas = karras_sigmas(T)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    index = torch.tensor([1])
    out = DifferentiableSampler(denoiser, sigmas, SamplerSettings(method="draft")).rollout(noise, index)
    ours = grads_of(params, colour_reward(decoder(out.latents)).mean())
    # No detach anywhere: gradient flows from x_T through every step.
    x = noise * sigmas[0]
    for i in range(T):
        x0 = denoiser(x, sigmas[i].expand(1), index)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    ref = grads_of(params, colour_reward(decoder(x)).mean())
    assert rel_err(ours, ref) < 1e-5
    # ...and it differs from K = 1 (the truncation is real).
    k1 = DifferentiableSampler(denoiser, sigmas, SamplerSettings(method="draft_k", k=1)).rollout(noise, index)
    g1 = grads_of(params, colour_reward(decoder(k1.latents)).mean())
    assert rel_err(g1, ref) > 1e-3


def test_nothing_before_the_last_k_steps_gets_gradient():
    """A parameter used only at the noisier sigmas, and the initial noise, receive no gradient."""
    denoiser, decoder, lora = toy_setup()
    sigmas = karras_sigmas(T)
    k = 3
    cut = float(sigmas[T - k])  # sigmas of the differentiated steps are <= cut
    early = torch.nn.Parameter(torch.tensor(0.3))

    def denoise(x, sigma, index):
        x0 = denoiser(x, sigma, index)
        if float(sigma[0]) > cut:
            x0 = x0 * (1 + early)
        return x0

    noise = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = DifferentiableSampler(denoise, sigmas, SamplerSettings(method="draft_k", k=k)).rollout(
        noise, torch.tensor([0]))
    loss = colour_reward(decoder(out.latents)).mean()
    grads = torch.autograd.grad(loss, [early, noise] + lora.trainable_parameters(), allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads[2:])
    # With K = T the same parameter does get gradient, so the check above can fail.
    out = DifferentiableSampler(denoise, sigmas, SamplerSettings(method="draft")).rollout(
        noise, torch.tensor([0]))
    g_early = torch.autograd.grad(colour_reward(decoder(out.latents)).mean(), early)[0]
    assert float(g_early.abs()) > 0


@pytest.mark.parametrize("include_original", [False, True])
def test_draft_lv_gradient_is_mean_of_single_step_gradients(include_original):
    denoiser, decoder, lora = toy_setup()
    params = lora.trainable_parameters()
    sigmas = karras_sigmas(T)
    n = 3
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([2, 5])
    settings = SamplerSettings(method="draft_lv", lv_samples=n, lv_include_original=include_original)
    sampler = DifferentiableSampler(denoiser, sigmas, settings)
    g = torch.Generator().manual_seed(77)
    out = sampler.rollout(noise, index, generator=g)
    terms = n + int(include_original)
    assert out.latents.shape[0] == 2 * terms and out.k == 1
    ours = grads_of(params, colour_reward(decoder(out.latents)).mean())

    # Reference: the no-grad chain, then each re-noised sample's one-step gradient, averaged.
    with torch.no_grad():
        x = noise * sigmas[0]
        for i in range(T - 1):
            x0 = denoiser(x, sigmas[i].expand(2), index)
            x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        x_last = x.clone()
        x0_chain = denoiser(x, sigmas[T - 1].expand(2), index)
    g = torch.Generator().manual_seed(77)
    starts = [x_last] if include_original else []
    starts += [x0_chain + sigmas[T - 1] * torch.randn(x0_chain.shape, generator=g) for _ in range(n)]
    per_sample = []
    for start in starts:
        x0_hat = denoiser(start, sigmas[T - 1].expand(2), index)
        per_sample.append(grads_of(params, colour_reward(decoder(x0_hat)).mean()))
    mean_grad = [torch.stack(gs).mean(0) for gs in zip(*per_sample)]
    assert rel_err(ours, mean_grad) < 1e-5
    # The rollout's x0 carries no gradient: the noise gets none.
    noise_req = noise.clone().requires_grad_(True)
    out2 = sampler.rollout(noise_req, index, generator=torch.Generator().manual_seed(77))
    assert torch.autograd.grad(colour_reward(decoder(out2.latents)).mean(), noise_req,
                               allow_unused=True)[0] is None


def test_random_k_draws_within_range_and_varies():
    settings = SamplerSettings(method="random_k", k_min=2, k_max=6)
    g = torch.Generator().manual_seed(0)
    ks = [settings.truncation(20, g) for _ in range(200)]
    assert min(ks) == 2 and max(ks) == 6
    assert settings.truncation(4, g) <= 4


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_scheduler(eta):
    """Same eps model, same alphas: our sigma-space sampler equals diffusers' DDIMScheduler."""
    import diffusers
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=1,
                                    timestep_spacing="leading")
    sched.set_timesteps(10)
    ac = sched.alphas_cumprod.double()
    timesteps = sched.timesteps.tolist()
    denoiser, _ = build_toy_model(seed=3)
    eps_net = denoiser.eps_net.double()
    sigma_of_t = lambda t: ((1 - ac[t]) / ac[t]).sqrt()  # noqa: E731
    index = torch.tensor([1])

    # diffusers, VP space: eps_net sees x_vp and the matching sigma.
    g = torch.Generator().manual_seed(4)
    x_vp = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    zs = [torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in timesteps]
    x = x_vp.clone()
    with torch.no_grad():
        for t, z in zip(timesteps, zs):
            eps = eps_net(x, sigma_of_t(t).reshape(1), index)
            x = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample

    # Ours, sigma space (x_ve = x_vp / sqrt(alphabar)); the same z at each step.
    sigmas = torch.tensor([float(sigma_of_t(t)) for t in timesteps] + [0.0], dtype=torch.float64)
    den = lambda xx, s, i: xx - s.reshape(-1, 1, 1, 1) * eps_net(  # noqa: E731
        xx / torch.sqrt(1 + s.reshape(-1, 1, 1, 1) ** 2), s, i)
    sampler = DifferentiableSampler(den, sigmas, SamplerSettings(method="draft_k", eta=eta))
    sampler.sigmas = sigmas  # keep float64 for the comparison
    y = x_vp / ac[timesteps[0]].sqrt()
    with torch.no_grad():
        for i in range(len(timesteps)):
            y, _ = sampler._step(i, y, index, zs[i])
    # The final step lands on sigma = 0 (alphabar = 1), where both spaces coincide.
    assert torch.allclose(y, x, atol=1e-4, rtol=0), float((y - x).abs().max())


def test_flow_step_is_euler_and_signal_scale_is_read_off_renoise():
    flow = lambda s, n, x0: s.reshape(-1, 1, 1, 1) * n + (1 - s.reshape(-1, 1, 1, 1)) * x0  # noqa: E731
    x = torch.randn(2, 4, 4, 4)
    x0 = torch.randn(2, 4, 4, 4)
    s, sn = torch.tensor(0.8), torch.tensor(0.5)
    a = signal_scale(flow, s, x)
    assert torch.allclose(a, torch.full_like(a, 0.2))
    out = ddim_step(x, x0, s, sn, a, signal_scale(flow, sn, x), eta=0.0)
    assert torch.allclose(out, x + (x - x0) / s * (sn - s), atol=1e-6)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError):
        SamplerSettings(method="dpo")
    with pytest.raises(ValueError):
        SamplerSettings(eta=1.5)
    with pytest.raises(ValueError):
        SamplerSettings(method="draft_k", k=12).truncation(10)
    with pytest.raises(ValueError):
        DifferentiableSampler(lambda *a: a[0], torch.tensor([1.0, 2.0, 0.0]), SamplerSettings())
