"""Video rewards on the engine (CPU tier): which frames the reward scores and which latent frames
are decoded for them (training/video_frames.py, DraftTrainer), gradients only through the scored
frames, the temporal consistency reward (reward_models/temporal.py), Combine with it, and the
held-out check on videos. A toy causal "video VAE" stands in for Wan's: latent frame 0 gives one
frame, every later latent frame four, each frame depending on its own latent frame only."""
import pytest
import torch
from torch import nn

from reward_models import CombinedReward, ImageStatReward, RewardModel, TemporalConsistencyReward
from reward_models.preprocess import ImageTransform
from training import DifferentiableSampler, DraftTrainer, SamplerSettings, TrainSettings, karras_sigmas, wrap_module
from training.heldout import HeldoutCheck, HeldoutSettings, pairwise_similarity, pixel_embedding
from training.run_options import VideoOptions
from training.toy_models import TOY_LORA_TARGETS, build_toy_model, colour_reward
from training.trainer import score_samples
from training.video_frames import FrameChoice

PROMPTS = ["a red fox", "a castle"]
LATENT = (4, 3, 8, 8)  # (C, T, h, w): 3 latent frames -> 9 frames


class ToyVideoDecoder:
    """(B, C, T, h, w) -> (B*F, 3, H, W), F = 1 + 4 (T - 1); records the T it was handed."""

    def __init__(self, decoder):
        self.decoder, self.handed = decoder, []

    def __call__(self, latent):
        self.handed.append(latent.shape[2])
        out = []
        for t in range(latent.shape[2]):
            image = self.decoder(latent[:, :, t])
            out.append(image[:, None] if t == 0 else
                       torch.stack([image * (0.6 + 0.1 * j) for j in range(4)], 1))
        return torch.cat(out, 1).flatten(0, 1)


def video_denoiser(denoiser):
    """The toy image denoiser applied frame by frame to (B, C, T, h, w)."""
    def denoise(x, sigma, index):
        b, t = x.shape[0], x.shape[2]
        flat = x.movedim(2, 1).flatten(0, 1)
        out = denoiser(flat, sigma.repeat_interleave(t), index.repeat_interleave(t))
        return out.unflatten(0, (b, t)).movedim(1, 2)
    return denoise


def make_video_trainer(reward=colour_reward, choice=None, seed=0, batch_size=2):
    denoiser, decoder = build_toy_model(seed=0)
    lora = wrap_module(denoiser, TOY_LORA_TARGETS, rank=4, alpha=4, seed=seed)
    sampler = DifferentiableSampler(video_denoiser(denoiser), karras_sigmas(4),
                                    SamplerSettings(method="draft_k", k=1))
    settings = TrainSettings(batch_size=batch_size, learning_rate=3e-3, seed=seed)
    video = ToyVideoDecoder(decoder)
    trainer = DraftTrainer(sampler, video, reward, PROMPTS, lora, LATENT, settings,
                           frame_choice=choice)
    return trainer, video


class Recording:
    """An image reward (mean brightness) that records the prompts and frame count it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append((images.shape[0], list(prompts)))
        return images.mean(dim=(1, 2, 3))


# -- the frame choice --------------------------------------------------------------------------------
def test_first_picks_the_first_frames_and_needs_only_their_latent_frames():
    for count, latent_frames in ((1, 1), (2, 2), (5, 2), (6, 3), (9, 3)):
        c = FrameChoice(3, 4, count, "first")
        assert c.frames() == tuple(range(count))
        assert c.latent_frames_for(c.frames()) == latent_frames == c.most_latent_frames
    assert FrameChoice(3, 4, 0).frames() == tuple(range(9))  # 0: every decoded frame


def test_evenly_spaced_and_random_picks():
    assert FrameChoice(3, 4, 3, "evenly spaced").frames() == (0, 4, 8)
    assert FrameChoice(3, 4, 2, "evenly spaced").frames() == (0, 8)
    assert FrameChoice(3, 4, 1, "evenly spaced").frames() == (4,)  # the middle frame
    assert FrameChoice(3, 4, 1, "evenly spaced").most_latent_frames == 2
    assert FrameChoice(5, 4, 4, "evenly spaced").frames() == (0, 5, 11, 16)
    r = FrameChoice(3, 4, 3, "random")
    picks = {r.frames(torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(picks) > 10
    for p in picks:
        assert len(set(p)) == 3 and list(p) == sorted(p) and all(0 <= f < 9 for f in p)
    assert r.most_latent_frames == 3 and r.evaluation_frames() == tuple(range(9))
    with pytest.raises(ValueError, match="generator"):
        r.frames()


def test_nonsense_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"reward_frames 10 is more than the 9 frames decoded from 3"):
        VideoOptions(length=33, decoded_latent_frames=3, reward_frames=10).frame_choice(9, 4)
    VideoOptions(reward_frames=9).frame_choice(9, 4)  # exactly the decoded frames is fine
    with pytest.raises(ValueError, match="frame_pick must be one of"):
        VideoOptions(frame_pick="last")
    with pytest.raises(ValueError, match="reward_frames must be >= 0|>= 0"):
        VideoOptions(reward_frames=-1)


@pytest.mark.parametrize("count,pick,handed", [(2, "first", 2), (5, "first", 2), (1, "first", 1),
                                               (3, "evenly spaced", 3), (0, "first", 3)])
def test_an_update_decodes_only_the_latent_frames_the_picked_frames_need(count, pick, handed):
    reward = Recording()
    trainer, video = make_video_trainer(reward, FrameChoice(3, 4, count, pick))
    trainer.step()
    assert video.handed == [handed]
    frames = count or 9
    assert reward.calls == [(2 * frames, [p for p in reward.calls[0][1][::frames] for _ in range(frames)])]
    assert len(trainer.last_images) == 1


def test_random_pick_is_fresh_per_update_and_the_same_for_the_same_seed():
    def picks(seed):
        trainer, _ = make_video_trainer(choice=FrameChoice(3, 4, 2, "random"), seed=seed)
        return [trainer.frames_for_update(i) for i in range(1, 9)]
    a = picks(0)
    assert a == picks(0) and len(set(a)) > 3 and a != picks(1)
    reward = Recording()
    trainer, video = make_video_trainer(reward, FrameChoice(3, 4, 2, "random"))
    trainer.step()  # update 1 scores a[0], decoding up to its last frame's latent frame
    assert video.handed == [FrameChoice(3, 4).latent_frames_for(a[0])] and reward.calls[0][0] == 4


def test_gradients_reach_only_the_picked_frames_and_their_latent_frames():
    choice = FrameChoice(3, 4, 2, "evenly spaced")  # frames 0 and 8 -> all 3 latent frames
    trainer, video = make_video_trainer(choice=choice)
    decoded = []

    def keep(latent):
        images = ToyVideoDecoder(video.decoder)(latent)
        images.retain_grad()
        decoded.append(images)
        return images
    trainer.decode = keep
    latent = torch.randn((2,) + LATENT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    picked = trainer.decode_frames(latent, choice.frames())
    assert picked.shape == (4, 3, 16, 16)
    assert torch.equal(picked, decoded[0].detach().view(2, 9, 3, 16, 16)[:, [0, 8]].flatten(0, 1))
    trainer.score(picked, PROMPTS).sum().backward()
    grad = decoded[0].grad.view(2, 9, -1).abs().sum(-1)
    assert (grad[:, [0, 8]] > 0).all() and float(grad[:, 1:8].abs().max()) == 0.0
    # 'first' with 2 frames: the third latent frame is never decoded, so it gets no gradient
    latent.grad = None
    first = trainer.decode_frames(latent, (0, 1))
    trainer.score(first, PROMPTS).sum().backward()
    per_latent = latent.grad.abs().sum(dim=(1, 3, 4))  # (B, T)
    assert (per_latent[:, :2] > 0).all() and float(per_latent[:, 2].max()) == 0.0


# -- the temporal consistency reward ------------------------------------------------------------------
def smooth_video(frames=6, seed=0):
    """(frames, 3, 16, 16): one image drifting slowly."""
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    t = torch.linspace(0, 1, frames).view(-1, 1, 1, 1)
    return (0.8 * base + 0.2 * t * drift).clamp(0, 1)


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
        self.conv.requires_grad_(False)

    def forward(self, pixels):
        return self.conv(pixels).flatten(1)


class EmbeddingReward(RewardModel):
    """An image reward with an image encoder of its own (as CLIP-based rewards have)."""

    def __init__(self):
        super().__init__()
        self.encoder = TinyEncoder()

    def image_embeddings(self, images):
        return self.encoder(images)

    def score(self, images, prompts):
        return self.encoder(images).mean(1)


def temporal_rewards():
    return {"pixels": TemporalConsistencyReward(),
            "encoder": TemporalConsistencyReward(TinyEncoder(), ImageTransform("crop", 12)),
            "reward's encoder": TemporalConsistencyReward(embeddings_of=EmbeddingReward())}


@pytest.mark.parametrize("source", ["pixels", "encoder", "reward's encoder"])
def test_temporal_reward_is_highest_for_identical_frames_and_lower_for_shuffled_or_noisy(source):
    reward = temporal_rewards()[source]
    video = smooth_video()
    still = video[:1].repeat(6, 1, 1, 1)
    order = torch.tensor([0, 5, 1, 4, 2, 3])
    noisy = (video + 0.3 * torch.randn(video.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = reward(torch.cat([still, video, video[order], noisy]), None, frames_per_video=6)
    assert s.shape == (4,)
    assert torch.allclose(s[0], torch.tensor(1.0), atol=1e-5)  # the maximum of both ranges
    assert s[0] > s[1] > s[2] and s[1] > s[3], s
    low = -1.0 if source != "pixels" else 0.0
    assert float(s.min()) >= low


@pytest.mark.parametrize("source", ["pixels", "encoder"])
def test_temporal_reward_gradient_flows_and_ascending_it_steadies_the_video(source):
    reward = temporal_rewards()[source]
    frames = smooth_video(4).clone().requires_grad_(True)
    noisy = (frames.detach() + 0.2 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(2)))
    x = noisy.clone().requires_grad_(True)
    before = reward(x, None, frames_per_video=4)
    before.sum().backward()
    assert float(x.grad.abs().max()) > 0
    with torch.no_grad():
        y = x + 0.5 * x.grad / x.grad.norm()
    assert float(reward(y, None, frames_per_video=4)) > float(before)


def test_temporal_reward_refuses_images_and_single_frames():
    reward = TemporalConsistencyReward()
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot score single images"):
        reward(images, None)
    with pytest.raises(ValueError, match="needs 2 or more frames per video, got 1"):
        reward(images, None, frames_per_video=1)
    # through the trainer's scoring on an image model (one image per sample): refused, not constant
    with pytest.raises(ValueError, match="needs 2 or more frames per video, got 1"):
        score_samples(reward, images, ["a"] * 4)
    with pytest.raises(ValueError, match="not both"):
        TemporalConsistencyReward(TinyEncoder(), ImageTransform("crop", 12), embeddings_of=EmbeddingReward())


def test_temporal_reward_scores_whole_videos_in_chunks():
    video = torch.cat([smooth_video(3, seed=s) for s in range(5)])
    whole = TemporalConsistencyReward()(video, None, frames_per_video=3)
    chunked = TemporalConsistencyReward(chunk_size=4)(video, None, frames_per_video=3)  # 1 video a chunk
    assert torch.allclose(whole, chunked)


# -- Combine with a video reward ----------------------------------------------------------------------
def test_combine_with_the_temporal_reward_scores_per_video_and_penalises_flicker():
    steady = smooth_video(4)
    flicker = steady.clone()
    flicker[1::2] = (flicker[1::2] * 0.5)
    flicker[0::2] = (flicker[0::2] * 1.5).clamp(0, 1)
    videos = torch.cat([steady, flicker])
    brightness, temporal = ImageStatReward("brightness"), TemporalConsistencyReward()
    per_frame = brightness(videos).view(2, 4).mean(1)
    consistency = temporal(videos, None, frames_per_video=4)
    for w in (0.5, -0.5):
        combined = CombinedReward([ImageStatReward("brightness"), TemporalConsistencyReward()], [1.0, w])
        assert combined.scores_videos
        s = combined(videos, None, frames_per_video=4)
        assert torch.allclose(s, per_frame + w * consistency, atol=1e-6)
        assert combined.last_scores["temporal"].shape == (2,)
    assert float(consistency[0]) > float(consistency[1])  # the weight 0.5 penalises the flicker
    with pytest.raises(ValueError, match="scores whole videos"):
        combined(videos, None)
    # the trainer's scoring hands the combination whole videos
    assert torch.allclose(score_samples(combined, videos, ["a", "b"]), per_frame - 0.5 * consistency, atol=1e-6)
    # image-only Combine on videos: each frame scored, averaged per video (as before)
    image_only = CombinedReward([ImageStatReward("brightness")], [2.0])
    assert not image_only.scores_videos
    assert torch.allclose(score_samples(image_only, videos, ["a", "b"]), 2 * per_frame, atol=1e-6)


def test_combine_standardises_per_video():
    videos = torch.cat([smooth_video(3, seed=s) for s in range(4)])
    combined = CombinedReward([ImageStatReward("brightness"), TemporalConsistencyReward()], [1.0, 1.0],
                              standardize=True)
    combined(videos, None, frames_per_video=3)
    expected = torch.stack([ImageStatReward("brightness")(videos).view(4, 3).mean(1),
                            TemporalConsistencyReward()(videos, None, frames_per_video=3)], 1)
    assert int(combined.num_batches) == 1
    assert torch.allclose(combined.running_mean, expected.mean(0), atol=1e-6)
    assert torch.allclose(combined.running_var, expected.var(0, unbiased=False), atol=1e-6)


def test_a_video_update_with_the_temporal_penalty_trains_and_only_picked_frames_are_scored():
    combined = CombinedReward([ImageStatReward("brightness"), TemporalConsistencyReward()], [1.0, 0.5])
    trainer, video = make_video_trainer(combined, FrameChoice(3, 4, 3, "first"))
    before = [p.detach().clone() for p in trainer.params]
    report = trainer.step()
    assert not report.skipped and video.handed == [2] and len(report.rewards) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


# -- the held-out check on videos ---------------------------------------------------------------------
def test_heldout_check_scores_videos_per_video_and_compares_middle_frames():
    reward = Recording()
    trainer, video = make_video_trainer(colour_reward, FrameChoice(3, 4, 5, "first"))
    judge = TemporalConsistencyReward()
    check = HeldoutCheck(HeldoutSettings(every=1, seeds=2, prompts=("p1", "p2")),
                         [("temporal", judge), ("recording", reward)], prompt_offset=len(PROMPTS), chunk=2)
    images, prompts = check.images(trainer)
    assert images.shape == (4 * 5, 3, 16, 16) and len(prompts) == 4 and video.handed == [2, 2]
    record = check.evaluate(trainer)["figures"]
    per_video = colour_reward(images).view(4, 5).mean(1)
    assert record["reward"] == pytest.approx(float(per_video.mean()), rel=1e-5)
    assert record["judge1"] == pytest.approx(float(judge(images, None, frames_per_video=5).mean()), rel=1e-5)
    assert [n for n, _ in reward.calls] == [10, 10]  # two videos of 5 frames at a time
    middle = images.view(4, 5, 3, 16, 16)[:, 2]
    sims = [pairwise_similarity(pixel_embedding(middle[i:i + 2])) for i in (0, 2)]
    assert record["similarity"] == pytest.approx(sum(sims) / 2, rel=1e-5)


def test_random_pick_evaluates_every_decoded_frame():
    trainer, video = make_video_trainer(choice=FrameChoice(3, 4, 2, "random"))
    assert trainer.evaluation_frames() is None
    assert trainer.generate([5]).shape == (9, 3, 16, 16) and video.handed == [3]
    trainer, _ = make_video_trainer(choice=FrameChoice(3, 4, 3, "evenly spaced"))
    assert trainer.generate([5]).shape == (3, 3, 16, 16)
