"""Two experts in the engine's sampler (Wan 2.2 A14B: a high-noise and a low-noise denoiser split at
a sigma boundary), ComfyUI-free.

* :func:`training.sampler.expert_steps` splits a schedule as Wan 2.2 does (high noise while
  ``sigma >= boundary``), and each expert denoises exactly its steps, in plain sampling and in a
  DRaFT rollout (prefix and tail).
* The trained expert's parameters get the gradient plain autograd gives through the same truncated
  chain, also when K reaches back past the boundary (training the high-noise expert: the gradient
  passes through the frozen low-noise expert's steps); the other expert's weights get none.
* A tail that falls entirely on the other expert's side is refused, saying which K would do.
"""
import pytest
import torch

from training.sampler import (DifferentiableSampler, OtherExpert, SamplerSettings, expert_steps,
                              tail_problem)

SIGMAS = torch.tensor([1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.0])  # 6 steps; 3 of them >= 0.875


def _flow_renoise(s, n, x0):
    s = s.reshape(-1, *([1] * (n.ndim - 1))).to(n)
    return s * n + (1 - s) * x0


class Expert(torch.nn.Module):
    """A small flow denoiser that records the sigma of every call."""

    def __init__(self, seed, trained):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.3 * torch.randn(4, 4, generator=g), requires_grad=trained)
        self.seen = []

    def forward(self, x, sigma, index):
        self.seen.append(round(float(sigma[0]), 4))
        v = torch.einsum("oc,bchw->bohw", self.w, torch.tanh(x)) + 0.1 * index.view(-1, 1, 1, 1)
        return x - sigma.view(-1, 1, 1, 1) * v


def _sampler(method, trained, k=1, boundary=0.875):
    mine, other = Expert(0, True), Expert(1, False)
    steps = expert_steps(SIGMAS, boundary, trained)
    sampler = DifferentiableSampler(mine, SIGMAS, SamplerSettings(method, k=k, checkpointing=True),
                                    renoise=_flow_renoise, other_expert=OtherExpert(other, steps))
    return sampler, mine, other


def test_expert_steps_split_at_the_sigma_boundary():
    assert expert_steps(SIGMAS, 0.875, "low noise") == {0, 1, 2}  # the high-noise expert's
    assert expert_steps(SIGMAS, 0.875, "high noise") == {3, 4, 5}
    assert expert_steps(SIGMAS, 0.9, "low noise") == {0, 1, 2}  # sigma >= boundary is high noise
    assert expert_steps(SIGMAS, 0.95, "low noise") == {0, 1}
    with pytest.raises(ValueError, match="trained expert"):
        expert_steps(SIGMAS, 0.875, "middle")


@pytest.mark.parametrize("trained", ["low noise", "high noise"])
def test_each_expert_denoises_exactly_its_steps(trained):
    sampler, mine, other = _sampler("draft_k", trained, k=4)
    high = [1.0, 0.95, 0.9]
    low = [0.8, 0.6, 0.3]
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 1])
    sampler.sample(noise, index)
    assert mine.seen == (low if trained == "low noise" else high)
    assert other.seen == (high if trained == "low noise" else low)
    mine.seen.clear(), other.seen.clear()
    out = sampler.rollout(noise, index, params=[mine.w])  # checkpointed: forward only so far
    assert mine.seen == (low if trained == "low noise" else high)
    assert other.seen == (high if trained == "low noise" else low)
    # training the low-noise expert with K = 4: the high-noise step 3 joins the no-grad prefix
    assert out.k == (3 if trained == "low noise" else 4)


@pytest.mark.parametrize("trained,k", [("low noise", 2), ("low noise", 5), ("high noise", 5),
                                       ("high noise", 6)])
def test_gradient_reaches_only_the_trained_expert_and_equals_autograd(trained, k):
    """DRaFT-K's gradient with two experts equals plain autograd through the same chain (the
    other expert's steps after a trained one differentiated through their input)."""
    sampler, mine, other = _sampler("draft_k", trained, k=k)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([0, 1])
    weights = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    out = sampler.rollout(noise, index, params=[mine.w])
    (out.latents * weights).sum().backward()
    got = mine.w.grad.clone()
    assert other.w.grad is None and float(got.abs().max()) > 0

    # the reference: the same chain by hand, gradient kept from the first trained step of the tail
    mine.w.grad = None
    T = len(SIGMAS) - 1
    other_steps = expert_steps(SIGMAS, 0.875, trained)
    first = T - k
    while first in other_steps:
        first += 1
    x = _flow_renoise(SIGMAS[:1].expand(2), noise, torch.zeros_like(noise))
    for i in range(T):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        with torch.set_grad_enabled(i >= first):
            net = other if i in other_steps else mine
            x0 = net(x, s.expand(2), index)
            x = x0 if float(s_next) == 0 else (1 - s_next) * x0 + s_next * (x - (1 - s) * x0) / s
    (x * weights).sum().backward()
    assert torch.allclose(got, mine.w.grad, atol=1e-6, rtol=1e-5)


def test_a_tail_on_the_other_side_is_refused():
    # training the high-noise expert: DRaFT-LV's one step and DRaFT-K's last 3 are the low-noise one's
    sampler, _, _ = _sampler("draft_lv", "high noise")
    noise = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="DRaFT-LV differentiates only the last step") as e:
        sampler.prefix(noise, torch.tensor([0]))
    assert "K >= 4" in str(e.value)
    other = expert_steps(SIGMAS, 0.875, "high noise")
    assert tail_problem(SamplerSettings("draft_k", k=3), 6, other) is not None
    assert tail_problem(SamplerSettings("draft_k", k=4), 6, other) is None
    assert "k_min >= 4" in tail_problem(SamplerSettings("random_k", k_min=2, k_max=6), 6, other)
    assert tail_problem(SamplerSettings("draft"), 6, other) is None
    # training the low-noise expert: every tail ends on its steps
    low = expert_steps(SIGMAS, 0.875, "low noise")
    assert all(tail_problem(SamplerSettings(m, k=1), 6, low) is None
               for m in ("draft", "draft_k", "draft_lv", "random_k"))
    assert "denoises none" in tail_problem(SamplerSettings("draft_lv"), 6, frozenset(range(6)))
