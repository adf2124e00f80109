"""Bad names never stop a run (issue 12, part 4): every one becomes a row with a reason.

Faults, each reproduced against the code before this work (there, each one failed the whole run or vanished):
- ``X_p0.mp4`` next to an ``X.mp4`` long enough to be split: the piece ``X_p0`` and the candidate ``X_p0`` clashed
  and the shard writer raised at the very end;
- an HDTF name with a ``.`` (a dot splits a WebDataset key: the shard writer raised at the end);
- an HDTF name with ``../`` (its video was read from outside raw_dir);
- a non-UTF-8 file name (a str with surrogate escapes, refused by Prefect's JSON parameters);
- a dangling link, a symlink loop and a directory named ``x.mp4`` vanished without a row.

The discovery rules are unit-tested on their own (cheap); two real flow runs (profile "tiny", one per dataset
kind, module-scoped) show that the run completes and that each bad name has its row in the real tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocess.datasets.discover import discover_candidates, folder_candidates, settle_candidates
from preprocess.datasets.hdtf import hdtf_candidates
from preprocess.run.records import Candidate
from shards.validate import validate_shards
from synchrorama.sample_data import make_talking_video

BAD_BYTES_NAME = os.fsdecode(b"caf\xe9-latin1.mp4")  # Latin-1 bytes: not UTF-8, Python holds them as surrogates
OUTSIDE_NAME = "outside_secret"


def _json_and_parquet_safe(candidates: list[Candidate]) -> None:
    """What the flow does with candidates: JSON parameters (strict UTF-8) and parquet string columns."""
    rows = [dataclasses.asdict(candidate) for candidate in candidates]
    json.dumps(rows, ensure_ascii=False).encode("utf-8")
    pa.table({"source": [row["source"] for row in rows], "id": [row["candidate_id"] for row in rows]})


def _make_bad_folder(raw: Path) -> None:
    """The non-video bad entries of a folder dataset (files here are tiny: discovery never decodes them)."""
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "dangling.mp4").symlink_to(raw / "nowhere.mp4")
    (raw / "loop.mp4").symlink_to(raw / "loop.mp4")
    (raw / "dir.mp4").mkdir()


def _by_id(candidates: list[Candidate]) -> dict[str, Candidate]:
    return {candidate.candidate_id: candidate for candidate in candidates}


# --------------------------------------------------------------------------------------------- id rules


def _candidate(clip_id: str, source: str | None = None) -> Candidate:
    return Candidate(candidate_id=clip_id, source=source or f"/raw/{clip_id}.mp4", dataset="folder")


def test_a_candidate_named_like_another_candidates_piece_is_renamed():
    settled = settle_candidates([_candidate("X_p0"), _candidate("X"), _candidate("Y")])
    assert [c.candidate_id for c in settled] == ["X", "X_p0_mp4", "Y"]
    assert settled[1].source == "/raw/X_p0.mp4" and settled[1].notes == ("renamed_from:X_p0",)
    assert settled[0].notes == () and settled[2].notes == ()


def test_settled_ids_are_valid_unique_piece_free_deterministic_and_stable():
    names = ["X", "X_p0", "X_p0_mp4", "X_p0_p3", "A.B_0", "A_B_0", "A B_0", "", "a/../b", "X_p12"]
    candidates = [_candidate(name, f"/raw/{index}.mp4") for index, name in enumerate(names)]
    settled = settle_candidates(candidates)
    ids = [c.candidate_id for c in settled]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == len(names)
    assert all(c.candidate_id and set(c.candidate_id) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for c in settled)
    for clip_id in ids:  # no id is a piece id of another
        assert not any(clip_id.startswith(f"{other}_p") and clip_id[len(other) + 2:].isdigit() for other in ids)
    by_source = {c.source: c.candidate_id for c in settled}
    assert by_source["/raw/0.mp4"] == "X"
    assert by_source["/raw/2.mp4"] == "X_p0_mp4"  # a clean id that clashes with nothing keeps it
    assert by_source["/raw/5.mp4"] == "A_B_0"  # the clean one wins over "A.B_0" and "A B_0"
    assert settle_candidates(list(reversed(candidates))) == settled  # input order does not matter
    assert settle_candidates(settled) == settled  # idempotent
    renamed = [c for c in settled if c.notes]
    assert all(c.notes[-1].startswith("renamed_from:") for c in renamed) and len(renamed) == 6


# --------------------------------------------------------------------------------------------- folder entries


def test_every_bad_video_entry_of_a_folder_gets_a_row_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    _make_bad_folder(raw)
    (raw / "good.mp4").write_bytes(b"not decoded at discovery")
    (raw / BAD_BYTES_NAME).write_bytes(b"x")
    (raw / "a.mp4").symlink_to(raw / "b.mp4")  # a loop through two links
    (raw / "b.mp4").symlink_to(raw / "a.mp4")
    os.mkfifo(raw / "pipe.mp4")  # must never be opened: a reader would block
    (raw / "notes.txt").write_text("not a video")
    candidates = folder_candidates(raw)
    reasons = {c.candidate_id: c.reject_reason for c in candidates}
    assert reasons == {"a": "symlink_loop", "b": "symlink_loop", "caf_-latin1": "bad_name",
                       "dangling": "broken_link", "dir": "not_a_file", "good": None, "loop": "symlink_loop",
                       "pipe": "not_a_file"}
    bad = _by_id(candidates)["caf_-latin1"]
    assert bad.source == str(raw / "caf\\xe9-latin1.mp4")
    assert "not valid UTF-8" in bad.reject_detail and "rename it to UTF-8" in bad.reject_detail
    assert "directory" in _by_id(candidates)["dir"].reject_detail
    assert "named pipe" in _by_id(candidates)["pipe"].reject_detail
    _json_and_parquet_safe(candidates)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open a file without read permission")
def test_an_unreadable_video_gets_a_row(tmp_path):
    (tmp_path / "locked.mp4").write_bytes(b"x")
    (tmp_path / "locked.mp4").chmod(0)
    assert folder_candidates(tmp_path)[0].reject_reason == "unreadable"


# --------------------------------------------------------------------------------------------- HDTF names


def _write_hdtf(raw: Path, names: list[str], seconds: int = 4) -> None:
    """A WDA subset annotating one clip [0, seconds) of each name (crop box at 720p)."""
    raw.mkdir(parents=True, exist_ok=True)
    files = {
        "video_url": "".join(f"{n} https://www.youtube.com/watch?v=x{i}\n" for i, n in enumerate(names)),
        "resolution": "".join(f"{n}.mp4 720\n" for n in names),
        "annotion_time": "".join(f"{n}.mp4 00:00-00:0{seconds}\n" for n in names),
        "crop_wh": "".join(f"{n}_0.mp4 440 400 40 400\n" for n in names),
        "crop_ratio": "".join(f"{n}_0.mp4 1.0\n" for n in names),
    }
    for suffix, text in files.items():
        (raw / f"WDA_{suffix}.txt").write_text(text, encoding="utf-8")


class _OpenRecorder:
    """Records every path opened in this process that names ``OUTSIDE_NAME`` (an audit hook cannot be removed,
    so it only records while ``active``)."""

    def __init__(self):
        self.active, self.opened = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and OUTSIDE_NAME in str(args[0]):
            self.opened.append(str(args[0]))


@pytest.fixture(scope="module")
def open_recorder():
    return _OpenRecorder()


def test_hdtf_bad_names_are_rows_and_issues_and_nothing_outside_is_opened(tmp_path, open_recorder):
    raw = tmp_path / "raw"
    names = ["Jane.Doe", f"../{OUTSIDE_NAME}", "Tab\x01Name", "Linked", "Dangling", "Folder", "Webm"]
    _write_hdtf(raw, names)
    (tmp_path / f"{OUTSIDE_NAME}.mp4").write_bytes(b"outside raw_dir")
    (raw / "Jane.Doe.mp4").write_bytes(b"x")
    (raw / "Linked.mp4").symlink_to(tmp_path / f"{OUTSIDE_NAME}.mp4")
    (raw / "Dangling.mp4").symlink_to(raw / "gone.mp4")
    (raw / "Folder.mp4").mkdir()
    (raw / "Webm.mp4").mkdir()  # a directory in the way, but the download is there as .webm
    (raw / "Webm.webm").write_bytes(b"x")
    open_recorder.active = True
    try:
        candidates, issues = discover_candidates("hdtf", raw)
    finally:
        open_recorder.active = False
    assert open_recorder.opened == []
    reasons = {c.candidate_id: c.reject_reason for c in candidates}
    assert reasons == {"Jane_Doe_0": None, f"___{OUTSIDE_NAME}_0": "unsafe_path", "Tab_Name_0": "bad_name",
                       "Linked_0": "link_outside_raw_dir", "Dangling_0": "broken_link", "Folder_0": "not_a_file",
                       "Webm_0": None}
    by_id = _by_id(candidates)
    assert by_id["Jane_Doe_0"].notes[-1] == "renamed_from:Jane.Doe_0"
    assert by_id["Jane_Doe_0"].source == str(raw / "Jane.Doe.mp4")
    assert by_id["Webm_0"].source == str(raw / "Webm.webm")
    assert "outside raw_dir" in by_id["Linked_0"].reject_detail
    assert "annotation files" in by_id[f"___{OUTSIDE_NAME}_0"].reject_detail
    kinds = {(issue.subject, issue.kind) for issue in issues}
    assert {("Jane.Doe", "id_renamed"), (f"../{OUTSIDE_NAME}", "unsafe_path"),
            ("Tab\x01Name", "bad_name")} <= kinds
    line_of = {issue.subject: (issue.file, issue.line) for issue in issues if issue.kind == "unsafe_path"}
    assert line_of[f"../{OUTSIDE_NAME}"] == ("WDA_annotion_time.txt", 2)
    _json_and_parquet_safe(candidates)


def test_hdtf_candidates_alone_keep_annotated_ids(tmp_path):
    """``hdtf_candidates`` keeps the annotation's names; ``discover_candidates`` settles them."""
    _write_hdtf(tmp_path, ["Jane.Doe"])
    candidates, _ = hdtf_candidates(tmp_path, tmp_path)
    assert [(c.candidate_id, c.reject_reason) for c in candidates] == [("Jane.Doe_0", "missing_source")]


# --------------------------------------------------------------------------------------------- real flow runs


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "tables" / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One real preprocess run over a folder holding every folder-side bad name; X.mp4 (8 s) is split in two
    pieces (max_clip_s 4), so its piece X_p0 would clash with the file X_p0.mp4 (3.5 s)."""
    from flows.preprocess import preprocess

    raw = tmp_path_factory.mktemp("raw_folder")
    make_talking_video(raw / "X.mp4", seconds=8.0)
    make_talking_video(raw / "X_p0.mp4", seconds=3.5)
    (raw / BAD_BYTES_NAME).write_bytes((raw / "X_p0.mp4").read_bytes())
    _make_bad_folder(raw)
    out = tmp_path_factory.mktemp("out_folder")
    summary = preprocess(dataset="folder", raw_dir=str(raw), out_dir=str(out), profile="tiny",
                         overrides={"filters": {"max_clip_s": 4.0}})
    return raw, out, summary


def test_folder_run_completes_with_a_row_per_bad_name(folder_run):
    raw, out, summary = folder_run
    rows = {row["clip_id"]: row for row in _table(out, "clips")}
    assert {clip_id: row["reason"] for clip_id, row in rows.items()} == {
        "X_p0": None, "X_p1": None, "X_p0_mp4": None, "caf_-latin1": "bad_name", "dangling": "broken_link",
        "loop": "symlink_loop", "dir": "not_a_file"}
    assert rows["X_p0"]["candidate_id"] == "X" and rows["X_p0"]["source"] == str(raw / "X.mp4")
    assert rows["X_p0_mp4"]["source"] == str(raw / "X_p0.mp4")
    assert "renamed_from:X_p0" in rows["X_p0_mp4"]["notes"]
    assert rows["caf_-latin1"]["source"] == str(raw / "caf\\xe9-latin1.mp4")
    assert "rename it to UTF-8" in rows["caf_-latin1"]["detail"]
    assert summary["n_kept"] == 3
    assert validate_shards(out / "shards") == []


@pytest.fixture(scope="module")
def hdtf_run(tmp_path_factory, open_recorder):
    """One real HDTF run: a name with a '.', a name with '../' whose target exists outside raw_dir, a link
    out of raw_dir. Opens in this process (the stages run in threads here) of the outside file are recorded."""
    from flows.preprocess import preprocess

    root = tmp_path_factory.mktemp("hdtf_root")
    raw = root / "raw"
    _write_hdtf(raw, ["Jane.Doe", f"../{OUTSIDE_NAME}", "Linked"])
    make_talking_video(raw / "Jane.Doe.mp4", seconds=4.0)
    (raw / "Linked.mp4").symlink_to(root / f"{OUTSIDE_NAME}.mp4")
    (root / f"{OUTSIDE_NAME}.mp4").write_bytes((raw / "Jane.Doe.mp4").read_bytes())
    out = root / "out"
    open_recorder.active = True
    try:
        summary = preprocess(dataset="hdtf", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    finally:
        open_recorder.active = False
    return raw, out, summary, list(open_recorder.opened)


def test_hdtf_run_completes_with_a_row_per_bad_name_and_never_reads_outside(hdtf_run):
    raw, out, summary, opened = hdtf_run
    assert opened == []
    rows = {row["clip_id"]: row for row in _table(out, "clips")}
    assert {clip_id: (row["reason"], row["reject_stage"]) for clip_id, row in rows.items()} == {
        "Jane_Doe_0": (None, None), f"___{OUTSIDE_NAME}_0": ("unsafe_path", "annotations"),
        "Linked_0": ("link_outside_raw_dir", "annotations")}
    assert "renamed_from:Jane.Doe_0" in rows["Jane_Doe_0"]["notes"]
    assert rows["Jane_Doe_0"]["source"] == str(raw / "Jane.Doe.mp4")
    issues = {(row["subject"], row["kind"]) for row in _table(out, "annotation_issues")}
    assert {("Jane.Doe", "id_renamed"), (f"../{OUTSIDE_NAME}", "unsafe_path")} <= issues
    assert summary["n_kept"] == 1
    assert validate_shards(out / "shards") == []
