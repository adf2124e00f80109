"""Preprocessing settings: the one typed source of truth for thresholds, output format and model references.

A *profile* is a named set of settings. ``default`` references the real models a user runs with;
``tiny`` references the small locally built models the tests and the offline demo use. The video stages of
this pipeline use MediaPipe's bundled legacy solutions in both profiles (they ship inside the wheel, so
"real" and "tiny" are the same there); the model stages (Demucs, Whisper, the emotion models, wav2vec 2.0, the
captioning model, SD 1.5's CLIP text encoder and VAE) differ: ``default`` names Hugging Face hub ids / Demucs
and Whisper model names, ``tiny`` names tiny models of the same classes under ``.models/tiny`` (built on first
use by ``tiny_models``), whose numbers mean nothing.

Every field can be overridden per run: ``preprocess(..., overrides={"filters": {"max_abs_yaw_deg": 30}})``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The captioner's default question (preprocess.visual.describe): the paper's attributes and actions.
DEFAULT_CAPTION_PROMPT = (
    "Describe the person in this video in one or two sentences: visible attributes (for example wearing "
    "earrings, glasses, a hat, hairstyle, clothing) and actions over the whole clip (for example turning "
    "head, nodding, smiling, raising eyebrows)."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> str:
        """A stable hash of these settings: part of every cache key that depends on them."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class LayoutSettings(_Section):
    """How dataset layouts are read at discovery (``preprocess/datasets/vfhq.py``, ``preprocess/datasets/mead.py``)."""

    mead_views: tuple[str, ...] = Field(
        ("front",), min_length=1, description="MEAD camera views made into candidates (front, down, top, left_30, "
        "left_60, right_30, right_60); every other view's videos are recorded as issues 'view_not_used'")


class ProbeSettings(_Section):
    decode_check: bool = Field(True, description="decode a frame near the start and end to catch truncation")


class LocateSettings(_Section):
    """Face location on the source video, before cropping (also counts faces for the multi-speaker filter)."""

    sample_fps: float = Field(2.0, description="source frames sampled per second for face counting/boxes")
    analysis_width: int = Field(640, description="sampled frames are downscaled to this width for detection")
    min_detection_confidence: float = 0.5
    face_box_scale: float = Field(
        1.8,
        description="landmark-derived square side = face_box_scale * crop_ratio * max(landmark extent); "
        "1.8 keeps hair, chin and some neck, as HDTF's boxes do",
    )
    default_crop_ratio: float = Field(1.0, description="crop_ratio when the dataset gives none")
    prefer_landmark_box: bool = Field(False, description="ignore annotated boxes and always use landmarks")
    # The crop that follows the face (preprocess/video/crop.py, docs/pipeline.md "The crop").
    follow_face: bool = Field(
        True, description="move the crop with the face's track (crop_method 'track'); False: one median box for the "
        "whole candidate (crop_method 'landmarks'/'detector')")
    track_smoothing_s: float = Field(
        1.0, ge=0, description="the face track's centre is averaged over a window this long (s): removes detection "
        "jitter; a steady drift passes unchanged")
    max_crop_speed: float = Field(
        0.5, gt=0, description="the crop's centre moves at most this many crop sides per second (a head turning or "
        "walking moves ~0.1-0.3; faster is a detection jump, a cut or another face)")
    annotated_box_face_margin: float = Field(
        0.1, ge=0, description="an annotated box is kept while every sampled face box lies inside it give or take "
        "this fraction of the face's side; a face leaving it further switches the clip to the face track")
    min_speaker_face_fraction: float = Field(
        0.5, ge=0, le=1, description="a face counts as a speaker (face_counts, multi_speaker) only when at least this "
        "fraction of the largest face's height (and at least filters.min_face_px): a portrait, a TV or an audience "
        "behind the speaker does not")


class StandardiseSettings(_Section):
    fps: int = 25
    size: int = 512
    crf: int = Field(18, description="libx264 constant rate factor (lower = better quality, bigger files)")
    preset: str = Field("veryfast", description="libx264 preset")
    sample_rate: int = 16000
    loudness_lufs: float = Field(-23.0, description="EBU R128 / ITU-R BS.1770-4 integrated loudness target")
    true_peak_dbfs: float = Field(-1.0, description="peak ceiling after gain, to avoid clipping")
    max_decode_errors: int = Field(
        20, ge=0, description="error lines ffmpeg may log while decoding the clip's range (a damaged packet logs "
        "about 2-5); above this the clip is rejected decode_errors, at or below it kept with a note decode_errors:<n>")


class MediaTimeouts(_Section):
    """Wall-clock limit of every ffmpeg/ffprobe call (``preprocess.run.media``): ``base_s + per_media_s x`` the seconds
    of media the call decodes or writes (base only for header reads and single-frame decodes).

    The limit exists so that no input can hang a worker; it is not a speed requirement. Measured here (2 cores):
    standardising 60 s of 720p to 512x512 takes about 5.5 s (11x faster than real time), so 8 s per second of media
    leaves ~90x headroom for 4K sources, slower machines and a CPU shared by several workers. A call past its limit
    is killed and raises ``FfmpegTimeout``; the stage fails for that clip (not cached: the next run retries it).
    Per run: ``overrides={"media": {"per_media_s": 20}}``; not part of any cache key (a limit changes no output).
    """

    base_s: float = Field(60.0, gt=0, description="seconds every call may take whatever the media's length")
    per_media_s: float = Field(8.0, ge=0, description="further seconds allowed per second of media handled")

    def limit_s(self, media_duration_s: float | None = None) -> float:
        """The limit in seconds for a call handling ``media_duration_s`` seconds of media (None: the base)."""
        return self.base_s + self.per_media_s * max(0.0, media_duration_s or 0.0)


class FaceSettings(_Section):
    """Per-frame MediaPipe face mesh on the standardised 512x512 frames as standardise's decode makes them (part of
    standardise's cache key)."""

    refine_landmarks: bool = Field(True, description="478 landmarks (with irises) instead of 468")
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5


class SpeechActivitySettings(_Section):
    """Silero VAD on the standardised clip's audio (``preprocess.video.speech_activity``); Silero's own defaults."""

    threshold: float = Field(0.5, gt=0, lt=1, description="a 32 ms window with a speech probability at or above "
                             "this starts speech; speech ends below threshold - 0.15")
    min_speech_ms: int = Field(250, ge=0, description="shorter speech segments are dropped")
    min_silence_ms: int = Field(100, ge=0, description="a pause must last this long to end a speech segment")
    speech_pad_ms: int = Field(30, ge=0, description="each speech segment is widened by this on both sides")


class ShotSettings(_Section):
    """Shot-cut detection (``preprocess.video.shots``: an equivalent of PySceneDetect's ContentDetector, its defaults)."""

    datasets: tuple[str, ...] = Field(
        ("folder", "hdtf", "vfhq", "mead"), description="dataset kinds whose clips are split at shot cuts (every "
        "kind: HDTF's annotated windows do contain cuts); the cuts are counted (n_shot_cuts) for every clip anyway")
    threshold: float = Field(27.0, gt=0, description="content score (mean |HSV difference| of consecutive frames, "
                             "0-255 scale) at or above which a frame starts a new shot; PySceneDetect's default")
    min_shot_frames: int = Field(15, ge=1, description="a cut closer than this to the previous cut is ignored "
                                 "(PySceneDetect's min_scene_len)")


class FrameQualitySettings(_Section):
    """What ``preprocess.video.frame_quality`` measures on the frames of standardise's one decode (part of standardise's
    cache key; the thresholds that judge the figures are in ``FilterSettings`` and re-judge without re-decoding)."""

    analysis_size: int = Field(256, ge=16, description="frames are shrunk to this square side for the content "
                               "score (PySceneDetect's automatic downscaling targets about 256 px wide)")
    sharpness_fps: float = Field(5.0, gt=0, description="face sharpness is measured at this rate (every 5th frame)")
    sharpness_crop_px: int = Field(128, ge=16, description="face crops are resized to this square side before the "
                                   "Laplacian, so that sharpness compares across face sizes")


class IdentitySettings(_Section):
    """The identity-change score (``preprocess.video.identity``)."""

    model: Literal["landmark_geometry"] = Field("landmark_geometry", description="the identity signature")
    window_frames: int = Field(10, ge=1, description="signatures are median-pooled over windows of this many frames")
    percentile: float = Field(80.0, ge=50, le=100, description="the score is this percentile of the pairwise "
                              "window distances (80: a second face in ~11% of the windows shows in full)")
    min_windows: int = Field(3, ge=2, description="fewer windows with a face: no score (null)")


class FilterSettings(_Section):
    """Each filter's threshold; a clip failing one is rejected with that filter's reason code."""

    min_clip_s: float = Field(3.0, description="shorter clips are rejected as too_short (paper: 3-20 s)")
    max_clip_s: float = Field(20.0, description="longer clips are split into equal pieces of at most this")
    min_face_frames_fraction: float = Field(0.9, description="below this fraction of frames with a face: no_face")
    min_face_px: float = Field(64.0, description="median detected face height in source pixels; below: face_too_small")
    min_source_crop_fraction: float | None = Field(
        0.5, ge=0, le=1, description="the square crop's side in source pixels below this fraction of "
        "standardise.size (0.5: 256 px for 512): low_resolution, decided before the encode (LatentSync keeps a face "
        "only at its training resolution); the clips table's upscale_factor is size / that side. None: off")
    max_abs_yaw_deg: float = Field(45.0, description="|yaw| above this counts as a side-profile frame")
    max_side_profile_fraction: float = Field(0.2, description="above this fraction of side-profile frames: side_profile")
    max_multi_face_fraction: float = Field(0.2, description="above this fraction of sampled frames with 2+ "
                                           "speaker-size faces (locate.min_speaker_face_fraction): multi_speaker")
    min_speech_fraction: float = Field(
        0.3, ge=0, le=1, description="below this fraction of frames in Silero VAD speech segments: no_speech "
        "(a talking head speaks most of the time; music, silence and room noise score near 0)")
    max_audio_padded_fraction: float = Field(
        0.1, ge=0, le=1, description="above this fraction of the piece's audio padded with silence because the "
        "source's audio track ended early: audio_missing")
    speech_activity: SpeechActivitySettings = SpeechActivitySettings()
    min_sharpness: float | None = Field(
        None, ge=0, description="median face-crop Laplacian variance below this: blurry; None: off (its scale "
        "depends on the footage: set it from the clips table's sharpness column)")
    max_identity_change: float | None = Field(
        0.08, ge=0, description="identity_change score above this: identity_change (the tracked face changes "
        "person), only with reject_identity_change. Set on generated clips (one face ~0.01, two faces ~0.15): "
        "calibrate on real footage from the clips table's identity_change column (docs/pipeline.md)")
    reject_identity_change: bool = Field(
        False, description="False (default): identity_change is measured and recorded only, never rejects (its "
        "threshold is not calibrated on real footage); True: reject above max_identity_change")
    shots: ShotSettings = ShotSettings()
    frame_quality: FrameQualitySettings = FrameQualitySettings()
    identity: IdentitySettings = IdentitySettings()


class SyncSettings(_Section):
    """The sync-expert filter (``preprocess.audio.sync_check``): SyncNet's AV offset and confidence per piece, the audio
    shifted when the offset is constant and small, the piece rejected ``out_of_sync`` when the confidence is low.

    Defaults are LatentSync's data pipeline (keep confidence >= 3 and |offset| <= 6 frames, shift to offset 0)
    with the public evaluation's search range (+/-15 frames); those thresholds were set on syncnet_v2 fed
    syncnet_python's own face crop, which the stage reproduces (docs/sync_expert.md). On other data, run
    ``mode=record_only`` first and read the report's confidence and offset histograms. SyncNet-style confidences are known to be low on
    non-English speech, so in-the-wild datasets get a lower threshold (``DATASET_SETTINGS``)."""

    enabled: bool = Field(True, description="measure every kept piece (needs models.sync_expert)")
    mode: Literal["reject_and_correct", "record_only"] = Field(
        "reject_and_correct", description="reject_and_correct: apply the thresholds below (reject out_of_sync, shift "
        "the audio of a correctable offset); record_only: measure offset and confidence and record them "
        "(av_* columns, the report's histograms) but never reject or shift, to calibrate the thresholds on one's own "
        "data before filtering with them (the tiny profile: a random expert's numbers mean nothing)")
    max_shift: int = Field(15, ge=1, le=30, description="offsets searched: -max_shift..+max_shift frames (25 fps)")
    min_confidence: float = Field(3.0, ge=0, description="confidence (median minus minimum of the mean distances "
                                  "over the shifts, LSE-C) below this: out_of_sync")
    max_correctable_offset_frames: int = Field(
        6, ge=0, description="a constant offset up to this many frames is corrected by shifting the audio; a larger "
        "one rejects the piece out_of_sync")
    segment_s: float = Field(4.0, gt=0, description="the offset is measured per segment of this length too; it is "
                             "constant when every segment's offset is within max_offset_spread_frames of the piece's")
    max_offset_spread_frames: int = Field(1, ge=0, description="see segment_s; a drifting offset cannot be "
                                          "corrected by one shift: out_of_sync")
    segment_min_confidence: float | None = Field(
        None, ge=0, description="a segment's offset counts in the constancy check only when the segment's own "
        "confidence reaches this (None: min_confidence); a pause's flat distances have a random argmin. With fewer "
        "than two confident segments the piece's offset decides")


class RunLimits(_Section):
    """When a run gives up: per-task time limits and the share of failed clips that fails the whole run."""

    task_timeout_s: float = Field(
        3600.0, gt=0, description="a stage task running longer is failed and its clip rejected 'timeout' (ffmpeg "
        "calls have their own, tighter limits scaled to the media's duration)")
    max_error_fraction: float = Field(
        0.25, ge=0, le=1, description="a stage that fails ('error'/'timeout') on more than this share of the clips "
        "it ran on fails the run: so many failures are not about the clips")


def machine_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _machine_has_cuda() -> bool:
    import torch  # imported here: settings are read in processes that never touch a model

    return torch.cuda.is_available()


def _default_gpus_per_gpu_task() -> float:
    return 1.0 if _machine_has_cuda() else 0.0


class EngineSettings(_Section):
    """Where the flow's stage tasks run (``flows.engines``, docs/scale.md): threads of the flow's own process, a
    Dask cluster (prefect-dask) or a Ray cluster (prefect-ray). Not part of any cache key: the engine changes
    where a stage runs, never what it writes (tests/test_engines.py checks byte-identical outputs)."""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads", description="threads: a thread pool in the flow's process; dask / ray: a cluster of worker "
        "processes, local (started and stopped with the run) or at `address`")
    workers: int | None = Field(
        None, ge=1, description="threads, or worker processes of a local Dask/Ray cluster (one task each at a "
        "time); None: the top-level `workers` (the machine's cores)")
    address: str | None = Field(
        None, description="an existing cluster to run on instead of a local one: a Dask scheduler "
        "('tcp://host:8786') or a Ray cluster ('ray://host:10001', or 'auto' on a node of it)")
    gpus_per_gpu_task: float = Field(
        default_factory=_default_gpus_per_gpu_task, ge=0, description="GPUs a GPU stage task requests from Dask "
        "(worker resource 'GPU') or Ray (num_gpus); default 1 when this machine has CUDA, else 0 (no request)")


class ShardSettings(_Section):
    max_samples_per_shard: int = 100
    max_bytes_per_shard: int = 1 << 30
    publish_hard_links: bool = Field(
        False, description="publish shards as hard links to the partitions' own shards instead of copies (reflinks "
        "where the file system has them): saves one copy of the shards on disk, but a shard damaged in place is then "
        "damaged in both places, and the only intact source is a rerun of its partition")


class PartitionSettings(_Section):
    """How candidates are grouped into partitions, the unit of orchestration (``preprocess.run.partitions``): one Prefect
    task per partition per stage group, so a dataset's task-run count grows with its partitions, not clips x stages."""

    max_clips: int = Field(16, ge=1, description="candidates per partition at most")
    max_seconds: float = Field(
        600.0, gt=0, description="a partition is closed once its candidates' annotated durations reach this many "
        "seconds (candidates without an end time count as one clip only)")
    prune_work: bool = Field(
        True, description="once a partition's shards are written, delete the work/ entries of its kept pieces' cut "
        "files (what the shard samples hold), so that a kept second is stored once beyond the shard (in the "
        "standardised clip, from which a changed setting re-cuts it)")
    gpu_slots: int = Field(1, ge=1, description="GPU stage-group tasks running at once, across every run using "
                           "the same Prefect server (a strict global concurrency limit)")
    gpu_limit_name: str = Field("synchrorama-gpu", description="the Prefect global concurrency limit the GPU "
                                "stage groups take a slot of; created with gpu_slots when missing")


class ModelChoice(_Section):
    """One model stage's model: what to load, and how to run it.

    ``model`` is a hub id (Hugging Face for the transformers models), a Demucs or Whisper model name, or a local
    path (a relative path is relative to the repository root, not to the working directory). ``device``:
    ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:N]``. ``batch_size`` is the rows of one forward
    pass; the batched stages (``preprocess.run.batching``) run items across a partition's pieces in passes of exactly
    that many rows of one shape (a short pass is filled with copies), so that a clip's numbers never depend on its
    batch-mates (a resumed or re-partitioned run must give identical outputs). ``dtype``:
    ``float32``, ``float16`` or ``bfloat16`` (half precision only takes effect on CUDA).
    """

    model: str
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None: the default branch")
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class ModelRefs(_Section):
    """Which model produced what: recorded next to every output row. The one place that names models."""

    face_mesh: str = "mediapipe.solutions.face_mesh (bundled, refine_landmarks)"
    face_detection: str = "mediapipe.solutions.face_detection (bundled, full-range model_selection=1)"
    separation: ModelChoice = ModelChoice(model="htdemucs")  # Demucs v4 hybrid transformer (demucs package)
    transcription: ModelChoice = ModelChoice(model="small")  # openai-whisper model name or checkpoint path
    text_emotion: ModelChoice = ModelChoice(model="j-hartmann/emotion-english-distilroberta-base", batch_size=16)
    speech_emotion: ModelChoice = ModelChoice(model="superb/hubert-large-superb-er")
    valence_arousal: ModelChoice = ModelChoice(model="audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim")
    wav2vec: ModelChoice = ModelChoice(model="facebook/wav2vec2-base-960h")
    # The paper captions with VideoLLaMA2, which is not on PyPI and pins an old torch: with a reference
    # "videollama2:<path or id>" it runs in its own environment as a Prefect deployment that the describe stage
    # calls (flows/videollama2_service.py, docs/visual_features.md). The default is a transformers-native
    # vision-language model that installs here.
    captioning: ModelChoice = ModelChoice(model="Qwen/Qwen2.5-VL-3B-Instruct", batch_size=1, dtype="bfloat16")
    # A diffusers Stable Diffusion 1.5 folder: text_encoder/ + tokenizer/ (descriptions), vae/ (latents).
    text_encoder: ModelChoice = ModelChoice(model="stable-diffusion-v1-5/stable-diffusion-v1-5", batch_size=16)
    vae: ModelChoice = ModelChoice(model="stable-diffusion-v1-5/stable-diffusion-v1-5", batch_size=8)
    # syncnet_v2 (model/syncnet.py) for the sync filter: a local state-dict file, not on any hub. Get it with
    # joonson/syncnet_python's download_model.sh (or LatentSync's checkpoints/auxiliary/syncnet_v2.model) and put
    # it here, or point this at it. batch_size: 5-frame windows per forward pass.
    sync_expert: ModelChoice = ModelChoice(model=".models/syncnet_v2.model", batch_size=20)


class SeparationSettings(_Section):
    """Music/noise removal (Demucs) and the speech-activity check on the separated vocals."""

    stem: str = Field("vocals", description="the Demucs source kept as the speech track")
    overlap: float = Field(0.25, description="fraction of a segment shared by neighbouring segments (cross-faded)")
    segment_s: float | None = Field(None, description="segment length in seconds; None: the model's own")
    silence_peak_dbfs: float = Field(-60.0, description="input peak below this: silent, not separated")
    activity_frame_ms: float = Field(30.0, description="frame length of the energy-based speech-activity check")
    activity_frame_dbfs: float = Field(-45.0, description="vocals frame RMS above this counts as active")
    min_speech_fraction: float = Field(0.05, description="fewer active frames than this: the clip has no speech")


class TranscriptionSettings(_Section):
    language: str | None = Field(None, description="force a language code (e.g. 'en'); None: Whisper detects it")
    temperature_fallback: bool = Field(True, description="Whisper's re-decoding at higher temperatures on failure")
    condition_on_previous_text: bool = True
    no_speech_threshold: float = Field(0.6, description="Whisper drops a segment above this no-speech prob...")
    logprob_threshold: float = Field(-1.0, description="...when its average log-prob is also below this")


class TextEmotionSettings(_Section):
    max_tokens: int = Field(512, description="longer transcripts are truncated (RoBERTa's context)")
    english_only: bool = Field(True, description="the default model is English-only: other languages are flagged")


class ValenceArousalSettings(_Section):
    window_s: float = Field(2.0, description="window length in seconds; hop = window_s / 2 (50% overlap)")


class Wav2VecSettings(_Section):
    """Which wav2vec 2.0 hidden states the wav2vec stage stores (``preprocess.audio.wav2vec_features``).

    Index 0 is the feature projection of the CNN encoder, index i the output of transformer layer i (0..12 for
    wav2vec2-base). The default, None, stores all of them: what the SynchroRaMa model reads (``model.config``
    ``DataShapes.wav2vec_layers``: all 13 for the full model, all 3 for the tiny one). Each stored layer costs
    ``25 x hidden_size x 2`` bytes per second of kept video (38.4 KB for wav2vec2-base; docs/audio_features.md).
    """

    layers: tuple[int, ...] | None = Field(
        None, min_length=1, description="hidden-state indices to store, strictly increasing (e.g. [12]: the last "
        "layer of wav2vec2-base only); None: all of them. The training loader refuses shards whose stored layers "
        "are not the ones the model reads")

    @field_validator("layers")
    @classmethod
    def _strictly_increasing(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None and (layers[0] < 0 or list(layers) != sorted(set(layers))):
            raise ValueError(f"wav2vec layers {list(layers)}: expected non-negative, strictly increasing indices")
        return layers


class ActionUnitSettings(_Section):
    """Per-frame facial action units (``preprocess.visual.action_units``)."""

    backend: Literal["geometric", "torch_export"] = Field(
        "geometric", description="geometric: measures on the face mesh; torch_export: a learned detector (.pt2)")
    exported_model: str | None = Field(None, description="torch_export: path of the torch.export program")
    exported_au_names: tuple[str, ...] = Field(
        (), description="torch_export: the detector's output columns, in order (e.g. AU01, AU02, ...)")
    exported_input_size: int = Field(224, description="torch_export: side of the square face crops it takes")


class DescriptionSettings(_Section):
    """The clip description (``preprocess.visual.describe``) and its CLIP text embedding (``preprocess.visual.text_embedding``)."""

    enabled: bool = True
    prompt: str = Field(DEFAULT_CAPTION_PROMPT, description="what the captioning model is asked; recorded per row")
    n_frames: int = Field(8, ge=1, description="frames sampled uniformly over the clip and shown to the model")
    frame_size: int = Field(336, ge=16, description="sampled frames are resized to this square side")
    max_new_tokens: int = Field(60, ge=1)


class LatentSettings(_Section):
    """Optional: Stable Diffusion VAE latents of every frame, so that training skips the VAE encoder."""

    enabled: bool = Field(False, description="off by default: fp16 latents cost ~0.8 MB per second of video")


class VisualSettings(_Section):
    """Parameters of the visual and semantic stages (their models are in ``ModelRefs``)."""

    action_units: ActionUnitSettings = ActionUnitSettings()
    description: DescriptionSettings = DescriptionSettings()
    latents: LatentSettings = LatentSettings()


class AudioSettings(_Section):
    """Parameters of the audio and emotion stages (their models are in ``ModelRefs``)."""

    separation: SeparationSettings = SeparationSettings()
    transcription: TranscriptionSettings = TranscriptionSettings()
    text_emotion: TextEmotionSettings = TextEmotionSettings()
    valence_arousal: ValenceArousalSettings = ValenceArousalSettings()
    wav2vec: Wav2VecSettings = Wav2VecSettings()


class PreprocessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "default"
    workers: int = Field(default_factory=machine_cores, ge=1, description="stage tasks run concurrently: threads "
                         "(ffmpeg and MediaPipe release the GIL), or local Dask/Ray worker processes unless "
                         "engine.workers says otherwise; default: the machine's cores")
    layouts: LayoutSettings = LayoutSettings()
    probe: ProbeSettings = ProbeSettings()
    locate: LocateSettings = LocateSettings()
    standardise: StandardiseSettings = StandardiseSettings()
    faces: FaceSettings = FaceSettings()
    filters: FilterSettings = FilterSettings()
    shards: ShardSettings = ShardSettings()
    partitions: PartitionSettings = PartitionSettings()
    limits: RunLimits = RunLimits()
    sync: SyncSettings = SyncSettings()
    audio: AudioSettings = AudioSettings()
    visual: VisualSettings = VisualSettings()
    media: MediaTimeouts = MediaTimeouts()
    engine: EngineSettings = Field(default_factory=EngineSettings)
    models: ModelRefs = ModelRefs()


ProfileName = Literal["default", "tiny"]

# Where the tiny profile's models live (relative to the repository root; git-ignored, built on first use).
TINY_MODELS_DIR = ".models/tiny"

# Per-profile overrides of the defaults above. The tiny profile keeps the video stages identical (MediaPipe is
# bundled; only the resolution gate is looser, for the generated videos) but uses a faster encoder preset so that tests and the demo finish quickly, and points every audio
# model stage at a tiny random model. It forces English and turns off Whisper's temperature fallback: a random
# Whisper would otherwise detect random languages (so no text would reach the text-emotion model) and re-decode
# six times per window.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "standardise": {"preset": "ultrafast"},
        # The generated test and demo videos are 640x360 with a ~150 px face crop (3.4x to 512): the tiny profile
        # lets up to 4x through (128 px) so that they reach the later stages; a 160x160 video still fails.
        "filters": {"min_source_crop_fraction": 0.25},
        "shards": {"max_samples_per_shard": 4},
        # A random Demucs' vocals are mostly above 8 kHz and vanish at 16 kHz (about -65 dBFS): a lower
        # activity threshold lets speech clips reach the later stages, while digital silence stays silence.
        "audio": {"separation": {"activity_frame_dbfs": -90.0},
                  "transcription": {"language": "en", "temperature_fallback": False,
                                    "condition_on_previous_text": False}},
        "models": {
            # a local Demucs repo folder; the reference names its bag, loaded by get_model(name, repo=folder)
            "separation": {"model": f"{TINY_MODELS_DIR}/htdemucs/htdemucs.yaml"},
            "transcription": {"model": f"{TINY_MODELS_DIR}/whisper/tiny-random.pt"},
            "text_emotion": {"model": f"{TINY_MODELS_DIR}/text-emotion"},
            "speech_emotion": {"model": f"{TINY_MODELS_DIR}/speech-emotion"},
            "valence_arousal": {"model": f"{TINY_MODELS_DIR}/valence-arousal"},
            "wav2vec": {"model": f"{TINY_MODELS_DIR}/wav2vec2"},
            "captioning": {"model": f"{TINY_MODELS_DIR}/captioner", "dtype": "float32"},
            "text_encoder": {"model": f"{TINY_MODELS_DIR}/sd15"},
            "vae": {"model": f"{TINY_MODELS_DIR}/sd15"},
            "sync_expert": {"model": f"{TINY_MODELS_DIR}/syncnet/syncnet_v2_tiny.model"},
        },
        # The tiny Qwen2.5-VL's pixel budget is 112x112 per image (16 vision tokens): frames are sampled at that
        # size, so its processor does not resize them again; two frames and 16 new tokens keep the demo quick.
        "visual": {"description": {"n_frames": 2, "frame_size": 112, "max_new_tokens": 16}},
        # A random sync expert's offsets and confidences mean nothing: measured and recorded, never acted on.
        "sync": {"mode": "record_only"},
    },
}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# What a dataset itself fixes, applied over the profile and under the run's overrides. HDTF and MEAD are English
# recordings: Whisper is told so instead of guessing per clip (a wrong guess on a short or noisy clip gives a
# transcript in another language, which the English text-emotion model then cannot score).
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "hdtf": {"audio": {"transcription": {"language": "en"}}},
    "mead": {"audio": {"transcription": {"language": "en"}}},
    # In-the-wild folders and VFHQ hold many languages, on which SyncNet's confidence runs low: a lower sync
    # threshold (a judgement, not a measurement: calibrate it on a run's av_confidence histogram).
    "folder": {"sync": {"min_confidence": 1.5}},
    "vfhq": {"sync": {"min_confidence": 1.5}},
}


def load_settings(profile: str = "default", overrides: dict[str, Any] | None = None,
                  dataset: str | None = None) -> PreprocessSettings:
    """Settings for a named profile, then the dataset's own settings (``DATASET_SETTINGS``), then per-run
    overrides on top (nested dicts merge)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown settings profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = _deep_merge({"profile": profile}, PROFILES[profile])
    values = _deep_merge(values, DATASET_SETTINGS.get(dataset or "", {}))
    values = _deep_merge(values, overrides or {})
    return PreprocessSettings.model_validate(values)
