"""A run that cannot do its job fails loudly, once, with the reason, and publishes nothing; a clip's own failure
rejects that clip; a task past its time limit is failed, not waited on."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from flows.preprocess import preprocess
from preprocess.audio import speech_emotion, wav2vec_features
from preprocess.run.failures import (
    EnvironmentFailure,
    RunFailed,
    check_failure_shares,
    is_environment_error,
    stage_failure_shares,
)
from preprocess.run.preflight import ModelSetupError, active_models
from preprocess.run.settings import load_settings
from preprocess.video import faces
from synchrorama.sample_data import make_talking_video


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "talk.mp4", seconds=4.0)
    return raw


def _published(out) -> list:
    return sorted(path.name for path in out.glob("*")) if out.exists() else []


def test_default_profile_without_its_models_fails_before_any_clip_naming_each_model(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # no Whisper checkpoint there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))  # no Demucs checkpoint there
    out = tmp_path / "out"
    with pytest.raises(ModelSetupError) as failure:
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="default")
    message = str(failure.value)
    for kind, choice in active_models(load_settings("default")).items():
        assert choice.model in message, (kind, message)
    assert "HF_HUB_OFFLINE=1" in message and "huggingface-cli download" in message
    assert "clips.parquet" not in {path.name for path in out.rglob("*")}  # nothing written, no 'error' rows
    assert not (out / "work" / "probe").exists()  # no clip was touched


def test_one_missing_model_is_named_alone_and_the_rest_load(raw, tmp_path):
    overrides = {"models": {"speech_emotion": {"model": str(tmp_path / "no-such-ser-model")}}}
    with pytest.raises(ModelSetupError) as failure:
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(tmp_path / "out"), profile="tiny",
                   overrides=overrides)
    message = str(failure.value)
    assert message.startswith("1 model(s) of profile 'tiny' cannot be loaded")
    assert "speech_emotion" in message and str(tmp_path / "no-such-ser-model") in message
    assert not (tmp_path / "out" / "tables").exists()


def test_an_out_of_memory_error_in_a_stage_fails_the_run_instead_of_rejecting_clips(raw, tmp_path, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(speech_emotion, "classify_speech", out_of_memory)  # what its STAGE calls
    out = tmp_path / "out"
    with pytest.raises(EnvironmentFailure, match="stage speech_emotion cannot run in this environment"):
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    assert not (out / "tables").exists() and not (out / "shards").exists()


def test_a_stage_failing_on_most_clips_fails_the_run_and_a_tolerated_share_rejects_the_clip(raw, tmp_path,
                                                                                            monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug that every clip triggers")

    monkeypatch.setattr(wav2vec_features, "wav2vec_frames", broken)
    out = tmp_path / "out"
    with pytest.raises(RunFailed, match=r"wav2vec: 1 of 1 failed .*a bug that every clip triggers"):
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    assert not (out / "tables").exists()
    # With the share allowed, the same failure is one clip's 'error' rejection and the run completes.
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                         overrides={"limits": {"max_error_fraction": 1.0}})
    rows = pq.read_table(out / "tables" / "clips.parquet").to_pylist()
    assert [(row["clip_id"], row["reject_stage"], row["reason"]) for row in rows] == [
        ("talk", "wav2vec", "error")]
    assert summary["n_kept"] == 0


def test_a_task_past_its_time_limit_is_failed_not_waited_on(raw, tmp_path, monkeypatch):
    slow_s = 60.0

    def slow_face_tracking(*args, **kwargs):
        deadline = time.monotonic() + slow_s
        while time.monotonic() < deadline:  # Python-level work: the task's timeout can interrupt it
            time.sleep(0.05)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(faces, "linked_from_standardise", slow_face_tracking)
    out = tmp_path / "out"
    started = time.monotonic()
    preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
               overrides={"limits": {"task_timeout_s": 3.0, "max_error_fraction": 1.0}})
    elapsed = time.monotonic() - started
    rows = pq.read_table(out / "tables" / "clips.parquet").to_pylist()
    assert [(row["reject_stage"], row["reason"]) for row in rows] == [("faces", "timeout")]
    assert "3.0" in rows[0]["detail"]
    assert elapsed < slow_s, elapsed  # the stage's 60 s were not waited for


def test_environment_errors_are_told_apart_from_clip_errors():
    import errno

    import torch

    from preprocess.run.model_loading import ModelNotFoundError

    assert is_environment_error(ImportError("torchvision is required for the video processor"))
    assert is_environment_error(ModelNotFoundError("x"))
    assert is_environment_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_environment_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_environment_error(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = ValueError("stage failed")
    wrapped.__cause__ = ImportError("no module named videollama2")
    assert is_environment_error(wrapped)
    assert not is_environment_error(ValueError("could not parse the transcript"))
    assert not is_environment_error(RuntimeError("ffmpeg exited 1: Invalid data found when processing input"))
    assert not is_environment_error(FileNotFoundError(errno.ENOENT, "clip.wav"))


def test_failure_share_counts_distinct_clips_per_stage():
    shares = stage_failure_shares([("probe", "a", False), ("probe", "b", False), ("probe", "b", True),
                                   ("wav2vec", "a_p0", True), ("wav2vec", "a_p1", False)])
    assert shares == {"probe": (1, 2), "wav2vec": (1, 2)}
    check_failure_shares(shares, 0.5, {})  # exactly half: tolerated
    with pytest.raises(RunFailed, match="probe: 1 of 2 failed"):
        check_failure_shares(shares, 0.25, {"probe": "b: error"})
