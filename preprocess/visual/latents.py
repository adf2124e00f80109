"""Stage (optional): Stable Diffusion VAE latents of every frame, cached in the shard as float16.

SynchroRaMa (arXiv 2509.19965, §3.1-3.2) denoises in Stable Diffusion 1.5's latent space; caching the latents
lets training skip the VAE encoder. The model is the ``AutoencoderKL`` in the ``vae/`` folder of a diffusers
SD 1.5 checkpoint. Frames are (H, W, 3) uint8 RGB at 25 fps, 512x512 in our clips; latents are
(T, 4, H/8, W/8) float16, i.e. (T, 4, 64, 64), already multiplied by the VAE's ``scaling_factor`` (0.18215 for
SD 1.5), the scale the UNet works at.

The posterior *mean* is stored, not a sample: a cached latent must be the same every time the stage runs (and
the trainer, which VAE-encodes uncached clips, uses the mean too). Frames go through the VAE in batches of
exactly ``batch_size`` (``models.vae.batch_size``) that run across the pieces of a partition
(``encode_videos``); a frame's latent is the same whichever frames shared its batch (``preprocess.run.batching``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from preprocess.run.media import iter_rgb_frames
from preprocess.run.model_loading import LoadedModel, load_model, model_identity, model_source, wrapped_loader
from preprocess.run.settings import ModelChoice
from preprocess.run.stage import Stage
from preprocess.video.standardise import VIDEO_FILE

DOWNSAMPLING = 8  # SD's VAE: four down blocks, three of which halve the size


class FrameLatentEncoder:
    def __init__(self, model_path: str, *, revision: str | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8):
        import torch
        from diffusers import AutoencoderKL

        self.dtype = getattr(torch, dtype)
        try:
            vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", revision=revision, torch_dtype=self.dtype)
        except OSError as error:
            raise FileNotFoundError(
                f"Stable Diffusion VAE not found under {model_path!r} (expected a vae/ folder, as in a diffusers "
                f"Stable Diffusion 1.5 checkpoint): download stable-diffusion-v1-5/stable-diffusion-v1-5 on a "
                f"connected machine, or use the tiny profile"
            ) from error
        self.vae = vae.to(device).eval()
        self.device, self.batch_size, self.name = device, batch_size, str(model_path)
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode_video(self, video: Path, *, size: int = 512) -> np.ndarray:
        """Every frame of ``video``, decoded at ``size`` x ``size`` (a multiple of 8): (T, 4, size/8, size/8)
        float16 scaled latents (posterior mean x scaling_factor)."""
        return self.encode_videos([video], size=size)[0]

    def encode_videos(self, videos: list[Path], *, size: int = 512) -> list[np.ndarray]:
        """``encode_video`` of each video, their frames streamed through the VAE in batches of exactly
        ``batch_size`` frames that run across video boundaries (the last one filled with copies of its last
        frame, ``preprocess.run.batching``): a frame's latent does not depend on which frames shared its batch, so
        each video's latents are those it gets alone. Decodes one batch of frames ahead, never a whole video."""
        import torch

        if size % DOWNSAMPLING:
            raise ValueError(f"frame size must be a multiple of {DOWNSAMPLING}, got {size}")
        chunks: list[list[np.ndarray]] = [[] for _ in videos]
        frames = ((index, frame) for index, video in enumerate(videos)
                  for frame in iter_rgb_frames(Path(video), width=size, height=size))
        with torch.inference_mode():
            for batch in _batches(frames, self.batch_size):
                rows = [frame for _, frame in batch]
                rows += [rows[-1]] * (self.batch_size - len(rows))
                pixels = torch.from_numpy(np.stack(rows)).to(self.device).permute(0, 3, 1, 2)
                pixels = pixels.to(self.dtype) / 127.5 - 1.0  # uint8 -> [-1, 1]
                mean = self.vae.encode(pixels).latent_dist.mean
                latents = (mean.float() * self.scaling_factor).cpu().numpy().astype(np.float16)
                for (index, _), latent in zip(batch, latents, strict=False):  # the filler rows are dropped
                    chunks[index].append(latent)
        empty = (0, self.vae.config.latent_channels, size // DOWNSAMPLING, size // DOWNSAMPLING)
        return [np.stack(chunk) if chunk else np.zeros(empty, np.float16) for chunk in chunks]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(T, 4, h, w) scaled latents -> (T, 8h, 8w, 3) uint8 RGB frames."""
        import torch

        frames = []
        with torch.inference_mode():
            for start in range(0, len(latents), self.batch_size):
                batch = torch.from_numpy(np.asarray(latents[start:start + self.batch_size], np.float32))
                batch = batch.to(self.device, self.dtype) / self.scaling_factor
                pixels = self.vae.decode(batch).sample.float().clamp(-1.0, 1.0)
                pixels = ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
                frames.append(pixels.cpu().numpy())
        if not frames:
            return np.zeros((0, *(DOWNSAMPLING * n for n in latents.shape[2:4]), 3), np.uint8)
        return np.concatenate(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (or stacks of them) in dB, peak 255; inf if equal."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    iterator = iter(frames)
    while batch := list(islice(iterator, size)):
        yield batch


def load_vae(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    source = model_source("vae", choice)
    model = wrapped_loader("vae", choice, lambda: FrameLatentEncoder(
        source, revision=choice.revision, device=str(device), dtype=str(dtype).removeprefix("torch."), batch_size=choice.batch_size))
    model.name = choice.model
    return LoadedModel("vae", choice.model, model, device, dtype)


# ---------------------------------------------------------------- the stage: on each kept piece's video, batched

LATENTS_FILE = "latents.npy"


def _latents_many(pieces: list, settings, workspace, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.vae
    vae = load_model("vae", choice, load_vae)
    videos = [Path(piece.files_dir) / VIDEO_FILE for piece in pieces]
    results = []
    for latents, out_dir in zip(vae.model.encode_videos(videos, size=settings.standardise.size), out_dirs,
                                strict=True):
        np.save(out_dir / LATENTS_FILE, latents)
        results.append({"file": LATENTS_FILE, "shape": list(latents.shape), "model": choice.model,
                        "scaling_factor": vae.model.scaling_factor})
    return results


STAGE = Stage(
    name="latents", version=2, group="visual", models=("vae",), loader=load_vae, run_many=_latents_many,
    enabled=lambda settings: settings.visual.latents.enabled,
    key_parts=lambda piece, settings, workspace: [piece.content_key, model_identity(settings.models.vae)],
    run=lambda piece, settings, workspace, out_dir: _latents_many([piece], settings, workspace, [out_dir])[0])
