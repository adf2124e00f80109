"""The `synchrorama` command line: run, inspect, report, validate, sample-data, summary, train."""

from __future__ import annotations

import re
import tarfile

import pytest
from typer.testing import CliRunner

from synchrorama.cli import app
from synchrorama.sample_data import make_talking_video

runner = CliRunner()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "host.mp4", layout="single", seconds=4.0)
    make_talking_video(raw / "tiny.mp4", layout="single", seconds=1.0, variant=1)
    out = tmp_path_factory.mktemp("out")
    result = runner.invoke(app, ["run", "--dataset", "folder", "--raw-dir", str(raw), "--out-dir", str(out),
                                 "--profile", "tiny"])
    assert result.exit_code == 0, result.output
    return out


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "serve", "inspect", "report", "validate", "sample-data", "summary", "download-hdtf",
                    "train", "build-tiny-models"):
        assert command in result.output


def test_inspect_prints_counts_reasons_and_durations(small_run):
    result = runner.invoke(app, ["inspect", str(small_run)])
    assert result.exit_code == 0, result.output
    assert re.search(r"kept\s*│\s*1\s*│\s*4\.0", result.output)
    assert "too_short" in result.output and "stage seconds" in result.output


def test_inspect_shows_disk_use_per_member_folder_and_kept_second(small_run):
    from synchrorama.inspect_tables import inspect_run

    rows = {row[0]: row for row in inspect_run(small_run)["disk_use"]}
    shard_bytes = sum(path.stat().st_size for path in (small_run / "shards").iterdir())
    assert rows["shards/"][2] == round(shard_bytes / 1e6, 2)
    # the one kept clip lasts 4.0 s: per-second figures are the member's bytes over 4
    with tarfile.open(small_run / "shards" / "shard-000000.tar") as tar:
        mp4_bytes = sum(info.size for info in tar if info.name.endswith(".mp4"))
    assert rows["shards: .mp4"][1] == 1 and rows["shards: .mp4"][3] == round(mp4_bytes / 4.0)
    assert {"shards: .wav2vec.npy", "tables/", "work/standardise/", "work/pieces/", "total"} <= set(rows)
    assert rows["total"][2] >= rows["shards/"][2] + rows["work/standardise/"][2]
    assert "disk use" in runner.invoke(app, ["inspect", str(small_run)]).output


def test_report_writes_html_with_plots(small_run):
    result = runner.invoke(app, ["report", str(small_run)])
    assert result.exit_code == 0, result.output
    page = (small_run / "report.html").read_text()
    # 5 figures, 2 of the sync check (av_confidence, av_offset_frames), 3 of the picture quality (sharpness,
    # identity_change, upscale_factor): the kept clip has all of these measured
    assert page.count("data:image/png;base64,") == 10
    for title in ("Head yaw", "Kept clip durations", "Reject reasons", "Time per stage",
                  "Action units over all kept frames", "Sharpness", "Identity change", "Upscale factor"):
        assert title in page
    # the AU summary (100 frames of the one kept clip) and the sample of descriptions with the prompt
    assert "100 frames of 1 clips" in page and "geometric-facemesh-v1" in page
    assert "<h2>descriptions</h2><p>1 clips described" in page and "wearing earrings" in page
    assert "MEAN NOTHING" in page


def test_validate_passes_then_catches_a_corrupted_shard(small_run, tmp_path):
    assert runner.invoke(app, ["validate", str(small_run)]).exit_code == 0
    shard = next((small_run / "shards").glob("shard-*.tar"))
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["validate", str(small_run)])
    assert result.exit_code == 1 and "sha256" in result.output


def test_summary_prints_component_counts():
    result = runner.invoke(app, ["summary", "--size", "tiny"])
    assert result.exit_code == 0 and "ReferenceNet" in result.output


def test_train_help_lists_every_setting():
    from dataclasses import fields

    from model.training.train_config import TrainConfig

    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    assert "usage: synchrorama train" in result.output
    for field in fields(TrainConfig):
        assert f"--{field.name}" in result.output
