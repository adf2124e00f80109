"""The audio and emotion stages inside the preprocess flow (tiny profile): every kept clip gets its rows in the
four audio tables and its features in the shard, silent clips are flagged, every clip's speech activity is in the
clips table, and a second run loads no model."""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.preprocess import preprocess
from model.emotion_embedding import EmotionFeatures
from preprocess.run import model_loading as stage_models
from preprocess.run.preflight import active_models
from preprocess.run.settings import load_settings
from shards.reader import clip_dataset
from shards.schema import EMOTION_ARRAYS, EMOTION_VALID_ARRAYS, OPTIONAL_MEMBERS, REQUIRED_MEMBERS
from shards.tables import (
    CLIPS_TABLE,
    SPEECH_EMOTION_TABLE,
    STAGE_TIMINGS_TABLE,
    TABLES_DIR,
    TEXT_EMOTION_TABLE,
    TRANSCRIPTS_TABLE,
    VA_WINDOWS_TABLE,
)
from shards.validate import validate_shards

KEPT = {"talk": 100, "quiet": 100}  # clip id -> frames (4 s at 25 fps)


@pytest.fixture
def run(tiny_feature_run):
    return tiny_feature_run


def _rows(out, table) -> list[dict]:
    return pq.read_table(out / TABLES_DIR / table).to_pylist()


def test_every_kept_clip_has_rows_in_every_audio_table(run):
    _, out, summary, _ = run
    assert summary["n_kept"] == 2 and summary["n_with_speech"] == 1
    assert "MEAN NOTHING" in summary["warning"]
    for table in (TRANSCRIPTS_TABLE, TEXT_EMOTION_TABLE, SPEECH_EMOTION_TABLE):
        rows = _rows(out, table)
        assert sorted(row["clip_id"] for row in rows) == sorted(KEPT)
        assert all(row["model"].startswith(".models/tiny/") for row in rows)
    transcripts = {row["clip_id"]: row for row in _rows(out, TRANSCRIPTS_TABLE)}
    assert transcripts["talk"]["has_speech"] and transcripts["talk"]["language"] == "en"
    assert transcripts["quiet"]["status"] == "no_speech" and transcripts["quiet"]["text"] == ""
    text = {row["clip_id"]: row for row in _rows(out, TEXT_EMOTION_TABLE)}
    assert text["quiet"]["status"] == "no_speech" and text["quiet"]["joy"] is None
    speech = {row["clip_id"]: row for row in _rows(out, SPEECH_EMOTION_TABLE)}
    assert {"neu", "hap", "ang", "sad"} <= set(speech["talk"])
    assert sum(speech["talk"][label] for label in ("neu", "hap", "ang", "sad")) == pytest.approx(1.0, abs=1e-5)
    assert speech["quiet"]["neu"] is None
    windows = _rows(out, VA_WINDOWS_TABLE)
    for clip_id, n_frames in KEPT.items():
        spans = [(w["start_s"], w["end_s"]) for w in windows if w["clip_id"] == clip_id]
        assert spans == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0)] and n_frames / 25 == 4.0
    assert all(w["valence"] is None for w in windows if w["clip_id"] == "quiet")
    assert all(isinstance(w["valence"], float) for w in windows if w["clip_id"] == "talk")
    # the tables reference's example query runs
    query = (f"SELECT v.clip_id, avg(v.valence) AS mean_valence FROM '{out}/tables/va_windows.parquet' v "
             f"JOIN '{out}/tables/transcripts.parquet' t USING (clip_id) WHERE v.status = 'ok' GROUP BY v.clip_id")
    assert [row[0] for row in duckdb.sql(query).fetchall()] == ["talk"]


def test_speech_activity_reaches_the_clips_table(run):
    """Silero VAD's measure is recorded for every piece; the silent clip is kept only because this run sets
    min_speech_fraction to 0 (see the tiny_feature_run fixture)."""
    _, out, _, overrides = run
    assert overrides["filters"]["min_speech_fraction"] == 0.0
    clips = {row["clip_id"]: row for row in _rows(out, CLIPS_TABLE)}
    assert clips["talk"]["speech_fraction"] > 0.7 and clips["quiet"]["speech_fraction"] == 0.0
    assert clips["talk"]["audio_padded_fraction"] == clips["quiet"]["audio_padded_fraction"] == 0.0
    assert all(row["speech_activity_s"] is not None for row in clips.values())


def test_every_kept_clip_carries_its_audio_features_in_the_shard(run):
    _, out, _, _ = run
    assert validate_shards(out / "shards") == []
    seen = set()
    for clip in clip_dataset(out / "shards", members=REQUIRED_MEMBERS + OPTIONAL_MEMBERS, decode_video=False):
        n_frames, meta = clip["meta"]["n_frames"], clip["meta"]
        assert n_frames == KEPT[clip["clip_id"]]
        assert tuple(clip["wav2vec"].shape) == tuple(meta["audio"]["wav2vec"]["shape"])
        assert clip["wav2vec"].shape[0] == n_frames  # exactly one vector set per video frame
        assert clip["vocals"].shape == clip["audio"].shape == (n_frames * 640,)
        emotion = meta["emotion"]
        with np.load(io.BytesIO(clip["emotion"]), allow_pickle=False) as arrays:
            # what the trainer builds model.emotion_embedding.EmotionFeatures from (eq. 1)
            features = EmotionFeatures(*(torch.from_numpy(arrays[name])[None] for name in EMOTION_ARRAYS))
            valid = {name: int(arrays[name]) for name in EMOTION_VALID_ARRAYS}
        assert tuple(features.text_probs.shape) == (1, 7)
        assert tuple(features.text_embedding.shape) == (1, emotion["text"]["embedding_dim"])
        assert tuple(features.speech_probs.shape) == (1, len(emotion["ser"]["classes"]))
        assert tuple(features.speech_embedding.shape) == (1, emotion["ser"]["embedding_dim"])
        assert tuple(features.va_values.shape) == (1, emotion["va"]["n_windows"], 3)
        assert tuple(features.va_embedding.shape) == (1, emotion["va"]["n_windows"], emotion["va"]["embedding_dim"])
        assert emotion["va"]["columns"] == ["valence", "arousal", "dominance"]
        assert valid["speech_valid"] == emotion["ser"]["valid"] == (clip["clip_id"] == "talk")
        if not emotion["text"]["valid"]:
            assert not features.text_probs.any() and valid["text_valid"] == 0
        assert meta["models"]["wav2vec"] == ".models/tiny/wav2vec2"
        seen.add(clip["clip_id"])
    assert seen == set(KEPT)


def test_second_run_loads_each_model_once_and_does_no_audio_work(run):
    raw, out, _, overrides = run
    shards = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    stage_models.clear_cache()
    loads = dict(stage_models.load_count)
    # every partition is finished: nothing to do, so no model is loaded at all
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=overrides)
    assert summary["n_partitions_reused"] == summary["n_partitions"]
    assert {kind: stage_models.load_count.get(kind, 0) - loads.get(kind, 0) for kind in stage_models.KINDS} == {
        kind: 0 for kind in stage_models.KINDS}
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == shards
    # other partitions (one clip each) are all new: the preflight loads every active model once (a broken setup
    # fails before any clip), no stage reloads one, and every stage's output comes from the cache (the pieces are
    # re-cut: their files went into the shards and were pruned from work/)
    repartitioned = {**overrides, "partitions": {"max_clips": 1}}
    preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=repartitioned)
    active = active_models(load_settings("tiny", repartitioned))
    assert {kind: stage_models.load_count.get(kind, 0) - loads.get(kind, 0) for kind in stage_models.KINDS} == {
        kind: int(kind in active) for kind in stage_models.KINDS}
    timings = _rows(out, STAGE_TIMINGS_TABLE)
    assert {"speech_activity", "separate", "transcribe", "text_emotion", "speech_emotion", "valence_arousal", "wav2vec",
            "action_units", "describe", "text_embedding", "latents"} <= {row["stage"] for row in timings}
    assert all(row["cached"] for row in timings if row["stage"] != "cut")
