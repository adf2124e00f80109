"""What Demucs is given: the source's full-band audio for the piece's exact range, at the model's rate and
channels (44.1 kHz stereo), not the 16 kHz mono clip.wav; and what comes out: vocals with clip.wav's length,
alignment and gain.

The source is generated: a talking-face video whose 48 kHz stereo soundtrack carries espeak-ng speech in both
channels, a 12 kHz tone in the left channel only (content that a 16 kHz clip.wav cannot hold) and a 3 kHz tone
in the right."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from preprocess.audio.separate import demucs_input, piece_source_range
from preprocess.pipeline import (
    Workspace,
    load_model,
    run_clip_stages,
    run_stage,
)
from preprocess.run.records import Candidate
from preprocess.run.settings import load_settings
from preprocess.video.standardise import AUDIO_FILE
from synchrorama.sample_data import make_talking_video, speech_wav

SOURCE_RATE, SECONDS = 48000, 8.0
# Candidate from 1.0 s to 7.4 s: 160 frames, split (max_clip_s 3.5) into two pieces of 80 frames (3.2 s).
START_S, END_S, PIECE_FRAMES = 1.0, 7.4, 80


def _high_band_share(channel: np.ndarray, rate: int, above_hz: float = 8000.0) -> float:
    """Share of the signal's power above ``above_hz``."""
    power = np.abs(np.fft.rfft(channel.astype(np.float64))) ** 2
    frequencies = np.fft.rfftfreq(len(channel), 1 / rate)
    return float(power[frequencies > above_hz].sum() / power.sum())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("separation-source")
    video = make_talking_video(root / "silent.mp4", seconds=SECONDS, audio="none")
    speech, rate = soundfile.read(speech_wav(root / "speech.wav"), dtype="float32")
    from julius import resample_frac

    speech = resample_frac(torch.from_numpy(speech), rate, SOURCE_RATE).numpy()
    n = int(SECONDS * SOURCE_RATE)
    speech = np.resize(speech, n)  # loops, like the generated videos' speech
    t = np.arange(n) / SOURCE_RATE
    left = 0.4 * speech + 0.1 * np.sin(2 * np.pi * 12000 * t)
    right = 0.4 * speech + 0.1 * np.sin(2 * np.pi * 3000 * t)
    soundfile.write(root / "stereo.wav", np.stack([left, right], axis=1).astype(np.float32), SOURCE_RATE)
    out = root / "source.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", video, "-i", root / "stereo.wav",
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "256k", out], check=True)
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_settings("tiny", {"filters": {"max_clip_s": 3.5}})


@pytest.fixture(scope="module")
def demucs_model(tiny):
    return load_model("separation", tiny.models.separation).model


def test_demucs_input_is_full_band_stereo_at_the_model_rate(source, demucs_model):
    mix, source_channels = demucs_input(str(source), 2.0, 3.2, demucs_model)
    assert (demucs_model.samplerate, demucs_model.audio_channels) == (44100, 2)  # what htdemucs was trained on
    assert mix.dtype == torch.float32 and mix.shape == (2, round(3.2 * 44100)) and source_channels == 2
    left, right = mix.numpy()
    # the 12 kHz tone is there, in the left channel only: the band above 8 kHz and the stereo image survive
    assert _high_band_share(left, 44100) > 0.05
    assert _high_band_share(right, 44100) < 0.01
    assert np.abs(left - right).max() > 0.05


def test_a_mono_source_is_duplicated_at_its_level_and_missing_audio_is_zeros(tmp_path, demucs_model):
    rate = 22050
    t = np.arange(2 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(tmp_path / "mono.wav", tone, rate)
    mix, source_channels = demucs_input(str(tmp_path / "mono.wav"), 0.0, 3.0, demucs_model)  # 1 s past the end
    assert source_channels == 1 and mix.shape == (2, 3 * 44100)
    assert torch.equal(mix[0], mix[1])
    assert float(mix[0, :2 * 44100].abs().max()) == pytest.approx(0.5, abs=0.01)  # not -3 dB (ffmpeg -ac 2)
    assert not mix[:, 2 * 44100 + 100:].any()


@pytest.fixture(scope="module")
def separated(source, tiny, tmp_path_factory, demucs_model):
    """The real stages from the source file to the separate stage, with Demucs' input captured on its way in."""
    import demucs.apply as demucs_apply

    workspace = Workspace(tmp_path_factory.mktemp("out"))
    job, pieces = run_clip_stages(Candidate("talk", str(source), "folder", start_s=START_S, end_s=END_S), tiny,
                                  workspace)
    captured = []
    real_apply_model = demucs_apply.apply_model

    def capturing_apply_model(model, mix, **kwargs):
        if model is demucs_model:  # apply_model calls itself on chunks (and on a bag's models): keep the stage's call
            captured.append(mix.clone())
        return real_apply_model(model, mix, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demucs_apply, "apply_model", capturing_apply_model)
        outcomes = [run_stage("separate", piece, tiny, workspace) for piece in pieces]
    return workspace, outcomes, captured


def test_the_stage_separates_each_piece_from_the_source_at_full_band(separated):
    _, outcomes, captured = separated
    assert [outcome.frames for outcome in outcomes] == [(0, PIECE_FRAMES), (PIECE_FRAMES, 2 * PIECE_FRAMES)]
    assert all(outcome.kept for outcome in outcomes), [outcome.rejection for outcome in outcomes]
    assert len(captured) == 2
    for mix in captured:  # normalised as demucs.separate does, so only shape and spectrum are compared
        assert mix.shape == (1, 2, round(PIECE_FRAMES / 25 * 44100))
        assert _high_band_share(mix[0, 0].numpy(), 44100) > 0.05
    for outcome in outcomes:
        result = outcome.features["separate"]
        assert result["status"] == "separated" and result["input_sample_rate"] == 44100
        assert result["source_channels"] == 2
        assert result["source_start_s"] == pytest.approx(START_S + outcome.frames[0] / 25)
        assert result["gain_db"] == outcome.job.standardised.gain_db
        vocals, rate = soundfile.read(Path(result["dir"]) / result["vocals"], dtype="int16")
        clip, clip_rate = soundfile.read(Path(outcome.files_dir) / AUDIO_FILE, dtype="int16")
        assert rate == clip_rate == 16000 and vocals.ndim == 1 and len(vocals) == len(clip) == PIECE_FRAMES * 640


def test_the_input_lines_up_with_clip_wav_sample_for_sample_at_its_gain(separated, demucs_model):
    """Demucs' input for the second piece, downmixed and resampled to 16 kHz at standardise's gain, is the
    piece's clip.wav: same range (no lag), same scale."""
    from julius import resample_frac

    _, outcomes, _ = separated
    piece = outcomes[1]
    start_s, duration_s = piece_source_range(piece)
    mix, _ = demucs_input(piece.job.candidate.source, start_s, duration_s, demucs_model)
    mono = resample_frac(mix.mean(0), 44100, 16000).numpy() * 10 ** (piece.job.standardised.gain_db / 20)
    clip, _ = soundfile.read(Path(piece.files_dir) / AUDIO_FILE, dtype="float32")
    n = min(len(mono), len(clip))
    mono, clip = mono[:n], clip[:n]
    lags = range(-40, 41)
    correlations = [np.corrcoef(np.roll(mono, lag)[100:-100], clip[100:-100])[0, 1] for lag in lags]
    assert lags[int(np.argmax(correlations))] == 0 and max(correlations) > 0.98
    assert np.sqrt(np.mean(mono ** 2)) / np.sqrt(np.mean(clip ** 2)) == pytest.approx(1.0, abs=0.05)


def test_the_cache_key_follows_the_source_range(separated, tiny):
    workspace, outcomes, _ = separated
    keys = [outcome.features["separate"]["key"] for outcome in outcomes]
    assert keys[0] != keys[1]
    again = run_stage("separate", replace(outcomes[1], features={}, timings=()), tiny, workspace)
    assert again.features["separate"]["key"] == keys[1] and again.timings[-1].cached
