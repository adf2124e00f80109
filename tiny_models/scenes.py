"""Generated scenes: frames of one face, two faces or none, drifting a little, from scikit-image's bundled photos.

The tiny VAE is trained on them (``tiny_models.vision``), and ``synchrorama.sample_data`` turns them into test
videos; they live here so that the tiny-model builders, which the preprocessing stages call, import nothing from
the command-line package.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from skimage import data as skimage_data
from skimage.transform import resize

Layout = Literal["single", "pair", "none"]


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
