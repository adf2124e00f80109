"""Reference image + 2 s of audio -> mp4 at 25 fps with the audio muxed in (tiny random weights, CPU)."""

import av
import numpy as np
import pytest
import torch

from model.config import tiny_config
from model.pipeline import TalkingFacePipeline
from model.synchrorama import SynchroRamaModel
from model.training.tiny_components import tiny_audio_encoder, tiny_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pipeline_writes_mp4_with_audio(tmp_path):
    cfg = tiny_config()
    d = cfg.data
    torch.manual_seed(0)
    pipeline = TalkingFacePipeline(SynchroRamaModel(cfg), tiny_vae(cfg), tiny_audio_encoder(cfg))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (d.image_size, d.image_size, 3), dtype=np.uint8)
    seconds = 2.0
    audio = (0.1 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * d.sample_rate)) / d.sample_rate)).astype(np.float32)
    video = pipeline(image, audio, description_embedding=torch.randn(1, d.text_tokens, d.text_dim),
                     num_inference_steps=2, seed=0)
    frames = int(seconds * d.fps)
    assert video.frames.shape == (frames, d.image_size, d.image_size, 3) and video.frames.dtype == np.uint8
    assert frames > cfg.clip_frames  # several clips were chained through motion frames

    path = video.save(tmp_path / "out.mp4")
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 25
        assert (stream.width, stream.height) == (d.image_size, d.image_size)
        assert sum(1 for _ in container.decode(video=0)) == frames
        assert len(container.streams.audio) == 1
        assert container.streams.audio[0].sample_rate == d.sample_rate
        assert float(container.duration / av.time_base) == pytest.approx(seconds, abs=0.1)
