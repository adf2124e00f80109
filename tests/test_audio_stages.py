"""The audio and emotion stages on generated audio (espeak-ng speech mixed with sine-chord music, digital
silence, music without a voice), with the tiny random models: shapes and types of every output, the window
layout, frame alignment, flagged rows instead of invented numbers, and caching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from preprocess.audio.text_emotion import TEXT_EMOTION_CLASSES
from preprocess.audio.valence_arousal import window_bounds
from preprocess.audio.wav2vec_features import features_to_frames
from preprocess.pipeline import AUDIO_STAGES, ClipJob, PieceOutcome, Workspace, load_model, run_audio_stages
from preprocess.run import model_loading as stage_models
from preprocess.run.model_loading import ModelNotFoundError
from preprocess.run.records import Candidate
from preprocess.run.settings import ModelChoice, load_settings
from preprocess.video.standardise import AUDIO_FILE, StandardisedClip
from synchrorama.sample_data import speech_wav

FPS, RATE = 25, 16000


def _chord(n_samples: int, level: float = 0.1) -> np.ndarray:
    t = np.arange(n_samples) / RATE
    return (level * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))).astype(np.float32)


def _piece(root: Path, clip_id: str, audio: np.ndarray) -> PieceOutcome:
    """A kept piece as filter-and-split leaves it, holding only what the audio stages read: its clip.wav, and the
    source range that separation decodes (here an audio-only source equal to clip.wav, standardised at 0 dB)."""
    files = root / clip_id
    files.mkdir(parents=True)
    soundfile.write(files / AUDIO_FILE, audio, RATE, subtype="PCM_16")
    source = root / f"{clip_id}.source.wav"
    soundfile.write(source, audio, RATE, subtype="PCM_16")
    n_frames = len(audio) // 640
    clip = StandardisedClip(video="clip.mp4", audio=AUDIO_FILE, n_frames=n_frames, fps=FPS, size=512, sample_rate=RATE,
                            loudness_in_lufs=None, gain_db=0.0, audio_padded_samples=0, notes=())
    job = ClipJob(candidate=Candidate(clip_id, str(source), "test"), source_sha256=f"test-{clip_id}", standardised=clip)
    return PieceOutcome(clip_id=clip_id, job=job, frames=(0, n_frames), files_dir=str(files),
                        content_key=f"test-{clip_id}")


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    from julius import resample_frac

    root = tmp_path_factory.mktemp("pieces")
    speech, rate = soundfile.read(speech_wav(root / "speech.wav", "Hello, this is a test of the audio stages."),
                                  dtype="float32")
    speech = resample_frac(torch.from_numpy(speech), rate, RATE).numpy()
    n = 125 * 640  # 5 s, 125 frames
    mix = _chord(n)
    mix[:min(n, len(speech))] += speech[:n]
    mix *= 0.5 / np.abs(mix).max()
    return {
        "speech_music": _piece(root, "speech_music", mix),
        "silent": _piece(root, "silent", np.zeros(80 * 640, np.float32)),  # 3.2 s of digital silence
        "music": _piece(root, "music", _chord(90 * 640, 0.3)),  # 3.6 s, no voice
    }


@pytest.fixture(scope="module")
def tiny():
    return load_settings("tiny")


@pytest.fixture(scope="module")
def processed(pieces, tiny, tmp_path_factory):
    workspace = Workspace(tmp_path_factory.mktemp("out"))
    return workspace, {name: run_audio_stages(piece, tiny, workspace) for name, piece in pieces.items()}


def _array(outcome: PieceOutcome, stage: str) -> np.ndarray:
    return np.load(Path(outcome.features[stage]["dir"]) / outcome.features[stage]["file"])


def test_every_stage_gives_outputs_of_the_right_shape_and_type(processed):
    _, outcomes = processed
    for name, outcome in outcomes.items():
        assert outcome.kept, (name, outcome.rejection)
        assert set(outcome.features) == set(AUDIO_STAGES)
        n_frames = outcome.frames[1]
        vocals, rate = soundfile.read(Path(outcome.features["separate"]["dir"]) / "vocals.wav", dtype="int16")
        assert rate == RATE and vocals.ndim == 1 and len(vocals) == n_frames * 640
        wav2vec = _array(outcome, "wav2vec")
        assert wav2vec.dtype == np.float16 and wav2vec.ndim == 3 and wav2vec.shape[0] == n_frames
        assert wav2vec.shape[1:] == (outcome.features["wav2vec"]["n_layers"], outcome.features["wav2vec"]["hidden_size"])
        # all hidden states (the projected CNN features and every transformer layer), not time steps
        config = load_model("wav2vec", load_settings("tiny").models.wav2vec).model.config
        assert wav2vec.shape[1:] == (config.num_hidden_layers + 1, config.hidden_size)
        assert np.isfinite(wav2vec).all()
        text, speech, va = (outcome.features[stage] for stage in ("text_emotion", "speech_emotion", "valence_arousal"))
        assert _array(outcome, "text_emotion").shape == (7 + text["embedding_dim"],)
        assert _array(outcome, "speech_emotion").shape == (len(speech["labels"]) + speech["embedding_dim"],)
        assert _array(outcome, "valence_arousal").shape == (len(va["windows"]), 3 + va["embedding_dim"])
        for stage in AUDIO_STAGES:
            assert outcome.features[stage]["model"].startswith(".models/tiny/")

    speech = outcomes["speech_music"].features
    assert speech["separate"]["has_speech"] and speech["separate"]["status"] == "separated"
    assert speech["transcribe"]["language"] == "en" and speech["transcribe"]["status"] in ("ok", "empty")
    if speech["transcribe"]["status"] == "ok":
        probabilities = speech["text_emotion"]["probabilities"]
        assert list(probabilities) == list(TEXT_EMOTION_CLASSES)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(speech["speech_emotion"]["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert speech["speech_emotion"]["labels"] == ["neu", "hap", "ang", "sad"]
    # the SER embedding is the classification head's input (SUPERB: weighted layer sum -> projector -> mean)
    ser = load_model("speech_emotion", load_settings("tiny").models.speech_emotion).model
    assert speech["speech_emotion"]["embedding_dim"] == ser.config.classifier_proj_size == ser.classifier.in_features
    assert all(isinstance(w["valence"], float) for w in speech["valence_arousal"]["windows"])


@pytest.mark.parametrize("seconds", [3.0, 4.0, 5.0, 7.36, 20.0])
def test_va_windows_overlap_by_half_and_cover_the_clip(seconds):
    n = int(seconds * FPS) * 640
    window, hop = 2 * RATE, RATE
    bounds = window_bounds(n, window, hop)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert len(bounds) == math.ceil((n - window) / hop) + 1
    for k, (start, end) in enumerate(bounds):
        assert start == k * hop
        assert end - start == window or k == len(bounds) - 1
    for (_start, end), (next_start, _) in zip(bounds, bounds[1:], strict=False):
        assert end - next_start == window // 2  # consecutive full windows share half their length
    covered = np.zeros(n, int)
    for start, end in bounds:
        covered[start:end] += 1
    assert covered.min() >= 1


def test_va_rows_come_from_those_windows(processed):
    _, outcomes = processed
    windows = outcomes["speech_music"].features["valence_arousal"]["windows"]
    assert [(w["start_s"], w["end_s"]) for w in windows] == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]
    assert outcomes["speech_music"].features["valence_arousal"]["hop_s"] == 1.0


def test_wav2vec_alignment_gives_one_vector_set_per_video_frame():
    for n_frames in (1, 2, 75, 500):
        n_features = 2 * n_frames - 1  # wav2vec 2.0 on n_frames * 640 samples (stride 320, field 400)
        features = np.arange(n_features, dtype=np.float64)[:, None, None] * np.ones((1, 3, 2))
        frames = features_to_frames(features, n_frames, 640, 320, 400)
        assert frames.shape == (n_frames, 3, 2)
        expected = np.clip(2 * np.arange(n_frames) + 0.375, 0, n_features - 1)  # frame centre, in feature steps
        assert np.allclose(frames[:, 0, 0], expected)


def test_silence_and_speechless_clips_give_flagged_rows_not_invented_text(pieces, tiny, tmp_path):
    # Digital silence with the tiny profile as it is. A random Demucs cannot tell music from a voice, so for the
    # music-only clip the speech check is made to find no voice (threshold 0 dBFS), as a trained Demucs would:
    # what is tested is that a clip without speech gets flagged rows and no made-up numbers downstream.
    speechless = load_settings("tiny", {"audio": {"separation": {"activity_frame_dbfs": 0.0}}})
    workspace = Workspace(tmp_path)
    for name, settings in (("silent", tiny), ("music", speechless)):
        audio = run_audio_stages(pieces[name], settings, workspace).features
        assert audio["separate"]["has_speech"] is False
        assert audio["transcribe"]["status"] == "no_speech" and audio["transcribe"]["text"] == ""
        assert audio["transcribe"]["language"] is None and audio["transcribe"]["segments"] == []
        assert audio["text_emotion"]["status"] == "no_speech" and audio["text_emotion"]["probabilities"] is None
        assert audio["speech_emotion"]["status"] == "no_speech" and audio["speech_emotion"]["probabilities"] is None
        assert all(w["valence"] is None for w in audio["valence_arousal"]["windows"])
        for stage in ("text_emotion", "speech_emotion", "valence_arousal"):
            assert not np.load(Path(audio[stage]["dir"]) / audio[stage]["file"]).any()
        wav2vec = np.load(Path(audio["wav2vec"]["dir"]) / audio["wav2vec"]["file"])
        assert wav2vec.shape[0] == pieces[name].frames[1]  # acoustic features exist even for silence
    silent = run_audio_stages(pieces["silent"], tiny, workspace).features
    assert silent["separate"]["status"] == "silent_input" and silent["separate"]["vocals_rms_dbfs"] is None
    vocals, _ = soundfile.read(Path(silent["separate"]["dir"]) / "vocals.wav")
    assert not vocals.any()


def test_non_english_transcript_is_flagged(processed, tiny, tmp_path):
    from preprocess.audio.text_emotion import score_transcript

    loaded = load_model("text_emotion", tiny.models.text_emotion)
    settings = tiny.audio.text_emotion
    assert score_transcript("Guten Tag", "de", "ok", loaded, settings, tmp_path).status == "non_english"
    assert score_transcript("", "en", "empty", loaded, settings, tmp_path).status == "empty_transcript"
    scored = score_transcript("What a lovely day!", "en", "ok", loaded, settings, tmp_path)
    assert scored.status == "ok" and set(scored.probabilities) == set(TEXT_EMOTION_CLASSES)


def test_rerun_does_no_model_work(processed, pieces, tiny):
    workspace, first = processed
    stage_models.clear_cache()
    loads_before = dict(stage_models.load_count)
    again = {name: run_audio_stages(piece, tiny, Workspace(workspace.out_dir)) for name, piece in pieces.items()}
    assert stage_models.load_count == loads_before  # no model was even loaded
    for name, outcome in again.items():
        assert [t.stage for t in outcome.timings] == list(AUDIO_STAGES)
        assert all(t.cached for t in outcome.timings)
        assert {s: r["key"] for s, r in outcome.features.items()} == {s: r["key"] for s, r in first[name].features.items()}


def test_models_load_once_per_process(tiny):
    first = load_model("wav2vec", tiny.models.wav2vec)
    assert load_model("wav2vec", tiny.models.wav2vec) is first


def test_separation_model_is_a_bag_as_get_model_returns(tiny):
    from demucs.apply import BagOfModels

    separation = load_model("separation", tiny.models.separation)
    assert isinstance(separation.model, BagOfModels) and "vocals" in separation.model.sources


def test_missing_model_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"wav2vec model not found: looked for the local path .*nowhere"):
        load_model("wav2vec", ModelChoice(model=str(tmp_path / "nowhere")))
    with pytest.raises(ModelNotFoundError, match=r"'no-such-org/no-such-model'.*Hugging Face cache.*huggingface-cli download"):
        load_model("speech_emotion", ModelChoice(model="no-such-org/no-such-model"))
