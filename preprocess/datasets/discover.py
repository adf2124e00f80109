"""Finding the candidate clips of a dataset: dispatches to HDTF's annotation files (``preprocess/datasets/hdtf.py``),
VFHQ's meta-info files (``preprocess/datasets/vfhq.py``), MEAD's subject folders (``preprocess/datasets/mead.py``) or
any folder tree of videos (``preprocess/datasets/video_files.py``, which also makes every name safe to pass on).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from preprocess.datasets.hdtf import hdtf_candidates
from preprocess.datasets.mead import looked_for as mead_looked_for
from preprocess.datasets.mead import mead_candidates
from preprocess.datasets.vfhq import looked_for as vfhq_looked_for
from preprocess.datasets.vfhq import vfhq_candidates
from preprocess.datasets.video_files import display_path, folder_candidates, is_utf8, settle_candidates
from preprocess.run.records import AnnotationIssue, Candidate
from preprocess.run.settings import LayoutSettings

SHIPPED_HDTF_ANNOTATIONS = Path(__file__).resolve().parents[2] / "data" / "hdtf_annotations"
FOLDER_DATASETS = ("folder",)  # plain trees of videos; vfhq and mead have readers of their real layouts
DATASETS = ("hdtf", *FOLDER_DATASETS, "vfhq", "mead")


def looked_for(dataset: str, raw_dir: Path, annotations_dir: Path | None = None, pattern: str = "**/*",
               layouts: LayoutSettings | None = None) -> str:
    """What discovery looked for, in words, for the error of a run that found no candidates."""
    if dataset == "hdtf":
        return (f"HDTF annotation files (*_video_url.txt, ...) in {annotations_dir or raw_dir} (or the shipped copy) "
                f"and their Name.mp4 videos in {raw_dir}")
    if dataset == "vfhq":
        return vfhq_looked_for(raw_dir, annotations_dir)
    if dataset == "mead":
        return mead_looked_for(raw_dir, (layouts or LayoutSettings()).mead_views)
    return f"video files matching pattern {pattern!r} under raw_dir {raw_dir}"


def _json_safe_issue(issue: AnnotationIssue) -> AnnotationIssue:
    """An issue whose text fields are valid UTF-8 (a non-UTF-8 annotations_dir shows up in ``file``)."""
    if all(is_utf8(text) for text in (issue.file, issue.subject, issue.detail)):
        return issue
    return replace(issue, file=display_path(issue.file), subject=display_path(issue.subject),
                   detail=display_path(issue.detail))


def discover_candidates(
    dataset: str, raw_dir: Path, annotations_dir: Path | None = None, pattern: str = "**/*",
    layouts: LayoutSettings | None = None,
) -> tuple[list[Candidate], list[AnnotationIssue]]:
    """Candidates (settled: see ``settle_candidates``) and annotation issues for a dataset kind. For HDTF,
    annotation files are looked for in ``annotations_dir``, else in ``raw_dir`` when it holds them, else the copy
    shipped with the project. VFHQ: its per-clip meta-info files (``preprocess/datasets/vfhq.py``); MEAD: its subject
    folders, with the views of ``layouts.mead_views`` (``preprocess/datasets/mead.py``). Raises only for a bad ``raw_dir``
    or dataset kind, never for a bad name."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw_dir {display_path(raw_dir)} is not a directory; pass the folder of videos")
    if dataset == "hdtf":
        if annotations_dir is None:
            annotations_dir = raw_dir if any(raw_dir.glob("*_annotion_time.txt")) else SHIPPED_HDTF_ANNOTATIONS
        candidates, issues = hdtf_candidates(Path(annotations_dir), raw_dir)
    elif dataset == "vfhq":
        candidates, issues = vfhq_candidates(raw_dir, annotations_dir)
    elif dataset == "mead":
        candidates, issues = mead_candidates(raw_dir, (layouts or LayoutSettings()).mead_views)
    elif dataset in FOLDER_DATASETS:
        candidates, issues = folder_candidates(raw_dir, dataset, pattern), []
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    return settle_candidates(candidates), [_json_safe_issue(issue) for issue in issues]
