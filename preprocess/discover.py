"""Finding the candidate clips of a dataset: HDTF's annotation files, or any folder tree of videos."""

from __future__ import annotations

import re
from pathlib import Path

from preprocess.records import AnnotationIssue, Candidate

# the containers talking-head collections come in; anything else in a folder (notes, audio, frames) is not a clip
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".wmv", ".3gp", ".ogv")
SHIPPED_HDTF_ANNOTATIONS = Path(__file__).resolve().parent.parent / "data" / "hdtf_annotations"
FOLDER_DATASETS = ("folder", "vfhq", "mead")
DATASETS = ("hdtf", *FOLDER_DATASETS)


def clip_id_for(relative: Path) -> str:
    """A clip id from a relative path: shard keys allow only [A-Za-z0-9_-] (a dot would split the key)."""
    stem = relative.with_suffix("").as_posix().replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def folder_candidates(raw_dir: Path, dataset: str = "folder", pattern: str = "**/*") -> list[Candidate]:
    """One candidate per video file under ``raw_dir`` (whole duration, crop box from the face)."""
    raw_dir = Path(raw_dir)
    videos = sorted(p for p in raw_dir.glob(pattern)
                    if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
    candidates, seen = [], set()
    for video in videos:
        relative = video.relative_to(raw_dir)
        clip_id = clip_id_for(relative)
        if clip_id in seen:  # e.g. a.mp4 and a.mov, or "a b.mp4" and "a_b.mp4"
            clip_id = f"{clip_id}_{video.suffix.lstrip('.').lower()}"
            suffix = 2
            while clip_id in seen:
                clip_id, suffix = f"{clip_id}{suffix}", suffix + 1
        seen.add(clip_id)
        candidates.append(Candidate(candidate_id=clip_id, source=str(video), dataset=dataset))
    return candidates


def discover_candidates(
    dataset: str, raw_dir: Path, annotations_dir: Path | None = None, pattern: str = "**/*"
) -> tuple[list[Candidate], list[AnnotationIssue]]:
    """Candidates and annotation issues for a dataset kind. For HDTF, annotation files are looked for in
    ``annotations_dir``, else in ``raw_dir`` when it holds them, else the copy shipped with the project."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw_dir {raw_dir} is not a directory")
    if dataset == "hdtf":
        from preprocess.hdtf import hdtf_candidates

        if annotations_dir is None:
            annotations_dir = raw_dir if any(raw_dir.glob("*_annotion_time.txt")) else SHIPPED_HDTF_ANNOTATIONS
        return hdtf_candidates(Path(annotations_dir), raw_dir)
    if dataset in FOLDER_DATASETS:
        return folder_candidates(raw_dir, dataset, pattern), []
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
