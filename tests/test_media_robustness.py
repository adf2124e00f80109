"""No media input can hang the pipeline: stderr is drained while ffmpeg runs, every call has a time limit, and
decode errors in the middle of a source (which probe cannot see) are counted by standardise.

The damaged source is a 60 s 1280x720 H.264/AAC file (ffmpeg's testsrc + a sine tone) with 4 KiB of seeded
random bytes written over the middle of the file. Every test runs under a pytest timeout, so a regression
(a deadlock, a missing limit) fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

import pytest

from preprocess.run.media import (
    FfmpegError,
    FfmpegTimeout,
    TransientMediaFailure,
    feed_stdin,
    iter_rgb_frames,
    run_ffmpeg,
    run_ffprobe,
    run_tool,
    stream_stdout,
)
from preprocess.run.records import CropBox, ProbeResult, Rejection
from preprocess.run.settings import MediaTimeouts, load_settings
from preprocess.video.probe import probe_video
from preprocess.video.standardise import StandardisedClip, standardise_clip

SECONDS, WIDTH, HEIGHT = 60.0, 1280, 720
DAMAGED_BYTES = 4096
CROP = CropBox(340.0, 60.0, 600.0, 600.0)


def _processes_mentioning(marker: str) -> list[str]:
    """Command lines of live (not zombie) processes whose arguments contain ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended while we looked
            continue
        if marker in cmdline and state != "Z":
            found.append(cmdline)
    return found


def _no_process_left(marker: str, within_s: float = 2.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := _processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The clean 60 s 720p source and its copy with the middle damaged (seed 1234). superfast: about 5 s to
    encode here (fast: 11 s); the damage makes ffmpeg log 40-50 error lines with either."""
    folder = tmp_path_factory.mktemp("damaged")
    clean = folder / "clean.mp4"
    run_ffmpeg(["-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate=25:duration={SECONDS}",
                "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={SECONDS}",
                "-c:v", "libx264", "-preset", "superfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", clean],
               purpose="writing the 60 s test source", media_duration_s=SECONDS)
    data = bytearray(clean.read_bytes())
    middle = len(data) // 2
    data[middle:middle + DAMAGED_BYTES] = random.Random(1234).randbytes(DAMAGED_BYTES)
    damaged = folder / f"damaged-{uuid.uuid4().hex[:8]}.mp4"  # a unique name: the process checks look for it
    damaged.write_bytes(bytes(data))
    return {"clean": clean, "damaged": damaged, "offset": middle}


def _damaged_time_s(path: Path, offset: int) -> float:
    """Presentation time of the first packet that overlaps the damaged bytes (demuxed, not decoded)."""
    packets = json.loads(run_ffprobe(["-show_entries", "packet=pts_time,pos,size", "-of", "json", path],
                                     purpose="listing packets").stdout)["packets"]
    hit = [float(p["pts_time"]) for p in packets
           if int(p["pos"]) < offset + DAMAGED_BYTES and int(p["pos"]) + int(p["size"]) > offset]
    assert hit, "the damaged bytes overlap no packet: the fixture damaged the index, not the media"
    return min(hit)


@pytest.mark.timeout(120)
def test_probe_passes_the_damaged_source(sources):
    # probe decodes one frame near each end: damage in the middle is invisible to it, so standardise must count
    result = probe_video(sources["damaged"])
    assert isinstance(result, ProbeResult), result
    assert result.duration_s == pytest.approx(SECONDS, abs=0.1)


@pytest.mark.timeout(180)
def test_standardise_rejects_the_damaged_source_in_bounded_time(sources, tmp_path):
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})
    started = time.monotonic()
    result = standardise_clip(str(sources["damaged"]), 0.0, SECONDS, CROP, settings, tmp_path)
    seconds = time.monotonic() - started
    print(f"\nstandardise of the damaged 60 s 720p source: {seconds:.1f} s -> {result}")
    assert seconds < MediaTimeouts().limit_s(SECONDS)
    assert isinstance(result, Rejection), result
    assert (result.stage, result.reason) == ("standardise", "decode_errors")
    count = int(result.detail.split("logged ")[1].split()[0])
    assert count > settings.max_decode_errors
    assert "first: [" in result.detail and " @ 0x" not in result.detail  # a sample line, addresses cleaned
    assert not list(tmp_path.iterdir())  # a rejection leaves no media behind


@pytest.mark.timeout(120)
def test_standardise_keeps_a_few_decode_errors_with_a_note(sources, tmp_path):
    """Over a short range around the damage, with a tolerant threshold: kept, the count in the notes."""
    at = _damaged_time_s(sources["damaged"], sources["offset"])
    start = max(0.0, at - 1.0)
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast",
                                                                        "max_decode_errors": 1000})
    result = standardise_clip(str(sources["damaged"]), start, 4.0, CROP, settings, tmp_path)
    assert isinstance(result, StandardisedClip), result
    notes = [note for note in result.notes if note.startswith("decode_errors:")]
    assert len(notes) == 1 and int(notes[0].split(":")[1]) > 0, result.notes
    # the same range of the clean source logs nothing and gets no note
    (tmp_path / "clean").mkdir()
    clean = standardise_clip(str(sources["clean"]), start, 4.0, CROP, settings, tmp_path / "clean")
    assert isinstance(clean, StandardisedClip) and not any(n.startswith("decode_errors") for n in clean.notes)


@pytest.mark.timeout(120)
def test_iter_rgb_frames_completes_on_the_damaged_source(sources):
    count = sum(1 for _ in iter_rgb_frames(sources["damaged"], width=160, height=90))
    assert count == pytest.approx(SECONDS * 25, abs=2)  # damaged frames are concealed, not dropped
    assert not _no_process_left(sources["damaged"].name)


@pytest.mark.timeout(60)
def test_closing_the_frame_generator_early_stops_ffmpeg(sources):
    frames = iter_rgb_frames(sources["damaged"], width=WIDTH, height=HEIGHT)
    first = next(frames)
    assert first.shape == (HEIGHT, WIDTH, 3)
    assert _processes_mentioning(sources["damaged"].name)  # ffmpeg is running, blocked on the full pipe
    frames.close()
    assert not _no_process_left(sources["damaged"].name)


_SPAM_CHILD = (
    "import sys\n"
    "for i in range(4000):\n"
    "    sys.stderr.write(f'[h264 @ 0x55d0c0ffee00] error {i} while decoding MB ' + 'x' * 300 + '\\n')\n"
    "    if i % 4 == 0:\n"
    "        sys.stdout.buffer.write(bytes([i % 251]) * 1000)\n"
)  # about 1.3 MB of stderr, interleaved with 1000-byte stdout chunks


@pytest.mark.timeout(60)
def test_megabytes_of_stderr_do_not_deadlock_the_helpers():
    """A child that fills stderr (far past a 64 KiB pipe) while it writes stdout: a helper that read stderr only
    after stdout ended would block forever here; these finish in well under a second."""
    command = [sys.executable, "-c", _SPAM_CHILD]
    chunks = list(stream_stdout(command, chunk_bytes=1000, purpose="stderr flood", timeout_s=30))
    assert len(chunks) == 1000 and all(chunk[0] == (4 * n) % 251 for n, chunk in enumerate(chunks))

    result = run_tool(command, purpose="stderr flood", timeout_s=30, capture_stdout=True)
    assert result.returncode == 0 and len(result.stdout) == 1_000_000
    assert result.log_lines == 4000  # every line counted, though only the first and last are kept
    assert result.first_line.startswith("[h264] error 0 ")  # cleaned of its address
    assert "error 3999 " in result.log_tail() and len(result.log) < 100_000

    reader = [sys.executable, "-c", "import sys\n"
              "for i in range(4000):\n"
              "    assert len(sys.stdin.buffer.read(750)) == 750\n"
              "    sys.stderr.write('error while reading ' + 'x' * 300 + '\\n')\n"]
    with feed_stdin(reader, purpose="stdin with a stderr flood", timeout_s=30) as stdin:
        for _ in range(100):
            stdin.write(b"\0" * 30_000)  # 3 MB in all, read 750 bytes per stderr line


@pytest.mark.timeout(60)
def test_a_call_past_its_limit_is_killed_promptly():
    marker = f"marker-{uuid.uuid4().hex}"
    limits = MediaTimeouts(base_s=1.0, per_media_s=0.0)
    started = time.monotonic()
    with pytest.raises(FfmpegTimeout) as raised:  # -re: an endless source read in real time, never finishes
        run_ffmpeg(["-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-metadata", f"title={marker}",
                    "-f", "null", "-"], purpose="an endless real-time decode", limits=limits)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0
    assert "an endless real-time decode" in str(raised.value) and "1.0 s" in str(raised.value)
    # a timeout is no verdict on the input: not an FfmpegError, so no stage caches a rejection for it
    assert isinstance(raised.value, TransientMediaFailure) and not isinstance(raised.value, FfmpegError)
    assert not _no_process_left(marker)


@pytest.mark.timeout(60)
def test_a_frame_decode_past_its_limit_is_killed(sources):
    limits = MediaTimeouts(base_s=0.3, per_media_s=0.0)  # far less than decoding 60 s of 720p takes
    started = time.monotonic()
    with pytest.raises(FfmpegTimeout, match="decoding frames of"):
        for _ in iter_rgb_frames(sources["damaged"], width=WIDTH, height=HEIGHT, limits=limits):
            pass
    assert time.monotonic() - started < 5.0
    assert not _no_process_left(sources["damaged"].name)


@pytest.mark.timeout(60)
def test_a_slow_consumer_does_not_count_against_the_decode_limit(sources):
    """The limit counts time spent waiting for ffmpeg: a consumer slower than the limit still gets every frame."""
    limits = MediaTimeouts(base_s=2.0, per_media_s=0.0)
    frames = 0
    for _ in iter_rgb_frames(sources["clean"], width=64, height=36, duration_s=0.4, limits=limits):
        time.sleep(0.3)  # 10 frames x 0.3 s = 3 s of consumer time, over the 2 s limit
        frames += 1
    assert frames == 10


@pytest.mark.timeout(60)
def test_a_standardise_past_its_limit_raises_instead_of_rejecting(sources, tmp_path):
    """A timeout is not a property of the clip (the machine may be slow): it propagates, so the pipeline records
    an uncached failure that the next run retries, never a cached rejection."""
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})
    started = time.monotonic()
    with pytest.raises(FfmpegTimeout, match="standardising the clip from 0.000 s for 60.000 s"):
        standardise_clip(str(sources["damaged"]), 0.0, SECONDS, CROP, settings, tmp_path,
                         limits=MediaTimeouts(base_s=0.5, per_media_s=0.0))
    assert time.monotonic() - started < 5.0
    assert not _no_process_left(sources["damaged"].name)


# ---------------------------------------------------------------- one decode: the encode streams its frames


def _unique_copy(source: Path, folder: Path) -> Path:
    """The source under a unique name, for the process checks to look for."""
    copy = folder / f"source-{uuid.uuid4().hex[:8]}.mp4"
    copy.write_bytes(source.read_bytes())
    return copy


@pytest.mark.timeout(120)
def test_the_streamed_encode_counts_the_same_decode_errors_and_gives_every_frame(sources, tmp_path):
    """The damaged range with a frame consumer: the same decode-error note as the encode alone, the same clip
    bytes, and one consumed frame per encoded frame."""
    at = _damaged_time_s(sources["damaged"], sources["offset"])
    start = max(0.0, at - 1.0)
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast",
                                                                        "max_decode_errors": 1000})
    (tmp_path / "alone").mkdir()
    (tmp_path / "streamed").mkdir()
    alone = standardise_clip(str(sources["damaged"]), start, 4.0, CROP, settings, tmp_path / "alone")
    frames = []
    streamed = standardise_clip(str(sources["damaged"]), start, 4.0, CROP, settings, tmp_path / "streamed",
                                frame_consumer=lambda frame: frames.append(frame.shape))
    assert isinstance(streamed, StandardisedClip), streamed
    assert streamed.notes == alone.notes and any(note.startswith("decode_errors:") for note in streamed.notes)
    assert len(frames) == streamed.n_frames >= 100 and set(frames) == {(512, 512, 3)}
    assert (tmp_path / "streamed" / "clip.mp4").read_bytes() == (tmp_path / "alone" / "clip.mp4").read_bytes()
    assert (tmp_path / "streamed" / "clip.wav").read_bytes() == (tmp_path / "alone" / "clip.wav").read_bytes()


@pytest.mark.timeout(120)
def test_a_streamed_encode_rejects_the_damaged_source_like_the_encode_alone(sources, tmp_path):
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})
    consumed = []
    result = standardise_clip(str(sources["damaged"]), 0.0, SECONDS, CROP, settings, tmp_path,
                              frame_consumer=lambda frame: consumed.append(1))
    assert isinstance(result, Rejection) and (result.stage, result.reason) == ("standardise", "decode_errors")
    assert len(consumed) == pytest.approx(SECONDS * 25, abs=2)
    assert not list(tmp_path.iterdir())  # no media left behind
    assert not _no_process_left(sources["damaged"].name)


@pytest.mark.timeout(60)
def test_a_failing_frame_consumer_stops_ffmpeg_at_once(sources, tmp_path):
    source = _unique_copy(sources["clean"], tmp_path)
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})

    def consumer(frame):
        raise ValueError("the face mesh crashed")

    started = time.monotonic()
    with pytest.raises(ValueError, match="the face mesh crashed"):
        standardise_clip(str(source), 0.0, SECONDS, CROP, settings, tmp_path, frame_consumer=consumer)
    assert time.monotonic() - started < 10.0  # not the 60 s clip's whole encode
    assert not _no_process_left(source.name)


@pytest.mark.timeout(60)
def test_an_encoder_killed_mid_stream_is_a_transient_failure_not_a_hang(sources, tmp_path):
    """SIGKILL to the ffmpeg that encodes and streams (the OOM killer's way): the stream ends, the kill is judged
    a MediaToolKilled (retried next run, never a cached rejection), nothing is left running."""
    import signal

    from preprocess.run.media import MediaToolKilled

    source = _unique_copy(sources["clean"], tmp_path)
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})

    def kill_the_encoder(frame):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and source.name in _cmdline(entry):
                os.kill(int(entry.name), signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(MediaToolKilled, match="SIGKILL") as raised:
        standardise_clip(str(source), 0.0, SECONDS, CROP, settings, tmp_path, frame_consumer=kill_the_encoder)
    assert not isinstance(raised.value, FfmpegError)
    assert time.monotonic() - started < 10.0
    assert not _no_process_left(source.name)


def _cmdline(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.timeout(60)
def test_a_slow_frame_consumer_does_not_count_against_the_encode_limit(sources, tmp_path):
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})
    limits = MediaTimeouts(base_s=2.0, per_media_s=0.0)
    consumed = []

    def slow(frame):
        time.sleep(0.3)  # 10 frames x 0.3 s = 3 s of consumer time, over the 2 s limit
        consumed.append(1)

    result = standardise_clip(str(sources["clean"]), 0.0, 0.4, CROP, settings, tmp_path, limits=limits,
                              frame_consumer=slow)
    assert isinstance(result, StandardisedClip) and result.n_frames == len(consumed) == 10


@pytest.mark.timeout(60)
def test_a_streamed_encode_past_its_limit_is_killed(sources, tmp_path):
    source = _unique_copy(sources["clean"], tmp_path)
    settings = load_settings("default").standardise.model_copy(update={"preset": "ultrafast"})
    started = time.monotonic()
    with pytest.raises(FfmpegTimeout, match="standardising the clip"):
        standardise_clip(str(source), 0.0, SECONDS, CROP, settings, tmp_path,
                         limits=MediaTimeouts(base_s=0.5, per_media_s=0.0), frame_consumer=lambda frame: None)
    assert time.monotonic() - started < 5.0
    assert not _no_process_left(source.name)
