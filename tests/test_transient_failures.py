"""Only verdicts about the content are cached (issue 12).

A media tool killed by a signal, a full disk, a deleted or truncated cache file and a leftover temp directory of
a live run must never turn into a permanent outcome: real ffmpeg processes are killed for real, ENOSPC comes from
the kernel (ffmpeg writing into /dev/full), cache files are deleted and truncated on disk. Still images and
streams without a usable frame rate get reasons of their own instead of ``truncated``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from media_fixtures import make_test_audio, make_test_video
from media_fixtures import run_ffmpeg as write_media

from preprocess.pipeline import (
    Workspace,
    run_select,
    run_stage,
    start_job,
)
from preprocess.run.cache import StageCache
from preprocess.run.failures import EnvironmentFailure, is_environment_error
from preprocess.run.media import FfmpegError, iter_rgb_frames, run_ffmpeg
from preprocess.run.records import Candidate, ProbeResult, Rejection
from preprocess.run.settings import load_settings
from preprocess.video.probe import ffprobe_json, probe_video

SETTINGS = load_settings("tiny")


def _live_processes(marker: str) -> list[int]:
    """Pids of live (not zombie) ffmpeg processes whose arguments contain ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended while we looked
            continue
        if argv and argv[0].endswith(b"ffmpeg") and state != "Z" and any(marker.encode() in arg for arg in argv):
            found.append(int(entry.name))
    return found


class Killer(threading.Thread):
    """SIGKILLs the first live ffmpeg whose argv contains ``marker`` (what the OOM killer does to a fat encode)."""

    def __init__(self, marker: str, timeout_s: float = 60.0):
        super().__init__(daemon=True)
        self.marker, self.timeout_s, self.killed = marker, timeout_s, []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            for pid in _live_processes(self.marker):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                return
            time.sleep(0.005)


def _upstream(video: Path, workspace: Workspace, settings=SETTINGS):
    job = start_job(Candidate("speaker", str(video), "folder"), workspace)
    return run_stage("locate", run_stage("probe", job, settings, workspace), settings, workspace)


def _timing(job_or_outcome, stage: str):
    return next(t for t in job_or_outcome.timings if t.stage == stage)


# ---------------------------------------------------------------- a killed ffmpeg is retried, never cached


@pytest.mark.timeout(300)
def test_an_ffmpeg_killed_mid_encode_is_retried_and_a_clean_rerun_keeps_the_clip(frontal_video, tmp_path):
    # a slow preset, so the encode is still running when the killer finds it in /proc
    settings = load_settings("tiny", {"standardise": {"preset": "veryslow"}})
    workspace = Workspace(tmp_path / "out")
    job = _upstream(frontal_video, workspace, settings)
    assert job.rejection is None, job.rejection
    killer = Killer(str(tmp_path / "out" / "work" / "standardise" / ".tmp-"))
    killer.start()
    killed = run_stage("standardise", job, settings, workspace)
    killer.join()
    assert killer.killed, "the encode finished before it could be killed"
    assert killed.rejection is not None
    assert (killed.rejection.stage, killed.rejection.reason) == ("standardise", "error"), killed.rejection
    assert "MediaToolKilled" in killed.rejection.detail and "SIGKILL" in killed.rejection.detail
    assert not [p for p in (tmp_path / "out" / "work" / "standardise").iterdir()], "something was cached"

    rerun = run_stage("standardise", job, settings, workspace)
    assert rerun.rejection is None, rerun.rejection
    assert rerun.standardised.n_frames == 125 and not _timing(rerun, "standardise").cached


@pytest.mark.timeout(120)
def test_a_killed_frame_decode_raises_a_transient_error_not_a_content_verdict(frontal_video, tmp_path):
    video = tmp_path / f"decode-{uuid.uuid4().hex[:8]}.mp4"  # a unique name for the killer to look for
    video.write_bytes(frontal_video.read_bytes())
    killer = Killer(video.name)
    with pytest.raises(Exception) as raised:
        for _ in iter_rgb_frames(video, width=640, height=360):
            if not killer.is_alive() and not killer.killed:
                killer.start()  # ffmpeg is running: it delivered a frame
            time.sleep(0.05)
    assert killer.killed
    assert type(raised.value).__name__ == "MediaToolKilled" and not isinstance(raised.value, FfmpegError)


# ---------------------------------------------------------------- a full disk fails the run


def test_ffmpeg_writing_to_a_full_device_is_an_environment_error(tmp_path):
    """/dev/full answers every write with ENOSPC: the kernel's own full-disk error, through real ffmpeg."""
    with pytest.raises(OSError) as raised:
        run_ffmpeg(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=1", "-c:v", "libx264",
                    "-f", "mp4", "/dev/full"], purpose="writing a clip to a full disk")
    assert raised.value.errno == errno.ENOSPC and is_environment_error(raised.value)
    assert "No space left on device" in str(raised.value.__cause__)  # ffmpeg's own log, kept as the cause
    # ffmpeg exits 0 after failing to write a WAV trailer: the log, not the exit status, says the disk is full
    with pytest.raises(OSError) as raised:
        run_ffmpeg(["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "pcm_s16le", "-f", "wav", "/dev/full"],
                   purpose="writing audio to a full disk")
    assert raised.value.errno == errno.ENOSPC and is_environment_error(raised.value)


class FullDiskCache(StageCache):
    """The real cache, except that the entry's clip.mp4 is a link to /dev/full: standardise's ffmpeg gets ENOSPC
    from the kernel when it writes the video, as on a full disk."""

    def run(self, stage, key, compute):
        def on_full_disk(out_dir: Path):
            (out_dir / "clip.mp4").symlink_to("/dev/full")
            return compute(out_dir)

        return super().run(stage, key, on_full_disk)


@pytest.mark.timeout(300)
def test_a_full_disk_during_standardise_fails_the_run_instead_of_rejecting_the_clip(frontal_video, tmp_path):
    workspace = Workspace(tmp_path / "out")
    job = _upstream(frontal_video, workspace)
    workspace.cache = FullDiskCache(workspace.cache.root)
    with pytest.raises(EnvironmentFailure) as raised:
        run_stage("standardise", job, SETTINGS, workspace)
    assert "stage standardise cannot run in this environment" in str(raised.value)
    assert "No space left on device" in str(raised.value)
    assert not list((tmp_path / "out" / "work" / "standardise").iterdir())  # nothing cached
    # with space again, the same clip goes through
    workspace.cache = StageCache(workspace.cache.root)
    assert run_stage("standardise", job, SETTINGS, workspace).rejection is None


# ---------------------------------------------------------------- cache entries verify their files


@pytest.mark.timeout(300)
def test_a_deleted_or_truncated_cache_file_is_recomputed_and_the_clip_kept(frontal_video, tmp_path, caplog):
    workspace = Workspace(tmp_path / "out")

    def through_select():
        job = run_stage("faces", run_stage("standardise", _upstream(frontal_video, workspace), SETTINGS, workspace), SETTINGS,
                        workspace)
        [piece] = run_select(job, SETTINGS, workspace)
        return job, piece

    job, piece = through_select()
    assert piece.kept, piece.rejection
    clip_dir = workspace.cache.entry_dir("standardise", job.standardise_key)
    piece_dir = Path(piece.files_dir)
    # media and arrays (result.json holds wall times, which differ between computations)
    sizes = {path: path.stat().st_size for path in [clip_dir / "clip.mp4", *piece_dir.iterdir()]
             if path.name != "result.json"}
    (piece_dir / "clip.wav").unlink()  # deleted
    with open(clip_dir / "clip.mp4", "r+b") as handle:  # cut short
        handle.truncate(sizes[clip_dir / "clip.mp4"] // 2)

    with caplog.at_level(logging.WARNING, logger="preprocess.run.cache"):
        job, piece = through_select()
    assert piece.kept, piece.rejection
    assert not _timing(job, "standardise").cached and not _timing(piece, "cut").cached
    assert _timing(job, "faces").cached  # only the damaged entries were recomputed
    assert {path: path.stat().st_size for path in sizes} == sizes
    messages = "\n".join(record.getMessage() for record in caplog.records)
    # the piece's clip.mp4 is a hard link of the whole standardised clip (preprocess/video/cut.py): cut short with it, and
    # found first; its deleted clip.wav alone would have been found too
    assert any(f"{piece_dir}" in line and ("clip.wav is missing" in line or "clip.mp4 has" in line)
               for line in messages.splitlines())
    assert f"{clip_dir}" in messages and f"clip.mp4 has {sizes[clip_dir / 'clip.mp4'] // 2} bytes" in messages


def test_an_entry_without_a_file_list_is_recomputed(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.entry_dir("stage", "key")
    entry.mkdir(parents=True)
    (entry / "result.json").write_text(json.dumps({"value": "old", "seconds": 0.1}))  # as older versions wrote it
    result, cached = cache.run("stage", "key", lambda out_dir: {"value": "new"})
    assert (result["value"], cached) == ("new", False)
    assert cache.run("stage", "key", lambda out_dir: {"value": "newer"}) == ({"value": "new",
                                                                             "seconds": result["seconds"]}, True)


# ---------------------------------------------------------------- clean-up spares live runs


def test_remove_leftovers_removes_only_temp_dirs_of_dead_processes(tmp_path):
    cache = StageCache(tmp_path)
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid is dead
    try:
        dirs = {
            "mine": tmp_path / "probe" / f".tmp-{'a' * 20}-{os.getpid()}@{host}-0123abcd",
            "live child": tmp_path / "faces" / f".tmp-{'b' * 20}-{sleeper.pid}@{host}-0123abcd",
            "dead": tmp_path / "faces" / f".tmp-{'c' * 20}-{finished.pid}@{host}-0123abcd",
            "other host": tmp_path / "faces" / f".tmp-{'d' * 20}-{finished.pid}@not-{host}-0123abcd",
            "older version": tmp_path / "faces" / f".tmp-{'e' * 20}-0123abcd",
        }
        for path in dirs.values():
            (path / "sub").mkdir(parents=True)
        assert cache.remove_leftovers() == 2
        assert {name for name, path in dirs.items() if path.exists()} == {"mine", "live child", "other host"}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cache_names_its_temp_dirs_after_their_process(tmp_path):
    cache = StageCache(tmp_path)
    seen = []
    cache.run("stage", "key", lambda out_dir: seen.append(out_dir.name) or {})
    assert seen[0].startswith(f".tmp-key-{os.getpid()}@{socket.gethostname()}-")


# ---------------------------------------------------------------- still images and unknown frame rates


def _reason(result) -> str:
    assert isinstance(result, Rejection), result
    return result.reason


def test_an_image_named_like_a_video_is_a_still_image(tmp_path):
    png = tmp_path / "photo.png"
    write_media(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-frames:v", "1", png])
    disguised = tmp_path / "photo.mp4"
    disguised.write_bytes(png.read_bytes())
    assert ffprobe_json(disguised)["format"]["format_name"] == "png_pipe"
    assert _reason(probe_video(disguised)) == "still_image"


def test_a_single_picture_stream_with_sound_is_a_still_image(tmp_path):
    picture = tmp_path / "one_frame.mp4"
    write_media(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-frames:v", "1", "-c:v", "libx264",
                 "-pix_fmt", "yuv420p", picture])
    sound = make_test_audio(tmp_path / "sound.m4a", seconds=3.0)
    source = tmp_path / "slideshow.mp4"
    write_media(["-i", picture, "-i", sound, "-map", "0:v", "-map", "1:a", "-c", "copy", source])
    assert ffprobe_json(source)["streams"][0]["nb_frames"] == "1"
    assert _reason(probe_video(source)) == "still_image"


def test_cover_art_alone_in_an_mp4_is_a_still_image(tmp_path):
    assert _reason(probe_video(make_test_audio(tmp_path / "song.mp4", cover_art=True))) == "still_image"


def _zero_sample_durations(source: Path, target: Path) -> Path:
    """Copy an mp4, setting every sample duration of its video track (the ``stts`` table) to 0: frames without
    times, the way a broken muxer writes them."""
    data = bytearray(source.read_bytes())
    stts = data.find(b"stts", data.find(b"vide"))  # the video track's handler comes before its sample table
    count = struct.unpack(">I", data[stts + 8:stts + 12])[0]
    for entry in range(count):
        struct.pack_into(">I", data, stts + 16 + 8 * entry, 0)
    target.write_bytes(bytes(data))
    return target


def test_a_stream_without_a_usable_frame_rate_gets_its_own_reason(tmp_path):
    source = make_test_video(tmp_path / "timed.mp4", seconds=3.0, codec="mjpeg")
    assert isinstance(probe_video(source), ProbeResult)
    untimed = _zero_sample_durations(source, tmp_path / "untimed.mp4")
    video = ffprobe_json(untimed)["streams"][0]
    # ffprobe's view: no base rate, an average of one frame per stated duration
    assert (video["codec_type"], video["r_frame_rate"], video["avg_frame_rate"]) == ("video", "1/0", "1/3")
    result = probe_video(untimed)
    assert _reason(result) == "unknown_frame_rate", result
    assert "r_frame_rate '1/0'" in result.detail


def test_the_probe_stage_caches_the_still_image_verdict(tmp_path):
    """Through the pipeline's probe stage the reason is kept as is (and cached: it is a verdict on the file)."""
    png = tmp_path / "photo.png"
    write_media(["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-frames:v", "1", png])
    video = tmp_path / "raw" / "still.mp4"
    video.parent.mkdir()
    video.write_bytes(png.read_bytes())
    workspace = Workspace(tmp_path / "out")
    job = run_stage("probe", start_job(Candidate("still", str(video), "folder"), workspace), SETTINGS, workspace)
    assert (job.rejection.stage, job.rejection.reason) == ("probe", "still_image")
    again = run_stage("probe", start_job(Candidate("still", str(video), "folder"), workspace), SETTINGS, workspace)
    assert again.rejection.reason == "still_image" and _timing(again, "probe").cached
