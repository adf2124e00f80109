"""Tests of the HDTF annotation reader on the real published files and on small synthetic folders.

The real-file expectations are derived independently from the raw files where possible (clip lists, clips
without crop rows), so the tests check completeness rather than a memorised number.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocess.datasets.hdtf import (
    hdtf_candidates,
    main,
    parse_timestamp,
    read_hdtf_annotations,
    summarise_issues,
)
from preprocess.run.records import CropBox

REAL_DIR = Path(__file__).resolve().parents[1] / "data" / "hdtf_annotations"
SUBSETS = ("RD", "WDA", "WRA")


# --------------------------------------------------------------------------------------------- helpers


def _raw_rows(name: str) -> list[list[str]]:
    """Naive independent reading of a real file: strip a BOM, split lines, skip blank ones."""
    text = (REAL_DIR / name).read_text(encoding="utf-8-sig")
    return [line.split() for line in text.splitlines() if line.strip()]


def _raw_clip_ids() -> set[str]:
    return {f"{row[0].removesuffix('.mp4')}_{index}"
            for subset in SUBSETS for row in _raw_rows(f"{subset}_annotion_time.txt")
            for index in range(len(row) - 1)}


def _issues_of(issues, kind):
    return [issue for issue in issues if issue.kind == kind]


@pytest.fixture(scope="module")
def real():
    """Candidates of the real files with an empty videos folder, and their issues."""
    empty = REAL_DIR / "__no_videos_here__"
    assert not empty.exists()
    candidates, issues = hdtf_candidates(REAL_DIR, empty)
    return {c.candidate_id: c for c in candidates}, candidates, issues


def _write_subset(folder: Path, subset: str, files: dict[str, str]) -> Path:
    """Write ``<subset>_<suffix>`` files; keys are the suffix kinds, values the exact text."""
    suffixes = {"url": "video_url.txt", "resolution": "resolution.txt", "time": "annotion_time.txt",
                "crop_wh": "crop_wh.txt", "crop_ratio": "crop_ratio.txt"}
    folder.mkdir(parents=True, exist_ok=True)
    for kind, text in files.items():
        (folder / f"{subset}_{suffixes[kind]}").write_text(text, encoding="utf-8")
    return folder


def _minimal(**overrides: str) -> dict[str, str]:
    """A clean one-video subset (V: two clips at 720p) that each test perturbs."""
    files = {
        "url": "V https://example.invalid/v\n",
        "resolution": "V.mp4 720\n",
        "time": "V.mp4 00:10-00:20 00:30-00:40\n",
        "crop_wh": "V_0.mp4 100 300 10 300\nV_1.mp4 110 310 0 310\n",
        "crop_ratio": "V_0.mp4 1.2\nV_1.mp4 1.0\n",
    }
    files.update(overrides)
    return files


# --------------------------------------------------------------------------------------------- real files


def test_real_summary_is_printed(real, capsys):
    _, candidates, issues = real
    main([str(REAL_DIR)])
    out = capsys.readouterr().out
    assert f"candidates: {len(candidates)}" in out
    with capsys.disabled():
        print("\nHDTF real annotations:", summarise_issues(issues), f"candidates={len(candidates)}")


def test_real_bom_reported_and_first_line_parsed():
    annotations, issues = read_hdtf_annotations(REAL_DIR)
    boms = _issues_of(issues, "bom")
    assert [(i.file, i.line) for i in boms] == [("WDA_video_url.txt", 1)]
    first_name = _raw_rows("WDA_video_url.txt")[0][0]
    assert first_name == "CarolynMaloney2"
    assert annotations.urls[first_name] == "https://www.youtube.com/watch?v=RApGxN-O9Qc"
    assert "\ufeffCarolynMaloney2" not in annotations.urls


def test_real_trailing_spaces_reported_and_parsed(real):
    by_id, _, issues = real
    trailing = {(i.file, i.line, i.subject) for i in _issues_of(issues, "trailing_space")}
    assert ("WRA_annotion_time.txt", 3, "AdamKinzinger2") in trailing
    raw_lines = (REAL_DIR / "WRA_annotion_time.txt").read_text(encoding="utf-8").splitlines()
    expected = {n for n, line in enumerate(raw_lines, 1) if line != line.rstrip()}
    assert {line for file, line, _ in trailing if file == "WRA_annotion_time.txt"} == expected
    assert [f"AdamKinzinger2_{i}" in by_id for i in range(4)] == [True, True, True, False]
    assert by_id["AdamKinzinger2_2"].end_s == 230.0


def test_real_no_final_newline():
    _, issues = read_hdtf_annotations(REAL_DIR)
    expected = {p.name for p in REAL_DIR.glob("*.txt") if not p.read_bytes().endswith(b"\n")}
    assert {i.file for i in _issues_of(issues, "no_final_newline")} == expected
    assert "WDA_video_url.txt" in expected


def test_real_resolution_zero(real):
    by_id, _, issues = real
    zero = _issues_of(issues, "resolution_zero")
    assert [(i.file, i.subject) for i in zero] == [("WRA_resolution.txt", "KevinMcCarthy1")]
    clip = by_id["KevinMcCarthy1_0"]
    assert clip.annotated_height is None
    assert "resolution_zero" in clip.notes
    assert clip.annotated_box == CropBox(x=412, y=0, w=465, h=465)


def test_real_radio24_has_no_time_annotation(real):
    by_id, _, issues = real
    assert by_id["Radio24"].reject_reason == "no_time_annotation"
    assert not any(cid.startswith("Radio24_") for cid in by_id)
    assert [i.subject for i in _issues_of(issues, "no_time_annotation")] == ["Radio24"]
    assert not _issues_of(issues, "url_without_time")  # recorded once, as no_time_annotation


def test_real_crop_box_missing_matches_raw_files(real):
    by_id, _, issues = real
    with_box = {row[0].removesuffix(".mp4") for s in SUBSETS for row in _raw_rows(f"{s}_crop_wh.txt")}
    with_ratio = {row[0].removesuffix(".mp4") for s in SUBSETS for row in _raw_rows(f"{s}_crop_ratio.txt")}
    clips = _raw_clip_ids()
    missing_box, missing_ratio = clips - with_box, clips - with_ratio
    assert missing_box  # the README says about 15
    assert {i.subject for i in _issues_of(issues, "crop_box_missing")} == missing_box
    assert len(_issues_of(issues, "crop_box_missing")) == len(missing_box)
    assert {i.subject for i in _issues_of(issues, "crop_ratio_missing")} == missing_ratio
    for clip_id in missing_box:
        assert by_id[clip_id].annotated_box is None
        assert "crop_box_missing" in by_id[clip_id].notes
    assert not _issues_of(issues, "crop_without_clip")


def test_real_row_count_mismatch(real):
    _, _, issues = real
    mismatches = _issues_of(issues, "row_count_mismatch")
    assert "WRA" in {i.subject for i in mismatches}
    wra = [i for i in mismatches if i.subject == "WRA"]
    assert any("168 rows in WRA_crop_wh.txt for 175 clips" in i.detail for i in wra)
    rd = [i for i in mismatches if i.file == "RD_annotion_time.txt"]
    assert len(rd) == 1 and "56 rows in RD_annotion_time.txt" in rd[0].detail


def test_real_crop_box_outside_frame(real):
    by_id, _, issues = real
    outside = {i.subject for i in _issues_of(issues, "crop_box_outside_frame")}
    assert "PeterKing_0" in outside  # 178 + 872 > 1280 at 720p
    for clip_id in outside:
        assert "crop_box_outside_frame" in by_id[clip_id].notes
        assert by_id[clip_id].annotated_box is not None


def test_real_radio11_clips(real):
    by_id, _, _ = real
    assert sorted(cid for cid in by_id if cid.startswith("Radio11_")) == ["Radio11_0", "Radio11_1"]
    first, second = by_id["Radio11_0"], by_id["Radio11_1"]
    assert (first.start_s, first.end_s) == (30.0, 60.0)
    assert (second.start_s, second.end_s) == (90.0, 150.0)
    assert first.annotated_box == CropBox(x=412, y=0, w=599, h=599)  # file order: x w y h
    assert first.annotated_height == 720 and first.crop_ratio == 1.2
    assert first.dataset == "hdtf" and first.source.endswith("Radio11.mp4")


def test_real_clip_list_is_complete_and_sorted(real):
    by_id, candidates, _ = real
    names_without_time = ({row[0] for s in SUBSETS for row in _raw_rows(f"{s}_video_url.txt")}
                          - {row[0].removesuffix(".mp4") for s in SUBSETS
                             for row in _raw_rows(f"{s}_annotion_time.txt")})
    assert set(by_id) == _raw_clip_ids() | names_without_time
    assert len(by_id) == len(candidates)
    ids = [c.candidate_id for c in candidates]
    assert ids == sorted(ids)


def test_real_empty_videos_dir_means_missing_source(real):
    _, candidates, _ = real
    reasons = {c.candidate_id: c.reject_reason for c in candidates}
    assert {cid for cid, reason in reasons.items() if reason != "missing_source"} == {"Radio24"}


def test_real_placeholder_source_is_accepted(tmp_path):
    (tmp_path / "Radio11.mp4").write_bytes(b"")
    candidates, _ = hdtf_candidates(REAL_DIR, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    for clip_id in ("Radio11_0", "Radio11_1"):
        assert by_id[clip_id].reject_reason is None
        assert by_id[clip_id].source == str(tmp_path / "Radio11.mp4")
    assert by_id["Radio10_0"].reject_reason == "missing_source"


# --------------------------------------------------------------------------------------------- synthetic


def test_clean_subset_has_no_issues(tmp_path):
    folder = _write_subset(tmp_path / "ann", "S", _minimal())
    (tmp_path / "V.mp4").write_bytes(b"")
    candidates, issues = hdtf_candidates(folder, tmp_path)
    assert issues == []
    assert [(c.candidate_id, c.start_s, c.end_s, c.notes, c.reject_reason) for c in candidates] == [
        ("V_0", 10.0, 20.0, (), None), ("V_1", 30.0, 40.0, (), None)]
    assert candidates[0].annotated_box == CropBox(x=100, y=10, w=300, h=300)


def test_bad_time_range(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(time="V.mp4 00:30-00:10 00:30-00:40\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    assert by_id["V_0"].reject_reason == "bad_time_range"
    assert (by_id["V_0"].start_s, by_id["V_0"].end_s) == (30.0, 10.0)
    assert by_id["V_1"].reject_reason == "missing_source"
    assert [(i.kind, i.subject, i.line) for i in _issues_of(issues, "bad_time_range")] == [
        ("bad_time_range", "V_0", 1)]


def test_malformed_lines(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(
        url="V https://example.invalid/v\nW https://example.invalid/w\n",
        resolution="V.mp4 720p\nW.mp4 720\n",
        time="V.mp4 00:10-00:20 00:30-00:40\nW.mp4 00:10-later\n",
        crop_wh="V_0.mp4 100 300 10\nV_1.mp4 110 310 0 310\nW_0.mp4 1 2 3 4\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    malformed = {(i.file, i.line, i.subject) for i in _issues_of(issues, "malformed_line")}
    assert malformed == {("S_resolution.txt", 1, "V"), ("S_annotion_time.txt", 2, "W"),
                         ("S_crop_wh.txt", 1, "V_0")}
    # The time line of W cannot be split into clips: one rejected candidate for the whole video.
    assert by_id["W"].reject_reason == "malformed_line"
    assert not any(cid.startswith("W_") for cid in by_id)
    assert [i.subject for i in _issues_of(issues, "crop_without_clip")] == ["W_0"]
    # V's unparsable height and box leave its clips usable but flagged.
    assert by_id["V_0"].annotated_height is None and "resolution_missing" in by_id["V_0"].notes
    assert by_id["V_0"].annotated_box is None and "crop_box_missing" in by_id["V_0"].notes
    assert by_id["V_1"].annotated_box == CropBox(x=110, y=0, w=310, h=310)
    assert [i.line for i in _issues_of(issues, "crop_box_missing")] == [1]


def test_duplicate_rows_first_wins(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(
        time="V.mp4 00:10-00:20 00:30-00:40\nV.mp4 00:00-00:05\n",
        crop_ratio="V_0.mp4 1.2\nV_1.mp4 1.0\nV_0.mp4 0.9\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    assert sorted(by_id) == ["V_0", "V_1"]
    assert by_id["V_0"].start_s == 10.0 and by_id["V_0"].crop_ratio == 1.2
    assert "duplicate_row" in by_id["V_0"].notes
    dups = {(i.file, i.line, i.subject) for i in _issues_of(issues, "duplicate_row")}
    assert dups == {("S_annotion_time.txt", 2, "V"), ("S_crop_ratio.txt", 3, "V_0")}


def test_crop_without_clip(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(
        crop_wh="V_0.mp4 100 300 10 300\nV_1.mp4 110 310 0 310\nV_5.mp4 1 2 3 4\nGhost_0.mp4 1 2 3 4\n",
        crop_ratio="V_0.mp4 1.2\nV_1.mp4 1.0\nV_5.mp4 1.0\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    assert sorted(c.candidate_id for c in candidates) == ["V_0", "V_1"]
    without = sorted((i.file, i.subject) for i in _issues_of(issues, "crop_without_clip"))
    assert without == [("S_crop_ratio.txt", "V_5"), ("S_crop_wh.txt", "Ghost_0"), ("S_crop_wh.txt", "V_5")]
    mismatch = {i.file: i.detail for i in _issues_of(issues, "row_count_mismatch")}
    assert mismatch == {"S_crop_wh.txt": "4 rows in S_crop_wh.txt for 2 clips in S_annotion_time.txt",
                        "S_crop_ratio.txt": "3 rows in S_crop_ratio.txt for 2 clips in S_annotion_time.txt"}


def test_hh_mm_ss_times(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(time="V.mp4 01:02:03-01:02:30 00:59:59.5-1:00:10\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    assert [(c.start_s, c.end_s) for c in candidates] == [(3723.0, 3750.0), (3599.5, 3610.0)]
    assert not _issues_of(issues, "malformed_line")


def test_parse_timestamp():
    assert parse_timestamp("00:30") == 30.0
    assert parse_timestamp("12:05") == 725.0
    assert parse_timestamp("1:00:00") == 3600.0
    for bad in ("00:60", "1:60:00", "abc", "10", "-1:00", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_crop_box_outside_frame_and_invalid(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(
        crop_wh="V_0.mp4 1000 400 0 400\nV_1.mp4 10 0 0 310\n"))
    candidates, issues = hdtf_candidates(folder, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    assert [i.subject for i in _issues_of(issues, "crop_box_outside_frame")] == ["V_0"]  # 1400 > 1280
    assert "crop_box_outside_frame" in by_id["V_0"].notes
    assert by_id["V_0"].annotated_box == CropBox(x=1000, y=0, w=400, h=400)
    assert [i.subject for i in _issues_of(issues, "crop_box_invalid")] == ["V_1"]
    assert "crop_box_invalid" in by_id["V_1"].notes


def test_lexical_traps(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(
        url="\ufeffV https://example.invalid/v\n\n",
        time="V.mp4 00:10-00:20 00:30-00:40  \r\n",
        crop_ratio="V_0.mp4 1.2\nV_1.mp4 1.0"))
    annotations, issues = read_hdtf_annotations(folder)
    kinds = {(i.kind, i.file, i.line) for i in issues}
    assert kinds == {("bom", "S_video_url.txt", 1), ("blank_line", "S_video_url.txt", 2),
                     ("crlf", "S_annotion_time.txt", 1), ("trailing_space", "S_annotion_time.txt", 1),
                     ("no_final_newline", "S_crop_ratio.txt", 2)}
    assert annotations.urls == {"V": "https://example.invalid/v"}
    assert [clip.crop_ratio for clip in annotations.clips] == [1.2, 1.0]
    assert all(clip.notes == () for clip in annotations.clips)


def test_cross_file_gaps(tmp_path):
    """Names missing from one file, a missing resolution, a missing whole file, a video without times."""
    files = _minimal(
        url="V https://example.invalid/v\nOnlyUrl https://example.invalid/o\n",
        resolution="OnlyRes.mp4 720\n",
        time="V.mp4 00:10-00:20 00:30-00:40\nNoUrl.mp4 00:00-00:05\n",
        crop_wh="V_0.mp4 100 300 10 300\nV_1.mp4 110 310 0 310\nNoUrl_0.mp4 1 2 3 4\n")
    del files["crop_ratio"]
    folder = _write_subset(tmp_path, "S", files)
    candidates, issues = hdtf_candidates(folder, tmp_path)
    by_id = {c.candidate_id: c for c in candidates}
    assert sorted(by_id) == ["NoUrl_0", "OnlyRes", "OnlyUrl", "V_0", "V_1"]
    assert by_id["OnlyRes"].reject_reason == by_id["OnlyUrl"].reject_reason == "no_time_annotation"
    assert sorted(i.subject for i in _issues_of(issues, "no_time_annotation")) == ["OnlyRes", "OnlyUrl"]
    assert [i.subject for i in _issues_of(issues, "not_in_url_list")] == ["NoUrl"]
    assert "not_in_url_list" in by_id["NoUrl_0"].notes
    assert sorted(i.subject for i in _issues_of(issues, "resolution_missing")) == ["NoUrl", "V"]
    assert by_id["V_0"].annotated_height is None and "resolution_missing" in by_id["V_0"].notes
    assert [(i.file, i.line) for i in _issues_of(issues, "file_missing")] == [("S_crop_ratio.txt", 0)]
    # The ratio file is missing as a whole: one file-level issue, a note per clip, no per-clip issues.
    assert not _issues_of(issues, "crop_ratio_missing")
    assert all("crop_ratio_missing" in by_id[cid].notes for cid in ("V_0", "V_1", "NoUrl_0"))
    mismatch = [i for i in _issues_of(issues, "row_count_mismatch") if i.file == "S_annotion_time.txt"]
    assert mismatch[0].detail == ("2 rows in S_video_url.txt, 1 rows in S_resolution.txt, "
                                  "2 rows in S_annotion_time.txt")


def test_same_video_in_two_subsets(tmp_path):
    _write_subset(tmp_path, "A", _minimal())
    _write_subset(tmp_path, "B", _minimal(time="V.mp4 00:00-00:05\n", crop_wh="V_0.mp4 1 2 3 4\n",
                                           crop_ratio="V_0.mp4 1.0\n"))
    candidates, issues = hdtf_candidates(tmp_path, tmp_path)
    assert [(c.candidate_id, c.start_s) for c in candidates] == [("V_0", 10.0), ("V_1", 30.0)]
    assert [(i.file, i.subject) for i in _issues_of(issues, "duplicate_row")] == [
        ("B_annotion_time.txt", "V")]


def test_missing_annotation_dir(tmp_path):
    candidates, issues = hdtf_candidates(tmp_path / "absent", tmp_path)
    assert candidates == []
    assert [i.kind for i in issues] == ["file_missing"]


def test_summarise_issues(tmp_path):
    folder = _write_subset(tmp_path, "S", _minimal(time="V.mp4 00:10-00:20 00:30-00:40 \n"))
    _, issues = read_hdtf_annotations(folder)
    assert summarise_issues(issues) == {"trailing_space": 1}
    assert summarise_issues([]) == {}


def test_a_video_downloaded_in_another_container_is_found(tmp_path):
    folder = _write_subset(tmp_path / "ann", "S", _minimal())
    (tmp_path / "V.webm").write_bytes(b"")  # what yt-dlp writes for YouTube's VP9 + Opus
    candidates, _ = hdtf_candidates(folder, tmp_path)
    assert [(c.source, c.reject_reason) for c in candidates] == [(str(tmp_path / "V.webm"), None)] * 2
    (tmp_path / "V.mp4").write_bytes(b"")
    assert {c.source for c in hdtf_candidates(folder, tmp_path)[0]} == {str(tmp_path / "V.mp4")}  # mp4 first
