"""The per-clip pipeline: stages wrapped with the content-addressed cache, with no Prefect in sight.

``flows/preprocess.py`` turns each ``run_*`` function into a Prefect task; tests and benchmarks call them
directly. A ``ClipJob`` carries one candidate clip through the stages. Once it is rejected, later stages pass
it through untouched. Each stage's cache key hashes the upstream key, the stage's own settings and a
``STAGE_VERSIONS`` number (bump it when a stage's code changes its output), so a changed threshold only
re-runs the stages that read it. An unexpected exception inside a stage becomes an ``error`` rejection for
that clip (not cached, so the next run retries it) instead of stopping the run, unless it is a failure of the
environment (``preprocess.failures``: imports, model loading, CUDA, memory, disk), which stops the run.

Filter-and-split (``run_select``) first runs Silero VAD once over the standardised clip (its own cached stage,
``speech_activity``), for each piece's ``speech_fraction``. The sync check (``run_sync``, ``preprocess.sync_check``)
runs on each kept piece next: it may reject it ``out_of_sync`` or shift its audio (the piece then lives in the sync
stage's directory). The audio stages (``run_separate`` ... ``run_wav2vec``) run on each kept piece after it.
Their keys hash the piece's content key (or the upstream audio stage's key;
separation, which reads the source file, hashes the source's content and the piece's range in it), the stage's
settings and the model reference (``ModelChoice`` fingerprint); a model is loaded only inside ``compute``, so a
cached re-run never loads one. Their results (the JSON the stage returned, plus ``key`` and ``dir``) accumulate in
``PieceOutcome.features``; a crash in one rejects the piece with reason ``error`` (retried next run).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from model.syncnet import SIZE_SUFFIX as SYNC_SIZE_SUFFIX
from preprocess.action_units import AUBackend, ExportedAUs, GeometricAUs
from preprocess.cache import StageCache, file_fingerprint, link_or_copy, stable_hash
from preprocess.crop import choose_crop
from preprocess.cut import cut_piece
from preprocess.describe import sample_frames_uniformly
from preprocess.face_models import mediapipe_version
from preprocess.faces import LANDMARKS_FILE, POSE_FILE, FaceMeshTracker, FaceTrack
from preprocess.failures import EnvironmentFailure, is_environment_error
from preprocess.filters import PieceStats, audio_padding_per_frame, judge_piece, piece_stats, plan_pieces
from preprocess.frame_quality import CONTENT_SCORES_FILE, SHARPNESS_FILE, FrameQuality, FrameQualityMeter
from preprocess.locate import FaceSurvey, survey_faces
from preprocess.media import iter_rgb_frames
from preprocess.probe import probe_video
from preprocess.records import Candidate, CropBox, ProbeResult, Rejection
from preprocess.separate import separate_vocals
from preprocess.settings import ModelChoice, PreprocessSettings
from preprocess.shots import find_cuts
from preprocess.speech_activity import SPEECH_FLAGS_FILE, measure_speech_activity, silero_identity
from preprocess.speech_emotion import classify_speech
from preprocess.stage_models import VIDEOLLAMA2_PREFIX, is_tiny_reference, load_model, local_path
from preprocess.standardise import VIDEO_FILE, StandardisedClip, standardise_clip
from preprocess.sync_check import REASON as OUT_OF_SYNC
from preprocess.sync_check import check_sync
from preprocess.text_emotion import score_transcripts
from preprocess.transcribe import transcribe_vocals
from preprocess.valence_arousal import valence_arousal_tracks
from preprocess.wav2vec_features import wav2vec_frames

log = logging.getLogger(__name__)

STAGE_VERSIONS = {"probe": 1, "locate": 2, "standardise": 4, "faces": 2, "speech_activity": 1, "frame_quality": 2, "pieces": 1,
                  "sync": 1,
                  "separate": 2,
                  "transcribe": 1, "text_emotion": 2, "speech_emotion": 2, "valence_arousal": 2, "wav2vec": 2,
                  "action_units": 1, "describe": 1, "text_embedding": 2, "latents": 2}
# The per-piece audio stages, in the order they run (also their stage_timings / clips-table names).
AUDIO_STAGES = ("separate", "transcribe", "text_emotion", "speech_emotion", "valence_arousal", "wav2vec")
# The per-piece visual and semantic stages, in order; describe, text_embedding (needs describe) and latents
# can be switched off in the settings, and then leave no entry in ``PieceOutcome.features``.
VISUAL_STAGES = ("action_units", "describe", "text_embedding", "latents")
AUS_FILE, CLIP_TEXT_FILE, LATENTS_FILE = "aus.npy", "clip_text.npy", "latents.npy"


@dataclass(frozen=True)
class StageTiming:
    stage: str
    seconds: float  # wall time of the run that computed the output (also when re-used from the cache)
    cached: bool


@dataclass(frozen=True)
class ClipJob:
    candidate: Candidate
    source_sha256: str | None = None
    probe: ProbeResult | None = None
    duration_s: float | None = None  # of the candidate clip in the source, after clamping to the file
    survey: FaceSurvey | None = None
    crop_box: CropBox | None = None
    crop_method: str | None = None
    crop_max_speed: float | None = None  # a face track's fastest move, crop sides per second; None: a fixed crop
    standardised: StandardisedClip | None = None
    standardise_key: str | None = None
    faces: FaceTrack | None = None
    faces_key: str | None = None
    rejection: Rejection | None = None
    notes: tuple[str, ...] = ()
    timings: tuple[StageTiming, ...] = ()


@dataclass(frozen=True)
class PieceOutcome:
    """The fate of one clip (a piece of a candidate, or the whole candidate if it never got that far)."""

    clip_id: str
    job: ClipJob
    piece_index: int = 0
    n_pieces: int = 0
    frames: tuple[int, int] | None = None
    stats: PieceStats | None = None
    rejection: Rejection | None = None
    files_dir: str | None = None  # directory holding clip.mp4, clip.wav, landmarks.npy, pose.npy
    content_key: str | None = None
    timings: tuple[StageTiming, ...] = field(default=())
    features: dict[str, dict] = field(default_factory=dict)  # per-piece model stage -> its stored result + "key" + "dir"

    @property
    def kept(self) -> bool:
        return self.rejection is None and self.files_dir is not None


class Workspace:
    """Where a run keeps its cache (``out_dir/work``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.cache = StageCache(self.out_dir / "work")

    def fingerprint(self, path: Path) -> str:
        return file_fingerprint(path, self.out_dir / "work" / "fingerprints")


def _reject(job: ClipJob, rejection: Rejection) -> ClipJob:
    return replace(job, rejection=rejection)


def _guarded(stage: str, job: ClipJob, body) -> ClipJob:
    """Run ``body()`` unless the job is already rejected; turn a crash into an ``error`` rejection."""
    if job.rejection is not None:
        return job
    try:
        return body()
    except Exception as error:  # a bad clip must never stop the run; a broken environment must
        _raise_if_environmental(stage, job.candidate.candidate_id, error)
        log.error("stage %s crashed on %s:\n%s", stage, job.candidate.candidate_id, traceback.format_exc())
        return _reject(job, Rejection(stage, "error", f"{type(error).__name__}: {error}"))


def _raise_if_environmental(stage: str, clip_id: str, error: Exception) -> None:
    """A failure of the environment (model, device, memory, disk) stops the run instead of rejecting the clip."""
    if is_environment_error(error):
        raise EnvironmentFailure(stage, clip_id, error) from error


def start_job(candidate: Candidate, workspace: Workspace) -> ClipJob:
    job = ClipJob(candidate=candidate, notes=candidate.notes)
    if candidate.reject_reason:
        return _reject(job, Rejection("annotations", candidate.reject_reason, candidate.reject_detail))
    source = Path(candidate.source)
    if not source.exists():
        return _reject(job, Rejection("annotations", "missing_source", f"{source} does not exist"))
    return _guarded("fingerprint", job, lambda: replace(job, source_sha256=workspace.fingerprint(source)))


def run_probe(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> ClipJob:
    def body() -> ClipJob:
        key = stable_hash("probe", STAGE_VERSIONS["probe"], job.source_sha256, settings.probe.fingerprint())

        def compute(_: Path) -> dict:
            result = probe_video(job.candidate.source, decode_check=settings.probe.decode_check,
                                 limits=settings.media)
            return _encode(result)

        stored, cached = workspace.cache.run("probe", key, compute)
        result = _decode(stored, ProbeResult)
        timed = replace(job, timings=job.timings + (StageTiming("probe", stored["seconds"], cached),))
        if isinstance(result, Rejection):
            return _reject(timed, result)
        # the cached probe may have been made for the same content at another path
        result = replace(result, path=job.candidate.source)
        start, end = job.candidate.start_s, job.candidate.end_s
        if start >= result.duration_s:
            return _reject(replace(timed, probe=result), Rejection(
                "probe", "clip_outside_source", f"clip starts at {start}s, the video lasts {result.duration_s:.2f}s"))
        notes = timed.notes + result.notes
        if end is None or end > result.duration_s:
            if end is not None:
                notes += ("clip_end_beyond_source",)
            end = result.duration_s
        return replace(timed, probe=result, duration_s=round(end - start, 3), notes=notes)

    return _guarded("probe", job, body)


def run_locate(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> ClipJob:
    def body() -> ClipJob:
        if job.duration_s < settings.filters.min_clip_s:
            # too short whatever happens next: skip the expensive stages
            return _reject(job, Rejection("filters", "too_short",
                                          f"{job.duration_s:.2f}s < {settings.filters.min_clip_s}s"))
        # faces under filters.min_face_px never count as speakers (face_counts), so that threshold is an input too
        key = stable_hash("locate", STAGE_VERSIONS["locate"], job.source_sha256, job.candidate.start_s,
                          job.duration_s, settings.locate.fingerprint(), mediapipe_version(),
                          settings.filters.min_face_px)

        def compute(_: Path) -> dict:
            return _encode(survey_faces(job.candidate.source, job.probe, job.candidate.start_s, job.duration_s,
                                        settings.locate, limits=settings.media,
                                        min_face_px=settings.filters.min_face_px))

        stored, cached = workspace.cache.run("locate", key, compute)
        result = _decode(stored, FaceSurvey)
        timed = replace(job, timings=job.timings + (StageTiming("locate", stored["seconds"], cached),))
        if isinstance(result, Rejection):
            return _reject(timed, result)
        return replace(timed, survey=result)

    return _guarded("locate", job, body)


def run_standardise(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> ClipJob:
    def body() -> ClipJob:
        fps = settings.standardise.fps
        # a frame more than the encode can give: the track covers every output frame
        choice = choose_crop(job.candidate, job.probe, job.survey, settings.locate, fps,
                             math.ceil(job.duration_s * fps) + 1)
        if isinstance(choice, Rejection):
            return _reject(job, choice)
        box, method, crop_notes, track = choice.box, choice.method, choice.notes, choice.track
        # a moving crop's path is part of the key (only then, so that fixed-box keys stay as they were)
        track_key = [stable_hash(track.side, track.xs, track.ys)] if track else []
        # a separate audio file (MEAD's microphone) is an input too: its content is part of the key (only then, so
        # that the keys of every other clip stay as they were)
        audio_source = job.candidate.audio_source
        audio_key = [workspace.fingerprint(Path(audio_source))] if audio_source else []
        # the face mesh and the frame-quality measures run on this stage's own decode (one decode, see
        # preprocess.standardise): what they measure with is an input of this entry too
        key = stable_hash("standardise", STAGE_VERSIONS["standardise"], job.source_sha256, job.candidate.start_s,
                          job.duration_s, box, settings.standardise.fingerprint(), *audio_key, *track_key,
                          *_frame_analysis_identity(settings))

        def compute(out_dir: Path) -> dict:
            tracker = FaceMeshTracker(settings.faces)
            meter = FrameQualityMeter(settings.standardise.fps, settings.filters.frame_quality)
            try:
                clip = standardise_clip(job.candidate.source, job.candidate.start_s, job.duration_s, box,
                                        settings.standardise, out_dir, limits=settings.media,
                                        audio_source=audio_source, crop_track=track,
                                        frame_consumer=lambda frame: meter.add(frame, tracker.add(frame)))
            finally:
                tracker.close()
            if isinstance(clip, Rejection):
                return _encode(clip)
            # run_faces and _frame_quality pick these up (light entries linking the arrays)
            return {**_encode(clip), "faces": _encode(tracker.save(out_dir)),
                    "frame_quality": _encode(meter.save(out_dir))}

        stored, cached = workspace.cache.run("standardise", key, compute)
        result = _decode(stored, StandardisedClip)
        timed = replace(job, crop_box=box, crop_method=method, crop_max_speed=track.max_speed if track else None,
                        notes=job.notes + crop_notes,
                        timings=job.timings + (StageTiming("standardise", stored["seconds"], cached),))
        if isinstance(result, Rejection):
            return _reject(timed, result)
        return replace(timed, standardised=result, standardise_key=key, notes=timed.notes + result.notes)

    return _guarded("standardise", job, body)


def run_faces(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> ClipJob:
    def body() -> ClipJob:
        key = stable_hash("faces", STAGE_VERSIONS["faces"], job.standardise_key, settings.faces.fingerprint(),
                          settings.models.face_mesh, mediapipe_version())

        def compute(out_dir: Path) -> dict:
            # the mesh ran on standardise's decode: this entry is the arrays linked from there
            return _linked_frame_analysis(workspace, job.standardise_key, "faces", (LANDMARKS_FILE, POSE_FILE),
                                          out_dir)

        stored, cached = workspace.cache.run("faces", key, compute)
        result = _decode(stored, FaceTrack)
        timed = replace(job, timings=job.timings + (StageTiming("faces", stored["seconds"], cached),))
        if isinstance(result, Rejection):
            return _reject(timed, result)
        return replace(timed, faces=result, faces_key=key)

    return _guarded("faces", job, body)


def run_select(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> list[PieceOutcome]:
    """Split into pieces, judge each, and cut the kept ones into their own files."""
    if job.rejection is not None:
        return [PieceOutcome(clip_id=job.candidate.candidate_id, job=job, rejection=job.rejection)]
    try:
        fps = job.standardised.fps
        pose = np.load(workspace.cache.entry_dir("faces", job.faces_key) / POSE_FILE)
        speech_flags, job = _speech_activity(job, settings, workspace)
        padding = audio_padding_per_frame(job.standardised.n_frames, job.standardised.sample_rate // fps,
                                          job.standardised.audio_padded_samples)
        landmarks = np.load(workspace.cache.entry_dir("faces", job.faces_key) / LANDMARKS_FILE)
        quality, job = _frame_quality(job, settings, workspace)
        if isinstance(quality, Rejection):
            return [PieceOutcome(clip_id=job.candidate.candidate_id, job=job, rejection=quality)]
        content_scores, sharpness = quality
        shots = settings.filters.shots
        # HDTF's annotated windows are single shots: cuts are looked for only in the datasets named in the settings
        cuts = (find_cuts(content_scores, shots.threshold, shots.min_shot_frames)
                if job.candidate.dataset in shots.datasets else None)
        ranges = plan_pieces(job.standardised.n_frames, fps, settings.filters.max_clip_s, cuts or ())
        outcomes = []
        for index, frames in enumerate(ranges):
            clip_id = job.candidate.candidate_id if len(ranges) == 1 else f"{job.candidate.candidate_id}_p{index}"
            stats = piece_stats(pose, job.survey, frames, fps, settings.filters, speech_flags, padding,
                                landmarks=landmarks, sharpness=sharpness, cuts=cuts)
            outcome = PieceOutcome(clip_id=clip_id, job=job, piece_index=index, n_pieces=len(ranges),
                                   frames=frames, stats=stats, rejection=judge_piece(stats, settings.filters))
            if outcome.rejection is None:
                outcome = _cut(outcome, settings, workspace)
            outcomes.append(outcome)
        return outcomes
    except Exception as error:
        _raise_if_environmental("pieces", job.candidate.candidate_id, error)
        log.error("selecting pieces crashed on %s:\n%s", job.candidate.candidate_id, traceback.format_exc())
        return [PieceOutcome(clip_id=job.candidate.candidate_id, job=job,
                             rejection=Rejection("pieces", "error", f"{type(error).__name__}: {error}"))]


def run_clip_stages(candidate: Candidate, settings: PreprocessSettings,
                    workspace: Workspace) -> tuple[ClipJob, list[PieceOutcome]]:
    """Every per-clip stage in order, without Prefect (tests, benchmarks): the job after face-landmarks and the
    piece outcomes of filter-and-split."""
    job = start_job(candidate, workspace)
    for stage in (run_probe, run_locate, run_standardise, run_faces):
        job = stage(job, settings, workspace)
    return job, run_select(job, settings, workspace)


def _speech_activity(job: ClipJob, settings: PreprocessSettings, workspace: Workspace) -> tuple[np.ndarray, ClipJob]:
    """Silero VAD over the whole standardised clip, once (cached): per-frame speech flags (n_frames,) uint8 for
    every piece's ``speech_fraction``, and the job with the stage's timing added."""
    chosen = settings.filters.speech_activity
    key = stable_hash("speech_activity", STAGE_VERSIONS["speech_activity"], job.standardise_key,
                      chosen.fingerprint(), silero_identity())
    audio = workspace.cache.entry_dir("standardise", job.standardise_key) / job.standardised.audio
    stored, cached = workspace.cache.run("speech_activity", key, lambda out_dir: asdict(
        measure_speech_activity(audio, job.standardised.fps, chosen, out_dir)))
    flags = np.load(workspace.cache.entry_dir("speech_activity", key) / SPEECH_FLAGS_FILE)
    return flags, replace(job, timings=job.timings + (StageTiming("speech_activity", stored["seconds"], cached),))


def _frame_quality(job: ClipJob, settings: PreprocessSettings, workspace: Workspace,
                   ) -> tuple[tuple[np.ndarray, np.ndarray] | Rejection, ClipJob]:
    """The picture-quality measures made on standardise's decode (cached stage ``frame_quality``, a light entry
    linking them): per-frame content scores (n_frames,) for the shot cuts and face-crop sharpness (n_frames,),
    NaN where not sampled; and the job with its timing."""
    chosen = settings.filters.frame_quality
    key = stable_hash("frame_quality", STAGE_VERSIONS["frame_quality"], job.standardise_key, job.faces_key,
                      chosen.fingerprint())
    stored, cached = workspace.cache.run("frame_quality", key, lambda out_dir: _linked_frame_analysis(
        workspace, job.standardise_key, "frame_quality", (CONTENT_SCORES_FILE, SHARPNESS_FILE), out_dir))
    job = replace(job, timings=job.timings + (StageTiming("frame_quality", stored["seconds"], cached),))
    result = _decode(stored, FrameQuality)
    if isinstance(result, Rejection):
        return result, job
    out_dir = workspace.cache.entry_dir("frame_quality", key)
    return (np.load(out_dir / result.content_scores), np.load(out_dir / result.sharpness)), job


def _frame_analysis_identity(settings: PreprocessSettings) -> list:
    """What the face mesh and the frame-quality measures inside standardise's decode depend on."""
    return [settings.faces.fingerprint(), settings.models.face_mesh, mediapipe_version(),
            settings.filters.frame_quality.fingerprint()]


def _linked_frame_analysis(workspace: Workspace, standardise_key: str, part: str, files: tuple[str, ...],
                           out_dir: Path) -> dict:
    """The ``part`` ("faces" or "frame_quality") result stored with the standardise entry, its ``files`` hard-linked
    (copied where links are not possible) into ``out_dir``: the arrays are not stored twice."""
    stored = workspace.cache.load("standardise", standardise_key)
    if stored is None or part not in stored:  # removed under the run: an uncached error, the next run recomputes
        raise RuntimeError(f"the standardise entry {standardise_key} holds no {part} result")
    if stored[part]["kind"] == "ok":
        clip_dir = workspace.cache.entry_dir("standardise", standardise_key)
        for name in files:
            link_or_copy(clip_dir / name, out_dir / name)
    return stored[part]


def _cut(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    job = outcome.job
    key = stable_hash("pieces", STAGE_VERSIONS["pieces"], job.standardise_key, job.faces_key, outcome.frames,
                      settings.standardise.fingerprint())
    clip_dir = workspace.cache.entry_dir("standardise", job.standardise_key)
    faces_dir = workspace.cache.entry_dir("faces", job.faces_key)
    stored, cached = workspace.cache.run("pieces", key, lambda out_dir: cut_piece(
        clip_dir, faces_dir, job.standardised.n_frames, outcome.frames, settings.standardise, out_dir,
        limits=settings.media))
    return replace(outcome, files_dir=str(workspace.cache.entry_dir("pieces", key)), content_key=key,
                   timings=(StageTiming("cut", stored["seconds"], cached),))


def _model_identity(choice: ModelChoice) -> str:
    """What a stage key knows of its model: the reference, revision, device and dtype; for a tiny model also
    the version of the tiny-model builder (they are rebuilt from code, not downloaded)."""
    if is_tiny_reference(choice.model):
        from tiny_models import VERSION

        return f"{choice.fingerprint()}:tiny-v{VERSION}"
    return choice.fingerprint()


def _run_piece_stage(stage: str, outcome: PieceOutcome, workspace: Workspace, key_parts: list,
                     compute) -> PieceOutcome:
    """Run one cached per-piece stage on a kept piece; a crash rejects the piece (``error``, not cached)."""
    if not outcome.kept:
        return outcome
    try:
        key = stable_hash(stage, STAGE_VERSIONS[stage], *key_parts)
        stored, cached = workspace.cache.run(stage, key, compute)
    except Exception as error:  # a bad clip must never stop the run; a broken environment must
        _raise_if_environmental(stage, outcome.clip_id, error)
        log.error("stage %s crashed on %s:\n%s", stage, outcome.clip_id, traceback.format_exc())
        return replace(outcome, rejection=Rejection(stage, "error", f"{type(error).__name__}: {error}"))
    return _with_entry(stage, outcome, workspace, key, stored, cached)


def _with_entry(stage: str, outcome: PieceOutcome, workspace: Workspace, key: str, stored: dict,
                cached: bool) -> PieceOutcome:
    """The piece with a stage's stored result in its features (plus ``key`` and ``dir``) and the stage's timing."""
    # the JSON round trip makes a fresh result look exactly like a cached one (tuples become lists)
    entry = {**json.loads(json.dumps(stored)), "key": key, "dir": str(workspace.cache.entry_dir(stage, key))}
    return replace(outcome, features={**outcome.features, stage: entry},
                   timings=outcome.timings + (StageTiming(stage, stored["seconds"], cached),))


def _vocals(outcome: PieceOutcome) -> Path:
    separated = outcome.features["separate"]
    return Path(separated["dir"]) / separated["vocals"]


def piece_source_range(outcome: PieceOutcome) -> tuple[float, float]:
    """(start, duration) in seconds of the source that a piece's audio covers: the candidate's start as
    standardise seeks it (to the millisecond) plus the piece's first frame, minus the shift the sync stage applied
    to its clip.wav (audio delayed by k frames starts k frames earlier in the source), and its frames' duration."""
    fps, (start, end) = outcome.job.standardised.fps, outcome.frames
    shift = outcome.features.get("sync", {}).get("shift_applied_frames", 0)
    return round(outcome.job.candidate.start_s, 3) + (start - shift) / fps, (end - start) / fps


def _sync_weights_identity(choice: ModelChoice, workspace: Workspace) -> list:
    """The content of the sync expert's weights (and sizes) files: a retrained file at the same path is a new
    model. Memoised by path, size and mtime (``Workspace.fingerprint``), so it is hashed once per run."""
    path = local_path(choice.model)
    files = [path, Path(f"{path}{SYNC_SIZE_SUFFIX}")] if path is not None else []
    return [workspace.fingerprint(file) if file.is_file() else None for file in files]


def run_sync(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    """The sync-expert filter (``preprocess.sync_check``) on a kept piece, after the cut and before every audio
    stage: the AV offset and confidence (``features["sync"]``), then one of: kept as is; kept with its audio
    shifted (files_dir and content_key become the stage's corrected piece, noted ``av_shift:<+k>``, so that every
    later stage and the shard see the corrected audio, and separation reads the shifted source range); or
    rejected ``out_of_sync``. Keyed on the piece's content key, the sync settings and the model identity with its
    weights' content hash."""
    chosen, choice = settings.sync, settings.models.sync_expert
    if not outcome.kept or not chosen.enabled:
        return outcome

    def compute(out_dir: Path) -> dict:
        return asdict(check_sync(Path(outcome.files_dir), load_model("sync_expert", choice).model, chosen, out_dir,
                                 clip_size=settings.standardise.size, fps=outcome.job.standardised.fps,
                                 batch_size=choice.batch_size, limits=settings.media))

    checked = _run_piece_stage("sync", outcome, workspace, [
        outcome.content_key, chosen.fingerprint(), _model_identity(choice),
        *_sync_weights_identity(choice, workspace)], compute)
    entry = checked.features.get("sync")
    if entry is None:  # the stage crashed: already rejected ``error``
        return checked
    if entry["decision"] == OUT_OF_SYNC:
        return replace(checked, rejection=Rejection("sync", OUT_OF_SYNC, entry["detail"]))
    if entry["audio"]:
        job = replace(checked.job, notes=checked.job.notes + (f"av_shift:{entry['shift_applied_frames']:+d}",))
        return replace(checked, job=job, files_dir=entry["dir"], content_key=entry["key"])
    return checked


def run_separate(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    """Demucs on the source's full-band audio for the piece's range (``preprocess.separate``); vocals.wav has
    the piece's clip.wav length and gain. Keyed on the source's content and range, not on clip.wav."""
    if not outcome.kept:
        return outcome
    choice, job = settings.models.separation, outcome.job
    start_s, duration_s = piece_source_range(outcome)
    clip = job.standardised
    n_samples = (outcome.frames[1] - outcome.frames[0]) * (clip.sample_rate // clip.fps)
    # the clip's sound comes from its separate audio file when it has one (MEAD's microphone), as in standardise
    audio_input = job.candidate.audio_source or job.candidate.source
    audio_sha256 = workspace.fingerprint(Path(audio_input)) if job.candidate.audio_source else job.source_sha256

    def compute(out_dir: Path) -> dict:
        return asdict(separate_vocals(audio_input, start_s, duration_s, n_samples, clip.sample_rate,
                                      clip.gain_db, load_model("separation", choice), settings.audio.separation,
                                      out_dir, limits=settings.media))

    return _run_piece_stage("separate", outcome, workspace, [
        audio_sha256, start_s, duration_s, n_samples, clip.sample_rate, clip.gain_db,
        settings.audio.separation.fingerprint(), _model_identity(choice)], compute)


def run_transcribe(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    choice = settings.models.transcription

    def compute(_: Path) -> dict:
        return transcribe_vocals(_vocals(outcome), outcome.features["separate"]["has_speech"],
                                 load_model("transcription", choice), settings.audio.transcription).as_json()

    return _run_piece_stage("transcribe", outcome, workspace, [
        outcome.features.get("separate", {}).get("key"), settings.audio.transcription.fingerprint(),
        _model_identity(choice)], compute)


def _text_emotion_key_parts(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> list:
    return [outcome.features.get("transcribe", {}).get("key"), settings.audio.text_emotion.fingerprint(),
            _model_identity(settings.models.text_emotion)]


def _text_emotion_many(outcomes: list[PieceOutcome], settings: PreprocessSettings, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.text_emotion
    transcripts = [(t["text"], t["language"], t["status"]) for t in (o.features["transcribe"] for o in outcomes)]
    return [asdict(scored) for scored in score_transcripts(transcripts, load_model("text_emotion", choice),
                                                           settings.audio.text_emotion, out_dirs, choice.batch_size)]


def run_text_emotion(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    return _run_piece_stage("text_emotion", outcome, workspace,
                            _text_emotion_key_parts(outcome, settings, workspace),
                            lambda out_dir: _text_emotion_many([outcome], settings, [out_dir])[0])


def run_speech_emotion(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    choice = settings.models.speech_emotion

    def compute(out_dir: Path) -> dict:
        return asdict(classify_speech(_vocals(outcome), outcome.features["separate"]["has_speech"],
                                      load_model("speech_emotion", choice), out_dir))

    return _run_piece_stage("speech_emotion", outcome, workspace, [
        outcome.features.get("separate", {}).get("key"), _model_identity(choice)], compute)


def _valence_arousal_key_parts(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> list:
    return [outcome.features.get("separate", {}).get("key"), settings.audio.valence_arousal.fingerprint(),
            _model_identity(settings.models.valence_arousal)]


def _valence_arousal_many(outcomes: list[PieceOutcome], settings: PreprocessSettings,
                          out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.valence_arousal
    clips = [(_vocals(outcome), outcome.features["separate"]["has_speech"]) for outcome in outcomes]
    return [asdict(track) for track in valence_arousal_tracks(clips, load_model("valence_arousal", choice),
                                                              settings.audio.valence_arousal, choice.batch_size,
                                                              out_dirs)]


def run_valence_arousal(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    return _run_piece_stage("valence_arousal", outcome, workspace,
                            _valence_arousal_key_parts(outcome, settings, workspace),
                            lambda out_dir: _valence_arousal_many([outcome], settings, [out_dir])[0])


def run_wav2vec(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    choice, chosen = settings.models.wav2vec, settings.audio.wav2vec

    def compute(out_dir: Path) -> dict:
        n_frames = outcome.frames[1] - outcome.frames[0]
        return asdict(wav2vec_frames(_vocals(outcome), n_frames, settings.standardise.fps,
                                     load_model("wav2vec", choice), out_dir, layers=chosen.layers))

    # keyed on the layer choice: a run that stores other layers must not reuse this file
    return _run_piece_stage("wav2vec", outcome, workspace, [
        outcome.features.get("separate", {}).get("key"), settings.standardise.fps, _model_identity(choice),
        chosen.fingerprint()], compute)


AUDIO_STAGE_FUNCTIONS = {
    "separate": run_separate,
    "transcribe": run_transcribe,
    "text_emotion": run_text_emotion,
    "speech_emotion": run_speech_emotion,
    "valence_arousal": run_valence_arousal,
    "wav2vec": run_wav2vec,
}


def run_audio_stages(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    """Every audio stage in order, without Prefect (tests, benchmarks)."""
    for stage in AUDIO_STAGES:
        outcome = AUDIO_STAGE_FUNCTIONS[stage](outcome, settings, workspace)
    return outcome


# ---------------------------------------------------------------- visual and semantic stages (per kept piece)


def _piece_file(outcome: PieceOutcome, name: str) -> Path:
    return Path(outcome.files_dir) / name


def au_backend(settings: PreprocessSettings) -> AUBackend:
    """The configured AU estimator (a learned one loads once per process, like the other models)."""
    chosen = settings.visual.action_units
    if chosen.backend == "geometric":
        return GeometricAUs()
    if not chosen.exported_model or not chosen.exported_au_names:
        raise ValueError("visual.action_units.backend 'torch_export' needs exported_model and exported_au_names")
    return _exported_aus(chosen.exported_model, chosen.exported_au_names, chosen.exported_input_size)


@functools.lru_cache(maxsize=4)
def _exported_aus(path: str, au_names: tuple[str, ...], input_size: int) -> ExportedAUs:
    return ExportedAUs(Path(path), au_names, input_size)


def _au_identity(settings: PreprocessSettings) -> list:
    chosen = settings.visual.action_units
    if chosen.backend == "geometric":
        return [chosen.fingerprint(), GeometricAUs.name]
    model = Path(chosen.exported_model or "")
    return [chosen.fingerprint(), file_fingerprint(model) if model.is_file() else str(model)]


def run_action_units(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    def compute(out_dir: Path) -> dict:
        backend = au_backend(settings)
        landmarks = np.load(_piece_file(outcome, LANDMARKS_FILE)).astype(np.float32)
        frames = None
        if backend.needs_frames:
            size = settings.standardise.size
            frames = np.stack(list(iter_rgb_frames(_piece_file(outcome, VIDEO_FILE), width=size, height=size)))
        values = backend.estimate(landmarks, frames).astype(np.float32)
        np.save(out_dir / AUS_FILE, values)
        return {"file": AUS_FILE, "au_names": list(backend.au_names), "model": backend.name,
                "n_frames": len(values), "n_face_frames": int((~np.isnan(values).any(axis=1)).sum())}

    return _run_piece_stage("action_units", outcome, workspace, [outcome.content_key, *_au_identity(settings)],
                            compute)


def _describe_key_parts(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> list:
    return [outcome.content_key, settings.visual.description.fingerprint(),
            _model_identity(settings.models.captioning)]


def _describe_many(outcomes: list[PieceOutcome], settings: PreprocessSettings, out_dirs: list[Path]) -> list[dict]:
    chosen, choice = settings.visual.description, settings.models.captioning
    captioner = load_model("captioning", choice)
    videos = [_piece_file(outcome, VIDEO_FILE) for outcome in outcomes]
    if hasattr(captioner.model, "describe_video"):  # VideoLLaMA2's service reads each clip with its own sampler
        described = [captioner.model.describe_video(video, chosen.prompt, chosen.max_new_tokens) for video in videos]
        answers = [(d.text, d.n_frames, d.frame_size) for d in described]
    else:
        clips = [sample_frames_uniformly(video, chosen.n_frames, chosen.frame_size) for video in videos]
        with captioner.lock:
            texts = captioner.model.describe_many(clips, chosen.prompt, chosen.max_new_tokens, choice.batch_size)
        answers = [(text, len(frames), chosen.frame_size) for text, frames in zip(texts, clips, strict=True)]
    # An empty answer is recorded as such, never replaced by a made-up one.
    return [{"text": text, "status": "ok" if text.strip() else "empty", "prompt": chosen.prompt,
             "model": choice.model, "n_frames": n_frames, "frame_size": frame_size}
            for text, n_frames, frame_size in answers]


def run_describe(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    if not settings.visual.description.enabled:
        return outcome
    return _run_piece_stage("describe", outcome, workspace, _describe_key_parts(outcome, settings, workspace),
                            lambda out_dir: _describe_many([outcome], settings, [out_dir])[0])


def _text_embedding_key_parts(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> list:
    return [outcome.features.get("describe", {}).get("key"), _model_identity(settings.models.text_encoder)]


def _text_embedding_many(outcomes: list[PieceOutcome], settings: PreprocessSettings,
                         out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.text_encoder
    encoder = load_model("text_encoder", choice)
    embeddings = encoder.model.encode([outcome.features["describe"]["text"] for outcome in outcomes],
                                      choice.batch_size)
    for embedding, out_dir in zip(embeddings, out_dirs, strict=True):
        np.save(out_dir / CLIP_TEXT_FILE, embedding)
    return [{"file": CLIP_TEXT_FILE, "shape": list(embedding.shape), "model": choice.model}
            for embedding in embeddings]


def run_text_embedding(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    if "describe" not in outcome.features:
        return outcome
    return _run_piece_stage("text_embedding", outcome, workspace,
                            _text_embedding_key_parts(outcome, settings, workspace),
                            lambda out_dir: _text_embedding_many([outcome], settings, [out_dir])[0])


def _latents_key_parts(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> list:
    return [outcome.content_key, _model_identity(settings.models.vae)]


def _latents_many(outcomes: list[PieceOutcome], settings: PreprocessSettings, out_dirs: list[Path]) -> list[dict]:
    choice = settings.models.vae
    vae = load_model("vae", choice)
    videos = [_piece_file(outcome, VIDEO_FILE) for outcome in outcomes]
    results = []
    for latents, out_dir in zip(vae.model.encode_videos(videos, size=settings.standardise.size), out_dirs,
                                strict=True):
        np.save(out_dir / LATENTS_FILE, latents)
        results.append({"file": LATENTS_FILE, "shape": list(latents.shape), "model": choice.model,
                        "scaling_factor": vae.model.scaling_factor})
    return results


def run_latents(outcome: PieceOutcome, settings: PreprocessSettings, workspace: Workspace) -> PieceOutcome:
    if not settings.visual.latents.enabled:
        return outcome
    return _run_piece_stage("latents", outcome, workspace, _latents_key_parts(outcome, settings, workspace),
                            lambda out_dir: _latents_many([outcome], settings, [out_dir])[0])


def _encode(result) -> dict:
    """JSON form of a stage result (a dataclass) or a Rejection, for the cache."""
    from dataclasses import asdict

    kind = "rejection" if isinstance(result, Rejection) else "ok"
    return {"kind": kind, "value": asdict(result)}


def _decode(stored: dict, cls):
    value = stored["value"]
    if stored["kind"] == "rejection":
        return Rejection(**value)
    fields = {}
    for name, item in value.items():
        if isinstance(item, list):
            item = tuple(item)
        if name in ("face_box",) and item is not None:
            item = CropBox(**item)
        fields[name] = item
    return cls(**fields)


# ---------------------------------------------------------------- a stage over many pieces (one partition)

# Every per-piece stage by name, in the order the pieces go through them.
PIECE_STAGE_FUNCTIONS = {"sync": run_sync, **AUDIO_STAGE_FUNCTIONS, "action_units": run_action_units,
                         "describe": run_describe, "text_embedding": run_text_embedding, "latents": run_latents}


@dataclass(frozen=True)
class _BatchedStage:
    """A per-piece stage that also computes many pieces in one call: its per-piece function's key parts and a
    ``many(outcomes, settings, out_dirs) -> results`` that the per-piece function itself calls with one piece."""

    key_parts: Callable[[PieceOutcome, PreprocessSettings, Workspace], list]
    many: Callable[[list[PieceOutcome], PreprocessSettings, list[Path]], list[dict]]


# The stages batched across pieces: their outputs do not depend on batch-mates (preprocess.batching). Not here: the
# sync check, separation, transcription, wav2vec and action units (whole clips of differing lengths, or no model);
# speech emotion, whose input is the whole clip: its length is rarely shared, and a fixed batch shape for it
# would cost batch_size forward passes of a whole clip per piece.
_BATCHED_STAGES = {
    "text_emotion": _BatchedStage(_text_emotion_key_parts, _text_emotion_many),
    "valence_arousal": _BatchedStage(_valence_arousal_key_parts, _valence_arousal_many),
    "describe": _BatchedStage(_describe_key_parts, _describe_many),
    "text_embedding": _BatchedStage(_text_embedding_key_parts, _text_embedding_many),
    "latents": _BatchedStage(_latents_key_parts, _latents_many),
}
# Pieces per call of a batched stage: bounds what one call holds in memory (sampled frames, audio) and what a
# crash makes redo one by one. Inside a call the model runs in batches of its ModelChoice.batch_size items.
PIECES_PER_CALL = 32


def _batched_input_ready(stage: str, outcome: PieceOutcome, settings: PreprocessSettings) -> bool:
    """Whether the batched path computes this piece; the others go to the per-piece function, which passes them
    through (rejected, stage switched off, no description) exactly as it does alone."""
    if not outcome.kept:
        return False
    if stage == "describe":
        # VideoLLaMA2's service describes one clip per call: nothing to batch
        return settings.visual.description.enabled and not settings.models.captioning.model.startswith(
            VIDEOLLAMA2_PREFIX)
    if stage == "text_embedding":
        return "describe" in outcome.features
    if stage == "latents":
        return settings.visual.latents.enabled
    return True


def run_piece_stage_batch(stage: str, pieces: list[PieceOutcome], settings: PreprocessSettings,
                          workspace: Workspace) -> list[PieceOutcome]:
    """One per-piece stage over many pieces (a partition's), in order; rejected pieces pass through untouched.

    Each piece gets the outcome, cache key and stored files its per-piece function gives it alone. The stages in
    ``_BATCHED_STAGES`` compute their cache misses together, up to ``PIECES_PER_CALL`` pieces per call (the
    model runs in fixed-shape batches of its ``ModelChoice.batch_size`` items, ``preprocess.batching``), and
    store one entry per piece (``StageCache.run_many``). If a call crashes, its
    pieces are redone one by one, so that only the bad piece is rejected ``error``; a failure of the environment
    stops the run, as in the per-piece functions."""
    batched = _BATCHED_STAGES.get(stage)
    alone = PIECE_STAGE_FUNCTIONS[stage]
    if batched is None:
        return [alone(piece, settings, workspace) for piece in pieces]
    outcomes = list(pieces)
    ready = []
    for index, piece in enumerate(pieces):
        if _batched_input_ready(stage, piece, settings):
            ready.append(index)
        else:
            outcomes[index] = alone(piece, settings, workspace)
    for first in range(0, len(ready), PIECES_PER_CALL):
        group = ready[first:first + PIECES_PER_CALL]
        for index, outcome in zip(group, _run_batch(stage, batched, [pieces[i] for i in group], settings,
                                                    workspace), strict=True):
            outcomes[index] = outcome
    return outcomes


def _run_batch(stage: str, batched: _BatchedStage, group: list[PieceOutcome], settings: PreprocessSettings,
               workspace: Workspace) -> list[PieceOutcome]:
    """One call of a batched stage over a group of kept pieces (see ``run_piece_stage_batch``)."""
    try:
        keys = [stable_hash(stage, STAGE_VERSIONS[stage], *batched.key_parts(piece, settings, workspace))
                for piece in group]
        by_key = dict(zip(keys, group, strict=True))
        stored = workspace.cache.run_many(stage, keys, lambda missing, out_dirs: batched.many(
            [by_key[key] for key in missing], settings, out_dirs))
    except Exception as error:
        if is_environment_error(error):
            raise EnvironmentFailure(stage, group[0].clip_id, error) from error
        log.warning("stage %s crashed on a batch of %d pieces (%s): redoing them one by one\n%s", stage,
                    len(group), ", ".join(piece.clip_id for piece in group), traceback.format_exc())
        return [PIECE_STAGE_FUNCTIONS[stage](piece, settings, workspace) for piece in group]
    return [_with_entry(stage, piece, workspace, key, result, cached)
            for piece, key, (result, cached) in zip(group, keys, stored, strict=True)]
