"""Stage: split long clips into pieces and judge every piece against the filters.

Splitting (paper: clips of 3 to 20 s): a clip longer than ``max_clip_s`` is cut on frame boundaries into the
fewest equal pieces that are each at most ``max_clip_s`` long (a 45 s clip gives three 15 s pieces); since
it is longer than ``max_clip_s``, each piece is at least ``max_clip_s / 2`` long. Each piece is then judged
on its own frames, so one turned-away stretch rejects only its piece. Filters run in a fixed order and the
first failing one gives the reason; ``detail`` names every failing filter.

Besides the face and pose filters, two audio filters: ``audio_missing`` when more than
``max_audio_padded_fraction`` of the piece's audio is silence that standardise padded in because the source's
audio track ended early, and ``no_speech`` when fewer than ``min_speech_fraction`` of its frames lie in speech
segments found by Silero VAD (``preprocess.video.speech_activity``, run once per standardised clip).

Shots: for the datasets in ``shots.datasets`` (every kind by default: folder, HDTF, VFHQ, MEAD; HDTF's annotated
windows were once taken for single shots, but they do contain cuts) the clip is first divided at its shot cuts
(``preprocess.video.shots``, as LatentSync splits every video with PySceneDetect before anything else) and each shot
is then split as above, so no piece spans a cut; a shot shorter than ``min_clip_s`` becomes a ``too_short`` piece.
The cuts are counted (``n_shot_cuts``) for every clip, split or not. Two picture filters: ``identity_change`` when
the tracked face's proportions change within the piece (``preprocess.video.identity``; measured and recorded for
every piece, rejecting only with ``reject_identity_change``: its threshold was set on generated clips) and
``blurry`` when the median face-crop sharpness is below ``min_sharpness`` (``preprocess.video.frame_quality``; off
by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from preprocess.run.records import Rejection
from preprocess.run.settings import FilterSettings
from preprocess.video.identity import identity_change, identity_model
from preprocess.video.locate import FaceSurvey
from preprocess.video.shots import shot_ranges


def plan_pieces(n_frames: int, fps: int, max_clip_s: float, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Frame ranges [start, end) covering the clip: each shot between ``cuts`` (frames that start a new shot,
    ``preprocess.video.shots``) is split into equal pieces of at most ``max_clip_s``, so no piece spans a cut. A shot
    shorter than ``min_clip_s`` still gets its piece, which the filters then reject ``too_short``."""
    max_frames = int(math.floor(max_clip_s * fps))
    ranges = []
    for shot_start, shot_end in shot_ranges(n_frames, cuts):
        n_pieces = max(1, math.ceil((shot_end - shot_start) / max_frames))
        base, extra = divmod(shot_end - shot_start, n_pieces)
        start = shot_start
        for index in range(n_pieces):
            end = start + base + (1 if index < extra else 0)
            ranges.append((start, end))
            start = end
    return ranges or [(0, n_frames)]


@dataclass(frozen=True)
class PieceStats:
    """Face, pose and audio statistics of one piece (angles in degrees, face size in source pixels; the audio
    fractions are shares of the piece's video frames, None when not measured)."""

    duration_s: float
    face_frames_fraction: float
    yaw_mean: float | None
    yaw_abs_p95: float | None
    pitch_mean: float | None
    roll_mean: float | None
    side_profile_fraction: float
    multi_face_fraction: float
    max_faces: int
    face_px_median: float | None
    speech_fraction: float | None = None  # frames in Silero VAD speech segments
    audio_padded_fraction: float | None = None  # audio samples that standardise padded with silence
    # picture quality (preprocess.video.frame_quality, preprocess.video.identity); None when not measured
    sharpness: float | None = None  # median Laplacian variance of the 128 px grey face crop over sampled frames
    identity_change: float | None = None  # identity signature spread within the piece (0: one face throughout)
    n_shot_cuts: int | None = None  # cuts found in the whole candidate; None: not measured
    shot_index: int | None = None  # the shot (0-based, between cuts) the piece lies in; None: not split at cuts

    def as_row(self) -> dict:
        return asdict(self)


def audio_padding_per_frame(n_frames: int, samples_per_frame: int, padded_samples: int) -> np.ndarray:
    """(n_frames,) fraction 0-1 of each frame's audio that is padding: standardise pads at the end only."""
    first_padded = n_frames * samples_per_frame - padded_samples
    frame_starts = np.arange(n_frames) * samples_per_frame
    return np.clip((frame_starts + samples_per_frame - first_padded) / samples_per_frame, 0.0, 1.0)


def piece_stats(
    pose: np.ndarray, survey: FaceSurvey, frames: tuple[int, int], fps: int, settings: FilterSettings,
    speech_flags: np.ndarray | None = None, audio_padding: np.ndarray | None = None,
    *, landmarks: np.ndarray | None = None, sharpness: np.ndarray | None = None, cuts: Sequence[int] | None = None,
    split_at_cuts: bool = True,
) -> PieceStats:
    """Statistics of frames [start, end) of a clip. ``pose`` (n_frames, 3) yaw/pitch/roll (NaN: no face);
    ``speech_flags`` (n_frames,) 1 where Silero VAD found speech; ``audio_padding`` (n_frames,) share of each
    frame's audio that is padding (``audio_padding_per_frame``). Without them the audio stats stay None.
    ``landmarks`` (n_frames, n_landmarks, 3) give ``identity_change``; ``sharpness`` (n_frames,) face-crop
    Laplacian variance, NaN where not measured (``preprocess.video.frame_quality``); ``cuts`` the frames that start a
    shot in the whole clip (None: not measured); ``split_at_cuts`` False: the pieces were not split at them (the
    dataset is not in ``shots.datasets``), so no ``shot_index``."""
    start, end = frames
    piece_pose = pose[start:end]
    has_face = ~np.isnan(piece_pose[:, 0])
    yaw = piece_pose[has_face, 0]
    # survey samples whose time falls inside this piece
    times = np.asarray(survey.sample_times_s)
    inside = (times >= start / fps) & (times < end / fps)
    counts = np.asarray(survey.face_counts)[inside]
    heights = np.asarray(survey.face_heights_px)[inside]
    heights = heights[heights > 0]

    def mean(values: np.ndarray) -> float | None:
        return round(float(np.mean(values)), 3) if len(values) else None

    return PieceStats(
        duration_s=round((end - start) / fps, 3),
        face_frames_fraction=round(float(has_face.mean()), 4) if len(has_face) else 0.0,
        yaw_mean=mean(yaw),
        yaw_abs_p95=round(float(np.percentile(np.abs(yaw), 95)), 3) if len(yaw) else None,
        pitch_mean=mean(piece_pose[has_face, 1]),
        roll_mean=mean(piece_pose[has_face, 2]),
        side_profile_fraction=round(float(np.mean(np.abs(yaw) > settings.max_abs_yaw_deg)), 4) if len(yaw) else 0.0,
        multi_face_fraction=round(float(np.mean(counts >= 2)), 4) if len(counts) else 0.0,
        max_faces=int(counts.max()) if len(counts) else 0,
        face_px_median=round(float(np.median(heights)), 1) if len(heights) else None,
        speech_fraction=_share(speech_flags, start, end),
        audio_padded_fraction=_share(audio_padding, start, end),
        sharpness=_median(sharpness, start, end),
        identity_change=None if landmarks is None else identity_change(
            identity_model(settings.identity.model), landmarks[start:end], settings.identity.window_frames,
            settings.identity.percentile, settings.identity.min_windows),
        n_shot_cuts=None if cuts is None else len(cuts),
        shot_index=None if cuts is None or not split_at_cuts else sum(1 for cut in cuts if cut <= start),
    )


def _median(per_frame: np.ndarray | None, start: int, end: int) -> float | None:
    """Median of the measured (finite) values of frames [start, end); None when none was measured."""
    if per_frame is None:
        return None
    piece = np.asarray(per_frame, np.float64)[start:end]
    piece = piece[np.isfinite(piece)]
    return round(float(np.median(piece)), 2) if len(piece) else None


def _share(per_frame: np.ndarray | None, start: int, end: int) -> float | None:
    if per_frame is None:
        return None
    piece = np.asarray(per_frame, np.float64)[start:end]
    if len(piece) != end - start:
        raise ValueError(f"per-frame audio stats cover {len(per_frame)} frames, the piece needs [{start}, {end})")
    return round(float(piece.mean()), 4) if len(piece) else 0.0


def judge_piece(stats: PieceStats, settings: FilterSettings) -> Rejection | None:
    """None when the piece passes every filter, else the first failing filter's rejection."""
    failures: list[tuple[str, str]] = []
    if stats.duration_s < settings.min_clip_s:
        failures.append(("too_short", f"{stats.duration_s:.2f}s < {settings.min_clip_s}s"))
    if stats.face_frames_fraction < settings.min_face_frames_fraction:
        failures.append(("no_face", f"face in {stats.face_frames_fraction:.0%} of frames "
                                    f"< {settings.min_face_frames_fraction:.0%}"))
    if stats.face_px_median is not None and stats.face_px_median < settings.min_face_px:
        failures.append(("face_too_small", f"median face height {stats.face_px_median:.0f}px < {settings.min_face_px}px"))
    if stats.multi_face_fraction > settings.max_multi_face_fraction:
        failures.append(("multi_speaker", f"2+ faces in {stats.multi_face_fraction:.0%} of sampled frames "
                                          f"> {settings.max_multi_face_fraction:.0%}"))
    if stats.side_profile_fraction > settings.max_side_profile_fraction:
        failures.append(("side_profile", f"|yaw| > {settings.max_abs_yaw_deg} deg in {stats.side_profile_fraction:.0%} "
                                         f"of face frames > {settings.max_side_profile_fraction:.0%}"))
    # Missing audio first: padded silence would also read as no speech.
    if stats.audio_padded_fraction is not None and stats.audio_padded_fraction > settings.max_audio_padded_fraction:
        failures.append(("audio_missing", f"{stats.audio_padded_fraction:.0%} of the audio is padding (the source's "
                                          f"audio ends early) > {settings.max_audio_padded_fraction:.0%}"))
    if stats.speech_fraction is not None and stats.speech_fraction < settings.min_speech_fraction:
        failures.append(("no_speech", f"speech (Silero VAD) in {stats.speech_fraction:.0%} of frames "
                                      f"< {settings.min_speech_fraction:.0%}"))
    # recorded only by default: the threshold was set on generated clips (preprocess.video.identity)
    if (settings.reject_identity_change and settings.max_identity_change is not None
            and stats.identity_change is not None and stats.identity_change > settings.max_identity_change):
        failures.append(("identity_change", f"the tracked face's proportions ({settings.identity.model}) vary by "
                                            f"{stats.identity_change:.3f} > {settings.max_identity_change} within the "
                                            "piece: another person (if not, raise filters.max_identity_change)"))
    if settings.min_sharpness is not None and stats.sharpness is not None and stats.sharpness < settings.min_sharpness:
        failures.append(("blurry", f"median face-crop Laplacian variance {stats.sharpness:.1f} "
                                   f"< {settings.min_sharpness}"))
    if not failures:
        return None
    return Rejection("filters", failures[0][0], "; ".join(f"{code}: {text}" for code, text in failures))
