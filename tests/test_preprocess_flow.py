"""End to end through the Prefect flow on generated videos: filters, splitting, rejections, shards read back
in a DataLoader, caching, and kill-and-resume giving identical outputs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flows.preprocess import preprocess
from shards.reader import clip_dataset
from shards.tables import CLIPS_TABLE, STAGE_TIMINGS_TABLE, TABLES_DIR, TIMING_COLUMNS
from shards.validate import validate_shards
from synchrorama.sample_data import make_talking_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "speaker" / "frontal.mp4", layout="single", seconds=6.0)
    make_talking_video(raw / "studio" / "two hosts.mkv", layout="pair", seconds=4.0)
    make_talking_video(raw / "empty_room.mp4", layout="none", seconds=4.0)
    make_talking_video(raw / "short.mp4", layout="single", seconds=1.0)
    make_talking_video(raw / "long_talk.mp4", layout="single", seconds=45.0)
    (raw / "empty.mp4").write_bytes(b"")
    (raw / "corrupt.mov").write_bytes(os.urandom(50_000))
    (raw / "notes.txt").write_text("not a video")
    return raw


@pytest.fixture(scope="module")
def first_run(raw_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny")
    return out, summary


def _clips(out: Path) -> dict[str, dict]:
    return {row["clip_id"]: row for row in pq.read_table(out / TABLES_DIR / CLIPS_TABLE).to_pylist()}


def test_every_clip_kept_or_rejected_with_its_reason(first_run):
    out, summary = first_run
    clips = _clips(out)
    expected = {
        "speaker__frontal": ("kept", None),
        "studio__two_hosts": ("rejected", "multi_speaker"),
        "empty_room": ("rejected", "no_face"),
        "short": ("rejected", "too_short"),
        "long_talk_p0": ("kept", None),
        "long_talk_p1": ("kept", None),
        "long_talk_p2": ("kept", None),
        "empty": ("rejected", "empty_file"),
        "corrupt": ("rejected", "unreadable"),
    }
    assert {clip_id: (row["status"], row["reason"]) for clip_id, row in clips.items()} == expected
    assert summary["n_kept"] == 4 and summary["n_rejected"] == 5
    for piece in ("long_talk_p0", "long_talk_p1", "long_talk_p2"):
        assert clips[piece]["duration_s"] == pytest.approx(15.0)
        assert clips[piece]["n_pieces"] == 3
    assert clips["speaker__frontal"]["face_frames_fraction"] == 1.0
    assert clips["studio__two_hosts"]["max_faces"] == 2
    assert all(clips[c]["shard"] for c in clips if clips[c]["status"] == "kept")
    assert clips["speaker__frontal"]["source"].endswith("speaker/frontal.mp4")


def test_kept_clips_are_512_square_25fps_with_16khz_audio_of_same_length(first_run):
    out, _ = first_run
    assert validate_shards(out / "shards") == []
    # spawn: this process has run Prefect (threads, a temporary server), which a forked worker would inherit
    loader = torch.utils.data.DataLoader(clip_dataset(out / "shards"), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn")
    seen = {}
    for clip in loader:
        video, audio = clip["video"], clip["audio"]
        assert video.dtype == torch.uint8 and tuple(video.shape[1:]) == (3, 512, 512)
        n_frames = video.shape[0]
        assert clip["meta"]["fps"] == 25 and clip["meta"]["n_frames"] == n_frames
        assert audio.ndim == 1 and audio.shape[0] == n_frames * 640  # 16 kHz: same duration as the video
        assert clip["meta"]["sample_rate"] == 16000
        assert tuple(clip["landmarks"].shape) == (n_frames, 478, 3) and tuple(clip["pose"].shape) == (n_frames, 3)
        seen[clip["clip_id"]] = n_frames
    assert seen == {"speaker__frontal": 150, "long_talk_p0": 375, "long_talk_p1": 375, "long_talk_p2": 375}


def _work_entries(out: Path) -> set[str]:
    return {str(path.relative_to(out)) for path in (out / "work").rglob("*")}


def test_second_run_does_no_stage_work_and_threshold_change_reruns_only_filters(first_run, raw_folder):
    out, _ = first_run
    shard_bytes = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    work = _work_entries(out)
    # every partition has its marker: the rerun skips them all, running no stage and writing nothing to work/
    summary = preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny")
    assert summary["n_partitions_reused"] == summary["n_partitions"] >= 1
    assert _work_entries(out) == work
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == shard_bytes

    # A stricter yaw threshold: no stage output changes, only the verdicts. It keeps no clip, which replaces the
    # published shards only when asked to (tests/test_run_commit.py).
    preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny",
               overrides={"filters": {"max_abs_yaw_deg": 0.01}}, replace_with_empty=True)
    timings = pq.read_table(out / TABLES_DIR / STAGE_TIMINGS_TABLE).to_pylist()
    assert all(row["cached"] for row in timings)
    clips = _clips(out)
    assert clips["speaker__frontal"]["reason"] == "side_profile"
    # and back: the original outputs again, without any stage work
    preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny")
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == shard_bytes


def _digest_outputs(out: Path) -> dict[str, str]:
    """sha256 of every shard file, and of the tables with the wall-time columns removed."""
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").iterdir())}
    clips = pq.read_table(out / TABLES_DIR / CLIPS_TABLE).drop_columns(list(TIMING_COLUMNS))
    clips = clips.drop_columns(["shard"]).to_pylist() + [None] + clips.column("shard").to_pylist()
    digests["clips"] = hashlib.sha256(repr(clips).encode()).hexdigest()
    for name in ("annotation_issues.parquet",):
        digests[name] = hashlib.sha256(repr(pq.read_table(out / TABLES_DIR / name).to_pylist()).encode()).hexdigest()
    return digests


def test_sigkill_then_resume_gives_identical_shards_and_tables(first_run, raw_folder, tmp_path):
    reference, _ = first_run
    preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(reference), profile="tiny")  # settle
    out = tmp_path / "resumed"
    code = (f"from flows.preprocess import preprocess; "
            f"preprocess(dataset='folder', raw_dir={str(raw_folder)!r}, out_dir={str(out)!r}, profile='tiny')")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    victim = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it in the middle of the expensive stages: once some clip has finished standardising
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        done = [p for p in (out / "work" / "standardise").glob("*") if not p.name.startswith(".")] \
            if (out / "work" / "standardise").exists() else []
        if done:
            break
        time.sleep(0.2)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (out / TABLES_DIR / CLIPS_TABLE).exists()

    finisher = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert finisher.returncode == 0, finisher.stderr[-3000:]
    assert _digest_outputs(out) == _digest_outputs(reference)
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
