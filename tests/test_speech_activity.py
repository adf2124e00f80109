"""Speech activity with the real Silero VAD (shipped inside the silero-vad wheel) on espeak-ng speech and on
synthetic music (sine chords and noise drums from numpy), and the two audio filters on the pipeline's own stage
functions: a music-only piece is rejected ``no_speech``, a speaking one is kept, a source whose audio track ends
early is rejected ``audio_missing``."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from preprocess.pipeline import (
    Workspace,
    run_clip_stages,
)
from preprocess.run.records import Candidate
from preprocess.run.settings import SpeechActivitySettings, load_settings
from preprocess.video.filters import audio_padding_per_frame
from preprocess.video.speech_activity import (
    frame_speech,
    load_silero_vad,
    measure_speech_activity,
    silero_identity,
)
from synchrorama.sample_data import make_talking_video, speech_wav

RATE, FPS = 16000, 25
SETTINGS = SpeechActivitySettings()


def _espeak(path: Path, seconds: float, rate: int = RATE) -> np.ndarray:
    """Looping espeak-ng speech, ``seconds`` long, at ``rate``."""
    from julius import resample_frac

    speech, speech_rate = soundfile.read(speech_wav(path), dtype="float32")
    speech = resample_frac(torch.from_numpy(speech), speech_rate, rate).numpy()
    return (0.5 * np.resize(speech, int(seconds * rate)) / np.abs(speech).max()).astype(np.float32)


def _music(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A chord progression (three sines per chord, 1 s each) over a kick-and-noise drum loop at 120 bpm."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    chords = ((220.0, 277.2, 329.6), (196.0, 246.9, 293.7), (174.6, 220.0, 261.6), (164.8, 207.7, 246.9))
    music = np.zeros(n)
    for second in range(int(np.ceil(seconds))):
        span = slice(second * rate, min(n, (second + 1) * rate))
        music[span] = 0.15 * sum(np.sin(2 * np.pi * f * t[span]) for f in chords[second % len(chords)])
    rng = np.random.default_rng(seed)
    for beat in range(0, n, rate // 2):
        length = min(rate // 8, n - beat)
        decay = np.arange(length)
        music[beat:beat + length] += 0.6 * np.sin(2 * np.pi * 60 * decay / rate) * np.exp(-decay / 800)
        music[beat:beat + length] += rng.normal(0, 0.2, length) * np.exp(-decay / 300)
    return (0.5 * music / np.abs(music).max()).astype(np.float32)


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    seconds = 6.0
    speech = _espeak(root / "speech.wav", seconds)
    music = _music(seconds)
    return {"speech": speech, "music": music, "speech_over_music": 0.8 * speech + 0.3 * music,
            "silence": np.zeros_like(speech)}


def test_silero_finds_espeak_speech_and_not_music(signals, tmp_path):
    vad = load_silero_vad()
    fractions = {}
    for name, audio in signals.items():
        probabilities, flags = frame_speech(audio, RATE, FPS, SETTINGS, vad)
        assert probabilities.shape == flags.shape == (len(audio) // 640,)
        assert probabilities.dtype == np.float32 and flags.dtype == np.uint8
        fractions[name] = float(flags.mean())
    print("\nSilero VAD speech fraction:", {name: round(value, 3) for name, value in fractions.items()})
    assert fractions["speech"] > 0.7 and fractions["speech_over_music"] > 0.6
    assert fractions["music"] < 0.1 and fractions["silence"] == 0.0
    # the stage function writes what the filters read, one value per video frame
    written = tmp_path / "clip.wav"
    soundfile.write(written, signals["speech"], RATE, subtype="PCM_16")
    result = measure_speech_activity(written, FPS, SETTINGS, tmp_path)
    assert result.n_frames == len(signals["speech"]) // 640 and result.speech_fraction > 0.7
    assert np.load(tmp_path / result.flags_file).shape == (result.n_frames,)
    assert result.model == silero_identity() and result.model.startswith("silero-vad==6.2.3:silero_vad.jit:")


def test_state_does_not_leak_between_clips_or_threads(signals):
    """The TorchScript model keeps a recurrent state: every clip starts from a reset one, and concurrent clips
    (the pipeline's worker threads) wait for each other instead of mixing their states."""
    vad = load_silero_vad()
    alone = frame_speech(signals["speech"], RATE, FPS, SETTINGS, vad)[0]
    frame_speech(signals["music"], RATE, FPS, SETTINGS, vad)
    assert np.array_equal(frame_speech(signals["speech"], RATE, FPS, SETTINGS, vad)[0], alone)
    results: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        results[name] = frame_speech(signals[name], RATE, FPS, SETTINGS, vad)[0]

    threads = [threading.Thread(target=run, args=(name,)) for name in ("speech", "music")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.array_equal(results["speech"], alone)


def test_importing_silero_keeps_the_process_thread_count():
    from preprocess.video import speech_activity

    torch_threads = torch.get_num_threads()
    speech_activity._timestamps_from_probs.cache_clear()
    speech_activity._timestamps_from_probs()
    assert torch.get_num_threads() == torch_threads


def test_wrong_rate_or_length_is_refused(signals):
    vad = load_silero_vad()
    with pytest.raises(ValueError, match="16000 Hz"):
        frame_speech(signals["speech"], 48000, FPS, SETTINGS, vad)
    with pytest.raises(ValueError, match="whole number"):
        frame_speech(signals["speech"][:1000], RATE, FPS, SETTINGS, vad)


def test_padding_is_counted_per_frame():
    padding = audio_padding_per_frame(10, 640, 3 * 640 + 320)
    assert padding.tolist() == [0.0] * 6 + [0.5, 1.0, 1.0, 1.0]
    assert not audio_padding_per_frame(10, 640, 0).any()


# ------------------------------------------------------------------ the filters, on the pipeline's stages


def _with_soundtrack(video: Path, audio: np.ndarray, rate: int, out: Path) -> Path:
    soundfile.write(out.with_suffix(".wav"), audio, rate)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", video, "-i", out.with_suffix(".wav"),
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", out], check=True)
    return out


def _select(source: Path, settings, workspace: Workspace):
    job, outcomes = run_clip_stages(Candidate(source.stem, str(source), "folder"), settings, workspace)
    assert job.rejection is None, job.rejection
    return job, outcomes


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    silent = make_talking_video(root / "picture.mp4", seconds=5.0, audio="none")
    return {
        "talk": make_talking_video(root / "talk.mp4", seconds=5.0),
        "music": _with_soundtrack(silent, _music(5.0, 44100), 44100, root / "music.mp4"),
        # the audio track stops after 2 s of a 5 s video
        "short_audio": _with_soundtrack(silent, _espeak(root / "speech.wav", 2.0, 44100), 44100,
                                        root / "short_audio.mp4"),
    }


@pytest.fixture(scope="module")
def selected(sources, tmp_path_factory):
    settings, workspace = load_settings("tiny"), Workspace(tmp_path_factory.mktemp("out"))
    return settings, workspace, {name: _select(path, settings, workspace) for name, path in sources.items()}


def test_music_only_piece_is_rejected_no_speech_and_speech_is_kept(selected):
    _, _, results = selected
    (_, [talk]), (_, [music]) = results["talk"], results["music"]
    assert talk.kept and talk.stats.speech_fraction > 0.7 and talk.stats.audio_padded_fraction == 0.0
    assert not music.kept and music.rejection.reason == "no_speech" and music.rejection.stage == "filters"
    assert music.stats.speech_fraction < 0.1 and "Silero VAD" in music.rejection.detail
    assert music.files_dir is None  # rejected before the cut: no audio stage will run on it
    assert "speech_fraction" in talk.stats.as_row() and "audio_padded_fraction" in talk.stats.as_row()
    assert "speech_activity" in [timing.stage for timing in talk.job.timings]


def test_audio_ending_early_is_rejected_audio_missing(selected):
    _, _, results = selected
    job, [piece] = results["short_audio"]
    padded = job.standardised.audio_padded_samples
    assert padded == pytest.approx(3 * RATE, abs=0.05 * RATE)  # 3 of 5 s
    assert piece.stats.audio_padded_fraction == pytest.approx(0.6, abs=0.02)
    assert piece.rejection.reason == "audio_missing" and "no_speech" not in piece.rejection.reason


def test_thresholds_are_settings_and_rerun_is_cached(selected, sources):
    settings, workspace, _ = selected
    lenient = load_settings("tiny", {"filters": {"min_speech_fraction": 0.0, "max_audio_padded_fraction": 1.0}})
    _, [music] = _select(sources["music"], lenient, workspace)
    assert music.kept  # nothing re-encoded: only the judgement changed
    job, _ = _select(sources["short_audio"], lenient, workspace)
    assert all(timing.cached for timing in job.timings)
    timings = {timing.stage: timing for timing in _select(sources["talk"], settings, workspace)[1][0].job.timings}
    assert timings["speech_activity"].cached
