"""Checkpoints are trusted only as far as they can be checked (issue 12, "Checkpoints"): ``training_state.pt``
loads with ``weights_only=True`` so a doctored pickle runs nothing; every file's sha256 sits in a manifest written
last, so flipped bytes, a truncated file or an interrupted save are refused and the newest older checkpoint that
verifies is used instead; a non-finite loss stops the run before the optimizer step, with ``latest`` unchanged; one
training run per output folder, which also clears what killed saves left. Real tiny runs on the CPU."""

from __future__ import annotations

import builtins
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loader import write_training_shards

from model.training.train import (
    MANIFEST,
    CheckpointError,
    NonFiniteLossError,
    latest_checkpoint,
    load_training_state,
    main,
    reseal_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from shards.output_lock import OutputLocked, hold_output_lock

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train_tiny.toml")
A2M = ["stage=a2m", "val_samples=0", "checkpoint_every=1", "warmup_steps=1"]  # the cheapest stage


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("ckpt-shards"), n_clips=4, frames=30)


@pytest.fixture(autouse=True)
def _both_cores(two_torch_threads):
    yield


@pytest.fixture(scope="module")
def two_checkpoints(shard_dir, tmp_path_factory):
    """A run stopped after step 2 with checkpoints at steps 1 and 2; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("ckpt-run")
    main(["--config", TINY, "--shards", str(shard_dir), "--out", str(out), *A2M, "max_steps=4", "stop_at_step=2"])
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def _resume(shards: Path, out: Path, *extra: str):
    return main(["--config", TINY, "--shards", str(shards), "--out", str(out), *A2M, "max_steps=3", *extra])


class _Payload:
    """Unpickling this calls ``builtins.exec`` on code that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_checkpoint_holds_a_manifest_of_every_file(two_checkpoints):
    folder = two_checkpoints / "checkpoints" / "step-0000002"
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(listed) == {"model.safetensors", "ema.safetensors", "training_state.pt", "state.json"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in listed.values())
    assert not list((two_checkpoints / "checkpoints").glob(".*tmp*"))
    # the RNG states are tensors and plain types: the safe unpickler reads the whole file
    assert isinstance(load_training_state(folder)["rng"]["numpy"][1], torch.Tensor)


def test_a_doctored_training_state_runs_nothing(shard_dir, two_checkpoints, tmp_path, caplog):
    out = _copy(two_checkpoints, tmp_path)
    folder = out / "checkpoints" / "step-0000002"
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _Payload(marker)}, folder / "training_state.pt")  # a real torch zip file
    write_manifest(folder)  # an attacker can rewrite the manifest too: the unpickler itself must refuse
    doctored = Path(shutil.copy(folder / "training_state.pt", tmp_path / "doctored.pt"))
    with pytest.raises(CheckpointError, match=r"step-0000002/training_state\.pt.*could run code"):
        load_training_state(folder)
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        resumed = _resume(shard_dir, out)  # refused, so the run goes on from the older checkpoint
    assert not marker.exists()
    assert [r["step"] for r in resumed.records] == [2, 3]
    assert any("skipping" in r.message and "could run code" in r.message for r in caplog.records)
    # the control: the same file does run under the unpickler the loop used before
    torch.load(doctored, weights_only=False)
    assert marker.read_text() == "ran"


def test_a_flipped_byte_is_refused_naming_the_file_and_the_older_checkpoint_used(shard_dir, two_checkpoints, tmp_path,
                                                                                  caplog):
    out = _copy(two_checkpoints, tmp_path)
    weights = out / "checkpoints" / "step-0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor: the file still parses, so only the hash can tell
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        resumed = _resume(shard_dir, out)
    assert [r["step"] for r in resumed.records] == [2, 3]  # from step 1, the newest checkpoint that verifies
    assert any(re.search(r"skipping .*step-0000002.*step-0000002/model\.safetensors does not match the sha256", r.message)
               for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(shard_dir, two_checkpoints, tmp_path, caplog, damage):
    out = _copy(two_checkpoints, tmp_path)
    state = out / "checkpoints" / "step-0000002" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2] if damage == "truncated" else b"")
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-0000001"
    assert any("step-0000002/training_state.pt does not match" in r.message for r in caplog.records)
    resumed = _resume(shard_dir, out)
    assert [r["step"] for r in resumed.records] == [2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    verify_checkpoint(out / "checkpoints" / "step-0000002")  # the damaged one was replaced by a good save


def test_when_no_checkpoint_verifies_the_run_stops_instead_of_restarting(shard_dir, two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    for step in ("step-0000001", "step-0000002"):
        (out / "checkpoints" / step / "ema.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* verifies"):
        _resume(shard_dir, out)


def test_a_second_run_on_the_same_out_dir_is_refused_and_stale_temp_saves_are_removed(shard_dir, two_checkpoints,
                                                                                     tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    stale = out / "checkpoints" / ".step-0000003.tmp-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a save")
    with hold_output_lock(out, "another training run"):
        with pytest.raises(OutputLocked, match="in use by another run .*another training run"):
            _resume(shard_dir, out)
        assert stale.exists()  # a refused run touches nothing
    resumed = _resume(shard_dir, out)
    assert [r["step"] for r in resumed.records] == [3]
    assert not stale.exists()


def test_an_interrupted_save_is_skipped_for_the_previous_checkpoint(shard_dir, two_checkpoints, tmp_path, caplog):
    out = _copy(two_checkpoints, tmp_path)
    checkpoints = out / "checkpoints"
    (checkpoints / "step-0000002" / MANIFEST).unlink()  # as if killed before the manifest went in
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        assert latest_checkpoint(checkpoints) == checkpoints / "step-0000001"
    assert any("skipping" in r.message and "step-0000002" in r.message for r in caplog.records)
    resumed = _resume(shard_dir, out)
    assert [r["step"] for r in resumed.records] == [2, 3]


def test_latest_cannot_point_outside_the_checkpoints_folder(two_checkpoints, tmp_path, caplog):
    out = _copy(two_checkpoints, tmp_path)
    checkpoints = out / "checkpoints"
    (checkpoints / "latest").write_text("../../../etc")
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        assert latest_checkpoint(checkpoints) == checkpoints / "step-0000002"
    assert any("not a checkpoint folder" in r.message for r in caplog.records)


def test_an_old_checkpoint_without_a_manifest_is_refused_until_resealed(shard_dir, two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    checkpoints = out / "checkpoints"
    import shutil

    shutil.rmtree(checkpoints / "step-0000002")
    (checkpoints / "latest").write_text("step-0000001")
    folder = checkpoints / "step-0000001"
    # the format an older model/training/train.py wrote: numpy's RNG state as its tuple with an ndarray, no manifest
    state = load_training_state(folder)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, folder / "training_state.pt")
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"step-0000001 has no manifest\.json.*reseal_checkpoint"):
        _resume(shard_dir, out)  # never a silent restart at step 0
    with pytest.raises(CheckpointError, match="could run code"):  # its ndarray is not allow-listed
        load_training_state(folder)
    reseal_checkpoint(folder)
    resumed = _resume(shard_dir, out)
    assert [r["step"] for r in resumed.records] == [2, 3]


def test_a_non_finite_loss_stops_before_the_update_and_saves_nothing(shard_dir, tmp_path):
    # a real way to diverge: lr=1e30 makes step 1's update blow the weights up, so step 2's loss is not finite
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite \{.*'total': (nan|inf)") as error:
        main(["--config", TINY, "--shards", str(shard_dir), "--out", str(tmp_path), *A2M, "max_steps=4",
              "lr=1e30", "grad_clip=0"])
    assert "latest" in str(error.value) and "unchanged" in str(error.value)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000001"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == ["step-0000001"]
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1]  # the non-finite step is neither logged nor saved


def _real_entries(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())["files"]


# Manifests that are valid JSON of the wrong shape (issue 21, fault 5): each must be refused as a CheckpointError, and
# the resume fall back to the older checkpoint, never crash with an AttributeError, TypeError or KeyError.
_WRONG_SHAPES = {
    "a list": lambda real: [],
    "an empty object": lambda real: {},
    "null": lambda real: None,
    "a string": lambda real: "step-0000002",
    "files is a list": lambda real: {"format": 1, "files": []},
    "an entry that is a number": lambda real: {"format": 1, "files": {"x": 3}},
    "every real entry a number": lambda real: {"format": 1, "files": {name: 3 for name in real}},
    "a sha256 that is a number": lambda real: {"format": 1, "files": {
        name: {**entry, "sha256": 123} for name, entry in real.items()}},
    "a size that is text": lambda real: {"format": 1, "files": {
        name: {**entry, "bytes": str(entry["bytes"])} for name, entry in real.items()}},
    "an entry without its sha256": lambda real: {"format": 1, "files": {
        name: {"bytes": entry["bytes"]} for name, entry in real.items()}},
    "a name that climbs out": lambda real: {"format": 1, "files": {
        **real, "../step-0000001/state.json": real["state.json"]}},
    "an unknown format": lambda real: {"format": 2, "files": real},
}


@pytest.mark.parametrize("shape", list(_WRONG_SHAPES))
def test_a_manifest_of_the_wrong_shape_is_skipped_for_the_previous_checkpoint(shard_dir, two_checkpoints, tmp_path,
                                                                              caplog, shape):
    out = _copy(two_checkpoints, tmp_path)
    newest = out / "checkpoints" / "step-0000002"
    (newest / MANIFEST).write_text(json.dumps(_WRONG_SHAPES[shape](_real_entries(newest))))
    with caplog.at_level(logging.WARNING, logger="model.training.train"):
        resumed = _resume(shard_dir, out, "stop_at_step=2")  # one step, from step 1
    assert [r["step"] for r in resumed.records] == [2]
    assert any(re.search(r"skipping .*step-0000002: .*step-0000002/manifest\.json is not a checkpoint manifest", r.message)
               for r in caplog.records), [r.message for r in caplog.records]
    verify_checkpoint(newest)  # the refused one was replaced by a good save


def test_evaluating_a_checkpoint_whose_manifest_has_the_wrong_shape_says_so(two_checkpoints, tmp_path):
    from evaluation.evaluate import EvaluationError
    from evaluation.from_checkpoint import GenerationSettings, checkpoint_record

    folder = _copy(two_checkpoints, tmp_path) / "checkpoints" / "step-0000002"
    (folder / MANIFEST).write_text("[]")  # `synchrorama evaluate --checkpoint <this folder>` records its weights' sha256
    with pytest.raises(EvaluationError, match=r"step-0000002/manifest\.json is not a checkpoint manifest"):
        checkpoint_record(folder, GenerationSettings())
