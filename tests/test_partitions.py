"""Partitions as the unit of orchestration (issue 13): deterministic planning, a task-run count that follows the
partitions, model groups that start before the video work is done, the strict GPU limit, and a SIGKILL in the
middle of a partition after which the rerun redoes that partition only."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pyarrow.parquet as pq
import pytest

from flows.preprocess import preprocess
from preprocess.run.partitions import MARKER_FILE, PARTITIONS_DIR, plan_partitions
from preprocess.run.records import Candidate
from preprocess.run.settings import load_settings
from shards.tables import TIMING_COLUMNS
from synchrorama.sample_data import make_talking_video

REPO = Path(__file__).resolve().parent.parent
ONE_PER_PARTITION = {"partitions": {"max_clips": 1}, "workers": 1}


def test_partitions_are_planned_in_id_order_and_bounded_by_clips_and_seconds():
    settings = load_settings("tiny", {"partitions": {"max_clips": 3, "max_seconds": 25.0}})
    candidates = [Candidate(candidate_id=f"c{number:02d}", source=f"/v/{number}.mp4", dataset="hdtf", start_s=0.0,
                            end_s=10.0 if number % 2 else None) for number in reversed(range(8))]
    partitions = plan_partitions(candidates, settings)
    ids = [[candidate.candidate_id for candidate in partition.candidates] for partition in partitions]
    # c00 (no end: counts as a clip only), c01 10 s, c02; c03 10 s, c04, c05 10 s: 20 s < 25 s, 3 clips
    assert ids == [["c00", "c01", "c02"], ["c03", "c04", "c05"], ["c06", "c07"]]
    assert [partition.name for partition in partitions] == ["p00000", "p00001", "p00002"]
    assert plan_partitions(list(reversed(candidates)), settings) == partitions
    by_seconds = plan_partitions(candidates, load_settings("tiny", {"partitions": {"max_clips": 8,
                                                                                   "max_seconds": 15.0}}))
    assert [len(partition.candidates) for partition in by_seconds] == [4, 4]  # two 10 s clips close one


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "a_first.mp4", layout="single", seconds=3.0)
    make_talking_video(raw / "b_second.mp4", layout="single", seconds=3.0, variant=1)
    # the last partition's clip is long, so that its video work is under way when the second partition finishes
    make_talking_video(raw / "c_third.mp4", layout="single", seconds=24.0, variant=2)
    return raw


def _task_runs(run_id: str) -> list:
    """The task runs of a preprocess flow run and of its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(run_id)])))
        ids = [UUID(run_id), *(child.id for child in children)]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                           overrides=ONE_PER_PARTITION)


def test_task_runs_follow_partitions_and_model_groups_overlap_video_work(reference):
    out, summary = reference
    assert summary["n_partitions"] == 3 and summary["n_kept"] >= 3
    runs = _task_runs(summary["run_id"])
    names = sorted(run.name for run in runs)
    groups = [f"{group}-p{number:05d}" for number in range(3) for group in ("audio", "video", "visual", "write")]
    # four tasks per partition, plus the run's own few (the models' preflight, the subflow's parent task)
    assert sorted(name for name in names if name[:-7] in ("video", "audio", "visual", "write")) == sorted(groups)
    assert len(runs) <= 4 * 3 + 3, names
    by_name = {run.name: run for run in runs}
    # no global barrier: the first partition's model groups ran while a later partition was still in its video group
    assert by_name["audio-p00000"].start_time < by_name["video-p00002"].end_time
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("synchrorama-gpu")
    assert limit.limit >= 1


def _markers(out: Path) -> dict[str, int]:
    root = out / "work" / PARTITIONS_DIR
    return {path.parent.name: path.stat().st_mtime_ns for path in root.glob(f"*/{MARKER_FILE}")}


def _published(out: Path) -> dict[str, str]:
    """sha256 of every shard file, and of every table without its wall-time columns."""
    digests = {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
               for path in sorted((out / "shards").iterdir())}
    for path in sorted((out / "tables").glob("*.parquet")):
        table = pq.read_table(path)
        table = table.drop_columns([name for name in table.column_names
                                    if name in TIMING_COLUMNS or name in ("seconds", "cached")])
        digests[str(path.relative_to(out))] = hashlib.sha256(repr(table.to_pylist()).encode()).hexdigest()
    return digests


def test_a_rerun_after_sigkill_in_a_partition_redoes_only_the_unfinished_partition(raw, reference, tmp_path):
    reference_out, _ = reference
    out = tmp_path / "killed"
    code = (f"from flows.preprocess import preprocess; "
            f"preprocess(dataset='folder', raw_dir={str(raw)!r}, out_dir={str(out)!r}, profile='tiny', "
            f"overrides={ONE_PER_PARTITION!r})")
    victim = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and victim.poll() is None and len(_markers(out)) < 2:
        time.sleep(0.1)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    finished_before = _markers(out)
    assert len(finished_before) == 2, finished_before  # the third partition was under way
    assert not (out / "summary.json").exists()

    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                         overrides=ONE_PER_PARTITION)
    assert summary["n_partitions_reused"] == 2
    after = _markers(out)
    assert {key: after[key] for key in finished_before} == finished_before  # never rewritten
    assert len(after) == 3
    redone = [run.name for run in _task_runs(summary["run_id"]) if run.name[:-7] in ("video", "write")]
    assert sorted(redone) == ["video-p00002", "write-p00002"]
    assert _published(out) == _published(reference_out)
