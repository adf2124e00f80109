"""Generated talking-face test data: videos built from scikit-image's bundled astronaut photo with espeak-ng
speech, and a small sample dataset in HDTF's real layout (annotation files + ``Name.mp4`` videos).

Nothing here needs the network. The faces do not move their lips (the photo is still, drifting slightly);
the data exercises the pipeline, it is not training material.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from skimage import data as skimage_data
from skimage.transform import resize

from preprocess.media import feed_stdin, media_limits, run_tool

Layout = Literal["single", "pair", "none"]

SPEECH_TEXT = (
    "Good evening. Today we talk about the weather, the markets and the news from around the world. "
    "Thank you for joining us, and stay with us after the break."
)


def _head_and_shoulders() -> np.ndarray:
    """The astronaut photo's head-and-shoulders region (RGB uint8, 280x280, face about 104 px high)."""
    return skimage_data.astronaut()[10:290, 85:365]


def _resized(image: np.ndarray, height: int) -> np.ndarray:
    width = int(round(image.shape[1] * height / image.shape[0]))
    return (resize(image, (height, width), anti_aliasing=True) * 255).astype(np.uint8)


def _background(width: int, height: int) -> np.ndarray:
    ramp = np.linspace(40, 110, width, dtype=np.float32)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[..., 0] = ramp[None, :]
    canvas[..., 1] = 70
    canvas[..., 2] = ramp[::-1][None, :]
    return canvas


def render_frames(layout: Layout, width: int, height: int, n_frames: int, fps: float, variant: int = 0):
    """Yield RGB frames: one face, two faces side by side, or a face-free still life, drifting a little.
    ``variant`` changes the background tint and the drift's phase, so variants are different files."""
    if layout == "none":
        patch = _resized(skimage_data.coffee(), int(height * 0.8))
        patches = [patch]
    else:
        patch_height = int(height * (0.62 if layout == "single" else 0.55))
        patch = _resized(_head_and_shoulders(), patch_height)
        patches = [patch] if layout == "single" else [patch, patch[:, ::-1]]
    background = _background(width, height)
    background[..., 1] = (70 + 17 * variant) % 256
    slots = len(patches)
    for index in range(n_frames):
        frame = background.copy()
        drift = int(round(6 * np.sin(2 * np.pi * index / (fps * 3) + variant)))
        for slot, patch in enumerate(patches):
            ph, pw = patch.shape[:2]
            centre_x = width * (slot + 0.5) / slots
            x = int(min(max(centre_x - pw / 2 + drift, 0), width - pw))
            y = int((height - ph) * 0.45)
            frame[y:y + ph, x:x + pw] = patch
        yield frame


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
