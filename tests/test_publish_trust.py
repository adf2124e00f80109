"""Partitions and publishing that never trust a marker blindly (issue 21), tried as a user and an operator would:
through the flow, the CLI and the readers, on copies of one real tiny-profile run (two clips, two partitions).

- a shard damaged in place, or deleted from ``work/``, and a rerun: repaired, never a dataset ``validate`` rejects;
- ``limit`` on a published output: refused, nothing changed; ``--publish-subset`` on purpose;
- a local model replaced in place at the same path: its stages rerun; an input rewritten with the same size and
  mtime: ``validate --deep`` names it;
- a half-published output: every reader refuses it, naming the fix; an index listing a shard twice is an error;
- temp files of a dead run on another host: ``validate`` reports them, the next run removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.preprocess import preprocess
from preprocess.run.failures import RunFailed
from preprocess.run.model_loading import TINY_DIR
from shards.reader import UnpublishedShardsError, clip_dataset, shard_urls
from shards.tables import PUBLISHING_MARKER
from shards.training_loader import TrainingWindows, WindowSpec
from synchrorama.cli import app
from synchrorama.sample_data import make_talking_video

runner = CliRunner()
TWO_PARTITIONS = {"partitions": {"max_clips": 1}, "workers": 1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "anna.mp4", seconds=3.0)
    make_talking_video(raw / "bert.mp4", seconds=3.0, variant=1)
    return raw


@pytest.fixture(scope="module")
def published(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("published") / "out"
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                         overrides=TWO_PARTITIONS)
    assert summary["n_kept"] == 2 and summary["n_partitions"] == 2, summary
    return out


@pytest.fixture
def out(published, tmp_path):
    """A private copy of the published run's out_dir; ``cp -a`` keeps hard links as they are."""
    copy = tmp_path / "out"
    subprocess.run(["cp", "-a", str(published), str(copy)], check=True)
    return copy


def _rerun(raw: Path, out: Path, **parameters) -> dict:
    return preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                      overrides=parameters.pop("overrides", TWO_PARTITIONS), **parameters)


def _validate(out: Path, *options: str):
    return runner.invoke(app, ["validate", str(out), *options])


def _index(out: Path) -> dict:
    return json.loads((out / "shards" / "index.json").read_text())


def _flip_byte(path: Path, offset: int = 700) -> None:
    """Damage a file in place: same size, same inode (what a bad disk or a stray write does)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_published_shards_are_copies_not_links_to_the_cache(published):
    for tar in (published / "shards").glob("shard-*.tar"):
        assert os.stat(tar).st_nlink == 1, f"{tar} shares its inode with the cache"


def test_a_shard_damaged_in_place_is_rebuilt_by_the_rerun(raw, out):
    published_tar = out / "shards" / "shard-000000.tar"
    recorded = _index(out)["shards"][0]["sha256"]
    _flip_byte(published_tar)
    assert _validate(out).exit_code == 1  # validate sees it
    _rerun(raw, out)
    assert _sha256(published_tar) == recorded == _index(out)["shards"][0]["sha256"]
    result = _validate(out)
    assert result.exit_code == 0, result.output


def test_a_damaged_partition_shard_redoes_its_partition(raw, out, caplog):
    [damaged] = sorted((out / "work" / "partitions").glob("*/shards/shard-000000.tar"))[:1]
    _flip_byte(damaged)
    summary = _rerun(raw, out)
    assert summary["n_partitions_reused"] == 1  # the other partition verified
    assert "is marked finished but" in caplog.text and "redoing it" in caplog.text
    result = _validate(out)
    assert result.exit_code == 0, result.output


def test_a_partition_shard_deleted_from_work_is_redone_and_the_published_dataset_stays_valid(raw, out):
    before = _index(out)
    for tar in (out / "work" / "partitions").glob("*/shards/shard-*.tar"):
        tar.unlink()  # work/ is a cache: deleting any of it must be safe
    summary = _rerun(raw, out)
    assert summary["n_partitions_reused"] == 0 and summary["n_kept"] == 2
    assert [shard["sha256"] for shard in _index(out)["shards"]] == [shard["sha256"] for shard in before["shards"]]
    result = _validate(out)
    assert result.exit_code == 0, result.output


def test_limit_on_a_published_output_is_refused_and_changes_nothing(raw, out):
    index_before = _sha256(out / "shards" / "index.json")
    partitions_before = sorted(path.name for path in (out / "work" / "partitions").iterdir())
    result = runner.invoke(app, ["run", "--dataset", "folder", "--raw-dir", str(raw), "--out-dir", str(out),
                                 "--profile", "tiny", "--limit", "1", "--overrides", json.dumps(TWO_PARTITIONS)])
    assert result.exit_code != 0
    assert isinstance(result.exception, RunFailed) and "publish_subset" in str(result.exception)
    assert _sha256(out / "shards" / "index.json") == index_before
    assert sorted(path.name for path in (out / "work" / "partitions").iterdir()) == partitions_before
    assert _validate(out).exit_code == 0

    # on purpose: the subset replaces it, and the full run's partitions stay for the next full run
    summary = _rerun(raw, out, limit=1, publish_subset=True)
    assert summary["n_clips"] == 1 and summary["limit"] == 1
    assert sorted(path.name for path in (out / "work" / "partitions").iterdir()) == partitions_before
    assert _rerun(raw, out)["n_partitions_reused"] == 2


def test_a_local_model_replaced_in_place_reruns_its_stage(raw, tmp_path):
    model = tmp_path / "text-emotion"
    shutil.copytree(TINY_DIR / "text-emotion", model)
    overrides = {**TWO_PARTITIONS, "models": {"text_emotion": {"model": str(model)}}}
    out = tmp_path / "out"
    first = _rerun(raw, out, overrides=overrides)
    assert _rerun(raw, out, overrides=overrides)["n_partitions_reused"] == 2

    # the same folder, other weights: copy in a retrained model over it, as an operator would
    from transformers import AutoModelForSequenceClassification

    retrained = AutoModelForSequenceClassification.from_pretrained(model)
    with __import__("torch").no_grad():
        retrained.classifier.out_proj.bias.add_(1.0)
    staged = tmp_path / "retrained"
    retrained.save_pretrained(staged)
    shutil.rmtree(model)
    staged.rename(model)
    again = _rerun(raw, out, overrides=overrides)
    assert again["n_partitions_reused"] == 0
    assert first["run_id"] != again["run_id"]


def test_validate_deep_names_an_input_rewritten_with_the_same_size_and_mtime(raw, out, tmp_path):
    # the run's own raw folder is shared by the other tests: work on a copy of one input, found through the table
    source = raw / "anna.mp4"
    stat = source.stat()
    backup = tmp_path / "anna.backup"
    shutil.copy2(source, backup)
    try:
        _flip_byte(source, offset=stat.st_size // 2)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert _validate(out).exit_code == 0  # the fast path cannot see it
        result = _validate(out, "--deep")
        assert result.exit_code == 1
        assert f"input {source}: its content changed" in result.output and "re-hashed 2 input files" in result.output
    finally:
        shutil.copy2(backup, source)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _half_published(out: Path) -> None:
    (out / PUBLISHING_MARKER).write_text(json.dumps({"run_id": "killed", "pid": 1, "host": "elsewhere"}))


def test_every_reader_refuses_a_half_published_output(out):
    _half_published(out)
    spec = WindowSpec(stage="stage1", motion_frames=2, clip_frames=4)
    for read in (lambda: shard_urls(out / "shards"), lambda: list(clip_dataset(out / "shards")),
                 lambda: TrainingWindows(out / "shards", spec, batch_size=1)):
        with pytest.raises(UnpublishedShardsError, match="rerun the preprocess flow"):
            read()


def test_readers_refuse_a_missing_or_disagreeing_index_and_a_shard_listed_twice(out):
    shards = out / "shards"
    index = _index(out)
    (shards / "index.json").write_text(json.dumps({**index, "shards": [*index["shards"], index["shards"][0]]}))
    with pytest.raises(UnpublishedShardsError, match="more than once"):
        shard_urls(shards)
    (shards / "index.json").write_text(json.dumps({**index, "shards": index["shards"][:1]}))
    with pytest.raises(UnpublishedShardsError, match="there but not listed"):
        shard_urls(shards)
    (shards / "index.json").unlink()
    with pytest.raises(UnpublishedShardsError, match="has no index.json"):
        shard_urls(shards)


def test_temps_of_a_dead_run_on_another_host_are_reported_then_removed(raw, out):
    [part] = sorted((out / "work" / "partitions").iterdir())[:1]
    leftovers = [out / "work" / "probe" / ".tmp-0123456789abcdef0123-4242@old-container-deadbeef",
                 out / ".summary.json.tmp-1a2b3c4d", out / "work" / "fingerprints" / ".x.json.tmp-0badf00d",
                 part / ".partition.json.tmp-31337"]
    leftovers[0].mkdir(parents=True)
    (leftovers[0] / "result.json").write_text("{}")
    for path in leftovers[1:]:
        path.write_text("half")
    result = _validate(out)
    assert result.exit_code == 1
    for path in leftovers:
        assert str(path.relative_to(out)) in result.output, result.output
    _rerun(raw, out)
    assert not any(path.exists() for path in leftovers)
    assert _validate(out).exit_code == 0
