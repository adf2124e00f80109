"""Stage: the sync-expert filter. Per kept piece: SyncNet's audio-visual offset and confidence, the decision, and
when the offset is constant and small, the piece's audio shifted to offset 0.

Reference: LatentSync's data pipeline (bytedance/LatentSync ``preprocess/``), which runs syncnet_v2 over every
clip, keeps it only with confidence >= 3 and |offset| <= 6 frames and shifts its audio to offset 0. The expert
and its evaluation are the project's one sync expert, ``model.syncnet`` (``sync_offset``: the public
SyncNetInstance.evaluate, +/-15 frames, confidence = median minus minimum of the mean distances). Deviations:

* Input: the piece's own ``clip.wav`` (16 kHz mono int16) and ``clip.mp4`` (the standardised 512 x 512 training
  crop), each frame cut again as syncnet_python's ``run_pipeline.py`` ``crop_video`` cuts the crops syncnet_v2
  was trained and evaluated on (``sync_frames``; issue 22: the 512 crop frames the face differently, which moves
  offset and confidence). Deviation: the face box is the extent of the piece's face-mesh landmarks
  (``landmarks.npy``), not an S3FD detection; the landmark extent runs from about the brow line to the chin,
  an S3FD box a little higher, so the crop sits slightly lower on the face than the reference's.
* Constancy: one shift can only fix a constant offset. The offset is also read per ``segment_s`` segment of
  windows (the same distances, averaged per segment); a piece whose segment offsets stray more than
  ``max_offset_spread_frames`` from its own is not corrected but rejected (a drifting offset, e.g. a variable
  frame rate source resampled badly). LatentSync shifts by the whole-clip offset without this check.
* The shift pads with silence (delayed audio: silence at the start; advanced: at the end) and keeps the
  piece's length, so video and audio still cover the same frames. Separation (``preprocess.audio.separate``) reads the source over the shifted
  range (``separate.piece_source_range``; silence before the source's start, ``separate.demucs_input``), so its
  vocals may hold neighbouring speech in those at most ``max_correctable_offset_frames`` padded frames where
  ``clip.wav`` holds silence.
* Thresholds are settings (``SyncSettings``), per dataset (``settings.DATASET_SETTINGS``).

Sign (the reference's): a positive offset means the audio leads the video; the fix delays the audio by
``offset x 640`` samples (advances it when negative), after which the expert reads offset 0.

The stage writes nothing when the piece needs no new audio. A corrected piece is a complete piece directory of
its own (``clip.mp4``, ``landmarks.npy`` and ``pose.npy`` hard-linked from the cut, falling back to a copy, and
the shifted ``clip.wav``), so every later stage and the shard read the corrected audio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile

from model.syncnet import SIZE_SUFFIX as SYNC_SIZE_SUFFIX
from model.syncnet import (  # the expert's files and input: one convention, in the model's module
    WEIGHTS_HELP,
    SyncNetV2,
    landmark_boxes,
    load_sync_expert,
    save_sync_expert,
    sync_crop,
    sync_crop_track,
    sync_offset,
)
from preprocess.run.cache import link_or_copy
from preprocess.run.media import iter_rgb_frames
from preprocess.run.model_loading import load_model, local_path, model_identity
from preprocess.run.records import Rejection
from preprocess.run.settings import MediaTimeouts, SyncSettings
from preprocess.run.stage import Stage
from preprocess.video.faces import LANDMARKS_FILE, POSE_FILE
from preprocess.video.standardise import AUDIO_FILE, VIDEO_FILE

REASON = "out_of_sync"
def sync_frames(video: Path, clip_size: int, image_size: int, limits: MediaTimeouts | None = None,
                landmarks: Path | np.ndarray | None = None) -> np.ndarray:
    """``(T, S, S, 3)`` uint8 RGB at the expert's ``image_size``: syncnet_python's crop (``model.syncnet.sync_crop``:
    from ``s`` above to ``1.8 s`` below the face box's centre, ``1.4 s`` to either side, padded with 110, the box
    median-filtered over 13 frames) of each frame of the piece's ``clip_size`` clip, the box being the extent of
    that frame's face-mesh ``landmarks`` (``(T, N, 3)`` normalised, or the piece's ``landmarks.npy``). Without
    landmarks (no file, or no face in any frame) each whole frame is resized, as before issue 22. Frames are
    cropped as they are decoded, so a piece never sits in memory at 512. Tests train their expert on this too."""
    import cv2

    if isinstance(landmarks, Path):
        landmarks = np.load(landmarks) if landmarks.is_file() else None
    track = None
    if landmarks is not None and len(landmarks):
        track = sync_crop_track(landmark_boxes(landmarks, clip_size, clip_size))
    frames = []
    for index, frame in enumerate(iter_rgb_frames(video, width=clip_size, height=clip_size, limits=limits)):
        if track is None:
            frames.append(frame if clip_size == image_size else cv2.resize(frame, (image_size, image_size)))
        else:
            t = min(index, len(track.s) - 1)
            frames.append(sync_crop(frame, track.s[t], track.x[t], track.y[t], image_size))
    return np.stack(frames) if frames else np.zeros((0, image_size, image_size, 3), np.uint8)


def _segment_bounds(n: int, windows_per_segment: int) -> list[int]:
    """Window indices where segments start, and ``n``: the last segment takes the remainder when it is at least
    half a segment, else it joins the one before."""
    bounds = list(range(0, n, windows_per_segment)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < windows_per_segment / 2:
        del bounds[-2]
    return bounds


def segment_readings(distances: np.ndarray, max_shift: int, windows_per_segment: int) -> list[tuple[int, float]]:
    """``(offset, confidence)`` of each run of ``windows_per_segment`` windows, from the per-window distances
    ``(N, 2 max_shift + 1)``, read as the piece is (argmin, and median minus minimum, of the segment's mean)."""
    bounds = _segment_bounds(len(distances), windows_per_segment)
    readings = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        mean = distances[a:b].mean(axis=0)
        readings.append((int(max_shift - np.argmin(mean)), float(np.median(mean) - mean.min())))
    return readings


def segment_offsets(distances: np.ndarray, max_shift: int, windows_per_segment: int) -> list[int]:
    """The offset of each segment (``segment_readings``), whatever its confidence."""
    return [offset for offset, _ in segment_readings(distances, max_shift, windows_per_segment)]


def offset_is_constant(offset: int, readings: list[tuple[int, float]], settings: SyncSettings) -> tuple[bool, list[int]]:
    """(constant, the segment offsets that counted). Only a segment whose own confidence passes
    ``settings.segment_min_confidence`` (``min_confidence`` when unset) counts: a pause, silence or a turned-away
    face gives a flat mean whose argmin is noise, and must not veto a piece whose offset is clear. With fewer than
    two confident segments there is nothing to compare, and the piece-level offset decides (constant)."""
    gate = settings.min_confidence if settings.segment_min_confidence is None else settings.segment_min_confidence
    counted = [value for value, confidence in readings if confidence >= gate]
    if len(counted) < 2:
        return True, counted
    return all(abs(value - offset) <= settings.max_offset_spread_frames for value in counted), counted


def shift_audio(audio: np.ndarray, frames: int, samples_per_frame: int) -> np.ndarray:
    """The audio delayed by ``frames`` video frames (advanced when negative), same length, silence filling in."""
    samples = min(abs(frames) * samples_per_frame, len(audio))
    silence = np.zeros(samples, audio.dtype)
    if frames >= 0:
        return np.concatenate([silence, audio[:len(audio) - samples]])
    return np.concatenate([audio[samples:], silence])


@dataclass(frozen=True)
class SyncCheck:
    """The sync expert's reading of one piece and what was done about it.

    ``offset_frames``: positive = audio leads video (25 fps frames); ``confidence``: LSE-C; ``min_distance``:
    LSE-D; ``segment_offsets``, ``segment_confidences``: per ``segment_s`` segment (``offset_constant`` counts only
    the confident ones); ``decision``: ``in_sync`` (offset 0), ``corrected``
    (audio shifted by ``shift_applied_frames``), ``out_of_sync`` (``detail`` says why) or ``measured`` (``mode=record_only``:
    recorded, never acted on); ``audio``: the corrected ``clip.wav`` in the stage's directory, else None."""

    offset_frames: int
    confidence: float
    min_distance: float
    n_windows: int
    segment_offsets: tuple[int, ...]
    segment_confidences: tuple[float, ...]
    offset_constant: bool
    decision: str
    shift_applied_frames: int
    detail: str | None
    audio: str | None
    image_size: int
    max_shift: int


def _decide(offset: int, confidence: float, constant: bool, spread: list[int],
            settings: SyncSettings) -> tuple[str, str | None]:
    """(decision, detail) by the thresholds, in the order LatentSync applies them (confidence, then offset)."""
    if settings.mode == "record_only":
        return "measured", None
    if confidence < settings.min_confidence:
        return REASON, (f"confidence {confidence:.2f} < min_confidence {settings.min_confidence} (offset "
                        f"{offset:+d} frames): the mouth does not follow this audio")
    if offset == 0:
        return "in_sync", None
    if abs(offset) > settings.max_correctable_offset_frames:
        return REASON, (f"offset {offset:+d} frames is beyond max_correctable_offset_frames "
                        f"{settings.max_correctable_offset_frames} (confidence {confidence:.2f})")
    if not constant:
        return REASON, (f"offset {offset:+d} frames is not constant: per-segment offsets {spread} stray more than "
                        f"max_offset_spread_frames {settings.max_offset_spread_frames}; one shift cannot fix it")
    return "corrected", None



def check_sync(piece_dir: Path, model: SyncNetV2, settings: SyncSettings, out_dir: Path, *, clip_size: int,
               fps: int, batch_size: int = 20, limits: MediaTimeouts | None = None) -> SyncCheck:
    """Measure the piece in ``piece_dir`` (``clip.mp4`` at ``clip_size`` and ``fps``, ``clip.wav``), decide,
    and for a correction write a whole corrected piece into ``out_dir`` (see the module docstring)."""
    piece_dir, out_dir = Path(piece_dir), Path(out_dir)
    audio, sample_rate = soundfile.read(piece_dir / AUDIO_FILE, dtype="int16")
    if audio.ndim != 1:
        raise ValueError(f"{piece_dir / AUDIO_FILE} has {audio.shape[1]} channels; the pipeline writes mono")
    frames = sync_frames(piece_dir / VIDEO_FILE, clip_size, model.image_size, limits, piece_dir / LANDMARKS_FILE)
    measure = sync_offset(model, frames, audio, max_shift=settings.max_shift, batch_size=batch_size,
                          sample_rate=sample_rate)
    readings = segment_readings(measure.distances, settings.max_shift, max(1, int(round(settings.segment_s * fps))))
    per_segment = [offset for offset, _ in readings]
    constant, counted = offset_is_constant(measure.offset_frames, readings, settings)
    decision, detail = _decide(measure.offset_frames, measure.confidence, constant, counted, settings)
    shift, written = 0, None
    if decision == "corrected":
        shift = measure.offset_frames
        for name in (VIDEO_FILE, LANDMARKS_FILE, POSE_FILE):
            link_or_copy(piece_dir / name, out_dir / name)
        soundfile.write(out_dir / AUDIO_FILE, shift_audio(audio, shift, sample_rate // fps), sample_rate,
                        subtype="PCM_16")
        written = AUDIO_FILE
    return SyncCheck(offset_frames=measure.offset_frames, confidence=round(measure.confidence, 4),
                     min_distance=round(measure.min_distance, 4), n_windows=len(measure.distances),
                     segment_offsets=tuple(per_segment),
                     segment_confidences=tuple(round(confidence, 4) for _, confidence in readings),
                     offset_constant=constant, decision=decision,
                     shift_applied_frames=shift, detail=detail, audio=written, image_size=model.image_size,
                     max_shift=settings.max_shift)


__all__ = ["REASON", "WEIGHTS_HELP", "SyncCheck", "check_sync", "load_sync_expert", "save_sync_expert",
           "offset_is_constant", "segment_offsets", "segment_readings", "shift_audio", "sync_frames"]


# ---------------------------------------------------------------- the stage: on each kept piece, before the audio stages


def _weights_identity(choice, workspace) -> list:
    """The content of the sync expert's weights (and sizes) files: a retrained file at the same path is a new
    model. Memoised by path, size and mtime (``Workspace.fingerprint``), so it is hashed once per run."""
    path = local_path(choice.model)
    files = [path, Path(f"{path}{SYNC_SIZE_SUFFIX}")] if path is not None else []
    return [workspace.fingerprint(file) if file.is_file() else None for file in files]


def _sync_key_parts(piece, settings, workspace) -> list:
    choice = settings.models.sync_expert
    return [piece.content_key, settings.sync.fingerprint(), model_identity(choice),
            *_weights_identity(choice, workspace)]


def _sync_run(piece, settings, workspace, out_dir: Path) -> dict:
    choice = settings.models.sync_expert
    return asdict(check_sync(Path(piece.files_dir), load_model("sync_expert", choice).model, settings.sync, out_dir,
                             clip_size=settings.standardise.size, fps=piece.job.standardised.fps,
                             batch_size=choice.batch_size, limits=settings.media))


def _sync_finish(piece, entry: dict, settings, workspace):
    """Kept as is; kept with its audio shifted (files_dir and content_key become this stage's corrected piece,
    noted ``av_shift:<+k>``, so that every later stage and the shard see the corrected audio); or rejected."""
    if entry["decision"] == REASON:
        return replace(piece, rejection=Rejection("sync", REASON, entry["detail"]))
    if entry["audio"]:
        job = replace(piece.job, notes=piece.job.notes + (f"av_shift:{entry['shift_applied_frames']:+d}",))
        return replace(piece, job=job, files_dir=entry["dir"], content_key=entry["key"])
    return piece


STAGE = Stage(name="sync", version=3, group="audio", models=("sync_expert",), key_parts=_sync_key_parts,
              run=_sync_run, finish=_sync_finish, enabled=lambda settings: settings.sync.enabled)
