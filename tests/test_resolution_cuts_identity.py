"""Issue 22: the resolution gate (``low_resolution``, ``upscale_factor``), HDTF windows split at shot cuts, and a
record-only identity-change filter by default.

Real clips throughout (``../shared/datasets/real_talking``: one real speaker each, one shot), made into the cases
with ffmpeg: a 160x160 copy of speaker_2 (a face crop of ~116 source pixels, 4.4x to 512) and a hard cut from
speaker_1 to speaker_2 (both scaled to 700x700, 6.1 s + 5.0 s), run through the whole flow (``profile="tiny"``)
as the folder dataset and as HDTF (annotation files written in HDTF's real layout, ``data/hdtf_annotations``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.preprocess import preprocess
from preprocess.run.settings import load_settings
from preprocess.video.filters import PieceStats, judge_piece
from preprocess.video.standardise import low_resolution_rejection, upscale_factor
from shards.tables import CLIPS_SCHEMA, CLIPS_TABLE, TABLES_DIR

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "real_talking"
if not REAL.is_dir():  # a git worktree beside the checkout: the shared folder of the main checkout
    REAL = Path("/work/shared/datasets/real_talking")
SPEAKER_1, SPEAKER_2 = REAL / "speaker_1.mp4", REAL / "speaker_2.mp4"
# speaker_1 is 6.131 s at 30 fps: the cut lands at 25 fps frame 153 (6.12 s) of the concatenation
CUT_S = 6.12

pytestmark = pytest.mark.skipif(not SPEAKER_2.is_file(), reason="the real talking clips are not beside the checkout")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


def make_hard_cut(path: Path) -> Path:
    """speaker_1 then speaker_2, both scaled to 700x700 at 25 fps, 44.1 kHz stereo: one hard cut to another person."""
    _ffmpeg("-i", str(SPEAKER_1), "-i", str(SPEAKER_2), "-filter_complex",
            "[0:v]scale=700:700,setsar=1,fps=25[v0];[1:v]scale=700:700,setsar=1,fps=25[v1];"
            "[0:a]aresample=44100,aformat=channel_layouts=stereo[a0];"
            "[1:a]aresample=44100,aformat=channel_layouts=stereo[a1];"
            "[v0][a0][v1][a1]concat=n=2:v=1:a=1[v][a]",
            "-map", "[v]", "-map", "[a]", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18",
            "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


def _clips(out: Path) -> dict[str, dict]:
    return {row["clip_id"]: row for row in pq.read_table(out / TABLES_DIR / CLIPS_TABLE).to_pylist()}


# ---------------------------------------------------------------- units


def test_the_gate_is_half_the_output_size_by_default_and_the_factor_is_size_over_the_side():
    default = load_settings("default")
    assert default.filters.min_source_crop_fraction == 0.5 and default.standardise.size == 512
    rejection = low_resolution_rejection(200, default)
    assert rejection.reason == "low_resolution" and rejection.stage == "standardise"
    assert "200 px" in rejection.detail and "256 px" in rejection.detail and "2.56x" in rejection.detail
    assert low_resolution_rejection(256, default) is None and low_resolution_rejection(700, default) is None
    assert low_resolution_rejection(10, load_settings("default", {"filters": {"min_source_crop_fraction": None}})) \
        is None
    assert upscale_factor(256.9, 512) == 2.0 and upscale_factor(616.0, 512) == round(512 / 616, 4)
    assert "upscale_factor" in CLIPS_SCHEMA.names


def _stats(identity_change: float | None) -> PieceStats:
    return PieceStats(duration_s=5.0, face_frames_fraction=1.0, yaw_mean=0.0, yaw_abs_p95=5.0, pitch_mean=0.0,
                      roll_mean=0.0, side_profile_fraction=0.0, multi_face_fraction=0.0, max_faces=1,
                      face_px_median=200.0, identity_change=identity_change)


def test_identity_change_is_recorded_only_unless_rejection_is_turned_on():
    default = load_settings("default").filters
    assert default.reject_identity_change is False and default.max_identity_change == 0.08
    assert judge_piece(_stats(0.3), default) is None
    strict = load_settings("default", {"filters": {"reject_identity_change": True}}).filters
    rejection = judge_piece(_stats(0.3), strict)
    assert rejection.reason == "identity_change" and "0.300 > 0.08" in rejection.detail
    assert judge_piece(_stats(0.05), strict) is None


# ---------------------------------------------------------------- through the flow


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    _ffmpeg("-i", str(SPEAKER_2), "-vf", "scale=160:160", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "copy",
            str(raw / "small_160.mp4"))
    (raw / "full_size.mp4").symlink_to(SPEAKER_2)
    make_hard_cut(raw / "hard_cut.mp4")
    out = tmp_path_factory.mktemp("out")
    preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    return raw, _clips(out)


def test_a_160px_video_is_rejected_low_resolution_and_a_full_size_one_kept_with_its_upscale_factor(folder_run):
    _, clips = folder_run
    small, full = clips["small_160"], clips["full_size"]
    assert (small["status"], small["reason"], small["reject_stage"]) == ("rejected", "low_resolution", "standardise")
    assert small["upscale_factor"] > 4 and small["crop_size"] < 128, small
    assert small["standardise_s"] is None  # decided before the encode
    assert full["status"] == "kept", full
    assert full["upscale_factor"] == upscale_factor(full["crop_size"], 512) and 0.5 < full["upscale_factor"] < 1.0
    # every row carries the factor once a crop is chosen
    assert all(row["upscale_factor"] is not None for row in clips.values())


def _assert_split_at_the_cut(rows: list[dict], start_s: float = 0.0) -> None:
    assert [row["piece_index"] for row in rows] == [0, 1]
    assert all(row["n_shot_cuts"] == 1 for row in rows)
    assert [row["shot_index"] for row in rows] == [0, 1]
    first, second = rows
    # the cut is at CUT_S in the source (an HDTF window starting at start_s holds it too); no piece spans it
    assert first["source_start_s"] == start_s
    assert first["source_end_s"] == pytest.approx(CUT_S, abs=0.05) == second["source_start_s"]
    assert all(row["status"] == "kept" and row["identity_change"] < 0.08 for row in rows), rows


def test_a_hard_cut_to_another_person_gives_two_pieces_in_the_folder_dataset(folder_run):
    _, clips = folder_run
    _assert_split_at_the_cut([clips["hard_cut_p0"], clips["hard_cut_p1"]])
    assert clips["full_size"]["n_shot_cuts"] == 0 and clips["full_size"]["shot_index"] == 0


def test_hdtf_windows_are_split_at_shot_cuts_and_every_row_counts_its_cuts(folder_run, tmp_path):
    raw_folder, _ = folder_run
    raw = tmp_path / "hdtf_raw"
    raw.mkdir()
    shutil.copyfile(raw_folder / "hard_cut.mp4", raw / "Cut0.mp4")  # HDTF refuses links leaving raw_dir
    # HDTF's layout (data/hdtf_annotations): a window around the cut, and a box at the 700 px annotated resolution
    (raw / "WRA_video_url.txt").write_text("Cut0 https://www.youtube.com/watch?v=sample22cut\n")
    (raw / "WRA_resolution.txt").write_text("Cut0.mp4 700\n")
    (raw / "WRA_annotion_time.txt").write_text("Cut0.mp4 00:01-00:11\n")
    (raw / "WRA_crop_wh.txt").write_text("Cut0_0.mp4 500 500 100 100\n")
    (raw / "WRA_crop_ratio.txt").write_text("Cut0_0.mp4 1.0\n")
    out = tmp_path / "out"
    preprocess(dataset="hdtf", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    clips = _clips(out)
    pieces = sorted((row for row in clips.values() if row["candidate_id"].startswith("Cut0")),
                    key=lambda row: row["piece_index"])
    _assert_split_at_the_cut(pieces, start_s=1.0)
    assert all(row["n_shot_cuts"] is not None for row in clips.values() if row["piece_index"] is not None)


def test_identity_change_is_recorded_not_rejected_by_default_and_rejected_when_asked(folder_run, tmp_path):
    raw_folder, _ = folder_run
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "two_people.mp4").symlink_to(raw_folder / "hard_cut.mp4")
    # one piece over both people (not split at the cut): only identity can tell. Measured here: two real people
    # 0.05, one of them 0.017-0.024, so the generated clips' 0.08 would miss them; a threshold calibrated between
    # the two, as docs/pipeline.md describes, is what a user would set
    calibrated = {"shots": {"datasets": []}, "max_identity_change": 0.035}
    out = tmp_path / "default"
    preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
               overrides={"filters": calibrated})
    (row,) = _clips(out).values()
    assert row["status"] == "kept" and row["identity_change"] > 0.035, row
    assert row["n_shot_cuts"] == 1 and row["shot_index"] is None
    strict = {"filters": {**calibrated, "reject_identity_change": True}}
    out = tmp_path / "strict"
    preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny", overrides=strict)
    (row,) = _clips(out).values()
    assert (row["status"], row["reason"]) == ("rejected", "identity_change"), row
