"""Safe wrappers around the ffmpeg/ffprobe command line: argument lists (never a shell string), stderr drained
while the tool runs, and a wall-clock limit on every call.

Every external media tool the pipeline runs goes through :func:`run_tool` (run to completion),
:func:`stream_stdout` (read its output while it runs; :func:`iter_rgb_frames` builds on it) or
:func:`feed_stdin` (write its input while it runs). All three:

* read stderr on a thread *while the process runs*. A damaged source makes ffmpeg log an error per broken
  packet; a pipe holds 64 KiB, and a process whose stderr pipe is full blocks forever, so reading stderr only
  after stdout ends (as this module once did) deadlocked the decode. The drain keeps the first and last lines
  (bounded memory whatever the volume) and counts the lines: with ``-v error`` every line is an error, which
  is how the standardise stage counts decode errors over the clip (``ToolRun.log_lines``).
* enforce a time limit, ``MediaTimeouts.limit_s(duration)`` = ``base_s + per_media_s x`` the seconds of media
  the call handles (base only when that is unknown or not the point, e.g. reading a container's header). A call
  past its limit has its whole process group killed and raises :class:`FfmpegTimeout` naming the call's purpose,
  the limit and the end of the tool's log.
* judge a failed run (:func:`check_tool_run`) by what it says about the *input*, because stages cache what they
  conclude about content and a cached verdict is kept by every later run:

  - the log says ``No space left on device``, ``Input/output error``, ``Cannot allocate memory`` (or a quota, a
    read-only file system, too many open files), whatever the exit status (ffmpeg exits 0 after failing to
    write a WAV trailer to a full disk): :class:`MediaEnvironmentError`, an ``OSError`` with that errno, which
    ``preprocess.run.failures.is_environment_error`` recognises, so the run stops once, publishing nothing;
  - killed by a signal (a negative exit status: the OOM killer's SIGKILL; ffmpeg's 255 after it caught
    SIGTERM/SIGINT), a file it reads or writes missing (``No such file or directory``, or an expected output
    absent after a zero exit), or past its time limit: a :class:`TransientMediaFailure`. It is *not* an
    :class:`FfmpegError`, so no stage's ``except FfmpegError`` turns it into a cached rejection; the pipeline
    records an uncached ``error`` for the clip and the next run retries it;
  - any other non-zero exit: :class:`FfmpegError`, a deterministic verdict about the input that stages may
    turn into a cached rejection (``encode_failed``, ``undecodable``, ...).

The limits live in ``preprocess.run.settings.MediaTimeouts`` (one source of truth); every helper takes
``limits=`` to override them, ``None`` meaning the defaults.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from preprocess.run.settings import MediaTimeouts

FFMPEG_PREFIX = ("ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y")
FFPROBE_PREFIX = ("ffprobe", "-v", "error", "-hide_banner")

_MESSAGE_TAIL_CHARS = 800  # characters of a tool's log quoted in an error message
_LOG_HEAD_LINES, _LOG_TAIL_LINES = 20, 200  # lines of stderr kept, from its start and its end
_MAX_LINE_BYTES = 4096  # a longer "line" (no newline for that long) is cut there
_REPEATED = re.compile(r"^\s*Last message repeated (\d+) times?\s*$")
_JOIN_S = 5.0  # how long to wait for a reader thread once its process has exited
_POLL_S = 0.25  # longest single wait on a tool's output


class FfmpegError(RuntimeError):
    """ffmpeg/ffprobe rejected its input (a non-zero exit that is not about the machine); the message names the
    call's purpose and carries the end of its stderr. Stages may cache a rejection made from it."""


class TransientMediaFailure(RuntimeError):
    """A media tool failed for a reason that says nothing about the input: killed by a signal, past its time
    limit, or a file it reads or writes vanished. Deliberately not an :class:`FfmpegError`: it must reach the
    pipeline's guard (an uncached ``error`` for this run, retried by the next) instead of becoming a cached
    rejection."""


class MediaToolKilled(TransientMediaFailure):
    """The tool was killed by a signal (e.g. SIGKILL from the kernel's OOM killer, or an operator)."""


class MediaFileVanished(TransientMediaFailure):
    """A file the call reads or writes is missing (deleted under the run, or never written despite a zero exit)."""


class MediaEnvironmentError(OSError):
    """The tool hit a failure of the machine (full disk, I/O error, out of memory), named by ``errno``: the run
    stops (``preprocess.run.failures.is_environment_error``). Raised from the :class:`FfmpegError` carrying the log."""


class FfmpegTimeout(TransientMediaFailure):
    """A media tool ran past its time limit and was killed (with its process group)."""

    def __init__(self, purpose: str, limit_s: float, log_tail: str) -> None:
        super().__init__(
            f"{purpose}: killed after its time limit of {limit_s:.1f} s (preprocess.run.settings.MediaTimeouts: raise "
            f"base_s/per_media_s if the machine is only slow); its last output: {log_tail or '(nothing logged)'}")
        self.purpose, self.limit_s, self.log_tail = purpose, limit_s, log_tail


_LOG_CONTEXT_ADDRESS = re.compile(r" @ 0x[0-9a-f]+")


def clean_ffmpeg_log(text: str) -> str:
    """Drop the memory addresses ffmpeg prints in its log prefixes (``[mov,mp4 @ 0x55...]``): they differ
    from run to run, and rejection details must be reproducible for re-runs to give identical tables."""
    return _LOG_CONTEXT_ADDRESS.sub("", text)


# Messages (strerror texts, as ffmpeg prints them) of failures of the machine rather than of the input.
_ENVIRONMENT_MESSAGES = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Input/output error", errno.EIO),
    ("Cannot allocate memory", errno.ENOMEM),
    ("Read-only file system", errno.EROFS),
    ("Too many open files", errno.EMFILE),
)
_FFMPEG_SIGNAL_EXIT = 255  # ffmpeg catches SIGINT/SIGTERM/SIGQUIT and exits 255; it exits 1 for any error


def raise_for_environment(returncode: int, log: str, *, tool: str, purpose: str) -> None:
    """Raise when a tool's run failed for a reason outside its input (see the module docstring): a
    :class:`MediaEnvironmentError` for a machine failure named in the log (whatever the exit status), a
    :class:`MediaToolKilled` for a signal, a :class:`MediaFileVanished` for a missing file. Returns for a
    success or a failure about the input, which the caller judges."""
    tail = log.strip()[-_MESSAGE_TAIL_CHARS:]
    for message, number in _ENVIRONMENT_MESSAGES:
        if message in log:
            cause = FfmpegError(f"{purpose}: {tool} exited {returncode}: {tail}")
            raise MediaEnvironmentError(
                number, f"{purpose}: {tool} reports '{message}' ({errno.errorcode.get(number, number)}): the "
                        f"machine, not the input, failed; free disk space / memory or fix the device and run again. "
                        f"Its log: {tail}") from cause
    if returncode < 0 or (returncode == _FFMPEG_SIGNAL_EXIT and tool == "ffmpeg"):
        how = f"signal {-returncode} ({_signal_name(-returncode)})" if returncode < 0 else "a signal it caught"
        raise MediaToolKilled(f"{purpose}: {tool} was killed by {how}, e.g. the out-of-memory killer; not a "
                              f"verdict on the input, the next run retries it. Its last output: "
                              f"{tail or '(nothing logged)'}")
    if returncode != 0 and "No such file or directory" in log:
        raise MediaFileVanished(f"{purpose}: a file {tool} reads or writes is missing (deleted while the run "
                                f"was using it?); the next run retries it. Its log: {tail}")


def check_tool_run(run: ToolRun, *, tool: str, purpose: str, outputs: Sequence[Path | str] = ()) -> None:
    """Raise unless ``run`` succeeded and wrote every file in ``outputs``: :func:`raise_for_environment`'s
    errors first, then :class:`FfmpegError` for a non-zero exit (a verdict on the input), then
    :class:`MediaFileVanished` for an expected output missing after a zero exit."""
    raise_for_environment(run.returncode, run.log, tool=tool, purpose=purpose)
    if run.returncode != 0:
        raise FfmpegError(f"{purpose}: {tool} exited {run.returncode}: {run.log_tail()}")
    missing = [str(path) for path in outputs if not Path(path).exists()]
    if missing:
        raise MediaFileVanished(f"{purpose}: {tool} exited 0 but {', '.join(missing)} is missing (deleted while "
                                f"the run was writing it?); the next run retries it")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def media_limits(limits: MediaTimeouts | None = None) -> MediaTimeouts:
    """``limits``, or the defaults from the settings (imported here: settings imports this module's users)."""
    if limits is not None:
        return limits
    from preprocess.run.settings import MediaTimeouts

    return MediaTimeouts()


@dataclass(frozen=True)
class ToolRun:
    """What a finished media tool left: exit status, stdout (when captured) and its cleaned log.

    ``log_lines`` counts the lines it wrote to stderr (a ``Last message repeated n times`` line counts n):
    with ``-v error`` each is an error ffmpeg logged. ``log`` is the cleaned stderr, its middle left out when
    longer than the lines kept; ``first_line`` is its first line ("" when it logged nothing).
    """

    returncode: int
    stdout: bytes
    log: str
    log_lines: int
    first_line: str
    seconds: float

    def log_tail(self, chars: int = _MESSAGE_TAIL_CHARS) -> str:
        return self.log.strip()[-chars:]


class _LogDrain(threading.Thread):
    """Reads a process's stderr to its end, keeping its first and last lines and counting all of them."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True, name="media-tool-stderr")
        self._stream = stream
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self.n_kept = 0  # lines that went into head or tail (for the "omitted" count)
        self.n_lines = 0  # log lines, a "Last message repeated n times" counting n

    def run(self) -> None:
        pending = b""
        try:
            while chunk := self._stream.read1(65536):  # type: ignore[attr-defined]
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for line in lines:
                    self._add(line)
                if len(pending) > _MAX_LINE_BYTES:
                    self._add(pending[:_MAX_LINE_BYTES])
                    pending = b""
        except (OSError, ValueError):  # the pipe was closed under us: the process is gone
            pass
        self._add(pending)

    def _add(self, raw: bytes) -> None:
        line = clean_ffmpeg_log(raw.decode("utf-8", errors="replace")).rstrip()
        if not line.strip():
            return
        repeated = _REPEATED.match(line)
        self.n_lines += int(repeated.group(1)) if repeated else 1
        self.n_kept += 1
        if len(self.head) < _LOG_HEAD_LINES:
            self.head.append(line)
        else:
            self.tail.append(line)

    @property
    def first_line(self) -> str:
        return self.head[0].strip() if self.head else ""

    def text(self) -> str:
        omitted = self.n_kept - len(self.head) - len(self.tail)
        middle = [f"[... {omitted} lines left out ...]"] if omitted > 0 else []
        return "\n".join([*self.head, *middle, *self.tail])

    def tail_text(self, chars: int = _MESSAGE_TAIL_CHARS) -> str:
        return self.text().strip()[-chars:]


def _start(command: Sequence[object], *, stdin: int | None, stdout: int | None) -> tuple[subprocess.Popen, _LogDrain]:
    """Start ``command`` in its own process group (so that a kill reaches anything it starts), stderr drained."""
    argv = [str(part) for part in command]
    try:
        process = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError as error:  # a broken installation, not a bad video: stop the run
        raise RuntimeError(f"{argv[0]} is not installed or not on PATH (Debian: apt-get install ffmpeg)") from error
    drain = _LogDrain(process.stderr)
    drain.start()
    return process, drain


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the process group of a process started by ``_start`` (if still running) and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


def _finish(process: subprocess.Popen, drain: _LogDrain, *threads: threading.Thread) -> None:
    """Kill if still running, then collect the reader threads and close the pipes."""
    _kill(process)
    for thread in (drain, *threads):
        thread.join(_JOIN_S)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:  # stdin whose reader died: the close's flush hits a broken pipe
                pass


def run_tool(
    command: Sequence[object], *, purpose: str, timeout_s: float, capture_stdout: bool = False
) -> ToolRun:
    """Run ``command`` to completion within ``timeout_s`` seconds of wall clock; never raises for a non-zero
    exit (the caller judges ``returncode`` and ``log``, e.g. with :func:`check_tool_run`). Raises :class:`FfmpegTimeout` past the limit and
    ``RuntimeError`` when the tool is not installed."""
    started = time.monotonic()
    process, drain = _start(command, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL)
    chunks: list[bytes] = []
    readers = []
    if capture_stdout:
        readers.append(threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True,
                                        name="media-tool-stdout"))
        readers[0].start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _finish(process, drain, *readers)
        raise FfmpegTimeout(purpose, timeout_s, drain.tail_text()) from None
    finally:
        _finish(process, drain, *readers)
    return ToolRun(returncode=returncode, stdout=b"".join(chunks), log=drain.text(), log_lines=drain.n_lines,
                   first_line=drain.first_line, seconds=round(time.monotonic() - started, 3))


def run_ffmpeg(
    args: Sequence[object], *, purpose: str = "ffmpeg", media_duration_s: float | None = None,
    limits: MediaTimeouts | None = None, outputs: Sequence[Path | str] = (),
) -> ToolRun:
    """``ffmpeg -v error -y <args>``, judged by :func:`check_tool_run` (``outputs``: the files it must have
    written); :class:`FfmpegTimeout` past ``limits.limit_s(media_duration_s)`` (the seconds of media the call
    decodes or writes)."""
    timeout_s = media_limits(limits).limit_s(media_duration_s)
    result = run_tool([*FFMPEG_PREFIX, *args], purpose=purpose, timeout_s=timeout_s)
    check_tool_run(result, tool="ffmpeg", purpose=purpose, outputs=outputs)
    return result


def run_ffprobe(
    args: Sequence[object], *, purpose: str, media_duration_s: float | None = None,
    limits: MediaTimeouts | None = None,
) -> ToolRun:
    """``ffprobe -v error <args>`` with stdout captured, judged by :func:`check_tool_run`."""
    timeout_s = media_limits(limits).limit_s(media_duration_s)
    result = run_tool([*FFPROBE_PREFIX, *args], purpose=purpose, timeout_s=timeout_s, capture_stdout=True)
    check_tool_run(result, tool="ffprobe", purpose=purpose)
    return result


def count_video_frames(path: Path, *, limits: MediaTimeouts | None = None) -> int:
    """Exact number of video frames (packets) in the first video stream, read from the container.

    Demuxes the whole file without decoding (milliseconds for a clip), so the base limit applies.
    """
    result = run_ffprobe(["-select_streams", "v:0", "-count_packets", "-show_entries", "stream=nb_read_packets",
                          "-of", "json", str(path)], purpose=f"counting the video frames of {path}", limits=limits)
    return int(json.loads(result.stdout)["streams"][0]["nb_read_packets"])


def media_duration_s(path: Path, *, limits: MediaTimeouts | None = None) -> float:
    """The container's duration in seconds (ffprobe reads the header only). Raises :class:`FfmpegError`
    when ffprobe fails or states no duration."""
    result = run_ffprobe(["-show_entries", "format=duration", "-of", "json", str(path)],
                         purpose=f"reading the duration of {path}", limits=limits)
    try:
        return float(json.loads(result.stdout)["format"]["duration"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise FfmpegError(f"reading the duration of {path}: ffprobe states none ({result.stdout[:200]!r})") from error


@dataclass
class StreamLog:
    """What a streamed tool logged, filled in by :func:`stream_stdout` once the tool has exited (``log=``):
    ``lines`` counts its stderr lines like ``ToolRun.log_lines`` (with ``-v error``: the errors it logged)."""

    lines: int = 0
    first_line: str = ""
    text: str = ""


def stream_stdout(
    command: Sequence[object], *, chunk_bytes: int, purpose: str, timeout_s: float, log: StreamLog | None = None
) -> Iterator[np.ndarray]:
    """Run ``command`` and yield its stdout in chunks of exactly ``chunk_bytes`` (uint8 arrays of that length;
    a shorter last piece is dropped), raising :class:`FfmpegError` if it exits non-zero.

    The limit counts the time spent *waiting for the tool*, not the time the consumer holds a chunk: a slow
    consumer (a VAE on CPU, a face mesh) stalls the tool through the full pipe and must not trip the limit of
    the tool it stalls; a tool that delivers nothing for longer than the rest of its budget is killed. Closing
    the generator early (``break``, ``close()``, garbage collection) kills the tool: it never keeps running for
    frames nobody reads. ``log``, when given, receives the tool's log counts once it has exited (also when it
    failed).
    """
    process, drain = _start(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    fd = process.stdout.fileno()
    _enlarge_pipe(fd, chunk_bytes)
    spent = 0.0  # seconds spent waiting for the tool so far
    resumed = time.monotonic()
    finished = False
    try:
        while True:
            chunk = np.empty(chunk_bytes, np.uint8)
            view, filled = memoryview(chunk), 0
            while filled < chunk_bytes:
                remaining = timeout_s - spent - (time.monotonic() - resumed)
                if remaining <= 0:
                    _finish(process, drain)
                    raise FfmpegTimeout(purpose, timeout_s, drain.tail_text())
                # short waits: Python code runs between them, so an exception injected into this thread (a
                # Prefect task timeout) lands promptly instead of after a long select
                if not select.select([fd], [], [], min(remaining, _POLL_S))[0]:
                    continue
                count = os.readv(fd, [view[filled:]])
                if count == 0:
                    break
                filled += count
            if filled < chunk_bytes:
                break
            spent += time.monotonic() - resumed
            yield chunk
            resumed = time.monotonic()
        remaining = timeout_s - spent - (time.monotonic() - resumed)
        try:
            returncode = process.wait(timeout=max(remaining, 0.01))
        except subprocess.TimeoutExpired:  # stdout closed, yet it does not exit
            _finish(process, drain)
            raise FfmpegTimeout(purpose, timeout_s, drain.tail_text()) from None
        finished = True
    finally:
        _finish(process, drain)  # kills it when the consumer stopped early or an error left the loop
        if log is not None:
            log.lines, log.first_line, log.text = drain.n_lines, drain.first_line, drain.text()
    if finished:
        _judge(returncode, drain, command, purpose)


def _enlarge_pipe(fd: int, chunk_bytes: int) -> None:
    """Let the tool write up to two chunks (at most the kernel's 1 MiB default cap) ahead of its reader, so that
    a consumer's per-frame work overlaps the tool's next frame; a pipe of the default 64 KiB holds less than one
    512x512 RGB frame. Linux only; elsewhere, or past the cap, the pipe stays as it is."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(2 * chunk_bytes, 1 << 20))
    except (ImportError, AttributeError, OSError):
        pass


@contextmanager
def feed_stdin(command: Sequence[object], *, purpose: str, timeout_s: float) -> Iterator[IO[bytes]]:
    """Run ``command`` with its stdin open for the ``with`` block to write into (e.g. raw frames for ffmpeg
    to encode); on leaving the block stdin is closed and the tool must finish. A watchdog kills it when the
    whole call passes ``timeout_s`` (writes then fail and :class:`FfmpegTimeout` is raised); a non-zero exit
    raises :class:`FfmpegError`."""
    process, drain = _start(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill(process)

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            yield process.stdin
            process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            if not expired.is_set():  # the tool died early: its exit status and log below say why
                process.wait()
            else:
                raise FfmpegTimeout(purpose, timeout_s, drain.tail_text()) from None
        returncode = process.wait(timeout=timeout_s + _JOIN_S)  # the watchdog ends it before this expires
    finally:
        watchdog.cancel()
        _finish(process, drain)
    if expired.is_set():
        raise FfmpegTimeout(purpose, timeout_s, drain.tail_text())
    _judge(returncode, drain, command, purpose)


def _judge(returncode: int, drain: _LogDrain, command: Sequence[object], purpose: str) -> None:
    """:func:`check_tool_run` for a streamed call (no ToolRun): environment, signal and missing-file failures
    first, then :class:`FfmpegError` for a non-zero exit."""
    tool = Path(str(command[0])).name
    raise_for_environment(returncode, drain.text(), tool=tool, purpose=purpose)
    if returncode != 0:
        raise FfmpegError(f"{purpose}: {tool} exited {returncode}: {drain.tail_text()}")


def iter_rgb_frames(
    path: Path,
    *,
    width: int,
    height: int,
    start_s: float = 0.0,
    duration_s: float | None = None,
    fps: float | None = None,
    pre_filters: Sequence[str] = (),
    limits: MediaTimeouts | None = None,
) -> Iterator[np.ndarray]:
    """Decode frames as (height, width, 3) uint8 RGB arrays, resampled to ``fps`` when given.

    ffmpeg applies rotation metadata before the filters, so frames come out as displayed. The time limit is
    ``limits.limit_s`` of ``duration_s`` (of the file's duration, read by ffprobe, when None) and counts only
    the time spent waiting for ffmpeg (see :func:`stream_stdout`). Raises :class:`FfmpegError` when ffmpeg
    fails, :class:`FfmpegTimeout` past the limit; stopping early kills ffmpeg.
    """
    limits = media_limits(limits)
    if duration_s is None:
        duration = max(0.0, media_duration_s(path, limits=limits) - start_s)
    else:
        duration = duration_s
    filters = list(pre_filters)
    if fps is not None:
        filters.append(f"fps={fps}")
    filters.append(f"scale={width}:{height}:flags=area")
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error"]
    if start_s > 0:
        command += ["-ss", f"{start_s:.3f}"]
    if duration_s is not None:
        command += ["-t", f"{duration_s:.3f}"]
    command += ["-i", str(path), "-map", "0:V:0", "-vf", ",".join(filters),
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    purpose = f"decoding frames of {path} from {start_s:.3f} s for {duration:.3f} s"
    chunks = stream_stdout(command, chunk_bytes=width * height * 3, purpose=purpose,
                           timeout_s=limits.limit_s(duration))
    try:
        for chunk in chunks:
            yield chunk.reshape(height, width, 3)
    finally:
        chunks.close()  # when our consumer stops early: stops ffmpeg now, not whenever the generator is collected
