"""Stage: where speech is in a standardised clip, measured with Silero VAD (a trained voice-activity detector).

Input: the clip's ``clip.wav`` (16 kHz mono, loudness-normalised, ``n_frames * 640`` samples). Silero VAD
(``silero-vad`` on PyPI; its TorchScript model ``silero_vad/data/silero_vad.jit`` ships inside the wheel, so it
runs offline) gives one speech probability per 512-sample window (32 ms), carrying its recurrent state from
window to window. The probabilities become speech segments with Silero's own post-processing
(``get_speech_timestamps_from_probs``: speech starts at ``threshold``, ends below ``threshold - 0.15`` after
``min_silence_ms``, segments shorter than ``min_speech_ms`` are dropped, each is padded by ``speech_pad_ms``).

Output, per video frame at 25 fps (640 samples): ``speech_prob.npy`` (float32, the windows' probabilities
averaged over the frame's samples) and ``speech_flags.npy`` (uint8, 1 where at least half of the frame's
samples lie in a speech segment). The filters take a piece's ``speech_fraction`` as the mean of its frames'
flags, so one run per clip serves every piece of it.

The model is loaded once per process. It is stateful (its recurrent state and the last 64 samples of context
live inside the TorchScript module), so each clip resets the state and holds a lock for the whole clip.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from preprocess.audio.audio_io import read_mono
from preprocess.run.settings import SpeechActivitySettings
from preprocess.run.stage import Stage

SPEECH_PROB_FILE = "speech_prob.npy"
SPEECH_FLAGS_FILE = "speech_flags.npy"
VAD_SAMPLE_RATE = 16000  # the packaged model's rate (it also takes 8 kHz, with 256-sample windows)
VAD_WINDOW = 512  # samples per window at 16 kHz: the only window size the v5+ models accept
_PACKAGE, _MODEL_FILE = "silero-vad", "silero_vad/data/silero_vad.jit"


@dataclass(frozen=True)
class SpeechActivity:
    prob_file: str  # file names inside the stage's output directory
    flags_file: str
    n_frames: int
    fps: int
    speech_fraction: float  # 0-1: flagged frames of the whole clip
    model: str


@dataclass(frozen=True)
class SileroVAD:
    model: torch.jit.ScriptModule
    lock: threading.Lock
    identity: str


@cache
def silero_identity() -> str:
    """What a cache key knows of the model: the package version and the hash of its TorchScript file.

    Reads only the package metadata and the file (no torch, no import of ``silero_vad``), so a cached re-run
    never loads the model."""
    try:
        distribution = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(f"the speech-activity stage needs {_PACKAGE} (pinned in pyproject.toml): run "
                          "scripts/install.sh, or `.venv/bin/python -m pip install -c constraints.txt "
                          f"{_PACKAGE}==6.2.3`") from error
    path = Path(distribution.locate_file(_MODEL_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{_PACKAGE} {distribution.version} has no {_MODEL_FILE} (looked at {path}); "
                                f"reinstall it: pip install --force-reinstall {_PACKAGE}=={distribution.version}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{_PACKAGE}=={distribution.version}:{Path(_MODEL_FILE).name}:{digest}"


_load_lock = threading.Lock()
_loaded: list[SileroVAD] = []


def load_silero_vad() -> SileroVAD:
    """The packaged Silero VAD TorchScript model, loaded once per process (thread-safe)."""
    with _load_lock:
        if not _loaded:
            identity = silero_identity()
            path = Path(importlib.metadata.distribution(_PACKAGE).locate_file(_MODEL_FILE))
            model = torch.jit.load(str(path), map_location="cpu").eval()
            _loaded.append(SileroVAD(model=model, lock=threading.Lock(), identity=identity))
        return _loaded[0]


@cache
def _timestamps_from_probs():
    # Importing silero_vad runs ``torch.set_num_threads(1)`` (silero_vad/model.py), which would slow every other
    # model stage of the process: keep the caller's thread count.
    threads = torch.get_num_threads()
    try:
        from silero_vad.utils_vad import get_speech_timestamps_from_probs
    finally:
        torch.set_num_threads(threads)
    return get_speech_timestamps_from_probs


def window_probabilities(audio: np.ndarray, vad: SileroVAD) -> np.ndarray:
    """Silero's speech probability of each 512-sample window of 16 kHz ``audio`` (N,) -> (ceil(N / 512),);
    the last window is zero-padded, as ``silero_vad.get_speech_timestamps`` pads it."""
    padded = np.pad(audio.astype(np.float32), (0, -len(audio) % VAD_WINDOW))
    windows = torch.from_numpy(padded).reshape(-1, VAD_WINDOW)
    probabilities = np.empty(len(windows), np.float32)
    with vad.lock, torch.inference_mode():
        vad.model.reset_states()  # state left by the previous clip must not leak into this one
        for index, window in enumerate(windows):
            probabilities[index] = vad.model(window[None], VAD_SAMPLE_RATE).item()
        vad.model.reset_states()
    return probabilities


def frame_speech(audio: np.ndarray, sample_rate: int, fps: int, settings: SpeechActivitySettings,
                 vad: SileroVAD) -> tuple[np.ndarray, np.ndarray]:
    """Per video frame: (speech probability float32 (n_frames,), speech flag uint8 (n_frames,)).

    ``audio`` is 16 kHz mono, a whole number of frames long (``sample_rate / fps`` samples per frame)."""
    if sample_rate != VAD_SAMPLE_RATE:
        raise ValueError(f"Silero VAD runs on {VAD_SAMPLE_RATE} Hz audio, got {sample_rate} Hz: standardise "
                         f"writes clip.wav at standardise.sample_rate, which must stay {VAD_SAMPLE_RATE}")
    samples_per_frame, remainder = divmod(sample_rate, fps)
    if remainder or len(audio) % samples_per_frame:
        raise ValueError(f"{len(audio)} samples at {sample_rate} Hz are not a whole number of {fps} fps frames")
    n_frames = len(audio) // samples_per_frame
    probabilities = window_probabilities(audio, vad)
    per_sample = np.repeat(probabilities, VAD_WINDOW)[:len(audio)]
    frame_prob = per_sample.reshape(n_frames, samples_per_frame).mean(axis=1).astype(np.float32)
    segments = _timestamps_from_probs()(
        probabilities.tolist(), sampling_rate=sample_rate, threshold=settings.threshold,
        min_speech_duration_ms=settings.min_speech_ms, min_silence_duration_ms=settings.min_silence_ms,
        speech_pad_ms=settings.speech_pad_ms, audio_length_samples=len(audio))
    in_speech = np.zeros(len(audio), bool)
    for segment in segments:
        in_speech[segment["start"]:segment["end"]] = True
    flags = (in_speech.reshape(n_frames, samples_per_frame).mean(axis=1) >= 0.5).astype(np.uint8)
    return frame_prob, flags


def measure_speech_activity(audio_path: Path, fps: int, settings: SpeechActivitySettings,
                            out_dir: Path) -> SpeechActivity:
    """Write ``speech_prob.npy`` and ``speech_flags.npy`` (one value per video frame) for a clip's audio."""
    audio, sample_rate = read_mono(audio_path)
    vad = load_silero_vad()
    frame_prob, flags = frame_speech(audio, sample_rate, fps, settings, vad)
    np.save(out_dir / SPEECH_PROB_FILE, frame_prob)
    np.save(out_dir / SPEECH_FLAGS_FILE, flags)
    return SpeechActivity(prob_file=SPEECH_PROB_FILE, flags_file=SPEECH_FLAGS_FILE, n_frames=len(flags), fps=fps,
                          speech_fraction=round(float(flags.mean()), 4) if len(flags) else 0.0,
                          model=vad.identity)


# ---------------------------------------------------------------- the stage: once over the whole standardised clip


def _speech_activity_run(job, settings, workspace, out_dir: Path) -> dict:
    audio = workspace.cache.entry_dir("standardise", job.standardise_key) / job.standardised.audio
    return asdict(measure_speech_activity(audio, job.standardised.fps, settings.filters.speech_activity, out_dir))


def _preload_silero(settings) -> str:
    try:
        load_silero_vad()
    except Exception as error:
        raise RuntimeError(f"speech-activity model (Silero VAD from the silero-vad package) failed to load: "
                           f"{type(error).__name__}: {error}. It ships inside its wheel: `pip install -c "
                           f"constraints.txt silero-vad`") from error
    return silero_identity()


STAGE = Stage(name="speech_activity", version=1, group="video", run=_speech_activity_run, preload=_preload_silero,
              key_parts=lambda job, settings, workspace: [job.standardise_key,
                                                          settings.filters.speech_activity.fingerprint(),
                                                          silero_identity()])
