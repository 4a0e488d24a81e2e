"""CombinedReward: weighted sum whose gradient is the weighted sum of its parts' gradients."""
import pytest
import torch

import reward_models as R
from reward_fixtures import PROMPTS, image_batch


class _Quadratic(R.RewardModel):
    """A small differentiable, prompt-dependent test reward: mean((x - c)^2) * (1 + len(prompt))."""

    name = "quadratic"
    needs_prompts = True

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def score(self, images, prompts):
        factor = torch.tensor([1.0 + len(p) / 10 for p in prompts], device=self.device)
        return ((images.to(self.device, self.dtype) - self.c) ** 2).mean((1, 2, 3)) * factor


def _parts():
    return [R.ImageStatReward("brightness"), R.ImageStatReward("sharpness"), _Quadratic(0.3)]


def _grad(fn, images):
    x = images.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


@pytest.mark.parametrize("standardize", [False, True])
def test_gradient_is_weighted_sum_of_parts(standardize):
    parts, weights = _parts(), [2.0, -0.5, 1.5]
    combined = R.CombinedReward(parts, weights, standardize=standardize)
    images = image_batch(3, 24, 24)
    if standardize:  # warm the running statistics, then freeze them for the comparison
        for i in range(4):
            combined(image_batch(3, 24, 24) * (0.5 + i / 8), PROMPTS)
        combined.track_stats = False
        scale = (combined.running_var + combined.eps).rsqrt()
    else:
        scale = torch.ones(3)
    expected = sum(w * s * _grad(lambda x: p(x, PROMPTS), images) for p, w, s in zip(parts, weights, scale))
    got = _grad(lambda x: combined(x, PROMPTS), images)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().sum() > 0
    assert combined.needs_prompts and set(combined.last_scores) == {"brightness", "sharpness", "quadratic"}


def test_values_weighted_sum_and_chunking():
    parts = _parts()
    combined = R.CombinedReward(parts, [1.0, 3.0, -2.0])
    images = image_batch(3, 24, 24)
    expected = parts[0](images) + 3 * parts[1](images) - 2 * parts[2](images, PROMPTS)
    assert torch.allclose(combined(images, PROMPTS), expected, atol=1e-6)
    combined.chunk_size = 2
    assert torch.allclose(combined(images, PROMPTS), expected, atol=1e-6)


def test_running_standardisation_tracks_mean_and_spread():
    torch.manual_seed(0)
    combined = R.CombinedReward([R.ImageStatReward("brightness")], standardize=True, momentum=0.9)
    for _ in range(200):
        levels = 0.6 + 0.1 * torch.randn(8)
        combined(levels.clamp(0, 1).view(8, 1, 1, 1).expand(8, 3, 4, 4).contiguous())
    assert abs(combined.running_mean.item() - 0.6) < 0.03
    assert abs(combined.running_var.sqrt().item() - 0.1) < 0.03
    z = combined(torch.full((2, 3, 4, 4), 0.7))
    assert torch.allclose(z, torch.full((2,), 1.0), atol=0.35)  # about one std above the mean
    n = int(combined.num_batches)
    combined.track_stats = False
    combined(torch.rand(2, 3, 4, 4))
    assert int(combined.num_batches) == n


def test_combined_reward_validates_arguments():
    with pytest.raises(ValueError, match="weights for"):
        R.CombinedReward(_parts(), [1.0])
    with pytest.raises(ValueError, match="at least one"):
        R.CombinedReward([])
    assert not R.CombinedReward([R.ImageStatReward("contrast")]).needs_prompts
    dup = R.CombinedReward([R.ImageStatReward("contrast"), R.ImageStatReward("contrast", target=0.2)])
    dup(torch.rand(1, 3, 8, 8))
    assert set(dup.last_scores) == {"contrast", "contrast_2"}
