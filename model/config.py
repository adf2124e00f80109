"""One source of truth for the model's shapes and settings: data shapes, network sizes, training recipe.

``full_config()`` is the paper's model (Stable Diffusion 1.5 backbone, wav2vec2-base audio, 512x512 at 25 fps);
``tiny_config()`` keeps every structural feature but shrinks every width so the whole model runs on a CPU in
tests. Everything else in ``model/`` reads its sizes from a ``ModelConfig``; nothing hard-codes a width.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataShapes:
    """What preprocessing stores per clip (defaults: the real data).

    Video: ``image_size`` square RGB frames at ``fps``; latents ``(latent_channels, latent_size, latent_size)``
    after the SD VAE, multiplied by ``vae_scale``. Audio: mono at ``sample_rate`` Hz, ``samples_per_frame``
    samples per video frame. wav2vec2 hidden states: ``(T, wav2vec_layers, wav2vec_dim)``, one set per video
    frame (stored fp16). Emotion: text-emotion probs + embedding, speech-emotion probs + embedding, and per
    window (``va_window_s`` long, every ``va_hop_s``, i.e. 50% overlap) valence/arousal/dominance + embedding.
    AUs: ``(T, au_count)``. Description: CLIP text last hidden state ``(text_tokens, text_dim)``.
    """

    image_size: int = 512
    fps: int = 25
    sample_rate: int = 16_000
    latent_channels: int = 4
    latent_size: int = 64
    vae_scale: float = 0.18215
    wav2vec_layers: int = 13
    wav2vec_dim: int = 768
    text_emotion_classes: int = 7
    text_emotion_dim: int = 768
    # The preprocessing default SER model (superb/hubert-large-superb-er) has 4 classes (neu, hap, ang, sad);
    # another SER model (e.g. an emotion2vec head with 9) only changes this number.
    speech_emotion_classes: int = 4
    speech_emotion_dim: int = 256  # the SER head's input (classifier_proj_size), preprocess.audio.speech_emotion
    va_values: int = 3  # valence, arousal, dominance
    va_dim: int = 1024
    va_window_s: float = 2.0
    va_hop_s: float = 1.0
    # The preprocessing default AU estimator's 8 AUs (preprocess.visual.action_units.GEOMETRIC_AU_NAMES); a learned
    # detector with another AU set only changes this number.
    au_count: int = 8
    text_tokens: int = 77
    text_dim: int = 768

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    @property
    def wav2vec_hidden_states(self) -> tuple[int, ...]:
        """The wav2vec 2.0 hidden states the model reads, by index (0: the CNN encoder's projected features,
        i: transformer layer i): all ``wav2vec_layers`` of them, as its own audio encoder stacks them
        (``model.training.train.audio_features``). Shards must store exactly these (their json's audio.wav2vec.layers)."""
        return tuple(range(self.wav2vec_layers))

    @property
    def va_window_frames(self) -> int:
        return round(self.va_window_s * self.fps)

    @property
    def va_hop_frames(self) -> int:
        return round(self.va_hop_s * self.fps)


def sd15_unet_config(cross_attention_dim: int = 768) -> dict:
    """The UNet2DConditionModel config of Stable Diffusion 1.5 (859,520,964 parameters)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
    }


def tiny_unet_config(cross_attention_dim: int = 32) -> dict:
    """The same layout as SD 1.5 (cross-attention blocks, a plain block, a mid block), at toy widths."""
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
    }


@dataclass(frozen=True)
class GuidanceDropout:
    """Per-sample probabilities of replacing a condition by its null value during training (for CFG)."""

    reference: float = 0.05
    audio: float = 0.05
    emotion: float = 0.1
    description: float = 0.1


@dataclass(frozen=True)
class LossWeights:
    """Weights of the paper's losses (section 3.7); a weight of 0 switches the loss (and its decode) off."""

    diffusion: float = 1.0
    sync: float = 0.0
    emo: float = 0.0
    au: float = 0.0
    attr_action: float = 0.0


@dataclass(frozen=True)
class TrainRecipe:
    """The public Hallo recipe the paper reports (section 4): batch 4, 512x512, lr 1e-5, 30k steps per stage.

    ``prediction_type`` and the zero-terminal-SNR, trailing-spacing schedule are used identically for training
    and DDIM sampling (see ``model/schedule.py``). ``pixel_frames`` is how many predicted frames the pixel-space
    losses decode per sample: 9 at the full config, so eq. 2 sees ``9 - sync_window + 1 = 5`` sync windows (its
    misalignment time is a soft-argmin over them; with one window it is a constant) and eq. 3 averages VA over
    ``emo_window_frames``-frame windows at 50% overlap (4 windows of 4 frames every 2). Deviation: the paper's VA
    windows are 2 s long, longer than a 14-frame clip; the per-frame VA targets are still interpolated from the
    stored 2 s windows. ``pixel_loss_max_timestep``: only samples drawn at a timestep below it get pixel losses;
    above it the predicted clean frame is mostly a guess from noise and the experts would score the guess.
    """

    batch_size: int = 4
    learning_rate: float = 1e-5
    steps_per_stage: int = 30_000
    num_train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    snr_gamma: float = 5.0
    sample_steps: int = 40
    guidance_scale: float = 3.5
    pixel_frames: int = 9
    emo_window_frames: int = 4
    pixel_loss_max_timestep: int = 600
    stage1_losses: LossWeights = LossWeights()
    stage2_losses: LossWeights = LossWeights(sync=0.05, emo=0.05, au=0.05, attr_action=0.05)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of every component. ``clip_frames`` generated frames follow ``motion_frames`` given frames."""

    name: str
    data: DataShapes
    unet: dict
    motion_attention_heads: int = 8
    motion_max_frames: int = 32
    clip_frames: int = 14
    motion_frames: int = 2
    audio_context_frames: int = 2  # on each side of a frame, so 5 frames of wav2vec states per frame
    audio_tokens: int = 32
    audio_hidden: int = 512
    emotion_tokens: int = 4
    emotion_hidden: int = 1024
    a2m_hidden: int = 128
    a2m_latent_channels: int = 8
    a2m_downsample: int = 4
    a2m_flow_layers: int = 4
    expert_width: int = 64
    expert_image_size: int = 96
    sync_window: int = 5
    sync_max_shift: int = 2
    dropout: GuidanceDropout = GuidanceDropout()
    recipe: TrainRecipe = field(default_factory=TrainRecipe)

    @property
    def cross_attention_dim(self) -> int:
        return self.unet["cross_attention_dim"]


def full_config() -> ModelConfig:
    return ModelConfig(name="full", data=DataShapes(), unet=sd15_unet_config())


def tiny_config() -> ModelConfig:
    # The feature sizes are those of the preprocessing's tiny profile (tiny_models/build.py: 32-wide
    # models, wav2vec with 2 layers + projection, SD-layout text encoder with 77 tokens), so the tiny model trains
    # on what `preprocess(..., profile="tiny")` writes without recomputing anything.
    data = DataShapes(
        image_size=32,
        latent_size=16,
        wav2vec_layers=3,
        wav2vec_dim=32,
        text_emotion_dim=32,
        speech_emotion_dim=32,
        va_dim=32,
        text_tokens=77,
        text_dim=32,
    )
    return ModelConfig(
        name="tiny",
        data=data,
        unet=tiny_unet_config(cross_attention_dim=data.text_dim),
        motion_attention_heads=2,
        motion_max_frames=16,
        clip_frames=4,
        motion_frames=2,
        audio_context_frames=1,
        audio_tokens=4,
        audio_hidden=32,
        emotion_tokens=2,
        emotion_hidden=32,
        a2m_hidden=16,
        a2m_latent_channels=4,
        a2m_downsample=2,
        a2m_flow_layers=2,
        expert_width=8,
        expert_image_size=16,
        sync_window=3,
        sync_max_shift=1,
        recipe=TrainRecipe(batch_size=2, sample_steps=3, pixel_frames=4, emo_window_frames=2),
    )


def config_for(size: str) -> ModelConfig:
    """``"full"`` or ``"tiny"``."""
    configs = {"full": full_config, "tiny": tiny_config}
    if size not in configs:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(configs)}")
    return configs[size]()


__all__ = ["DataShapes", "GuidanceDropout", "LossWeights", "ModelConfig", "TrainRecipe", "config_for", "full_config", "tiny_config"]
