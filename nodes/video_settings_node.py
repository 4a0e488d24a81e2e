"""DRaFT Video Settings: a video family's training length and the frames the reward sees
(optional; default: the family's usual length, 3 decoded latent frames; image families ignore it)."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.run_options import VideoOptions
from ..training.video_frames import FRAME_PICKS
from .options_node import OptionsNode
from .trainer_options import OPTION_INPUTS

DraftVideoSettingsType = io.Custom("DRAFT_VIDEO")


class DraftVideoSettings(OptionsNode):
    TRAINER_INPUT, TYPE = "video", DraftVideoSettingsType
    TITLE, OPTIONS = OPTION_INPUTS[TRAINER_INPUT]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.options_schema(
            "DRaFTVideoSettings", cls.TITLE,
            ("Optional, for video models (Wan 2.1, Wan 2.2): how long the training videos are and how "
             "many of their frames the reward scores (without this node: the family's usual "
             "length, 33 frames for Wan 2.1, 3 decoded latent frames, every decoded frame "
             "scored). Any image reward scores a video frame by frame on the chosen frames; a "
             "video's reward is the mean over them (a video reward, Temporal Consistency, "
             "compares them in order). Image models ignore this node."),
            [
                io.Int.Input("length", default=VideoOptions.length, min=0, max=1024, step=1,
                             tooltip="Frames per training video, 4k + 1 for Wan (33 = 9 latent frames; Wan generates 81 by default); 0 = the model family's usual (33 for Wan 2.1). Memory and time grow with it: every latent frame goes through the DiT."),
                io.Int.Input("decoded_latent_frames", default=VideoOptions.decoded_latent_frames, min=0, max=256,
                             tooltip="Decode at most the first this many latent frames for the reward (Wan's causal VAE gives 1 + 4(k - 1) frames from k: 3 -> 9 frames), as VideoX-Fun's reward training does (num_decoded_latents 3); 0 = all. The decoder's memory grows with it."),
                io.Int.Input("reward_frames", default=VideoOptions.reward_frames, min=0, max=1024, optional=True,
                             tooltip="How many of the decoded frames the reward scores per video; 0 = every decoded frame. Only the latent frames the picked frames need are decoded ('first' with 5 frames: 2 latent frames). At most the decoded frames (1 + 4(k - 1)); 2 or more for the Temporal Consistency reward."),
                io.Combo.Input("frame_pick", options=list(FRAME_PICKS), default=VideoOptions.frame_pick, optional=True,
                               tooltip="Which frames reward_frames takes: first: the first ones (the fewest latent frames decoded); evenly spaced: spread over the decoded frames, first and last included (1 frame: the middle one); random: a fresh draw every update from the run's seed (held-out checks and previews then score every decoded frame)."),
            ],
        )
