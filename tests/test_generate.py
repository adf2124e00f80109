"""`synchrorama generate` (issue 11, item 6): a tiny checkpoint trained for one step + a rendered face + espeak-ng
speech -> an mp4 with a video stream of 25 fps x the audio's duration and an audio stream, conditioned on
features that the preprocessing stages computed from that audio, and naming the checkpoint and its tiny models.
Also: validation videos in training get the shard's stored emotion and description."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from test_train_loader import write_training_shards
from typer.testing import CliRunner

from model.generation import generate
from model.training.train import main as train_main
from model.training.train import model_config, validation_inputs
from model.training.train_config import parse_config
from preprocess.audio.separate import separate_vocals
from preprocess.audio.wav2vec_features import wav2vec_frames
from preprocess.pipeline import load_model
from preprocess.run.media import run_ffprobe
from preprocess.run.settings import load_settings
from synchrorama.cli import app
from synchrorama.sample_data import render_frames, speech_wav

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train_tiny.toml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("gen-shards"), n_clips=2, frames=30, cached_wav2vec=True)


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-run")
    train_main(["--config", TINY, "--shards", str(shards), "--out", str(out), "max_steps=1", "batch_size=1",
                "val_samples=0", "loss_sync=0", "loss_emo=0", "loss_au=0", "loss_attr_action=0"])
    return out


def _streams(path: Path) -> dict:
    result = run_ffprobe(["-count_frames", "-show_entries", "stream=codec_type,nb_read_frames,avg_frame_rate:"
                          "format_tags=comment", "-of", "json", str(path)], purpose="probing the generated video")
    return json.loads(result.stdout)


def test_generate_makes_an_mp4_with_audio_from_the_driving_audios_features(run_dir, tmp_path, monkeypatch):
    image, audio, out = tmp_path / "ref.png", tmp_path / "drive.wav", tmp_path / "out" / "talking.mp4"
    Image.fromarray(next(render_frames("single", 160, 120, 1, 25))).save(image)
    speech_wav(audio, "Hello there.")
    duration = soundfile.info(audio).duration
    # spy on what the sampler is given (the real pipeline still runs)
    seen = {}
    features_of = generate._StoredFeaturesPipeline.audio_features
    frames_of = generate._StoredFeaturesPipeline.frames
    monkeypatch.setattr(generate._StoredFeaturesPipeline, "audio_features",
                        lambda self, waveform: seen.setdefault("wav2vec", features_of(self, waveform)))
    monkeypatch.setattr(generate._StoredFeaturesPipeline, "frames",
                        lambda self, *args, **kwargs: seen.update(kwargs) or frames_of(self, *args, **kwargs))

    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(run_dir), "--image", str(image), "--audio",
                                      str(audio), "--out", str(out), "--steps", "1", "--work-dir",
                                      str(tmp_path / "work")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "TINY MODELS" in result.output  # said loudly

    expected_frames = math.ceil(duration * 25)
    probe = _streams(out)
    video = [s for s in probe["streams"] if s["codec_type"] == "video"]
    assert len(video) == 1 and video[0]["avg_frame_rate"] == "25/1"
    assert int(video[0]["nb_read_frames"]) == expected_frames
    assert [s["codec_type"] for s in probe["streams"]].count("audio") == 1
    checkpoint = run_dir / "checkpoints" / "step-0000001"
    comment = probe["format"]["tags"]["comment"]
    assert str(checkpoint.resolve()) in comment and "TINY MODELS" in comment
    report = json.loads((out.parent / "talking.mp4.json").read_text())
    assert report["checkpoint"] == str(checkpoint.resolve()) and report["step"] == 1
    assert report["n_frames"] == expected_frames and report["description_source"] == "captioner"
    assert report["preprocessing_models"]["wav2vec"] == ".models/tiny/wav2vec2" and report["warning"]

    # The conditions are the preprocessing stages' outputs for THIS audio: Demucs on the driving file over its
    # range, then the wav2vec stage on those vocals, recomputed here independently of model.generation.generate.
    settings = load_settings("tiny")
    work = tmp_path / "work"
    clip, rate = soundfile.read(work / "clip.wav", dtype="float32")
    assert len(clip) == expected_frames * 640 and rate == 16000
    separated_dir, features_dir = tmp_path / "sep", tmp_path / "w2v"
    separated_dir.mkdir()
    features_dir.mkdir()
    separated = separate_vocals(str(audio), 0.0, expected_frames / 25, len(clip), 16000, report["loudness_gain_db"],
                                load_model("separation", settings.models.separation), settings.audio.separation,
                                separated_dir)
    assert separated.n_samples == len(clip) and separated.status == "separated"
    assert np.array_equal(soundfile.read(separated_dir / "vocals.wav")[0],
                          soundfile.read(work / "separate" / "vocals.wav")[0])
    wav2vec_frames(separated_dir / "vocals.wav", expected_frames, 25, load_model("wav2vec", settings.models.wav2vec),
                   features_dir)
    expected = torch.from_numpy(np.load(features_dir / "wav2vec.npy").astype(np.float32))
    assert expected.shape[0] == expected_frames and expected.std() > 0
    assert torch.equal(seen["wav2vec"].cpu(), expected)
    # emotion: the three emotion stages' arrays, as the shard writer packs them
    speech = np.load(work / "speech_emotion" / "emotion_ser.npy")
    emotion = seen["emotion"]
    assert torch.equal(torch.cat([emotion.speech_probs[0], emotion.speech_embedding[0]]),
                       torch.from_numpy(speech.astype(np.float32)))
    va = np.load(work / "valence_arousal" / "emotion_va.npy")
    assert emotion.va_values.shape[1] == len(va) >= 1
    assert seen["description_embedding"] is not None and seen["description_embedding"].shape == (1, 77, 32)


def test_a_folder_that_is_not_a_checkpoint_is_refused_clearly(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path), "--image", "x.png", "--audio",
                                      "y.wav", "--out", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2
    assert "does not exist" in result.output or "not a training checkpoint" in result.output


def test_validation_videos_get_the_shards_stored_emotion(shards):
    cfg = parse_config(["--config", TINY, "--shards", str(shards), "val_samples=1"])
    [sample] = validation_inputs(cfg, model_config(cfg))
    assert sample["emotion"] is not None
    # write_training_shards stores clip i's emotion arrays filled with i: the first clip's are zeros, so look at
    # their shapes and that they are the stored ones, not the pipeline's neutral stand-in
    assert sample["emotion"].va_values.shape == (1, 2, 3)
    assert sample["description"] is None  # these shards have no description embedding
