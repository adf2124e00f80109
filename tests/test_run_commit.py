"""One run per out_dir and a run-level commit (issue 12): a locked out_dir refuses a second run; a run that fails
before publishing, or keeps no clip, leaves the published dataset byte-identical; a kill between shards and
tables is reported by ``validate``; index.json entries that are not bare shard names are refused unopened; one bad
clip becomes a rejection row instead of crashing the run after all its work.

One real tiny-profile run is shared (module fixture); each scenario works on a copy of its out_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.preprocess import preprocess
from preprocess.run.failures import RunFailed
from preprocess.run.preflight import ModelSetupError
from shards.validate import validate_shards
from synchrorama.cli import app
from synchrorama.sample_data import make_talking_video

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "anna.mp4", seconds=4.0)
    make_talking_video(raw / "bert.mp4", seconds=4.0, variant=1)
    return raw


@pytest.fixture(scope="module")
def good_run(raw, tmp_path_factory):
    """(out_dir, summary) of one complete run that kept both clips."""
    out = tmp_path_factory.mktemp("good") / "out"
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    assert summary["n_kept"] == 2, summary
    return out, summary


@pytest.fixture
def out(good_run, tmp_path):
    """A private copy of the good run's out_dir (cache included, so reruns do no stage work)."""
    copy = tmp_path / "out"
    shutil.copytree(good_run[0], copy, symlinks=True)
    return copy


def _published(out: Path) -> dict[str, str]:
    """sha256 of every published file: shards, tables, summary.json (not the cache or the lock file)."""
    files = [*sorted((out / "shards").iterdir()), *sorted((out / "tables").iterdir()), out / "summary.json"]
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def _clips(out: Path) -> list[dict]:
    return pq.read_table(out / "tables" / "clips.parquet", columns=["clip_id", "status", "reason", "shard"]).to_pylist()


def test_a_complete_run_commits_summary_last_and_validates(good_run):
    out, summary = good_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk.get("status") == "complete" and on_disk["run_id"] == summary["run_id"]
    index = (out / "shards" / "index.json").read_bytes()
    assert on_disk["committed"]["index_sha256"] == hashlib.sha256(index).hexdigest()
    assert [entry["tar"] for entry in on_disk["committed"]["shards"]] == ["shard-000000.tar"]
    assert on_disk["committed"]["tables"]["clips.parquet"] == 2
    assert not (out / "publishing.json").exists()
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 0, result.output
    assert "shards, tables and summary.json agree" in result.output
    from shards.validate import validate_output

    assert validate_output(out) == []


def test_a_second_run_on_a_locked_out_dir_is_refused_and_touches_nothing(raw, out):
    from shards.output_lock import OutputLocked, hold_output_lock

    before = _published(out)
    leftover = out / "work" / "probe" / ".tmp-live-run-entry"  # what a live run's half-built entry looks like
    leftover.mkdir(parents=True)
    with hold_output_lock(out, "preprocess folder (the first run)"), pytest.raises(OutputLocked) as refused:
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    message = str(refused.value)
    assert "in use by another run" in message and "the first run" in message and f"pid {os.getpid()}" in message
    assert _published(out) == before
    assert leftover.is_dir()  # the first run's temp files survive the second run


def test_a_rerun_with_a_missing_model_leaves_the_published_files_byte_identical(raw, out, tmp_path):
    before = _published(out)
    overrides = {"models": {"speech_emotion": {"model": str(tmp_path / "no-such-ser-model")}}}
    with pytest.raises(ModelSetupError):
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=overrides)
    assert _published(out) == before
    assert not (out / "publishing.json").exists()


CHILD = """
    import os, signal, sys
    import preprocess.run.outputs as write_outputs

    def die_before_the_first_table(*args, **kwargs):
        # the shards (and index.json) are written; SIGKILL leaves no chance to clean up
        os.kill(os.getpid(), signal.SIGKILL)

    # the publish's first table (the partitions' own tables were written before)
    write_outputs.merge_tables_atomic = die_before_the_first_table
    from flows.preprocess import preprocess
    preprocess(dataset="folder", raw_dir=sys.argv[1], out_dir=sys.argv[2], profile="tiny", limit=1,
               publish_subset=True)
"""


def test_a_kill_between_shards_and_tables_is_reported_by_validate_and_a_rerun_repairs_it(raw, out, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    # limit=1: this run publishes one clip where the committed dataset has two, so the two must disagree
    child = subprocess.Popen([sys.executable, str(script), str(raw), str(out)], cwd=REPO, env=env,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = child.communicate(timeout=400)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # anything the child started
        except ProcessLookupError:
            pass
    assert child.returncode == -signal.SIGKILL, log[-3000:]
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["n_samples"] == 1  # the new shards are in place, the tables are the old run's
    (out / "tables" / ".clips.parquet.tmp-0badf00d").write_bytes(b"PAR1 half a table")  # a killed table write

    assert validate_shards(out / "shards") == []  # the shards alone are fine
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 1, f"validate called the interrupted publish valid: {result.output}"
    assert "publishing.json" in result.output

    from shards.validate import validate_output

    problems = validate_output(out)
    text = "\n".join(problems)
    assert "publishing.json: a publish was interrupted" in text
    assert "summary.json: stale" in text and "shard-000000.tar" in text
    assert "kept clip bert says shard shard-000000.tar, but the indexed shards hold it in none" in text
    assert "tables/.clips.parquet.tmp-0badf00d: leftover temp file" in text

    # the same run again, uninterrupted, completes the publish and removes the leftovers
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", limit=1,
                         publish_subset=True)
    assert summary["n_kept"] == 1
    assert validate_output(out) == []
    assert not (out / "tables" / ".clips.parquet.tmp-0badf00d").exists()


def test_a_rerun_that_keeps_no_clip_fails_and_leaves_the_published_shards(raw, out):
    before = _published(out)
    everything_too_small = {"filters": {"min_face_px": 100_000}}
    with pytest.raises(RunFailed) as failed:
        preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                   overrides=everything_too_small)
    message = str(failed.value)
    assert "kept 0 of 2 clips (rejected: face_too_small 2)" in message
    assert "the 1 published shards" in message and "left untouched" in message
    assert "replace_with_empty=true" in message
    assert _published(out) == before

    # asked for explicitly, the empty dataset is published, and it is consistent
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                         overrides=everything_too_small, replace_with_empty=True)
    assert summary["n_kept"] == 0 and summary["n_shards"] == 0
    assert not list((out / "shards").glob("shard-*"))
    assert {row["reason"] for row in _clips(out)} == {"face_too_small"}
    from shards.validate import validate_output

    assert validate_output(out) == []


def test_a_dataset_without_candidates_fails_naming_what_was_looked_for(tmp_path):
    empty = tmp_path / "raw"
    (empty / "clips").mkdir(parents=True)
    (empty / "clips" / "readme.txt").write_text("no videos here")
    out = tmp_path / "out"
    with pytest.raises(RunFailed) as failed:
        preprocess(dataset="folder", raw_dir=str(empty), out_dir=str(out), profile="tiny", pattern="clips/**/*")
    message = str(failed.value)
    assert str(empty) in message and "'clips/**/*'" in message and "'folder'" in message
    assert not (out / "summary.json").exists() and not (out / "tables").exists()


def test_an_index_entry_that_is_not_a_bare_shard_name_is_reported_and_never_opened(out, tmp_path):
    bait = tmp_path / "outside.tar"  # "../../outside.tar" from out/shards
    shutil.copy(out / "shards" / "shard-000000.tar", bait)
    index_path = out / "shards" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"].append({**index["shards"][0], "tar": "../../outside.tar"})
    index_path.write_text(json.dumps(index))

    opened: list[str] = []
    watching = [True]

    def audit(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) \
                and "outside.tar" in os.fsdecode(args[0]):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one switches itself off below
    try:
        shard_problems = validate_shards(out / "shards")
        result = runner.invoke(app, ["validate", str(out)])
    finally:
        watching[0] = False
    refusal = "index.json: entry '../../outside.tar' is not a bare shard name"
    assert any(refusal in problem for problem in shard_problems), shard_problems
    assert result.exit_code == 1 and refusal in result.output
    assert opened == []
    from shards.validate import validate_output

    assert any(refusal in problem for problem in validate_output(out))


def test_a_duplicate_id_or_a_refused_sample_becomes_a_rejection_not_a_crash(raw, out):
    from preprocess.datasets.discover import discover_candidates
    from preprocess.pipeline import Workspace
    from preprocess.run.outputs import write_outputs
    from preprocess.run.partitions import process_candidates
    from preprocess.run.settings import load_settings

    settings = load_settings("tiny", None, dataset="folder")
    candidates, issues = discover_candidates("folder", raw)
    outcomes = process_candidates(candidates, settings, Workspace(out))  # all cached but the cut pieces
    anna, bert = sorted((outcome for outcome in outcomes if outcome.kept), key=lambda outcome: outcome.clip_id)
    # the same id again from another file (discovery de-duplicates; this is the writer's safety net), and a clip
    # whose id the shard schema refuses
    twin = replace(anna, job=replace(anna.job, candidate=replace(anna.job.candidate, source=str(raw / "zz.mp4"))))
    refused = replace(bert, clip_id="bert copy!")
    summary = write_outputs([*outcomes, twin, refused], issues, settings, out)

    assert (summary.n_clips, summary.n_kept) == (4, 2)
    assert summary.reasons == {"duplicate_id": 1, "invalid_sample": 1}
    rows = {(row["clip_id"], row["status"], row["reason"]) for row in _clips(out)}
    assert rows == {("anna", "kept", None), ("anna", "rejected", "duplicate_id"), ("bert", "kept", None),
                    ("bert copy!", "rejected", "invalid_sample")}
    assert validate_shards(out / "shards") == []
