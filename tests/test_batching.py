"""Batching across pieces in the model stages (``run_piece_stage_batch``), with the tiny models of the real classes:
every piece gets bit for bit the stored files, result JSON and cache key that it gets when computed alone, the
batched path really runs fewer forward passes, a crash in a batch costs only the bad piece, and a broken
environment still stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from media_fixtures import make_test_video, write_garbage

from preprocess import pipeline
from preprocess.pipeline import ClipJob, PieceOutcome, Workspace, load_model, run_piece_stage_batch, run_stage
from preprocess.run import batching
from preprocess.run.cache import FILES_KEY, RESULT_FILE, StageCache
from preprocess.run.failures import EnvironmentFailure
from preprocess.run.records import Candidate, Rejection
from preprocess.run.settings import load_settings
from preprocess.video.standardise import VIDEO_FILE

RATE, FPS, SIZE = 16000, 25, 128
# Batch sizes that leave a short, filled last batch and make pieces of a call share batches with each other.
TINY_BATCHED = {
    "standardise": {"size": SIZE},
    "visual": {"latents": {"enabled": True}},
    "models": {"text_emotion": {"batch_size": 3}, "valence_arousal": {"batch_size": 4},
               "captioning": {"batch_size": 3}, "text_encoder": {"batch_size": 3}, "vae": {"batch_size": 4}},
}
# (text, language, transcription status): scored ones of several token lengths, and each flagged kind
TRANSCRIPTS = [
    ("Hello there, how are you today?", "en", "ok"),
    ("I am absolutely furious about what happened at the station this morning.", "en", "ok"),
    ("Fine.", "en", "ok"),
    ("Guten Tag, wie geht es Ihnen?", "de", "ok"),
    ("What a wonderful, sunny and lovely day it is today, my dear friend; " * 4, "en", "ok"),
    ("", "en", "empty"),
    ("", None, "no_speech"),
    ("Thank you so much, that is very kind.", "en", "ok"),
]
# vocals: seconds and whether speech was found: a window exactly, whole windows plus a short last one, shorter
# than a window, no speech
VOCALS = [(3.3, True), (2.0, True), (5.0, True), (1.2, True), (4.0, False), (2.7, True), (3.3, True), (6.1, True)]
DESCRIPTIONS = ["a woman wearing earrings turning her head", "", "a man with glasses nodding slowly and smiling",
                "someone", "a person raising eyebrows", "a bald man in a blue shirt talking", "hat", "x " * 40]
VIDEO_SECONDS = [0.4, 0.6, 0.28, 1.0, 0.36, 0.52, 0.44, 0.2]  # 10, 15, 7, 25, 9, 13, 11, 5 frames


@pytest.fixture(scope="module")
def settings():
    return load_settings("tiny", TINY_BATCHED)


@pytest.fixture(scope="module")
def pieces(tmp_path_factory) -> list[PieceOutcome]:
    """Kept pieces holding what the batched stages read (clip.mp4, the separated vocals, a transcript, a
    description), each different, plus one rejected piece in the middle."""
    root = tmp_path_factory.mktemp("pieces")
    rng = np.random.default_rng(7)
    outcomes = []
    for index, (transcript, (seconds, has_speech), description, video_s) in enumerate(
            zip(TRANSCRIPTS, VOCALS, DESCRIPTIONS, VIDEO_SECONDS, strict=True)):
        files = root / f"p{index}"
        files.mkdir()
        make_test_video(files / VIDEO_FILE, width=SIZE, height=SIZE, seconds=video_s, fps=FPS, with_audio=False)
        t = np.arange(int(seconds * RATE)) / RATE
        vocals = 0.2 * np.sin(2 * np.pi * (150 + 40 * index) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(files / "vocals.wav", vocals.astype(np.float32), RATE, subtype="PCM_16")
        text, language, status = transcript
        job = ClipJob(candidate=Candidate(f"p{index}", str(files / VIDEO_FILE), "test"))
        outcomes.append(PieceOutcome(
            clip_id=f"p{index}", job=job, frames=(0, int(video_s * FPS)), files_dir=str(files),
            content_key=f"content-p{index}",
            features={"separate": {"dir": str(files), "vocals": "vocals.wav", "has_speech": has_speech,
                                   "key": f"separate-p{index}"},
                      "transcribe": {"text": text, "language": language, "status": status,
                                     "key": f"transcribe-p{index}"},
                      "describe": {"text": description, "key": f"describe-p{index}"}}))
    rejected = PieceOutcome(clip_id="rejected", job=outcomes[0].job,
                            rejection=Rejection("filters", "too_short", "test"))
    return outcomes[:4] + [rejected] + outcomes[4:]


def _stored(outcome: PieceOutcome, stage: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The stage's result.json (without its wall time) and every array it stored, for one piece."""
    entry = Path(outcome.features[stage]["dir"])
    result = json.loads((entry / RESULT_FILE).read_text())
    result.pop("seconds")
    return result, {name: np.load(entry / name) for name in result[FILES_KEY] if name.endswith(".npy")}


def _model_module(stage: str, settings) -> torch.nn.Module:
    """The module whose forward passes a stage's batches are counted on."""
    models = settings.models
    if stage == "text_emotion":
        return load_model("text_emotion", models.text_emotion).model
    if stage in ("valence_arousal", "speech_emotion"):
        return load_model(stage, getattr(models, stage)).model
    if stage == "describe":
        return load_model("captioning", models.captioning).model.model
    if stage == "text_embedding":
        return load_model("text_encoder", models.text_encoder).model.model
    return load_model("vae", models.vae).model.vae.encoder


def _counting_forwards(module: torch.nn.Module) -> tuple[list[int], object]:
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


BATCHED = ("text_emotion", "valence_arousal", "describe", "text_embedding", "latents")


@pytest.mark.parametrize("stage", [*BATCHED, "speech_emotion"])
def test_batched_pieces_store_exactly_what_they_store_alone(stage, settings, pieces, tmp_path):
    calls, handle = _counting_forwards(_model_module(stage, settings))
    try:
        alone = [run_stage(stage, piece, settings, Workspace(tmp_path / "alone")) for piece in pieces]
        alone_calls, calls[0] = calls[0], 0
        together = run_piece_stage_batch(stage, pieces, settings, Workspace(tmp_path / "together"))
        together_calls = calls[0]
    finally:
        handle.remove()
    assert len(together) == len(pieces)
    for piece, one, batched in zip(pieces, alone, together, strict=True):
        if not piece.kept:
            assert batched is piece  # passes through untouched
            continue
        assert batched.rejection is None and one.rejection is None, batched.rejection
        assert batched.features[stage]["key"] == one.features[stage]["key"]
        (result_alone, arrays_alone), (result_batched, arrays_batched) = _stored(one, stage), _stored(batched, stage)
        assert result_batched == result_alone
        assert arrays_batched.keys() == arrays_alone.keys()
        assert arrays_alone or stage == "describe"  # a description is its JSON (the text)
        for name, array in arrays_alone.items():
            assert array.dtype == arrays_batched[name].dtype and np.array_equal(array, arrays_batched[name]), name
        feature_alone = {k: v for k, v in one.features[stage].items() if k not in ("dir", "seconds")}
        assert {k: v for k, v in batched.features[stage].items() if k not in ("dir", "seconds")} == feature_alone
    if stage == "describe":  # equal empty answers would prove nothing
        assert len({piece.features[stage]["text"] for piece in together if piece.kept}) > 1
    print(f"\n{stage}: {alone_calls} forward passes one piece at a time, {together_calls} batched")
    if stage in BATCHED:
        assert together_calls < alone_calls
    else:  # speech emotion is not batched (whole clips of differing lengths)
        assert together_calls == alone_calls


def test_scored_and_flagged_transcripts_are_all_there(settings, pieces, tmp_path):
    """The flagged inputs (no speech, empty transcript, another language) keep their status in a batch."""
    done = run_piece_stage_batch("text_emotion", pieces, settings, Workspace(tmp_path))
    statuses = [piece.features["text_emotion"]["status"] for piece in done if piece.kept]
    assert statuses == ["ok", "ok", "ok", "non_english", "ok", "empty_transcript", "no_speech", "ok"]
    va = run_piece_stage_batch("valence_arousal", pieces, settings, Workspace(tmp_path))
    assert [piece.features["valence_arousal"]["status"] for piece in va if piece.kept].count("no_speech") == 1


def test_a_batch_reuses_what_is_cached_and_computes_the_rest_together(settings, pieces, tmp_path):
    workspace = Workspace(tmp_path)
    kept = [piece for piece in pieces if piece.kept]
    first = [pipeline.run_stage("valence_arousal", piece, settings, workspace) for piece in kept[::2]]
    done = run_piece_stage_batch("valence_arousal", pieces, settings, workspace)
    timings = {piece.clip_id: piece.timings[-1] for piece in done if piece.kept}
    assert [timings[piece.clip_id].cached for piece in kept] == [index % 2 == 0 for index in range(len(kept))]
    for piece in first:
        match = next(d for d in done if d.clip_id == piece.clip_id)
        assert match.features["valence_arousal"] == piece.features["valence_arousal"]
    again = run_piece_stage_batch("valence_arousal", pieces, settings, workspace)
    assert all(piece.timings[-1].cached for piece in again if piece.kept)


@pytest.mark.parametrize("stage", ["valence_arousal", "latents"])
def test_a_crash_in_a_batch_rejects_only_the_bad_piece(stage, settings, pieces, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_garbage(bad_dir / "vocals.wav")
    write_garbage(bad_dir / VIDEO_FILE)
    bad = PieceOutcome(clip_id="bad", job=pieces[0].job, frames=(0, 10), files_dir=str(bad_dir),
                       content_key="content-bad",
                       features={"separate": {"dir": str(bad_dir), "vocals": "vocals.wav", "has_speech": True,
                                              "key": "separate-bad"}})
    kept = [piece for piece in pieces if piece.kept][:3]
    done = run_piece_stage_batch(stage, [kept[0], bad, *kept[1:]], settings, Workspace(tmp_path / "batched"))
    assert done[1].rejection is not None and done[1].rejection.reason == "error" and done[1].rejection.stage == stage
    alone = Workspace(tmp_path / "alone")
    for piece, batched in zip(kept, [done[0], *done[2:]], strict=True):
        assert batched.rejection is None
        one = run_stage(stage, piece, settings, alone)
        assert batched.features[stage]["key"] == one.features[stage]["key"]
        for name, array in _stored(one, stage)[1].items():
            assert np.array_equal(array, _stored(batched, stage)[1][name])
    assert not list((tmp_path / "batched" / "work" / stage).glob(".tmp-*"))  # nothing half-written left


def test_a_broken_environment_still_stops_the_run(pieces, tmp_path):
    broken = load_settings("tiny", {"models": {"text_emotion": {"model": str(tmp_path / "no-such-model")}}})
    with pytest.raises(EnvironmentFailure, match="text_emotion"):
        run_piece_stage_batch("text_emotion", pieces, broken, Workspace(tmp_path))


def test_run_many_stores_each_entry_verified_and_nothing_on_a_crash(tmp_path):
    cache = StageCache(tmp_path)

    def write(keys: list[str], out_dirs: list[Path]) -> list[dict]:
        for key, out_dir in zip(keys, out_dirs, strict=True):
            (out_dir / "value.txt").write_text(key)
        return [{"key_was": key} for key in keys]

    results = cache.run_many("stage", ["a", "b", "a"], write)
    assert [cached for _, cached in results] == [False, False, False]
    assert [result["key_was"] for result, _ in results] == ["a", "b", "a"]
    assert json.loads((tmp_path / "stage" / "b" / RESULT_FILE).read_text())[FILES_KEY] == {"value.txt": 1}
    assert cache.load("stage", "a")["key_was"] == "a"
    assert [cached for _, cached in cache.run_many("stage", ["b", "c"], write)] == [True, False]

    def crash(keys, out_dirs):
        write(keys, out_dirs)
        raise ValueError("bad piece")

    with pytest.raises(ValueError):
        cache.run_many("stage", ["d", "e"], crash)
    assert cache.load("stage", "d") is None and not list((tmp_path / "stage").glob(".tmp-*"))


def test_fixed_shape_batches_fill_each_batch_with_copies():
    plan = batching.fixed_shape_batches(["x", "y", "x", "x", "y"], 2)
    assert plan == [([0, 2], [0, 2]), ([3], [3, 3]), ([1, 4], [1, 4])]
    assert batching.run_fixed_shape_batches([1, 2, 3], ["s"] * 3, 2, lambda rows: [r * 10 for r in rows]) == [10, 20, 30]
