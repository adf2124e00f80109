"""Small deterministic test media made with the ffmpeg command line (written against ffmpeg 5.1).

Every function writes one file and returns its path. Sources are ffmpeg's synthetic ``testsrc`` picture
(asymmetric, so rotations can be checked pixel by pixel; unlike ``testsrc2`` it allows odd sizes) and a
``sine`` tone; encoders run single-threaded with bitexact flags and no metadata, so the same ffmpeg build
writes the same bytes every time. Damaged files (garbage, truncated, corrupted) use fixed seeds.
"""

from __future__ import annotations

import functools
import random
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# container suffix -> audio codec it takes without fuss
_AUDIO_CODEC = {".mp4": "aac", ".mov": "aac", ".m4a": "aac", ".mkv": "aac", ".webm": "libopus",
                ".avi": "pcm_s16le", ".nut": "pcm_s16le", ".wav": "pcm_s16le"}
_BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1"]


def run_ffmpeg(args: Sequence[object]) -> None:
    """Run ffmpeg quietly (argument list, overwrite); raise with its stderr on failure."""
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *map(str, args)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({completed.returncode}): {' '.join(command)}\n{completed.stderr}")


@functools.cache
def have_encoder(name: str) -> bool:
    """Whether this ffmpeg build lists the encoder ``name``."""
    listing = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], check=False, capture_output=True,
                             text=True).stdout
    return any(line.split()[1:2] == [name] for line in listing.splitlines() if line.startswith(" "))


def _video_codec_args(codec: str) -> list[str]:
    if codec in ("libx264", "libx265"):
        # one thread: the bitstream does not depend on the machine's core count
        return ["-c:v", codec, "-preset", "ultrafast", "-threads", "1"]
    if codec == "mpeg4":
        return ["-c:v", codec, "-q:v", "5", "-threads", "1"]
    return ["-c:v", codec, "-threads", "1"]


def make_test_video(
    path: str | Path,
    *,
    width: int = 160,
    height: int = 120,
    seconds: float = 2.0,
    fps: int = 25,
    with_audio: bool = True,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    rotation: int | None = None,
    extra_audio_track: bool = False,
    vfr: bool = False,
    faststart: bool = False,
    audio_codec: str | None = None,
    sample_rate: int = 44100,
) -> Path:
    """A ``testsrc`` video with a mono 440 Hz tone, in the container named by the suffix.

    ``rotation``: clockwise display rotation (90/180/270) written as the mp4/mov display matrix, the way
    phones tag portrait video (see :func:`set_mp4_rotation`). ``extra_audio_track`` adds a second audio
    stream that differs on purpose (880 Hz, 22050 Hz, stereo) so tests can tell which one was read.
    ``vfr``: all frames for the first half, every second frame after it, timestamps kept as they are
    (``-fps_mode vfr``), so the rate drops from ``fps`` to ``fps / 2`` halfway.
    Libx264 needs even sizes for 4:2:0; use ``pix_fmt="yuv444p"`` (or codec ``mpeg4``) for odd ones.
    """
    path = Path(path)
    args: list[object] = ["-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={fps}:duration={seconds}"]
    maps = ["-map", "0:v"]
    if with_audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={sample_rate}:duration={seconds}"]
        maps += ["-map", "1:a"]
    if extra_audio_track:
        args += ["-f", "lavfi", "-i", f"sine=frequency=880:sample_rate=22050:duration={seconds}"]
        maps += ["-map", f"{2 if with_audio else 1}:a"]
    args += maps
    if vfr:
        args += ["-vf", rf"select='lt(t\,{seconds / 2})+not(mod(n\,2))'", "-fps_mode", "vfr"]
    args += [*_video_codec_args(codec), "-pix_fmt", pix_fmt]
    if with_audio or extra_audio_track:
        args += ["-c:a", audio_codec or _AUDIO_CODEC.get(path.suffix.lower(), "aac")]
        if extra_audio_track:
            stereo = 1 if with_audio else 0
            args += [f"-ac:a:{stereo}", "2"]
    if faststart:
        args += ["-movflags", "+faststart"]
    run_ffmpeg([*args, *_BITEXACT, path])
    if rotation:
        set_mp4_rotation(path, rotation)
    return path


def make_test_audio(
    path: str | Path, *, seconds: float = 1.0, sample_rate: int = 16000, channels: int = 1,
    codec: str | None = None, cover_art: bool = False,
) -> Path:
    """An audio-only file (440 Hz tone). ``cover_art`` adds a PNG attached picture (a "video" stream that
    players show as artwork, as music files carry); m4a/mp4/mkv only."""
    path = Path(path)
    args: list[object] = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={sample_rate}:duration={seconds}"]
    if cover_art:
        args += ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=1:duration=1", "-map", "0:a", "-map", "1:v",
                 "-frames:v", "1", "-c:v", "png", "-disposition:v:0", "attached_pic"]
    args += ["-ac", channels, "-c:a", codec or _AUDIO_CODEC.get(path.suffix.lower(), "aac")]
    run_ffmpeg([*args, *_BITEXACT, path])
    return path


def make_zero_duration_video(path: str | Path) -> Path:
    """A NUT file with one video frame and one audio frame: both streams exist, the stated duration is 0."""
    path = Path(path).with_suffix(".nut")
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-f", "lavfi", "-i", "sine",
                "-frames:v", "1", "-frames:a", "1", *_video_codec_args("libx264"), "-pix_fmt", "yuv420p",
                "-c:a", "pcm_s16le", *_BITEXACT, path])
    return path


def write_garbage(path: str | Path, n_bytes: int = 65536, seed: int = 0) -> Path:
    """``n_bytes`` pseudo-random bytes (no container ffprobe recognises, for the seeds used in tests)."""
    path = Path(path)
    path.write_bytes(random.Random(seed).randbytes(n_bytes))
    return path


def truncate_copy(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def corrupt_mdat(src: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """Copy an mp4, replacing every byte of its media data (``mdat``) with noise: the index still parses,
    nothing decodes."""
    data = bytearray(Path(src).read_bytes())
    for start, size, kind, header in _boxes(data, 0, len(data)):
        if kind == b"mdat":
            data[start + header:start + size] = random.Random(seed).randbytes(size - header)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def set_mp4_rotation(path: str | Path, degrees: int) -> None:
    """Write a clockwise display rotation into the video track header (``tkhd`` matrix) of an mp4/mov.

    This is what phones write (portrait: 90). It is done in place, on the bytes, because the ffmpeg
    options differ between versions: ffmpeg 5.1 has no ``-display_rotation`` (6.0+) and turns the legacy
    ``-metadata:s:v:0 rotate=90`` into a 90 degree *counter-clockwise* matrix.
    """
    if degrees % 90:
        raise ValueError(f"rotation must be a multiple of 90, got {degrees}")
    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".mov", ".m4v"):
        raise ValueError(f"display matrices are only written to mp4/mov files, not {path.name}")
    data = bytearray(path.read_bytes())
    tkhd = _video_tkhd(data)
    version = data[tkhd]
    matrix_at = tkhd + (40 if version == 0 else 52)  # offset from the full-box version byte
    width, height = (value / 65536 for value in struct.unpack(">II", data[matrix_at + 36:matrix_at + 44]))
    a, b, c, d, tx, ty = {  # ISO 14496-12: x' = a*x + c*y + tx, y' = b*x + d*y + ty (y down)
        0: (1, 0, 0, 1, 0, 0),
        90: (0, 1, -1, 0, height, 0),
        180: (-1, 0, 0, -1, width, height),
        270: (0, -1, 1, 0, 0, width),
    }[degrees % 360]
    fixed = [round(v * 65536) for v in (a, b)] + [0] + [round(v * 65536) for v in (c, d)] + [0] \
        + [round(tx * 65536), round(ty * 65536), 1 << 30]
    data[matrix_at:matrix_at + 36] = struct.pack(">9i", *fixed)
    path.write_bytes(bytes(data))


def read_gray_frame(path: str | Path, *, at_s: float = 0.0, autorotate: bool = True) -> np.ndarray:
    """One decoded frame as a (height, width) uint8 luma array, rotated as ffmpeg displays it."""
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error"]
    if not autorotate:
        command.append("-noautorotate")
    if at_s:
        command += ["-ss", f"{at_s:.3f}"]
    command += ["-i", str(path), "-map", "0:v:0", "-frames:v", "1", "-f", "image2pipe", "-c:v", "pgm", "-"]
    pgm = subprocess.run(command, capture_output=True, check=True).stdout
    magic, width, height, maxval, pixels = pgm.split(maxsplit=4)
    assert magic == b"P5" and maxval == b"255", pgm[:20]
    return np.frombuffer(pixels[: int(width) * int(height)], np.uint8).reshape(int(height), int(width))


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def _boxes(data: bytearray, start: int, end: int):
    """(offset, size, type, header length) of the ISO-BMFF boxes laid end to end in data[start:end]."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
        elif size == 0:
            size = end - at
        if size < header:
            return
        yield at, size, kind, header
        at += size


def _video_tkhd(data: bytearray) -> int:
    """Offset of the version byte of the ``tkhd`` box in the first video ``trak``."""
    for moov, size, kind, header in _boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for trak, trak_size, trak_kind, trak_header in _boxes(data, moov + header, moov + size):
            if trak_kind != b"trak":
                continue
            children = {k: (o, s, h) for o, s, k, h in _boxes(data, trak + trak_header, trak + trak_size)}
            mdia_at, mdia_size, mdia_header = children[b"mdia"]
            for hdlr, _, hdlr_kind, hdlr_header in _boxes(data, mdia_at + mdia_header, mdia_at + mdia_size):
                # hdlr: version/flags (4), pre_defined (4), handler_type (4)
                if hdlr_kind == b"hdlr" and data[hdlr + hdlr_header + 8:hdlr + hdlr_header + 12] == b"vide":
                    tkhd_at, _, tkhd_header = children[b"tkhd"]
                    return tkhd_at + tkhd_header
    raise ValueError("no video track found")
