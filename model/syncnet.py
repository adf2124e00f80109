"""The project's one sync expert: ``syncnet_v2`` (Chung & Zisserman, "Out of time: automated lip sync in the
wild", ACCV-W 2016), its inputs and the public SyncNet evaluation (offset, confidence, LSE-D / LSE-C).

Reference implementation: joonson/syncnet_python, ``SyncNetModel.py`` (class ``S``) for the network and
``SyncNetInstance.py`` (``evaluate``, ``calc_pdist``) for the inputs and the offset/confidence. Parameter names
(``netcnnaud``, ``netfcaud``, ``netcnnlip``, ``netfclip`` and the ``nn.Sequential`` indices inside them) are
those of the released ``syncnet_v2.model`` state dict, so its weights load unchanged (``load_syncnet``).

Who uses it: the data-quality filter of issue 14 (offset and confidence per piece), the evaluation's
SyncNet columns of issue 15 (LSE-D, LSE-C, offset; SynchroRaMa section 4 "Evaluation Metrics", Table 1).
It is also the stage-2 sync loss's expert when the training setting ``sync_expert`` names its weights
(``SyncNetV2LossExpert``, eq. 2 of section 3.7); by default that loss uses ``model/experts.py``'s
``SyncNetExpert`` (wav2vec2 states, trained by ``synchrorama train-experts``).

Inputs, exactly as ``SyncNetInstance.evaluate`` feeds them:

* audio: 16 kHz mono as int16 sample values (``scipy.io.wavfile.read`` of ffmpeg's pcm_s16le), MFCC by
  ``python_speech_features.mfcc`` with its defaults (25 ms window, 10 ms hop = 100 Hz, 13 coefficients, 26
  mel filters, NFFT 512, pre-emphasis 0.97, lifter 22, c0 replaced by the log frame energy): ``(13, n)``;
  one window is 20 MFCC frames (0.2 s), starting at MFCC frame ``4 * t`` for video frame ``t`` (25 fps).
* video: face crops resized to 224 x 224 (``cv2.resize``, bilinear), **BGR** channel order (``cv2.imread``)
  and raw 0..255 values, no normalisation; one window is 5 consecutive frames, ``(N, 3, 5, 224, 224)``.
* windows ``t = 0 .. min(T, len(audio) // 640) - 6``: the reference stops one window short of the last
  possible one (``lastframe = min_length - 5`` used as an exclusive bound); kept, so the figures match.

Offset and confidence (``sync_offset``): per window ``i`` and shift ``k = -max_shift .. +max_shift`` the L2
distance (``F.pairwise_distance``, whose ``eps = 1e-6`` is kept) between the video embedding of window ``i``
and the audio embedding of window ``i + k``, where audio windows beyond either end are zero vectors (the
reference pads with zeros, and the mean includes those terms). Mean over windows, ``min_distance`` = its
minimum, ``offset = max_shift - argmin`` (so ``offset = -k*``), ``confidence = median - minimum``.

Sign convention (the reference's, tested): **positive offset = the audio leads the video** (a sound is heard
``offset`` frames before the mouth makes it); audio that lags the video (delayed, e.g. by a late audio track)
gives a negative offset. To correct a clip, delay its audio by ``offset`` frames (``offset * 640`` samples),
i.e. advance it when the offset is negative.

LSE-D / LSE-C (Wav2Lip, Prajwal et al. 2020, ``evaluation/``: the same syncnet_python ``evaluate`` run per
video) are ``min_distance`` and ``confidence`` of a clip; papers average them over clips.

Size keys (everything else is fixed by the architecture): ``audio_channels`` (6 conv widths of the audio
tower), ``lip_channels`` (6 conv widths of the lip tower), ``fc_hidden`` (hidden width of both heads),
``embedding_dim`` (1024) and ``image_size`` (224). The last conv of each tower has a kernel equal to the
feature map it sees, so that its output is 1 x 1: ``(5, 4)`` for 13 x 20 MFCC windows and ``(1, 6, 6)`` for
224 crops, ``(1, 1, 1)`` for the smallest crop the lip tower accepts (64). Deviation: the reference hard-codes
these sizes; here they are derived so that tiny models of the same class can be built for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.losses import SyncEstimate

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MFCC_PER_FRAME = 4  # 100 Hz MFCC over 25 fps video
NUM_MFCC = 13
MFCC_WINDOW = 20  # 0.2 s of MFCC frames ...
WINDOW_FRAMES = 5  # ... against 5 video frames
FULL_IMAGE_SIZE = 224

WEIGHTS_HELP = (
    "syncnet_v2.model is released with joonson/syncnet_python (its download_model.sh fetches "
    "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model; LatentSync ships the same file as "
    "checkpoints/auxiliary/syncnet_v2.model). Download it on a machine with network access and give its local path."
)


@dataclass(frozen=True)
class SyncNetV2Size:
    """The size keys of ``SyncNetV2``; the defaults are the released ``syncnet_v2``."""

    audio_channels: tuple[int, ...] = (64, 192, 384, 256, 256, 512)
    lip_channels: tuple[int, ...] = (96, 256, 256, 256, 256, 512)
    fc_hidden: int = 512
    embedding_dim: int = 1024
    image_size: int = FULL_IMAGE_SIZE

    @classmethod
    def tiny(cls) -> SyncNetV2Size:
        """A few-thousand-parameter model of the same class for tests (64 x 64 crops)."""
        return cls(audio_channels=(8, 16, 16, 16, 16, 32), lip_channels=(8, 16, 16, 16, 16, 32),
                   fc_hidden=32, embedding_dim=32, image_size=64)


def _pool_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _lip_feature_size(image_size: int) -> int:
    """Spatial size reaching the lip tower's last conv (6 for 224): the layers of ``S.netcnnlip`` in order."""
    size = _pool_out(image_size, 7, 2)  # conv 7x7 stride 2
    size = _pool_out(size, 3, 2)  # max-pool 3 stride 2
    size = _pool_out(size, 5, 2, 1)  # conv 5x5 stride 2 pad 1
    size = _pool_out(size, 3, 2, 1)  # max-pool 3 stride 2 pad 1
    return _pool_out(size, 3, 2)  # three 3x3 pad-1 convs keep the size; max-pool 3 stride 2


def _audio_feature_size() -> tuple[int, int]:
    """(5, 4) for the 13 x 20 MFCC window: max-pool 3 stride (1, 2), then max-pool 3 stride 2."""
    height, width = _pool_out(NUM_MFCC, 3, 1), _pool_out(MFCC_WINDOW, 3, 2)
    return _pool_out(height, 3, 2), _pool_out(width, 3, 2)


class SyncNetV2(nn.Module):
    """syncnet_v2 (syncnet_python ``SyncNetModel.S``): two towers mapping a 0.2 s window to a shared space.

    ``forward_aud(mfcc (N, 1, 13, 20)) -> (N, embedding_dim)``; ``forward_lip(video (N, 3, 5, S, S)) ->
    (N, embedding_dim)`` with ``S = image_size`` and video as BGR values 0..255 (see the module docstring).
    The ReLU and pooling layers sit at the reference's ``nn.Sequential`` indices so that parameter names match.
    """

    def __init__(self, audio_channels: tuple[int, ...] = SyncNetV2Size.audio_channels,
                 lip_channels: tuple[int, ...] = SyncNetV2Size.lip_channels, fc_hidden: int = 512,
                 embedding_dim: int = 1024, image_size: int = FULL_IMAGE_SIZE):
        super().__init__()
        if len(audio_channels) != 6 or len(lip_channels) != 6:
            raise ValueError(f"SyncNetV2 has 6 conv layers per tower; got audio_channels={audio_channels}, "
                             f"lip_channels={lip_channels}")
        lip_kernel = _lip_feature_size(image_size)
        if lip_kernel < 1:
            raise ValueError(f"image_size={image_size} is too small for the syncnet_v2 lip tower (its "
                             f"strided convs and pools need at least 64 pixels); use 64 or more (224 for syncnet_v2)")
        self.size = SyncNetV2Size(tuple(audio_channels), tuple(lip_channels), fc_hidden, embedding_dim, image_size)
        a1, a2, a3, a4, a5, a6 = audio_channels
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, a1, kernel_size=3, padding=1), nn.BatchNorm2d(a1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=1, stride=1),  # a no-op in the reference, kept for its index
            nn.Conv2d(a1, a2, kernel_size=3, padding=1), nn.BatchNorm2d(a2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
            nn.Conv2d(a2, a3, kernel_size=3, padding=1), nn.BatchNorm2d(a3), nn.ReLU(inplace=True),
            nn.Conv2d(a3, a4, kernel_size=3, padding=1), nn.BatchNorm2d(a4), nn.ReLU(inplace=True),
            nn.Conv2d(a4, a5, kernel_size=3, padding=1), nn.BatchNorm2d(a5), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(a5, a6, kernel_size=_audio_feature_size()), nn.BatchNorm2d(a6), nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(a6, fc_hidden), nn.BatchNorm1d(fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, embedding_dim))
        l1, l2, l3, l4, l5, l6 = lip_channels
        self.netfclip = nn.Sequential(
            nn.Linear(l6, fc_hidden), nn.BatchNorm1d(fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, embedding_dim))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, l1, kernel_size=(WINDOW_FRAMES, 7, 7), stride=(1, 2, 2)), nn.BatchNorm3d(l1),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(l1, l2, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(l2),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(l2, l3, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(l3), nn.ReLU(inplace=True),
            nn.Conv3d(l3, l4, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(l4), nn.ReLU(inplace=True),
            nn.Conv3d(l4, l5, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(l5), nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(l5, l6, kernel_size=(1, lip_kernel, lip_kernel)), nn.BatchNorm3d(l6), nn.ReLU(inplace=True),
        )

    @property
    def image_size(self) -> int:
        return self.size.image_size

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 13, 20)`` MFCC windows -> ``(N, embedding_dim)``."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 5, S, S)`` BGR 0..255 windows -> ``(N, embedding_dim)``."""
        return self.netfclip(self.netcnnlip(video).flatten(1))

    def forward(self, video: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(video embeddings, audio embeddings) of paired windows."""
        return self.forward_lip(video), self.forward_aud(mfcc)


class SyncNetWeightsError(ValueError):
    """The weights file is missing or does not hold a syncnet_v2 state dict of this model's sizes."""


def load_syncnet(path: str | Path, device: str | torch.device = "cpu",
                 size: SyncNetV2Size | None = None) -> SyncNetV2:
    """``SyncNetV2`` (default: full size) with the state dict at ``path`` (``syncnet_v2.model`` or a file saved
    from ``model.state_dict()``), loaded with ``weights_only=True``, frozen, in eval mode, on ``device``.

    Like the reference's ``loadParameters`` the file may lack the BatchNorm ``num_batches_tracked`` counters
    (unused in eval mode); any other missing, unexpected or mis-shaped key raises ``SyncNetWeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise SyncNetWeightsError(f"no SyncNet weights at {path}. {WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled module, a truncated download, an HTML error page
        raise SyncNetWeightsError(f"{path} is not a loadable state dict ({type(error).__name__}: {error}). "
                                  f"{WEIGHTS_HELP}") from error
    if not isinstance(state, dict):
        raise SyncNetWeightsError(f"{path} holds a {type(state).__name__}, not a state dict. {WEIGHTS_HELP}")
    model = SyncNetV2(**vars(size or SyncNetV2Size()))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise SyncNetWeightsError(
            f"{path} does not match SyncNetV2{tuple(vars(model.size).values())}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"mismatched {mismatched[:5]}. Pass size= for a non-default model, or check the file. {WEIGHTS_HELP}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked can be absent, checked above
    return model.to(device).requires_grad_(False).eval()


def syncnet_mfcc(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``(13, n)`` MFCC at 100 Hz of mono 16 kHz audio, as syncnet_python computes it (``n = 4 T - 1`` for
    ``T`` frames of 640 samples). ``audio``: int16 samples, or floats in [-1, 1] which are scaled to int16
    values first (the reference reads a pcm_s16le wav; the scale moves c0 and the log energy, so it matters)."""
    import python_speech_features  # small pure-Python dependency, imported where used

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"syncnet_v2 was trained on {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample first "
                         f"(the project's standardised clips are 16 kHz)")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (S,), got shape {audio.shape}")
    if audio.dtype != np.int16:
        audio = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    return python_speech_features.mfcc(audio, SAMPLE_RATE).T


def syncnet_video(frames: np.ndarray, image_size: int = FULL_IMAGE_SIZE, channel_order: str = "rgb") -> torch.Tensor:
    """``frames (T, H, W, 3)`` uint8 face crops -> ``(3, T, S, S)`` float BGR 0..255 at ``S = image_size``.

    The whole frame is taken as the face crop: cut it with ``sync_crops`` first (syncnet_python's ``crop_video``
    framing, from face landmarks), as the filter and the evaluation do. Resized with ``cv2.resize`` (bilinear)."""
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape}")
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if frames.shape[1:3] != (image_size, image_size):
        frames = np.stack([cv2.resize(frame, (image_size, image_size)) for frame in frames])
    if channel_order == "rgb":
        frames = frames[..., ::-1]  # the model was trained on cv2's BGR
    return torch.from_numpy(np.ascontiguousarray(frames).astype(np.float32)).permute(3, 0, 1, 2)


# syncnet_python's run_pipeline.py: --crop_scale default, crop_video's median filter and padding value.
CROP_SCALE = 0.4
BOX_MEDIAN_KERNEL = 13
CROP_PAD_VALUE = 110


@dataclass(frozen=True)
class SyncCropTrack:
    """Per-frame crop boxes as ``crop_video`` keeps them (``dets``), in pixels of the frames they cut:
    ``s`` half the box's larger side, ``x`` / ``y`` its centre; each ``(T,)``, median-filtered over time."""

    s: np.ndarray
    x: np.ndarray
    y: np.ndarray


def landmark_boxes(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(T, 4)`` face boxes ``x1, y1, x2, y2`` in pixels: the x / y extent of each frame's normalised landmarks
    ``(T, N, >= 2)`` (MediaPipe's face mesh; x by width, y by height). NaN rows where the frame has no face."""
    points = np.asarray(landmarks, np.float64)[..., :2] * (width, height)
    boxes = np.full((len(points), 4), np.nan)
    found = np.isfinite(points).all(axis=(1, 2))
    if found.any():
        boxes[found] = np.concatenate([points[found].min(axis=1), points[found].max(axis=1)], axis=1)
    return boxes


def sync_crop_track(boxes: np.ndarray) -> SyncCropTrack | None:
    """syncnet_python's ``crop_video`` box smoothing, from per-frame boxes ``(T, 4)`` ``x1, y1, x2, y2``:
    ``s = max(y2 - y1, x2 - x1) / 2``, centre ``((x1 + x2) / 2, (y1 + y2) / 2)``, each smoothed with
    ``scipy.signal.medfilt(kernel_size=13)`` (zero-padded at the ends, as there). Frames without a box (NaN)
    are filled linearly from their neighbours first, as ``track_shot`` interpolates between detections
    (``interp1d``); before the first and after the last box, the nearest one holds. None when no frame has one."""
    from scipy import signal

    boxes = np.asarray(boxes, np.float64)
    found = np.isfinite(boxes).all(axis=1)
    if not found.any():
        return None
    frames = np.arange(len(boxes))
    boxes = np.stack([np.interp(frames, frames[found], boxes[found, k]) for k in range(4)], axis=1)
    kernel = BOX_MEDIAN_KERNEL
    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    return SyncCropTrack(s=signal.medfilt(s, kernel_size=kernel),
                         x=signal.medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel_size=kernel),
                         y=signal.medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel_size=kernel))


def sync_crop(frame: np.ndarray, s: float, x: float, y: float, image_size: int = FULL_IMAGE_SIZE,
              crop_scale: float = CROP_SCALE) -> np.ndarray:
    """One frame's crop as syncnet_python's ``crop_video`` cuts it, resized to ``image_size`` (``cv2.resize``):
    the frame padded by ``bsi = int(s (1 + 2 cs))`` pixels of value 110 on every side, then rows
    ``int(y + bsi - s) .. int(y + bsi + s (1 + 2 cs))`` and columns ``int(x + bsi - s (1 + cs)) .. int(x + bsi +
    s (1 + cs))``, i.e. from ``s`` above to ``1.8 s`` below the box centre and ``1.4 s`` to either side at
    ``cs = 0.4``. ``frame (H, W, 3)`` uint8, any channel order (the padding is grey)."""
    import cv2

    pad = int(s * (1 + 2 * crop_scale))
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), "constant", constant_values=(CROP_PAD_VALUE,))
    my, mx = y + pad, x + pad
    face = padded[int(my - s):int(my + s * (1 + 2 * crop_scale)),
                  int(mx - s * (1 + crop_scale)):int(mx + s * (1 + crop_scale))]
    return cv2.resize(face, (image_size, image_size))


def sync_crops(frames: np.ndarray, landmarks: np.ndarray | None, image_size: int = FULL_IMAGE_SIZE) -> np.ndarray:
    """``(T, S, S, 3)`` uint8: syncnet_python's crop of each frame ``(T, H, W, 3)``, its face box the extent of
    that frame's landmarks ``(T', N, >= 2)`` (normalised), smoothed over the clip as ``crop_video`` does. The
    landmarks are matched to the frames by index (a shorter array holds its last row). Without landmarks, or
    with no face in any frame, each whole frame is resized (the frame is taken to be the face crop already)."""
    import cv2

    frames = np.asarray(frames)
    track = None
    if landmarks is not None and len(landmarks) and len(frames):
        landmarks = np.asarray(landmarks)[np.minimum(np.arange(len(frames)), len(landmarks) - 1)]
        track = sync_crop_track(landmark_boxes(landmarks, frames.shape[2], frames.shape[1]))
    if track is None:
        resized = [frame if frame.shape[:2] == (image_size, image_size) else cv2.resize(frame, (image_size, image_size))
                   for frame in frames]
        return np.stack(resized) if resized else np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.stack([sync_crop(frame, track.s[t], track.x[t], track.y[t], image_size) for t, frame in enumerate(frames)])


def window_count(num_frames: int, num_samples: int) -> int:
    """Windows the reference evaluates: ``min(T, S // 640) - 5`` (one short of the last full window)."""
    return min(num_frames, num_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES


@torch.no_grad()
def embed_windows(model: SyncNetV2, video: torch.Tensor, mfcc: np.ndarray, num_windows: int,
                  batch_size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, audio) embeddings ``(num_windows, D)`` of windows ``t = 0 .. num_windows - 1`` (eval mode).

    ``video (3, T, S, S)`` from ``syncnet_video``; ``mfcc (13, n)`` from ``syncnet_mfcc``."""
    device = next(model.parameters()).device
    cc = torch.from_numpy(np.ascontiguousarray(mfcc, dtype=np.float32))
    was_training = model.training
    model.eval()
    video_out, audio_out = [], []
    try:
        for start in range(0, num_windows, batch_size):
            ts = range(start, min(num_windows, start + batch_size))
            lip = torch.stack([video[:, t:t + WINDOW_FRAMES] for t in ts]).to(device)
            aud = torch.stack([cc[None, :, t * MFCC_PER_FRAME:t * MFCC_PER_FRAME + MFCC_WINDOW] for t in ts])
            video_out.append(model.forward_lip(lip).float().cpu())
            audio_out.append(model.forward_aud(aud.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(video_out), torch.cat(audio_out)


def shift_distances(video_emb: torch.Tensor, audio_emb: torch.Tensor, max_shift: int) -> torch.Tensor:
    """``(N, 2 * max_shift + 1)``: column ``j`` is the distance between video window ``i`` and audio window
    ``i + j - max_shift`` (a zero vector outside ``0 .. N - 1``), as syncnet_python's ``calc_pdist``."""
    n, width = video_emb.shape[0], 2 * max_shift + 1
    padded = F.pad(audio_emb, (0, 0, max_shift, max_shift))
    shifted = padded.unfold(0, width, 1).permute(0, 2, 1)  # (N, width, D): row i holds padded[i : i + width]
    pairs = video_emb[:, None, :].expand(n, width, -1)
    return F.pairwise_distance(pairs.reshape(n * width, -1), shifted.reshape(n * width, -1)).view(n, width)


@dataclass(frozen=True)
class SyncMeasure:
    """The public SyncNet evaluation of one clip.

    ``offset_frames``: positive = audio leads video (see the module docstring); ``confidence`` = median minus
    minimum of the mean distances (LSE-C); ``min_distance`` = that minimum (LSE-D); ``distances`` ``(N, 2 *
    max_shift + 1)`` per window and shift (column ``j`` = audio shifted by ``j - max_shift`` windows)."""

    offset_frames: int
    confidence: float
    min_distance: float
    distances: np.ndarray = field(repr=False)

    @property
    def lse_d(self) -> float:
        return self.min_distance

    @property
    def lse_c(self) -> float:
        return self.confidence

    @property
    def mean_distances(self) -> np.ndarray:
        return self.distances.mean(axis=0)


def measure_from_distances(distances: torch.Tensor, max_shift: int) -> SyncMeasure:
    """Offset and confidence from per-window distances, as ``SyncNetInstance.evaluate``."""
    mean = distances.mean(dim=0)
    min_value, min_index = torch.min(mean, 0)
    confidence = torch.median(mean) - min_value  # 2 * max_shift + 1 values: an odd count, a true median
    return SyncMeasure(offset_frames=int(max_shift - min_index), confidence=float(confidence),
                       min_distance=float(min_value), distances=distances.numpy())


def sync_offset(model: SyncNetV2, frames: np.ndarray, audio: np.ndarray, max_shift: int = 15,
                batch_size: int = 20, sample_rate: int = SAMPLE_RATE, channel_order: str = "rgb") -> SyncMeasure:
    """The public SyncNet evaluation of a clip: ``frames (T, H, W, 3)`` uint8 face crops at 25 fps (RGB unless
    ``channel_order="bgr"``), ``audio (S,)`` mono 16 kHz (float in [-1, 1] or int16), over shifts
    ``-max_shift .. +max_shift`` frames (15 in the public evaluation, 10 in syncnet_python's demo default)."""
    num_windows = window_count(len(frames), len(audio))
    if num_windows < 1:
        raise ValueError(f"clip too short for SyncNet: {len(frames)} frames and {len(audio)} samples give "
                         f"{num_windows} windows; need at least {WINDOW_FRAMES + 1} frames (0.24 s) of both")
    video = syncnet_video(frames, model.image_size, channel_order)
    video_emb, audio_emb = embed_windows(model, video, syncnet_mfcc(audio, sample_rate), num_windows, batch_size)
    return measure_from_distances(shift_distances(video_emb, audio_emb, max_shift), max_shift)


def shift_contrastive_loss(video_emb: torch.Tensor, audio_emb: torch.Tensor, true_shift: int) -> torch.Tensor:
    """Training loss for a SyncNetV2: cross-entropy over candidate audio windows with logits ``-d^2``.

    ``video_emb (B, D)``; ``audio_emb (B, S, D)``: for each video window the audio windows at ``S`` shifts, of
    which index ``true_shift`` is the in-sync one. It trains exactly what ``sync_offset`` reads (the in-sync
    shift has the smallest L2 distance). Deviation: SyncNet (Chung & Zisserman 2016) trains with a margin
    contrastive loss on single pairs; on the tiny test model that loss stayed at its trivial solution (every
    distance about 0.55) for 300 steps at lr 1e-3, while this one separated in-sync pairs in 200 steps at lr
    3e-3 (the
    negatives are the same window's neighbouring shifts, the ones ``sync_offset`` must tell apart)."""
    d2 = (video_emb[:, None, :] - audio_emb).pow(2).sum(-1)
    target = torch.full((video_emb.shape[0],), true_shift, dtype=torch.long, device=video_emb.device)
    return F.cross_entropy(-d2, target)


class SyncNetV2LossExpert(nn.Module):
    """A frozen ``SyncNetV2`` behind the training sync loss's interface: ``estimate(frames, audio) ->
    SyncEstimate`` as ``model/experts.py``'s ``SyncNetExpert.estimate`` returns it, so that ``sync_loss`` (SynchroRaMa
    section 3.7, eq. 2) works unchanged. Chosen by the training setting ``sync_expert`` (docs/training.md).

    * ``frames (B, T, 3, H, W)`` in [-1, 1], RGB, ``T >= 5``: resized (bilinear, differentiable) to the model's
      ``image_size``, mapped to 0..255 and flipped to BGR (what ``syncnet_video`` gives the evaluation); every
      5-frame window ``k = 0 .. T - 5`` goes through ``forward_lip``. Gradients reach the frames.
    * ``audio (B, S)``: the same frames' 16 kHz waveform (``S = T * 640``; floats in [-1, 1]); MFCC as the
      evaluation computes it (``syncnet_mfcc``, on the host, no gradient: the audio is the driving audio).
    * Per window ``k`` and shift ``j = -max_shift .. +max_shift`` frames: the L2 distance between video window
      ``k`` and the audio window ``j`` frames later (the reference's ``F.pairwise_distance``). Offset: the
      soft-argmin over shifts of the window-mean distances, ``softmax(-mean / temperature) @ shifts``; positive
      = the audio lags the video, ``SyncNetExpert``'s sign, i.e. about ``-sync_offset(...).offset_frames``.
      Misalignment time: ``softmax(d_in_sync / temperature) @ window centres`` (where the in-sync distance is
      largest, as ``SyncNetExpert`` weights its lowest in-sync similarity). Both in seconds, ``(B,)``.

    Deviations: the evaluation stops one window short and pads out-of-range audio *embeddings* with zeros
    (``shift_distances``); a loss on short decoded spans (9 frames at the full config, 5 windows) cannot spare
    windows, so the waveform is mirrored by ``max_shift`` frames at each end (``np.pad`` "reflect": speech-like
    MFCC statistics without sync to the mouth; ``SyncNetExpert`` repeats the edge frames' features, but a
    repeated waveform sample is silence, whose MFCC is far from any speech) plus 160 samples so that the last
    window's 20th MFCC frame exists. ``temperature`` is in distance units (syncnet_v2's in-sync and median
    mean distances differ by about 7 on real talking faces, its LSE-C; the tiny test model's by about 1.5).
    """

    reads_waveform = True  # model/training/training_step.py passes the waveform, not wav2vec2 states

    def __init__(self, model: SyncNetV2, max_shift: int, fps: int = FPS, temperature: float = 0.5):
        super().__init__()
        if fps != FPS:
            raise ValueError(f"syncnet_v2 pairs 5 frames at {FPS} fps with 0.2 s of MFCC; the model runs at {fps} fps")
        if max_shift < 0 or temperature <= 0:
            raise ValueError(f"max_shift must be >= 0 and temperature > 0, got {max_shift} and {temperature}")
        self.syncnet = model.requires_grad_(False).eval()
        self.max_shift, self.fps, self.temperature = max_shift, fps, temperature

    def train(self, mode: bool = True) -> SyncNetV2LossExpert:
        """Always eval: the frozen syncnet's BatchNorm must use its running statistics (DDP / .train() calls)."""
        super().train(False)
        return self

    def lip_windows(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] RGB -> ``(B * (T - 4), 3, 5, S, S)`` BGR 0..255 (differentiable).
        Not clamped: a clamp would cut the gradient of out-of-range pixels, and the VAE's slight overshoot is
        within what the model tolerates."""
        b, t = frames.shape[:2]
        size = self.syncnet.image_size
        pixels = F.interpolate(frames.flatten(0, 1).float(), size=(size, size), mode="bilinear", align_corners=False)
        pixels = ((pixels + 1) * 127.5).flip(1).unflatten(0, (b, t))  # RGB -> BGR, as cv2.imread gives
        windows = pixels.unfold(1, WINDOW_FRAMES, 1)  # (B, K, 3, S, S, 5)
        return windows.permute(0, 1, 2, 5, 3, 4).flatten(0, 1)

    @torch.no_grad()
    def audio_windows(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B, T * 640)`` -> MFCC windows ``(B * (T - 4 + 2 * max_shift), 1, 13, 20)``: window ``i`` starts at
        video frame ``i - max_shift`` of the mirrored waveform (see the class docstring)."""
        pad = self.max_shift * SAMPLES_PER_FRAME
        count = num_frames - WINDOW_FRAMES + 1 + 2 * self.max_shift
        windows = []
        for wave in audio.detach().float().cpu().numpy():
            if len(wave) != num_frames * SAMPLES_PER_FRAME:
                raise ValueError(f"audio has {len(wave)} samples for {num_frames} frames; SyncNetV2LossExpert needs "
                                 f"the frames' own 16 kHz waveform, {SAMPLES_PER_FRAME} samples per frame")
            padded = np.pad(wave, (pad, pad + SAMPLES_PER_FRAME // MFCC_PER_FRAME), mode="reflect")
            mfcc = torch.from_numpy(syncnet_mfcc(padded).astype(np.float32))
            windows += [mfcc[None, :, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_WINDOW] for i in range(count)]
        return torch.stack(windows).to(audio.device)

    def distances(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """``(B, K, 2 * max_shift + 1)``: column ``j`` is the distance between video window ``k`` and the audio
        window ``j - max_shift`` frames later (column ``max_shift``: in sync)."""
        b, t = frames.shape[:2]
        if t < WINDOW_FRAMES:
            raise ValueError(f"{t} frames are fewer than one syncnet_v2 window ({WINDOW_FRAMES}); decode at least "
                             f"{WINDOW_FRAMES} frames (the recipe's pixel_frames and the clip_frames setting)")
        s, k = self.max_shift, t - WINDOW_FRAMES + 1
        video = self.syncnet.forward_lip(self.lip_windows(frames)).unflatten(0, (b, k))  # (B, K, D)
        with torch.no_grad():
            spoken = self.syncnet.forward_aud(self.audio_windows(audio, t)).unflatten(0, (b, k + 2 * s))
        spoken = spoken.to(video.dtype)
        return torch.stack([F.pairwise_distance(video, spoken[:, j:j + k], eps=1e-6) for j in range(2 * s + 1)], -1)

    def estimate(self, frames: torch.Tensor, audio: torch.Tensor) -> SyncEstimate:
        """Frames ``(B, T, 3, H, W)`` in [-1, 1] and their waveform ``(B, T * 640)`` -> ``SyncEstimate``."""
        distance = self.distances(frames, audio).float()
        s, k = self.max_shift, distance.shape[1]
        shifts = torch.arange(-s, s + 1, device=distance.device, dtype=distance.dtype)
        offset = (-distance.mean(1) / self.temperature).softmax(-1) @ shifts
        centres = torch.arange(k, device=distance.device, dtype=distance.dtype) + WINDOW_FRAMES / 2
        where = (distance[..., s] / self.temperature).softmax(-1) @ centres
        return SyncEstimate(offset / self.fps, where / self.fps)


SIZE_SUFFIX = ".json"  # <weights file>.json: the SyncNetV2Size keys of a model that is not the full-size syncnet_v2


def load_sync_expert(path: Path, device: str | torch.device = "cpu") -> SyncNetV2:
    """``load_syncnet`` with the model's sizes from ``<path>.json`` when that file exists (a tiny or retrained
    model), else the released syncnet_v2's. Raises ``SyncNetWeightsError`` naming the path and how to fix it."""
    path = Path(path)
    sizes_file = Path(f"{path}{SIZE_SUFFIX}")
    size = None
    if sizes_file.is_file():
        try:
            size = SyncNetV2Size(**{key: tuple(value) if isinstance(value, list) else value
                                    for key, value in json.loads(sizes_file.read_text()).items()})
        except (ValueError, TypeError) as error:
            raise SyncNetWeightsError(f"{sizes_file} does not hold SyncNetV2Size keys ({error}); delete it for the "
                                      f"released syncnet_v2, or write e.g. {json.dumps(vars(SyncNetV2Size.tiny()))}"
                                      ) from error
    try:
        return load_syncnet(path, device, size)
    except SyncNetWeightsError as error:
        if size is None and "mismatched" in str(error):
            raise SyncNetWeightsError(f"{error} A model of other sizes needs {sizes_file} with its SyncNetV2Size "
                                      f"keys next to it (save_sync_expert writes both).") from error
        raise


def save_sync_expert(model: SyncNetV2, path: Path) -> Path:
    """Write ``model``'s state dict (without BatchNorm counters, like the released file) and its sizes file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, path)
    Path(f"{path}{SIZE_SUFFIX}").write_text(json.dumps(vars(model.size)))
    return path


def load_sync_loss_expert(path: str | Path, max_shift: int, device: str | torch.device = "cpu",
                          temperature: float = 0.5) -> SyncNetV2LossExpert:
    """``SyncNetV2LossExpert`` around the weights at ``path``: the released ``syncnet_v2.model``, or a model of
    other sizes saved with ``save_sync_expert`` (its ``<path>.json`` sizes file next to it).
    Raises ``SyncNetWeightsError`` naming the file and where the released weights come from."""
    return SyncNetV2LossExpert(load_sync_expert(Path(path), device), max_shift, temperature=temperature)
