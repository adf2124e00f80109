"""`synchrorama evaluate --checkpoint --shards` (issue 15, second mode): a tiny checkpoint trained for one step
generates each shard clip from its first frame and its audio; the ground truth is the shard's own stream; the
folders are evaluated; the tables record the checkpoint and the generation settings and say loudly that the
numbers mean nothing."""

from __future__ import annotations

import json
import math
import shutil

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_generate import TINY
from test_train_loader import write_training_shards
from typer.testing import CliRunner

from evaluation.evaluate import TABLE_COLUMNS, read_audio, read_frames
from evaluation.from_checkpoint import a2m_untrained
from model.training.train import main as train_main
from shards.reader import clip_dataset
from shards.schema import file_sha256
from synchrorama.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = 32  # two 16-frame FVD windows per clip: the per-clip FVD needs two


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("eval-shards"), n_clips=2, frames=FRAMES,
                                 cached_wav2vec=True)


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run")
    train_main(["--config", TINY, "--shards", str(shards), "--out", str(out), "max_steps=1", "batch_size=1",
                "val_samples=0", "loss_sync=0", "loss_emo=0", "loss_au=0", "loss_attr_action=0"])
    return out


def _frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def test_evaluate_a_checkpoint_on_a_shard_set(shards, run_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(run_dir), "--shards", str(shards), "--out", str(out), "--profile", "tiny",
            "--steps", "1", "--no-progress", "--settings", '{"va_window_s": 0.5}']
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "TINY CHECKPOINT" in result.output and "MEAN NOTHING" in result.output

    checkpoint = run_dir / "checkpoints" / "step-0000001"
    sha = file_sha256(checkpoint / "model.safetensors")
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    assert [row["clip_id"] for row in clips] == ["clip0", "clip1"]  # one row per clip
    for row in clips:
        assert all(value is not None for value in row.values()), row  # every column filled
        assert row["checkpoint"] == str(checkpoint.resolve()) and row["checkpoint_step"] == 1
        assert row["checkpoint_model_sha256"] == sha
        # the generated clip has the ground truth's frame count, as decoded from both files
        assert row["truth_frames"] == row["generated_frames"] == row["n_frames"] == FRAMES
        assert _frames(out / "generated" / f"{row['clip_id']}.mp4") == FRAMES
        assert _frames(out / "ground_truth" / f"{row['clip_id']}.mp4") == FRAMES
        # a 1-step tiny generator paints no face: the face metrics are empty, and the row says why
        assert row["face_fraction"] == 0 and "no face" in row["notes"]
        for _name, key, _arrow in TABLE_COLUMNS:
            if key not in ("efid", "au_f1"):
                assert math.isfinite(row[key]), (row["clip_id"], key, row[key], row["notes"])
    # the ground truth is the shard's own video stream (copied, not re-encoded) and its audio
    for clip in clip_dataset(shards, members=("mp4", "wav")):
        truth = out / "ground_truth" / f"{clip['clip_id']}.mp4"
        assert np.array_equal(read_frames(truth), clip["video"].permute(0, 2, 3, 1).numpy())
        audio = read_audio(truth)
        assert abs(len(audio) - FRAMES * 640) < 2048  # AAC pads by up to two 1024-sample frames

    summary = pq.read_table(out / "summary.parquet").to_pylist()[0]
    assert summary["clips"] == 2 and summary["checkpoint_model_sha256"] == sha
    assert json.loads(summary["generation"])["steps"] == 1 and "TINY CHECKPOINT" in summary["warnings"]
    table = (out / "table.md").read_text()
    assert table.startswith("> **TINY CHECKPOINT") and "What generated the clips" in table and sha in table
    provenance = json.loads((out / "evaluation.json").read_text())
    assert provenance["run"]["checkpoint_step"] == 1 and provenance["run"]["generation"]["seed"] == 0
    assert provenance["run"]["a2m_untrained"] == a2m_untrained(checkpoint, "ema") is True
    assert "UNTRAINED" in table  # a stage-2 run without init_a2m_from keeps a zero A2M output layer

    # a second run with --limit 1 reuses the generated clip (same checkpoint and settings) and evaluates 1 clip
    again = CliRunner().invoke(app, [*args, "--limit", "1"])
    assert again.exit_code == 0, again.output + repr(again.exception)
    [row] = pq.read_table(out / "clips.parquet").to_pylist()
    assert row["clip_id"] == "clip0" and row["generation_reused"] and row["generation_seconds"] == 0


def test_the_two_modes_are_not_mixed_and_a_bad_checkpoint_is_refused(shards, run_dir, tmp_path):
    mixed = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--generated", str(tmp_path),
                                     "--out", str(tmp_path / "o")])
    assert mixed.exit_code == 2 and "either --generated and --ground-truth" in mixed.output
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--shards", str(shards),
                                   "--out", str(tmp_path / "o"), "--profile", "tiny"])
    assert bad.exit_code == 2 and "not a training checkpoint" in bad.output
    # weights changed after the save: refused before anything is generated, naming both hashes
    changed = tmp_path / "changed"
    shutil.copytree(run_dir / "checkpoints" / "step-0000001", changed)
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (changed / "model.safetensors").write_bytes(bytes(weights))
    refused = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(changed), "--shards", str(shards),
                                       "--out", str(tmp_path / "o"), "--profile", "tiny"])
    assert refused.exit_code == 2 and "the weights changed after the checkpoint was saved" in refused.output
    assert not (tmp_path / "o").exists()
