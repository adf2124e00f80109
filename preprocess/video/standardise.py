"""Stage: cut, crop and re-encode one candidate clip to the training format.

Video: the first real video stream (not cover art), deinterlaced where frames are flagged interlaced, constant
25 fps, the chosen square crop scaled to 512x512 (Lanczos), H.264 (libx264, yuv420p),
no audio track. A crop that follows the face (``preprocess.video.crop.CropTrack``) is moved frame by frame in the same
encode: ffmpeg's ``sendcmd`` sets the crop's x/y per output frame. Measured on 30 s of 720p (2 busy cores): decoding
and filtering took 1.0-1.8 s with or without the per-frame commands (noise, no cost of their own); x264 then spends
what the content costs (a crop that follows a drifting face sees the background move: about 2x the bytes). Audio: first audio track (of the candidate's separate audio file when it has one: MEAD's
microphone recording), downmixed to mono, resampled to 16 kHz, loudness-normalised to
-23 LUFS integrated (EBU R128 / ITU-R BS.1770-4, measured with pyloudnorm) with the peak kept under
-1 dBFS, and trimmed or zero-padded to exactly ``n_frames * 640`` samples so that audio and video have the
same duration (the padding, audio the source lacks, is counted in ``audio_padded_samples`` for the
``audio_missing`` filter). Both are cut by the same input seek and both are pinned to start at that seek point: a stream
that starts later in the source (an audio track with an offset, a video whose first frame comes late) is
padded at the front (silence, the first frame repeated) and one that starts earlier is trimmed, so lip motion
and speech stay aligned frame for frame. Gaps inside the audio are filled with silence for the same reason.

One decode: the stage below passes a ``frame_consumer`` (the face mesh and the frame-quality measures,
``STAGE`` at the end of this module). The same ffmpeg process then splits the filtered frames after the last
filter: one branch goes to libx264 (``clip.mp4``, byte-identical to the encode without a consumer), the other, as
raw RGB on stdout, to the consumer, frame by frame while ffmpeg goes on decoding and x264 encodes on its own
threads. ``clip.mp4`` is no longer decoded again (it was twice: for the face mesh and for frame quality); the
consumer sees the frames before x264's (CRF 18) compression. ffmpeg's count of the frames it encoded and the
consumer's must agree (else a ``RuntimeError``: a broken pipeline, not a verdict on the clip). One process writes
both branches, so no pipe joins two tools that could wait on each other; the time limit counts only the waits for
ffmpeg, not the consumer's work (``preprocess.run.media.stream_stdout``).

Decode errors: this stage decodes the clip's whole range anyway, so it counts the error lines ffmpeg logs while
doing it (probe decodes only near both ends of the file and cannot see damage in the middle). More than
``max_decode_errors`` rejects the clip ``decode_errors`` (detail: the count and the first line); fewer keep it with
the note ``decode_errors:<n>``.

Only verdicts about the input are returned as rejections (and so cached): ``encode_failed`` is ffmpeg exiting
with an error on this input. A failure that is not the clip's (``preprocess.run.media.check_tool_run``) propagates
instead: past the encode's time limit (``MediaTimeouts``, scaled to the clip's duration), ffmpeg killed by a
signal (the OOM killer), an output missing after the encode: a ``TransientMediaFailure``, so the clip fails with
an uncached ``error`` for this run and the next run retries it; a full disk, an I/O error or no memory: an
``OSError`` with that errno, which stops the run (``preprocess.run.failures``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile

from preprocess.run.cache import stable_hash
from preprocess.run.job import decode, encode, rejected
from preprocess.run.media import (
    FFMPEG_PREFIX,
    FfmpegError,
    MediaFileVanished,
    StreamLog,
    count_video_frames,
    media_limits,
    run_ffmpeg,
    stream_stdout,
)
from preprocess.run.records import CropBox, Rejection
from preprocess.run.settings import MediaTimeouts, StandardiseSettings
from preprocess.run.stage import Stage
from preprocess.video.crop import CropTrack, choose_crop
from preprocess.video.face_models import mediapipe_version
from preprocess.video.faces import FaceMeshTracker
from preprocess.video.frame_quality import FrameQualityMeter

VIDEO_FILE = "clip.mp4"
AUDIO_FILE = "clip.wav"
CROP_GRAPH_FILE = "crop_track.ffgraph"  # scratch: the filter graph of a moving crop, removed after the encode


@dataclass(frozen=True)
class StandardisedClip:
    video: str  # file name inside the stage's output directory
    audio: str
    n_frames: int
    fps: int
    size: int
    sample_rate: int
    loudness_in_lufs: float | None  # None: silent or too short to measure
    gain_db: float
    audio_padded_samples: int  # zeros appended at the end because the source's audio ended early (filter audio_missing)
    notes: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


def standardise_clip(
    source: str, start_s: float, duration_s: float, box: CropBox, settings: StandardiseSettings, out_dir: Path,
    limits: MediaTimeouts | None = None, audio_source: str | None = None, crop_track: CropTrack | None = None,
    frame_consumer: Callable[[np.ndarray], None] | None = None,
) -> StandardisedClip | Rejection:
    """``audio_source``: a separate file to take the audio from instead of ``source``'s own track (MEAD's
    microphone recording), cut over the same range: read as a second ffmpeg input with the same seek.

    ``frame_consumer``: called with every output frame, in order, as a (size, size, 3) uint8 RGB array, from the
    same decode that the encoder gets (see "One decode" in the module docstring); frame ``f`` it sees is frame
    ``f`` of ``clip.mp4``. An exception it raises stops ffmpeg and propagates."""
    video_path, raw_audio_path = out_dir / VIDEO_FILE, out_dir / "raw_audio.wav"
    video_filter = (
        # bwdif touches only frames flagged interlaced (broadcast-style sources); progressive ones pass as they are
        f"bwdif=mode=send_frame:deint=interlaced,fps={settings.fps}:start_time=0,"
        f"{_moving_crop(crop_track) if crop_track else ''}crop={int(box.w)}:{int(box.h)}:{int(box.x)}:{int(box.y)},"
        f"scale={settings.size}:{settings.size}:flags=lanczos,setsar=1,format=yuv420p"
    )
    graph_file = out_dir / CROP_GRAPH_FILE
    if frame_consumer is not None:
        # the encoder and the consumer's raw RGB pipe get the same frames: split after the last filter
        graph = f"[0:V:0]{video_filter},split=2[encode][analyse]"
        video_input = ["-filter_complex_script", str(graph_file)] if crop_track else ["-filter_complex", graph]
        video_maps, analysis_output = ["-map", "[encode]"], ["-map", "[analyse]", "-f", "rawvideo",
                                                             "-pix_fmt", "rgb24", "pipe:1"]
    else:
        graph = video_filter
        video_input, analysis_output = [], []
        video_maps = ["-map", "0:V:0", *(["-filter_script:v", str(graph_file)] if crop_track else ["-vf", graph])]
    # A track's per-frame commands can outgrow a command-line argument (128 KiB): the graph goes in a file
    if crop_track:
        graph_file.write_text(graph)
    # No seek for a clip from the file's start: ffmpeg seeks on the video's key frames, and a picture that
    # starts late would drop the audio before it.
    seek = ["-ss", f"{start_s:.3f}"] if start_s > 0 else []
    audio_input = [*seek, "-t", f"{duration_s:.3f}", "-i", audio_source] if audio_source else []
    command = [
        *seek, "-t", f"{duration_s:.3f}", "-i", source, *audio_input, *video_input,
        *video_maps, "-c:v", "libx264", "-preset", settings.preset,
        "-crf", str(settings.crf), "-an", "-movflags", "+faststart", str(video_path),
        *analysis_output,
        "-map", "1:a:0" if audio_source else "0:a:0", "-af", f"aresample={settings.sample_rate}:async=1:first_pts=0",
        "-ac", "1", "-ar", str(settings.sample_rate), "-c:a", "pcm_s16le",
        str(raw_audio_path),
    ]
    # no source path in the purpose: it ends up in the cached encode_failed detail, and cached outputs are
    # shared by every path holding the same content
    purpose = f"standardising the clip from {start_s:.3f} s for {duration_s:.3f} s"
    try:
        if frame_consumer is None:
            decode_errors, first_error = _encode(command, purpose, duration_s, limits, (video_path, raw_audio_path))
            consumed = None
        else:
            decode_errors, first_error, consumed = _encode_and_stream(
                command, purpose, duration_s, limits, (video_path, raw_audio_path), settings.size, frame_consumer)
        n_frames = count_video_frames(video_path, limits=limits)
    except FfmpegError as error:  # only a verdict on the input: timeouts, kills and a full disk are not FfmpegErrors
        return Rejection("standardise", "encode_failed", str(error))
    finally:
        graph_file.unlink(missing_ok=True)
    if consumed is not None and consumed != n_frames:  # the split broken: the consumer's frames are not the clip's
        raise RuntimeError(f"{purpose}: the encoder wrote {n_frames} frames, the frame consumer got {consumed}")
    # with -v error every line ffmpeg logged is an error, and the encoder side does not log on success: these
    # are the decoder's and demuxer's complaints about the source over the clip's whole range
    if decode_errors > settings.max_decode_errors:
        video_path.unlink(missing_ok=True)  # a rejection keeps no media in the cache
        raw_audio_path.unlink(missing_ok=True)
        return Rejection("standardise", "decode_errors",
                         f"ffmpeg logged {decode_errors} decode errors over the clip (more than max_decode_errors="
                         f"{settings.max_decode_errors}); first: {first_error[:300]}")
    error_notes = [f"decode_errors:{decode_errors}"] if decode_errors else []
    if n_frames == 0:
        return Rejection("standardise", "no_frames", "the cut produced no video frames")

    audio, sample_rate = soundfile.read(raw_audio_path, dtype="float32", always_2d=False)
    raw_audio_path.unlink()
    samples_per_frame = settings.sample_rate // settings.fps
    padded_samples = max(0, n_frames * samples_per_frame - len(audio))
    audio, notes = _fit_length(audio, n_frames * samples_per_frame)
    audio, loudness_in, gain_db, loudness_notes = normalise_loudness(audio, sample_rate, settings)
    soundfile.write(out_dir / AUDIO_FILE, audio, sample_rate, subtype="PCM_16")
    return StandardisedClip(
        video=VIDEO_FILE, audio=AUDIO_FILE, n_frames=n_frames, fps=settings.fps, size=settings.size,
        sample_rate=sample_rate, loudness_in_lufs=loudness_in, gain_db=gain_db, audio_padded_samples=padded_samples,
        notes=tuple(error_notes + notes + loudness_notes),
    )


def _encode(command: list, purpose: str, duration_s: float, limits: MediaTimeouts | None,
            outputs: tuple[Path, ...]) -> tuple[int, str]:
    """The encode alone: (error lines ffmpeg logged, the first of them)."""
    encode = run_ffmpeg(command, purpose=purpose, media_duration_s=duration_s, limits=limits, outputs=outputs)
    return encode.log_lines, encode.first_line


def _encode_and_stream(command: list, purpose: str, duration_s: float, limits: MediaTimeouts | None,
                       outputs: tuple[Path, ...], size: int, frame_consumer: Callable[[np.ndarray], None],
                       ) -> tuple[int, str, int]:
    """The encode with its frames streamed to ``frame_consumer``: (error lines, the first, frames consumed).

    One ffmpeg process writes both outputs, so no pipe joins two tools and none can wait on a dead partner:
    ffmpeg dying ends the stream (its exit status is judged as in :func:`preprocess.run.media.check_tool_run`), and the
    consumer failing kills ffmpeg (``stream_stdout`` closes on leaving the loop). The time limit counts only the
    waits for ffmpeg, not the consumer's work (a face mesh on a slow CPU must not trip the encode's limit)."""
    log = StreamLog()
    frames = stream_stdout([*FFMPEG_PREFIX, *command], chunk_bytes=size * size * 3, purpose=purpose,
                           timeout_s=media_limits(limits).limit_s(duration_s), log=log)
    consumed = 0
    try:
        for chunk in frames:
            frame_consumer(chunk.reshape(size, size, 3))
            consumed += 1
    finally:
        frames.close()  # a consumer's exception: ffmpeg is killed now, not when the generator is collected
    missing = [str(path) for path in outputs if not path.exists()]
    if missing:
        raise MediaFileVanished(f"{purpose}: ffmpeg exited 0 but {', '.join(missing)} is missing (deleted while "
                                f"the run was writing it?); the next run retries it")
    return log.lines, log.first_line, consumed


def _moving_crop(track: CropTrack) -> str:
    """An ffmpeg ``sendcmd`` filter that moves the following ``crop`` to (xs[f], ys[f]) on output frame f.

    Commands fire when a frame's time reaches theirs: each is stamped half a frame early, so rounding in the
    timestamps cannot push it onto the next frame; only moves are sent. The commands sit in single quotes (the
    graph parser strips them), so their commas and semicolons stay inside sendcmd's argument.
    """
    commands, last = [], None
    for frame, (x, y) in enumerate(zip(track.xs, track.ys, strict=True)):
        if (x, y) != last:
            commands.append(f"{max(0.0, (frame - 0.5) / track.fps):.6f} crop x {x}, crop y {y};")
            last = (x, y)
    return "sendcmd=c='" + "\n".join(commands) + "',"


def _fit_length(audio: np.ndarray, n_samples: int) -> tuple[np.ndarray, list[str]]:
    """Trim or zero-pad to exactly ``n_samples``; more than 40 ms of padding is worth a note."""
    if len(audio) >= n_samples:
        return audio[:n_samples], []
    notes = ["audio_padded"] if n_samples - len(audio) > 640 else []
    return np.pad(audio, (0, n_samples - len(audio))), notes


def normalise_loudness(
    audio: np.ndarray, sample_rate: int, settings: StandardiseSettings
) -> tuple[np.ndarray, float | None, float, list[str]]:
    """Gain to the integrated-loudness target, limited so the peak stays under the ceiling."""
    if len(audio) < int(0.4 * sample_rate) or not np.any(audio):
        return audio, None, 0.0, ["silent_audio"]
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64))
    if not np.isfinite(loudness):
        return audio, None, 0.0, ["silent_audio"]
    gain_db = settings.loudness_lufs - loudness
    notes = []
    peak = float(np.max(np.abs(audio)))
    ceiling = 10 ** (settings.true_peak_dbfs / 20)
    if peak * 10 ** (gain_db / 20) > ceiling:
        gain_db = 20 * np.log10(ceiling / peak)
        notes.append("peak_limited")
    return (audio * 10 ** (gain_db / 20)).astype(np.float32), round(float(loudness), 2), round(float(gain_db), 2), notes


# ---------------------------------------------------------------- the stage


def frame_analysis_identity(settings) -> list:
    """What the face mesh and the frame-quality measures inside this stage's decode depend on."""
    return [settings.faces.fingerprint(), settings.models.face_mesh, mediapipe_version(),
            settings.filters.frame_quality.fingerprint()]


def _choose_crop(job, settings, workspace):
    """The crop (a fixed box or a face track) onto the job, before the key: the crop is an input of the encode."""
    fps = settings.standardise.fps
    # a frame more than the encode can give: the track covers every output frame
    choice = choose_crop(job.candidate, job.probe, job.survey, settings.locate, fps,
                         math.ceil(job.duration_s * fps) + 1)
    if isinstance(choice, Rejection):
        return choice
    track = choice.track
    job = replace(job, crop_box=choice.box, crop_method=choice.method, crop_track=track,
                  crop_max_speed=track.max_speed if track else None, notes=job.notes + choice.notes)
    low_resolution = low_resolution_rejection(int(choice.box.w), settings)
    # the crop stays on the rejected job, so that its row shows the crop size and upscale factor it would have had
    return rejected(job, low_resolution) if low_resolution else job


def upscale_factor(crop_side_px: float, size: int) -> float:
    """How many times standardise enlarges the source crop: ``size`` over the crop's side in whole source pixels
    (ffmpeg crops ``int(side)``); 1 or less: no upscaling."""
    return round(size / max(int(crop_side_px), 1), 4)


def low_resolution_rejection(crop_side_px: int, settings) -> Rejection | None:
    """``low_resolution`` when the square crop's side in source pixels (ffmpeg crops ``int(box.w)``) is below
    ``filters.min_source_crop_fraction`` of the output size: the clip would be upscaled more than 2x (at 0.5) to
    ``standardise.size``. Decided here, before the encode, so that no time is spent standardising it; not cached
    (a settings change re-judges it for free)."""
    fraction, size = settings.filters.min_source_crop_fraction, settings.standardise.size
    if fraction is None or crop_side_px >= fraction * size:
        return None
    return Rejection("standardise", "low_resolution",
                     f"the source crop is {crop_side_px} px square, below filters.min_source_crop_fraction={fraction} "
                     f"of the {size} px output ({fraction * size:.0f} px): it would be upscaled "
                     f"{upscale_factor(crop_side_px, size):.2f}x")


def _standardise_key_parts(job, settings, workspace) -> list:
    track = job.crop_track
    # a moving crop's path is part of the key (only then, so that fixed-box keys stay as they were)
    track_key = [stable_hash(track.side, track.xs, track.ys)] if track else []
    # a separate audio file (MEAD's microphone) is an input too: its content is part of the key (only then)
    audio_source = job.candidate.audio_source
    audio_key = [workspace.fingerprint(Path(audio_source))] if audio_source else []
    # the face mesh and the frame-quality measures run on this stage's own decode (one decode): what they measure
    # with is an input of this entry too
    return [job.source_sha256, job.candidate.start_s, job.duration_s, job.crop_box, settings.standardise.fingerprint(),
            *audio_key, *track_key, *frame_analysis_identity(settings)]


def _standardise_run(job, settings, workspace, out_dir: Path) -> dict:
    tracker = FaceMeshTracker(settings.faces)
    meter = FrameQualityMeter(settings.standardise.fps, settings.filters.frame_quality)
    try:
        clip = standardise_clip(job.candidate.source, job.candidate.start_s, job.duration_s, job.crop_box,
                                settings.standardise, out_dir, limits=settings.media,
                                audio_source=job.candidate.audio_source, crop_track=job.crop_track,
                                frame_consumer=lambda frame: meter.add(frame, tracker.add(frame)))
    finally:
        tracker.close()
    if isinstance(clip, Rejection):
        return encode(clip)
    # the faces and frame_quality stages pick these up (light entries linking the arrays)
    return {**encode(clip), "faces": encode(tracker.save(out_dir)), "frame_quality": encode(meter.save(out_dir))}


def _standardise_finish(job, entry: dict, settings, workspace):
    result = decode(entry, StandardisedClip)
    if isinstance(result, Rejection):
        return rejected(job, result)
    return replace(job, standardised=result, standardise_key=entry["key"], notes=job.notes + result.notes)


STAGE = Stage(name="standardise", version=4, group="video", prepare=_choose_crop, key_parts=_standardise_key_parts,
              run=_standardise_run, finish=_standardise_finish)
