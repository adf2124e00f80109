"""Sampling: reference image + audio (+ description, + emotion features) -> talking-face video (section 4).

Per clip of ``clip_frames`` frames: DDIM (``recipe.sample_steps``, 40 for the full model, same schedule as
training) with classifier-free guidance, where the unconditional branch keeps the reference and nulls audio,
emotion and description exactly as guidance dropout does in training. Long audio is cut into consecutive
clips; the first clip's motion frames come from the A2M module (section 3.5), each later clip's from the
last ``motion_frames`` latents of the clip before. Audio: mono float at 16 kHz; frames at 25 fps, so
``ceil(samples / 640)`` frames are generated.

Devices and precision: everything is made on the model's device (noise from a generator on that device,
``model/devices.py``; guidance flags; DDIM's timesteps are Python ints, so stepping never reads a value back
from the GPU). On CUDA the networks run under bf16 autocast (``bf16=None``: on CUDA only) while the DDIM
latents stay fp32. ``frames`` returns the decoded video still on the device (the meta-device tests stop
there); calling the pipeline brings it to the host as a ``GeneratedVideo``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from model.audio_projection import resample_to_frames
from model.devices import device_generator
from model.emotion_embedding import EmotionFeatures
from model.generation.video_io import write_video
from model.guidance import ConditionKeep
from model.schedule import sample_scheduler
from model.synchrorama import SynchroRamaModel


@dataclass
class GeneratedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8
    audio: np.ndarray  # (S,) float32 at sample_rate
    fps: int
    sample_rate: int

    def save(self, path) -> str:
        return str(write_video(self.frames, path, self.fps, self.audio, self.sample_rate))


class TalkingFacePipeline:
    def __init__(self, model: SynchroRamaModel, vae, audio_encoder, text_encoder=None, tokenizer=None,
                 bf16: bool | None = None):
        self.model, self.vae, self.audio_encoder = model.eval(), vae.eval(), audio_encoder.eval()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.cfg = model.cfg
        self.scheduler = sample_scheduler(self.cfg.recipe)
        self.bf16 = bf16  # None: bf16 autocast on CUDA, full precision elsewhere

    def autocast(self):
        device = self.device
        on = self.bf16 if self.bf16 is not None else device.type == "cuda"
        return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    @property
    def device(self):
        return next(self.model.parameters()).device

    def audio_features(self, waveform: np.ndarray) -> torch.Tensor:
        """16 kHz mono ``(S,)`` -> wav2vec2 states of all layers per video frame ``(T, L, D)``."""
        x = torch.as_tensor(waveform, dtype=torch.float32, device=self.device)[None]
        x = (x - x.mean()) / (x.std() + 1e-7)  # what Wav2Vec2FeatureExtractor(do_normalize=True) does
        states = torch.stack(self.audio_encoder(x, output_hidden_states=True).hidden_states)[:, 0]
        frames = math.ceil(len(waveform) / self.cfg.data.samples_per_frame)
        return resample_to_frames(states, frames)

    def description_tokens(self, description: str | None, embedding: torch.Tensor | None):
        """CLIP-text tokens ``(1, 77, 768)`` and whether a description was given at all."""
        d = self.cfg.data
        if embedding is None and description is not None:
            ids = self.tokenizer(description, padding="max_length", max_length=d.text_tokens, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            embedding = self.text_encoder(ids).last_hidden_state
        if embedding is None:
            return torch.zeros(1, d.text_tokens, d.text_dim, device=self.device), False
        return embedding.reshape(1, d.text_tokens, d.text_dim).to(self.device), True

    @torch.no_grad()
    def __call__(self, reference_image: np.ndarray, audio: np.ndarray, description: str | None = None,
                 description_embedding: torch.Tensor | None = None, emotion: EmotionFeatures | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 seed: int = 0) -> GeneratedVideo:
        """``reference_image (H, W, 3)`` uint8 RGB at the model's resolution, ``audio (S,)`` float at 16 kHz."""
        frames = self.frames(reference_image, audio, description, description_embedding, emotion,
                             num_inference_steps, guidance_scale, seed)
        d = self.cfg.data
        return GeneratedVideo(frames.cpu().numpy(), np.asarray(audio, dtype=np.float32), d.fps, d.sample_rate)

    @torch.no_grad()
    def frames(self, reference_image: np.ndarray, audio: np.ndarray, description: str | None = None,
               description_embedding: torch.Tensor | None = None, emotion: EmotionFeatures | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               seed: int = 0) -> torch.Tensor:
        """The video as uint8 ``(T, H, W, 3)`` on the model's device (see ``__call__``)."""
        with self.autocast():
            return self._frames(reference_image, audio, description, description_embedding, emotion,
                                num_inference_steps, guidance_scale, seed)

    def _frames(self, reference_image, audio, description, description_embedding, emotion, num_inference_steps,
                guidance_scale, seed) -> torch.Tensor:
        cfg, d, device = self.cfg, self.cfg.data, self.device
        steps = num_inference_steps or cfg.recipe.sample_steps
        scale = cfg.recipe.guidance_scale if guidance_scale is None else guidance_scale
        generator = device_generator(device, seed)
        m, t = cfg.motion_frames, cfg.clip_frames

        image = torch.as_tensor(reference_image, device=device).permute(2, 0, 1)[None].float() / 127.5 - 1
        reference = (self.vae.encode(image).latent_dist.mode() * d.vae_scale).float()
        description_tokens, has_description = self.description_tokens(description, description_embedding)
        has_emotion = emotion is not None
        emotion = emotion.to(device) if has_emotion else _neutral_emotion(cfg, device)

        features = self.audio_features(audio)
        total = features.shape[0]
        clips = math.ceil(total / t)
        # frame i of the video is row i + m; the rows before and after repeat the edge frames
        index = (torch.arange(clips * t + m, device=device) - m).clamp(0, total - 1)
        features = features[index]

        # row 0 conditional, row 1 unconditional: keeps the reference (None: no sample drops it) and nulls
        # audio, emotion and description, as guidance dropout does in training
        def flags(*values: bool) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.bool, device=device)

        keep = ConditionKeep(reference=None, audio=flags(True, False), emotion=flags(has_emotion, False),
                             description=flags(has_description, False))
        motion = self.model.a2m.sample(reference, features[None, :m], generator=generator)
        self.scheduler.set_timesteps(steps)  # on the host: DDIM's branches read the timestep as a number
        timesteps = self.scheduler.timesteps.tolist()
        outputs = []
        for clip in range(clips):
            clip_features = features[clip * t: clip * t + m + t][None].expand(2, -1, -1, -1)
            conditions, description_pair = self.model.conditions(
                reference.expand(2, -1, -1, -1), description_tokens.expand(2, -1, -1), clip_features,
                _repeat(emotion, 2), torch.full((2,), clip * t - m, device=device), keep)
            latents = torch.randn((1, t, *reference.shape[1:]), generator=generator, device=device,
                                  dtype=torch.float32)
            latents = latents * self.scheduler.init_noise_sigma
            for timestep in timesteps:
                prediction = self.model(latents.expand(2, -1, -1, -1, -1), torch.full((2,), timestep, device=device),
                                        motion.expand(2, -1, -1, -1, -1), description_pair, conditions)
                conditional, unconditional = prediction.float().chunk(2)
                guided = unconditional + scale * (conditional - unconditional)
                latents = self.scheduler.step(guided, timestep, latents).prev_sample  # fp32 latents
            outputs.append(latents)
            motion = latents[:, -m:]

        latents = torch.cat(outputs, 1)[0, :total] / d.vae_scale
        frames = torch.cat([self.vae.decode(chunk).sample.float() for chunk in latents.split(8)])
        return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def _neutral_emotion(cfg, device) -> EmotionFeatures:
    d = cfg.data

    def zeros(*shape):
        return torch.zeros(1, *shape, device=device)

    return EmotionFeatures(zeros(d.text_emotion_classes), zeros(d.text_emotion_dim),
                           zeros(d.speech_emotion_classes), zeros(d.speech_emotion_dim),
                           zeros(1, d.va_values), zeros(1, d.va_dim))


def _repeat(emotion: EmotionFeatures, n: int) -> EmotionFeatures:
    return EmotionFeatures(*(v.expand(n, *v.shape[1:]) for v in vars(emotion).values()))
