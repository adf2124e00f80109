"""Probe stage: facts about one source video, or the reason it cannot be used.

``probe_video(path)`` runs one ``ffprobe`` (streams, format and the timestamps of the first few hundred
packets) and, unless ``decode_check=False``, two cheap ``ffmpeg`` decodes of a single video frame: one at
the start and one shortly before the stated end. It never decodes the whole file (at most one GOP per
check). It returns a :class:`ProbeResult` or a :class:`Rejection` with ``stage="probe"``.

Rejection reasons (stable codes, roughly in the order they are checked; ``detail`` is for humans):

``file_not_found``   the path does not exist.
``empty_file``       the file has 0 bytes.
``unreadable``       ffprobe cannot parse the file (garbage bytes, unknown format, not a regular file,
                     permission denied).
``no_video_stream``  no video stream at all (audio-only files without a picture).
``still_image``      a picture, not a video: an image file (PNG, JPEG, ... read by an image demuxer, whatever
                     its extension), a file whose only picture is an attached one (cover art), or a video stream
                     of a single frame (``nb_frames`` 1, or one video packet in a file read to its end).
``zero_duration``    neither the container nor the video stream states a positive duration (single-frame
                     files without a duration; checked before the single-frame ``still_image``).
``unknown_frame_rate``  the video stream states no usable frame rate: the stated average rate and base rate
                     (``avg_frame_rate``, ``r_frame_rate``), else the packet timestamps, else frames over duration,
                     give none of at least ``MIN_FPS`` (``0/0``, ``1/0``: an mp4 whose sample durations are 0).
``no_audio_stream``  a video without any audio stream.
``truncated``        the file ends before its stated duration: an mp4 whose ``moov`` index is missing
                     (download cut off before the index was written), or the container parses but no
                     frame decodes shortly before the stated end *and* the demuxer delivers no packet
                     there, or the start fails with the demuxer reporting a partial file.
``undecodable``      the container parses but the first video frame cannot be decoded.

Notes (``ProbeResult.notes``, benign facts worth recording, in this order):
``rotated_90``/``rotated_180``/``rotated_270``, ``rotation_not_multiple_of_90``, ``variable_frame_rate``,
``10_bit`` (any depth other than 8: ``<n>_bit``), ``odd_size``, ``non_square_pixels``, ``interlaced``,
``extra_video_tracks``, ``extra_audio_tracks``, ``extra_streams`` (subtitles, data, attachments, cover art),
``decode_warnings`` (a frame decoded but the decoder logged errors),
``end_not_decoded`` (no frame decoded after seeking near the end, but the demuxer delivers packets there:
an index-less container such as MPEG-TS seeks to any packet, and without a keyframe after it nothing
decodes; the file is not short).

Rotation convention: ``rotation`` is the clockwise angle (0/90/180/270) by which a player turns the stored
frame to show it, i.e. the convention of the legacy ``rotate`` tag (a portrait phone video: 90).
ffprobe reports the display matrix as a *counter-clockwise* angle (``side_data_list[].rotation``, e.g. -90
for that phone video), so it is negated; the legacy tag is used as is when there is no display matrix.
``width``/``height`` are the displayed size: swapped for 90 and 270. Note that ffmpeg 5.1 turns
``-metadata:s:v:0 rotate=90`` into a display matrix of 90 degrees *counter-clockwise* (270 here).

Variable frame rate heuristic (``variable_frame_rate``), true when either:

* the rates disagree: ``r_frame_rate`` (the base rate, the finest tick that represents all timestamps)
  differs from ``avg_frame_rate`` (frames / duration) by more than 1 %, unless r is (within 1 %) an
  integer multiple 2..4 of avg, which is what interlaced and field-rate streams report; or
* the timestamps are irregular: among the first ``_PACKETS_READ`` packets (demuxed, not decoded), the
  sorted video presentation timestamps have frame intervals that differ from their median by more than
  one tick + 5 % in at least 2 intervals and 2 % of them. One tick of slack absorbs the rounding of
  millisecond timebases (29.97 fps in mkv alternates 33/34 ms); needing several outliers keeps one
  dropped frame from counting.

The rate check sees the whole file but misses mild jitter (phones: r=30, avg=29.8); the timestamp check
sees jitter but only at the start. Both are cheap.

Every ffprobe/ffmpeg call goes through ``preprocess.run.media.run_tool`` (stderr drained while it runs) with the base
time limit of ``MediaTimeouts`` (none of them reads more than a few hundred packets or one GOP). A rejection is
cached, so only verdicts about the file are returned: a call past its limit (``FfmpegTimeout``), killed by a
signal or missing its file raises a ``preprocess.run.media.TransientMediaFailure`` (the clip's uncached ``error``,
retried next run), and a full disk or I/O error an ``OSError`` that stops the run
(``preprocess.run.media.raise_for_environment``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from preprocess.run.job import decode, encode, rejected
from preprocess.run.media import ToolRun, clean_ffmpeg_log, media_limits, raise_for_environment, run_tool
from preprocess.run.records import ProbeResult, Rejection
from preprocess.run.stage import Stage

if TYPE_CHECKING:
    from preprocess.run.settings import MediaTimeouts

STAGE_NAME = "probe"

REASONS = (
    "file_not_found",
    "empty_file",
    "unreadable",
    "no_video_stream",
    "still_image",
    "zero_duration",
    "unknown_frame_rate",
    "no_audio_stream",
    "truncated",
    "undecodable",
)

FFPROBE = "ffprobe"
FFMPEG = "ffmpeg"

_PACKETS_READ = 400  # packets (all streams) whose timestamps the ffprobe call reads for the VFR check
_RATE_TOLERANCE = 0.01
_ISO_BOXES = {b"ftyp", b"mdat", b"moov", b"free", b"skip", b"wide", b"pnot", b"uuid"}  # mp4/mov first boxes
_STDERR_KEEP = 600  # characters of tool stderr kept in a rejection's detail
MIN_FPS = 1.0  # below this a "video" shows one picture for more than a second: its rate is not a real one


class FFprobeError(RuntimeError):
    """ffprobe exited with an error; ``stderr`` holds its (complete) message."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def _input_url(path: Path) -> str:
    # "file:" stops ffmpeg from reading a leading "-" as an option or "name:" as a protocol
    return "file:" + str(path.resolve())


def _run(command: Sequence[str], purpose: str, limits: MediaTimeouts | None) -> ToolRun:
    """Run a header read or a one-frame decode under the base time limit (its length does not scale with the
    file's). Raises ``FfmpegTimeout`` past it, and ``raise_for_environment``'s errors for a run that failed
    for reasons outside the file (a signal, a full disk, the file vanishing): none of those may become a
    cached rejection."""
    completed = run_tool(command, purpose=purpose, timeout_s=media_limits(limits).limit_s(None),
                         capture_stdout=True)
    raise_for_environment(completed.returncode, completed.log, tool=command[0], purpose=purpose)
    return completed


def ffprobe_json(
    path: str | Path, *, extra_args: Sequence[str] = (), limits: MediaTimeouts | None = None
) -> dict:
    """``ffprobe -show_streams -show_format -of json`` of ``path`` as a dict (``extra_args`` are added).

    Raises :class:`FFprobeError` when ffprobe rejects the file or prints no JSON, ``preprocess.run.media.FfmpegTimeout``
    past the base time limit of ``limits`` (and see :func:`_run`).
    """
    command = [FFPROBE, "-v", "error", "-hide_banner", "-show_streams", "-show_format", *extra_args,
               "-of", "json", _input_url(Path(path))]
    completed = _run(command, f"probing {path}", limits)
    if completed.returncode != 0:
        raise FFprobeError(f"ffprobe exited {completed.returncode}: {_tail(completed.log)}", completed.log)
    try:
        return json.loads(completed.stdout.decode("utf-8", errors="replace") or "{}")
    except json.JSONDecodeError as error:
        raise FFprobeError(f"ffprobe printed invalid JSON: {error}", completed.log) from error


def probe_video(
    path: str | Path, *, decode_check: bool = True, limits: MediaTimeouts | None = None
) -> ProbeResult | Rejection:
    """Facts about the video at ``path``, or a ``Rejection`` (see the module docstring for the codes).
    ``limits``: the time limits of its ffprobe/ffmpeg calls (None: the settings' defaults)."""
    path = Path(path)
    try:
        if not path.exists():
            return _reject("file_not_found", f"{path} does not exist")
        if not path.is_file():
            return _reject("unreadable", f"{path} is not a regular file")
        size = path.stat().st_size
        if size == 0:
            return _reject("empty_file", f"{path} has 0 bytes")
        with path.open("rb") as handle:  # ffprobe's message for "permission denied" is less clear
            head = handle.read(12)
    except OSError as error:
        return _reject("unreadable", f"{path}: {error}")

    try:
        # a timeout propagates: a slow machine is no verdict on the file (the next run retries it)
        info = ffprobe_json(path, extra_args=[
            "-show_entries", "packet=stream_index,pts,dts", "-read_intervals", f"%+#{_PACKETS_READ}"], limits=limits)
    except FFprobeError as error:
        if "moov atom not found" in error.stderr and head[4:8] in _ISO_BOXES:
            # a real mp4/mov (it starts with an ISO box) whose index was never written: typically a
            # download or recording cut short; garbage named .mp4 gets the same message from ffprobe
            return _reject("truncated", f"mp4 index (moov atom) missing: {_tail(error.stderr)}")
        return _reject("unreadable", f"ffprobe cannot parse the file: {_tail(error.stderr)}")

    streams = info.get("streams") or []
    fmt = info.get("format") or {}
    video = [s for s in streams if s.get("codec_type") == "video" and not _is_attached_picture(s)]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    others = [s for s in streams if s not in video and s not in audio]
    format_name = str(fmt.get("format_name") or "")
    if format_name == "image2" or format_name.endswith("_pipe"):  # ffmpeg's image demuxers (png_pipe, ...)
        return _reject("still_image", f"an image file ({format_name}), not a video")
    if not video:
        if any(_is_attached_picture(s) for s in streams):
            return _reject("still_image", "the only picture is an attached one (cover art), not a video stream")
        kinds = ", ".join(sorted({str(s.get("codec_type")) for s in streams})) or "none"
        return _reject("no_video_stream", f"no video stream (streams: {kinds})")
    v = video[0]

    duration = _video_duration(fmt, v)
    if not duration > 0:
        return _reject("zero_duration", f"no positive duration (format: {fmt.get('duration')!r}, "
                                        f"stream: {v.get('duration')!r})")
    packets = info.get("packets") or []
    stream_times = [_int(p.get("pts"), _int(p.get("dts"))) for p in packets if p.get("stream_index") == v.get("index")]
    # one video packet counts only when ffprobe read the whole file (fewer packets than it was asked for)
    if _int(v.get("nb_frames")) == 1 or (len(stream_times) == 1 and len(packets) < _PACKETS_READ):
        return _reject("still_image", f"the video stream holds a single picture ({v.get('codec_name')}) for "
                                      f"{duration:.2f} s")
    timestamps = [t for t in stream_times if t is not None]
    r_rate, avg_rate = _rate(v.get("r_frame_rate")), _rate(v.get("avg_frame_rate"))
    # the stated rates first; a derived one only when the container states none
    fps = avg_rate or r_rate or _fps_from_timestamps(timestamps, v) or _fps_from_count(v, duration)
    if not fps >= MIN_FPS:
        return _reject("unknown_frame_rate", f"no usable frame rate: r_frame_rate {v.get('r_frame_rate')!r}, "
                                             f"avg_frame_rate {v.get('avg_frame_rate')!r}, taken as {fps:.3g} fps "
                                             f"(at least {MIN_FPS:g} expected)")
    if not audio:
        return _reject("no_audio_stream", "the video has no audio stream")
    a = audio[0]

    notes: list[str] = []
    rotation, raw_rotation = _rotation(v)
    if rotation:
        notes.append(f"rotated_{rotation}")
    if raw_rotation is not None and abs(raw_rotation - round(raw_rotation / 90) * 90) > 1:
        notes.append("rotation_not_multiple_of_90")

    vfr = _rates_disagree(r_rate, avg_rate) or timestamps_irregular(timestamps)
    if vfr:
        notes.append("variable_frame_rate")

    pix_fmt = v.get("pix_fmt") or ""
    bit_depth = _bit_depth(pix_fmt, v.get("bits_per_raw_sample"))
    if bit_depth and bit_depth != 8:
        notes.append(f"{bit_depth}_bit")

    width, height = int(v.get("width") or 0), int(v.get("height") or 0)
    if rotation in (90, 270):
        width, height = height, width
    if width % 2 or height % 2:
        notes.append("odd_size")
    sar = v.get("sample_aspect_ratio") or "1:1"
    if sar not in ("1:1", "0:1", "N/A"):
        notes.append("non_square_pixels")
    if v.get("field_order") not in (None, "", "progressive", "unknown"):
        notes.append("interlaced")
    if len(video) > 1:
        notes.append("extra_video_tracks")
    if len(audio) > 1:
        notes.append("extra_audio_tracks")
    if others:
        notes.append("extra_streams")

    if decode_check:
        video_end = min(duration, _float(v.get("duration")) or duration)  # audio may outlast the video
        outcome = _decode_check(path, int(v.get("index", 0)), video_end, limits)
        if isinstance(outcome, Rejection):
            return outcome
        notes.extend(outcome)

    return ProbeResult(
        path=str(path),
        width=width,
        height=height,
        rotation=rotation,
        fps=float(fps),
        variable_frame_rate=vfr,
        duration_s=duration,
        pix_fmt=pix_fmt,
        bit_depth=bit_depth,
        video_codec=str(v.get("codec_name") or ""),
        audio_codec=str(a.get("codec_name") or ""),
        audio_sample_rate=int(_float(a.get("sample_rate")) or 0),
        audio_channels=int(a.get("channels") or 0),
        n_video_streams=len(video),
        n_audio_streams=len(audio),
        size_bytes=size,
        notes=tuple(notes),
    )


def timestamps_irregular(timestamps: Sequence[int], *, reorder_tail: int = 16) -> bool:
    """True when the frame intervals of these video timestamps (in stream ticks, any order) vary.

    The timestamps come from the first packets in *decode* order: with B-frames the frames that would fill
    the last few gaps have not been read yet, so the ``reorder_tail`` highest timestamps are ignored.
    """
    ts = sorted(set(timestamps))
    if reorder_tail and len(ts) > 2 * reorder_tail + 10:
        ts = ts[:-reorder_tail]
    deltas = [b - a for a, b in itertools.pairwise(ts)]
    if len(deltas) < 10:
        return False
    median = statistics.median(deltas)
    if median <= 0:
        return False
    slack = 1 + 0.05 * median  # one tick of rounding + 5 %
    outliers = sum(abs(d - median) > slack for d in deltas)
    return outliers >= max(2, 0.02 * len(deltas))


def _decode_check(
    path: Path, stream_index: int, duration: float, limits: MediaTimeouts | None
) -> Rejection | list[str]:
    """Decode one frame at the start and one shortly before the end; notes, or the rejection."""
    notes: list[str] = []
    ok, stderr = _decode_one_frame(path, stream_index, 0.0, limits)
    if not ok:
        if "partial file" in stderr or "End of file" in stderr:
            return _reject("truncated", f"no frame decodes at the start, the file ends early: {_tail(stderr)}")
        return _reject("undecodable", f"the first video frame cannot be decoded: {_tail(stderr)}")
    warned = bool(stderr.strip())
    # "well before the end": 5 % of the duration, at least 0.5 s (frame and timestamp rounding, audio
    # streams a little longer than the video) and at most 2 s
    margin = max(0.5, min(0.05 * duration, 2.0))
    at = duration - margin
    if at > 0.0:
        ok, stderr = _decode_one_frame(path, stream_index, at, limits)
        if not ok:
            if not _packets_reach(path, stream_index, at, duration, limits):
                return _reject("truncated", f"no frame decodes at {at:.2f} s of the stated {duration:.2f} s "
                                            f"and the stream ends before: {_tail(stderr) or 'no error logged'}")
            # the packets are there: a container without an index (MPEG-TS) seeks to any packet, and with
            # no keyframe between there and the end nothing can be decoded; not a damaged file
            notes.append("end_not_decoded")
        else:
            warned = warned or bool(stderr.strip())
    if warned:
        notes.append("decode_warnings")
    return notes


def _decode_one_frame(
    path: Path, stream_index: int, at_s: float, limits: MediaTimeouts | None
) -> tuple[bool, str]:
    """Decode the first frame at or after ``at_s`` (input seek to the keyframe before, then decode).

    ``framecrc`` prints one line per decoded frame, so stdout tells whether a frame came out even when
    ffmpeg exits 0 after hitting the end of a truncated file.
    """
    command = [FFMPEG, "-nostdin", "-hide_banner", "-v", "error"]
    if at_s > 0:
        command += ["-ss", f"{at_s:.3f}"]
    command += ["-i", _input_url(path), "-map", f"0:{stream_index}", "-frames:v", "1", "-f", "framecrc", "-"]
    # a timeout propagates (see _run): "no frame in time" on a busy machine is no verdict on the file
    completed = _run(command, f"decoding one frame of {path} at {at_s:.3f} s", limits)
    stdout = completed.stdout.decode("utf-8", errors="replace")
    frames = [line for line in stdout.splitlines() if line.strip() and not line.startswith("#")]
    stderr = completed.log
    if completed.returncode != 0:
        stderr += f"\nffmpeg exited {completed.returncode}"
    return bool(frames), stderr


def _packets_reach(
    path: Path, stream_index: int, at_s: float, duration: float, limits: MediaTimeouts | None
) -> bool:
    """Whether the demuxer delivers packets of the stream at or after ``at_s`` (no decoding)."""
    command = [FFPROBE, "-v", "error", "-hide_banner", "-select_streams", str(stream_index),
               "-read_intervals", f"{at_s:.3f}%{duration + 1.0:.3f}", "-show_entries", "packet=pts_time,dts_time",
               "-of", "json", _input_url(path)]
    try:
        completed = _run(command, f"reading the packets of {path} after {at_s:.3f} s", limits)
        packets = json.loads(completed.stdout.decode("utf-8", errors="replace") or "{}").get("packets") or []
    except json.JSONDecodeError:
        return False
    times = (_float(p.get("pts_time")) or _float(p.get("dts_time")) for p in packets)
    return any(t is not None and t >= at_s - 0.1 for t in times)


def _rotation(stream: dict) -> tuple[int, float | None]:
    """(clockwise rotation normalised to 0/90/180/270, raw clockwise degrees or None)."""
    raw: float | None = None
    for side_data in stream.get("side_data_list") or []:
        if "rotation" in side_data:
            value = _float(side_data.get("rotation"))
            if value is not None:
                raw = -value  # ffprobe: counter-clockwise display-matrix angle
                break
    if raw is None:
        raw = _float((stream.get("tags") or {}).get("rotate"))  # legacy tag: clockwise
    if raw is None or not math.isfinite(raw):
        return 0, None
    return round(raw / 90.0) * 90 % 360, raw


def _video_duration(fmt: dict, stream: dict) -> float:
    """Container duration, else the stream's, else matroska's ``DURATION`` tag; 0.0 when unknown."""
    for value in (fmt.get("duration"), stream.get("duration")):
        seconds = _float(value)
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            return seconds
    tag = (stream.get("tags") or {}).get("DURATION")
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", tag or "")
    if match:
        hours, minutes, secs = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(secs)
    return 0.0


def _rates_disagree(r_rate: float, avg_rate: float) -> bool:
    if not r_rate or not avg_rate:
        return False
    if abs(r_rate - avg_rate) <= _RATE_TOLERANCE * avg_rate:
        return False
    ratio = r_rate / avg_rate
    multiple = round(ratio)
    # r an integer multiple of avg: a field rate or a doubled base rate, not a variable rate
    return not (2 <= multiple <= 4 and abs(ratio - multiple) <= _RATE_TOLERANCE * multiple)


def _fps_from_count(stream: dict, duration: float) -> float:
    frames = _int(stream.get("nb_frames"))
    return frames / duration if frames and duration > 0 else 0.0


def _fps_from_timestamps(timestamps: Sequence[int], stream: dict) -> float:
    ts = sorted(set(timestamps))
    tick = _rate(stream.get("time_base"))
    if len(ts) < 3 or not tick:
        return 0.0
    median = statistics.median(b - a for a, b in itertools.pairwise(ts))
    return 1.0 / (median * tick) if median > 0 else 0.0


def _bit_depth(pix_fmt: str, bits_per_raw_sample: object) -> int:
    """Bits per component of ``pix_fmt`` (libavutil's pixel format table via PyAV), else a name rule."""
    if not pix_fmt:
        return _int(bits_per_raw_sample) or 0
    try:
        from av.video.format import VideoFormat

        return max(component.bits for component in VideoFormat(pix_fmt).components)
    except (ImportError, ValueError):  # unknown to PyAV's libavutil: read the name (rgb48le -> 16)
        match = re.search(r"(\d+)(?:le|be)$", pix_fmt)
        number = int(match.group(1)) if match else 8
        return number if number <= 16 else 16 if number in (48, 64) else 8


def _is_attached_picture(stream: dict) -> bool:
    return bool((stream.get("disposition") or {}).get("attached_pic"))


def _rate(text: object) -> float:
    """'30000/1001' -> 29.97; '0/0', 'N/A' or missing -> 0.0."""
    if not isinstance(text, str) or "/" not in text:
        return _float(text) or 0.0
    num, _, den = text.partition("/")
    try:
        numerator, denominator = float(num), float(den)
    except ValueError:
        return 0.0
    return numerator / denominator if denominator else 0.0


def _float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _int(value: object, default: int | None = None) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _tail(text: str) -> str:
    text = " | ".join(line.strip() for line in clean_ffmpeg_log(text).strip().splitlines()[-6:] if line.strip())
    return text[-_STDERR_KEEP:]


def _reject(reason: str, detail: str) -> Rejection:
    assert reason in REASONS, reason
    return Rejection(stage=STAGE_NAME, reason=reason, detail=detail)


# ---------------------------------------------------------------- the stage


def _probe_run(job, settings, workspace, out_dir: Path) -> dict:
    return encode(probe_video(job.candidate.source, decode_check=settings.probe.decode_check, limits=settings.media))


def _probe_finish(job, entry: dict, settings, workspace):
    """The probe onto the job: the clip's duration clamped to the file (noted when it ran past its end)."""
    result = decode(entry, ProbeResult)
    if isinstance(result, Rejection):
        return rejected(job, result)
    result = replace(result, path=job.candidate.source)  # a cached probe may be of the same content at another path
    start, end = job.candidate.start_s, job.candidate.end_s
    if start >= result.duration_s:
        return rejected(replace(job, probe=result), Rejection(
            "probe", "clip_outside_source", f"clip starts at {start}s, the video lasts {result.duration_s:.2f}s"))
    notes = job.notes + result.notes
    if end is None or end > result.duration_s:
        if end is not None:
            notes += ("clip_end_beyond_source",)
        end = result.duration_s
    return replace(job, probe=result, duration_s=round(end - start, 3), notes=notes)


STAGE = Stage(name="probe", version=1, group="video", run=_probe_run, finish=_probe_finish,
              key_parts=lambda job, settings, workspace: [job.source_sha256, settings.probe.fingerprint()])
