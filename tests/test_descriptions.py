"""Captioning and description embeddings with tiny random models of the default classes (Qwen2.5-VL, SD 1.5's
CLIP text encoder) through the real loading code."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.run.settings import DEFAULT_CAPTION_PROMPT as DEFAULT_PROMPT
from preprocess.visual.describe import TransformersCaptioner, sample_frames_uniformly
from preprocess.visual.text_embedding import DescriptionEncoder
from tiny_models.vision import build_tiny_captioner, build_tiny_sd_text_encoder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_captioner(root / "captioner")
    build_tiny_sd_text_encoder(root / "sd15")
    return root


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import subprocess

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=512x512:rate=25", "-t", "2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return TransformersCaptioner(str(tiny_dir / "captioner"), max_new_tokens=8)


def test_frames_are_sampled_uniformly(clip):
    frames = sample_frames_uniformly(clip, 5)
    assert len(frames) == 5 and frames[0].shape == (512, 512, 3)
    assert len({frame.tobytes() for frame in frames}) == 5  # testsrc changes every frame


def test_tiny_captioner_describes_deterministically(captioner, clip):
    frames = sample_frames_uniformly(clip, 4, size=112)
    first = captioner.describe(frames, DEFAULT_PROMPT)
    assert isinstance(first, str) and first and first == captioner.describe(frames, DEFAULT_PROMPT)
    assert captioner.name.endswith("captioner")


def test_the_frames_reach_the_description(captioner, clip):
    """Other frames, other text: the images go through the vision tower into the decoder (random weights, so the
    text itself means nothing)."""
    frames = sample_frames_uniformly(clip, 2, size=112)
    black = [np.zeros_like(frame) for frame in frames]
    assert captioner.describe(frames, DEFAULT_PROMPT) != captioner.describe(black, DEFAULT_PROMPT)


def test_missing_captioning_model_names_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found locally"):
        TransformersCaptioner(str(tmp_path / "no-such-model"))


def test_description_embedding_is_77_tokens(tiny_dir):
    encoder = DescriptionEncoder(str(tiny_dir / "sd15"))
    embeddings = encoder.encode(["a woman wearing earrings turning her head", ""])
    assert embeddings.shape == (2, 77, 32) and embeddings.dtype == np.float16
    assert np.isfinite(embeddings).all() and not np.allclose(embeddings[0], embeddings[1])
