"""Generated talking-face test data: videos built from scikit-image's bundled astronaut photo with espeak-ng
speech, and a small sample dataset in HDTF's real layout (annotation files + ``Name.mp4`` videos).

Nothing here needs the network. The faces of ``make_talking_video`` do not move their lips (the photo is still,
drifting slightly); the data exercises the pipeline, it is not training material. ``make_lip_sync_video`` draws a
mouth that opens with the speech's loudness, with the audio moved by a known number of frames or replaced by
unrelated speech: known answers for the sync expert.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from preprocess.run.media import feed_stdin, media_limits, run_tool
from tiny_models.scenes import Layout, _background, _head_and_shoulders, _resized, render_frames  # noqa: F401 (re-exported)

SPEECH_TEXT = (
    "Good evening. Today we talk about the weather, the markets and the news from around the world. "
    "Thank you for joining us, and stay with us after the break."
)


def speech_wav(path: Path, text: str = SPEECH_TEXT) -> Path:
    """Speech synthesised by espeak-ng (its own sample rate; later stages resample)."""
    result = run_tool(["espeak-ng", "-s", "150", "-w", str(path), text], purpose=f"synthesising speech into {path}",
                      timeout_s=media_limits().limit_s(None))
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng failed writing {path} (exit {result.returncode}): {result.log_tail()}")
    return path


def make_talking_video(
    path: Path, *, layout: Layout = "single", seconds: float = 5.0, width: int = 640, height: int = 360,
    fps: float = 30.0, audio: Literal["speech", "silence", "none"] = "speech", variant: int = 0,
) -> Path:
    """Write an H.264/AAC mp4 of a generated scene with looping espeak-ng speech."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = int(round(seconds * fps))
    with tempfile.TemporaryDirectory() as scratch:
        command = ["ffmpeg", "-nostdin", "-v", "error", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
        if audio == "speech":
            command += ["-stream_loop", "-1", "-i", str(speech_wav(Path(scratch) / "speech.wav"))]
        elif audio == "silence":
            command += ["-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono"]
        command += ["-map", "0:v"] + (["-map", "1:a", "-c:a", "aac", "-b:a", "64k"] if audio != "none" else [])
        command += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p",
                    "-t", f"{n_frames / fps:.3f}", str(path)]
        # stderr is drained while the frames go in (a full stderr pipe would block ffmpeg, and us with it)
        with feed_stdin(command, purpose=f"writing the generated video {path}",
                        timeout_s=media_limits().limit_s(seconds)) as stdin:
            for frame in render_frames(layout, width, height, n_frames, fps, variant):
                stdin.write(frame.tobytes())
    return path


# ---- lip-synced talking clips (the sync expert's tests): a mouth that opens with the speech's loudness ----

SYNC_FPS = 25  # the pipeline's frame rate: one video frame is 640 samples at 16 kHz
SYNC_SAMPLE_RATE = 16_000
# The astronaut's mouth in _head_and_shoulders() coordinates, from MediaPipe face mesh landmarks 13/14 (inner
# lips) and 61/291 (corners): centre (138, 135), 43 px wide, in a face 107 px high (landmarks 10 to 152).
MOUTH_CENTRE = (138.0, 135.0)
MOUTH_HALF_WIDTH = 19.0
MOUTH_HALF_HEIGHT = (1.0, 9.0)  # closed .. fully open (loudness 1), in patch pixels


def speech_16k(seconds: float, text: str = SPEECH_TEXT) -> np.ndarray:
    """espeak-ng speech of ``text`` as float32 mono at 16 kHz, looped to ``seconds``."""
    import soundfile
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as scratch:
        speech, rate = soundfile.read(speech_wav(Path(scratch) / "speech.wav", text), dtype="float32", always_2d=True)
    speech = resample_poly(speech.mean(axis=1), SYNC_SAMPLE_RATE, rate).astype(np.float32)
    n = int(round(seconds * SYNC_SAMPLE_RATE))
    return np.resize(speech, n) if len(speech) else np.zeros(n, np.float32)  # np.resize repeats: a loop


def speech_envelope(audio: np.ndarray, fps: int = SYNC_FPS, sample_rate: int = SYNC_SAMPLE_RATE) -> np.ndarray:
    """Per video frame loudness in [0, 1]: the RMS of the frame's samples over the 95th percentile of them."""
    step = sample_rate // fps
    frames = audio[:len(audio) // step * step].astype(np.float64).reshape(-1, step)
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    scale = np.percentile(rms, 95) if len(rms) else 0.0
    return np.clip(rms / scale, 0, 1) if scale > 0 else np.zeros_like(rms)


def render_lip_sync_frames(envelope: np.ndarray, width: int, height: int, variant: int = 0):
    """Yield RGB frames of ``render_frames``' single layout with a dark mouth ellipse on the astronaut's mouth
    whose height follows ``envelope`` (one loudness in [0, 1] per frame; sub-pixel, antialiased)."""
    import cv2

    patch_height = int(height * 0.62)
    scale = patch_height / _head_and_shoulders().shape[0]
    pw = _resized(_head_and_shoulders(), patch_height).shape[1]
    frames = render_frames("single", width, height, len(envelope), SYNC_FPS, variant)
    for index, (frame, level) in enumerate(zip(frames, envelope, strict=True)):
        drift = int(round(6 * np.sin(2 * np.pi * index / (SYNC_FPS * 3) + variant)))  # render_frames' placement
        x = int(min(max(width / 2 - pw / 2 + drift, 0), width - pw))
        y = int((height - patch_height) * 0.45)
        closed, opened = MOUTH_HALF_HEIGHT
        centre = (x + MOUTH_CENTRE[0] * scale, y + MOUTH_CENTRE[1] * scale)
        axes = (MOUTH_HALF_WIDTH * scale, (closed + (opened - closed) * float(level)) * scale)
        # fixed point (shift 4 = 1/16 px) so that the opening follows the loudness smoothly
        cv2.ellipse(frame, tuple(int(round(v * 16)) for v in centre), tuple(int(round(v * 16)) for v in axes),
                    0, 0, 360, (70, 20, 30), -1, cv2.LINE_AA, 4)
        yield frame


def lead_audio(audio: np.ndarray, frames: int, samples_per_frame: int = SYNC_SAMPLE_RATE // SYNC_FPS) -> np.ndarray:
    """The audio ``frames`` video frames early (it leads the video; negative: late), silence filling the gap."""
    samples = min(abs(frames) * samples_per_frame, len(audio))
    silence = np.zeros(samples, audio.dtype)
    if frames >= 0:
        return np.concatenate([audio[samples:], silence])
    return np.concatenate([silence, audio[:len(audio) - samples]])


def make_lip_sync_video(
    path: Path, *, seconds: float = 8.0, width: int = 640, height: int = 360, text: str = SPEECH_TEXT,
    audio_lead_frames: int = 0, audio_text: str | None = None, variant: int = 0,
) -> Path:
    """Write a 25 fps H.264/AAC mp4 whose mouth opens with the loudness of espeak-ng speech of ``text``.

    The audio track is that speech moved ``audio_lead_frames`` frames early (SyncNet's sign: a positive offset
    means the audio leads the video; negative: it lags), or, with ``audio_text``, speech of another text that the
    mouth does not follow (unrelated audio)."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    speech = speech_16k(seconds, text)
    envelope = speech_envelope(speech)
    audio = lead_audio(speech if audio_text is None else speech_16k(seconds, audio_text), audio_lead_frames)
    with tempfile.TemporaryDirectory() as scratch:
        wav = Path(scratch) / "audio.wav"
        soundfile.write(wav, audio, SYNC_SAMPLE_RATE, subtype="PCM_16")
        command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{width}x{height}", "-r", str(SYNC_FPS), "-i", "-", "-i", str(wav), "-map", "0:v",
                   "-map", "1:a", "-c:a", "aac", "-b:a", "96k", "-c:v", "libx264", "-preset", "ultrafast",
                   "-crf", "20", "-pix_fmt", "yuv420p", "-t", f"{len(envelope) / SYNC_FPS:.3f}", str(path)]
        with feed_stdin(command, purpose=f"writing the generated lip-sync video {path}",
                        timeout_s=media_limits().limit_s(seconds)) as stdin:
            for frame in render_lip_sync_frames(envelope, width, height, variant):
                stdin.write(frame.tobytes())
    return path


# The sample dataset: every behaviour of the pipeline at least once, in HDTF's real file layout.
# Videos are 640x360 while the annotations are at 720p, so annotated boxes are scaled by 0.5.
SAMPLE_VIDEOS: dict[str, dict] = {
    "JaneDoe0": {"layout": "single", "seconds": 12.0},  # clip 0 kept (7 s), clip 1 too short (1 s)
    "JohnRoe1": {"layout": "single", "seconds": 26.0},  # 25 s clip split into two pieces; resolution 0
    "TwoHosts0": {"layout": "pair", "seconds": 6.0},  # multi-speaker
    "EmptyStudio0": {"layout": "none", "seconds": 5.0},  # no face
}
SAMPLE_ANNOTATIONS: dict[str, str] = {
    # WDA: BOM on the url file, trailing space on a time line, a missing crop row, a resolution of 0
    "WDA_video_url.txt": "\ufeffJaneDoe0 https://www.youtube.com/watch?v=sample00001\n"
                         "JohnRoe1 https://www.youtube.com/watch?v=sample00002\n",
    "WDA_resolution.txt": "JaneDoe0.mp4 720\nJohnRoe1.mp4 0\n",
    "WDA_annotion_time.txt": "JaneDoe0.mp4 00:01-00:08 00:10-00:11 \nJohnRoe1.mp4 00:00-00:25\n",
    "WDA_crop_wh.txt": "JaneDoe0_0.mp4 440 400 40 400\nJohnRoe1_0.mp4 440 400 40 400\n",
    "WDA_crop_ratio.txt": "JaneDoe0_0.mp4 1.0\nJaneDoe0_1.mp4 1.0\nJohnRoe1_0.mp4 1.2\n",
    # WRA: a crop box that falls outside the 16:9 frame
    "WRA_video_url.txt": "TwoHosts0 https://www.youtube.com/watch?v=sample00003\n"
                         "EmptyStudio0 https://www.youtube.com/watch?v=sample00004\n",
    "WRA_resolution.txt": "TwoHosts0.mp4 720\nEmptyStudio0.mp4 720\n",
    "WRA_annotion_time.txt": "TwoHosts0.mp4 00:00-00:05\nEmptyStudio0.mp4 00:00-00:04\n",
    "WRA_crop_wh.txt": "TwoHosts0_0.mp4 1000 400 40 400\nEmptyStudio0_0.mp4 440 400 40 400\n",
    "WRA_crop_ratio.txt": "TwoHosts0_0.mp4 1.0\nEmptyStudio0_0.mp4 1.0\n",
    # RD: a corrupt download, a video never downloaded, a video without time annotation, no final newline
    "RD_video_url.txt": "Radio1 https://www.youtube.com/watch?v=sample00005\n"
                        "Radio2 https://www.youtube.com/watch?v=sample00006\n"
                        "Radio3 https://www.youtube.com/watch?v=sample00007\n",
    "RD_resolution.txt": "Radio1.mp4 720\nRadio2.mp4 720\nRadio3.mp4 720\n",
    "RD_annotion_time.txt": "Radio1.mp4 00:00-00:05\nRadio2.mp4 00:00-00:06\n",
    "RD_crop_wh.txt": "Radio1_0.mp4 440 400 40 400\nRadio2_0.mp4 440 400 40 400\n",
    "RD_crop_ratio.txt": "Radio1_0.mp4 1.0\nRadio2_0.mp4 1.0",
}


def make_sample_hdtf(out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write the sample HDTF dataset (annotation files and videos) into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    marker = out_dir / ".complete"
    if marker.exists() and not overwrite:
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name, text in SAMPLE_ANNOTATIONS.items():
        (out_dir / name).write_bytes(text.encode("utf-8"))
    for name, spec in SAMPLE_VIDEOS.items():
        make_talking_video(out_dir / f"{name}.mp4", **spec)
    # A download that broke off: the first 20 kB of a real video, then nothing.
    broken = make_talking_video(out_dir / "Radio1.full.mp4", seconds=5.0)
    (out_dir / "Radio1.mp4").write_bytes(broken.read_bytes()[:20_000])
    broken.unlink()
    marker.write_text("sample HDTF dataset generated by synchrorama.sample_data\n")
    return out_dir
