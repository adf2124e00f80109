"""VAE latents of every frame with the tiny, briefly trained SD-layout VAE, through the real loading code."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from preprocess.run.media import count_video_frames, iter_rgb_frames
from preprocess.run.model_loading import TINY_DIR
from preprocess.visual.latents import FrameLatentEncoder, psnr
from synchrorama.sample_data import make_talking_video

# The tiny VAE reaches about 26 dB on these frames; the same config with random weights about 11 dB.
MIN_PSNR_DB = 20.0


@pytest.fixture(scope="module")
def sd15():
    """The tiny profile's SD 1.5 folder, built once for the session before its first test (tests/conftest.py): a
    second build here would train the same VAE again inside this module's first test's time limit."""
    root = TINY_DIR / "sd15"
    tiny_models.BUILDER.build(TINY_DIR)
    return root


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """1 s of a generated talking face, 512x512 at 25 fps, like the pipeline's clips."""
    return make_talking_video(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=1.0, width=512, height=512,
                              fps=25.0, audio="none")


@pytest.fixture(scope="module")
def encoder(sd15):
    return FrameLatentEncoder(str(sd15), batch_size=8)


@pytest.fixture(scope="module")
def latents(encoder, clip):
    return encoder.encode_video(clip)


def test_every_frame_is_encoded_as_float16_latents(sd15, encoder, latents, clip):
    assert latents.dtype == np.float16
    assert latents.shape == (count_video_frames(clip), 4, 64, 64)
    assert encoder.scaling_factor == pytest.approx(0.18215) and encoder.name == str(sd15)


def test_latents_decode_back_to_the_frames(encoder, latents, clip):
    frames = np.stack(list(iter_rgb_frames(clip, width=512, height=512)))
    decoded = encoder.decode(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    quality = psnr(decoded, frames)
    print(f"\ntiny VAE round trip: {quality:.1f} dB PSNR over {len(frames)} frames of 512x512")
    assert quality > MIN_PSNR_DB


def test_the_same_vae_untrained_fails_the_threshold(sd15, tmp_path):
    """The threshold measures training: random weights of the same config are far below it."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL.from_config(AutoencoderKL.load_config(sd15, subfolder="vae")).save_pretrained(tmp_path / "vae")
    short = make_talking_video(tmp_path / "short.mp4", seconds=0.2, width=512, height=512, fps=25.0, audio="none")
    untrained = FrameLatentEncoder(str(tmp_path))
    frames = np.stack(list(iter_rgb_frames(short, width=512, height=512)))
    quality = psnr(untrained.decode(untrained.encode_video(short)), frames)
    print(f"\nuntrained VAE of the same config: {quality:.1f} dB PSNR")
    assert quality < MIN_PSNR_DB - 5


def test_encoding_is_reproducible(encoder, latents, clip):
    assert encoder.encode_video(clip).tobytes() == latents.tobytes()


def test_missing_vae_names_the_path(tmp_path):
    missing = tmp_path / "no-such-sd15"
    with pytest.raises(FileNotFoundError, match="no-such-sd15") as raised:
        FrameLatentEncoder(str(missing))
    assert "vae/" in str(raised.value) and "tiny profile" in str(raised.value)


def test_psnr_is_in_decibels_with_peak_255():
    black = np.zeros((2, 8, 8, 3), np.uint8)
    assert psnr(black, black) == float("inf")
    assert psnr(black, black + 255) == pytest.approx(0.0)
    assert psnr(black, black + 1) == pytest.approx(20 * np.log10(255))
