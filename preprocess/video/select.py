"""Filter-and-split, the video group's last stage: the standardised clip into pieces (at most
``filters.max_clip_s`` long, never across a shot cut where cuts are looked for), each judged by the filters
(``preprocess.video.filters``) and, when kept, cut into its own files (the ``pieces`` stage,
``preprocess.video.cut``). Reads what the earlier video stages stored: the face track, the speech-activity flags
and the frame-quality measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.run.executor import run_stage
from preprocess.run.job import ClipJob, PieceOutcome, Workspace
from preprocess.run.settings import PreprocessSettings
from preprocess.run.stage import Split
from preprocess.video import cut
from preprocess.video.faces import LANDMARKS_FILE, POSE_FILE
from preprocess.video.filters import audio_padding_per_frame, judge_piece, piece_stats, plan_pieces
from preprocess.video.shots import find_cuts
from preprocess.video.speech_activity import SPEECH_FLAGS_FILE


def _stored_array(job: ClipJob, stage: str, name: str) -> np.ndarray:
    return np.load(Path(job.entries[stage]["dir"]) / name)


def select_pieces(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> list[PieceOutcome]:
    """Split into pieces, judge each, and cut the kept ones into their own files."""
    clip, fps = job.standardised, job.standardised.fps
    faces_dir = workspace.cache.entry_dir("faces", job.faces_key)
    pose, landmarks = np.load(faces_dir / POSE_FILE), np.load(faces_dir / LANDMARKS_FILE)
    speech_flags = _stored_array(job, "speech_activity", SPEECH_FLAGS_FILE)
    quality = job.entries["frame_quality"]["value"]
    content_scores = _stored_array(job, "frame_quality", quality["content_scores"])
    sharpness = _stored_array(job, "frame_quality", quality["sharpness"])
    padding = audio_padding_per_frame(clip.n_frames, clip.sample_rate // fps, clip.audio_padded_samples)
    shots = settings.filters.shots
    # counted for every clip (n_shot_cuts); the pieces are split at them for the datasets in shots.datasets (all
    # by default: HDTF's annotated windows, once taken for single shots, do contain cuts)
    cuts = find_cuts(content_scores, shots.threshold, shots.min_shot_frames)
    split_at_cuts = job.candidate.dataset in shots.datasets
    ranges = plan_pieces(clip.n_frames, fps, settings.filters.max_clip_s, cuts if split_at_cuts else ())
    outcomes = []
    for index, frames in enumerate(ranges):
        clip_id = job.candidate.candidate_id if len(ranges) == 1 else f"{job.candidate.candidate_id}_p{index}"
        stats = piece_stats(pose, job.survey, frames, fps, settings.filters, speech_flags, padding,
                            landmarks=landmarks, sharpness=sharpness, cuts=cuts, split_at_cuts=split_at_cuts)
        outcome = PieceOutcome(clip_id=clip_id, job=job, piece_index=index, n_pieces=len(ranges),
                               frames=frames, stats=stats, rejection=judge_piece(stats, settings.filters))
        outcomes.append(run_stage(cut.STAGE, outcome, settings, workspace))
    return outcomes


STAGE = Split(name="pieces", group="video", run=select_pieces)
