"""Small differentiable evaluators that let the section 3.7 losses reach the generator.

The paper scores generated videos with non-differentiable or very large tools (Synchformer, a wav2vec2 VA
model on the audio, an AU detector, VideoLLaMA2 captions). Each is replaced by a compact network that maps
decoded frames ``(B, T, 3, H, W)`` in [-1, 1] to the same quantity, trained beforehand on the preprocessing
outputs and frozen here; weights load from a safetensors file (``load_expert_weights``):

* ``SyncNetExpert``: SyncNet-style two-tower model (mouth-crop windows of ``sync_window`` frames vs audio
  windows). Sync estimate = soft-argmax of similarity over audio shifts (offset) and soft-argmin over windows
  of the in-sync similarity (where misalignment is strongest). The mouth box comes from the stored landmarks
  when training the expert (``mouth_box``) and from the ``default_mouth_box`` buffer (the median training box,
  saved with the weights) on generated frames, which are aligned face crops like the training frames.
  Deviations: the audio tower reads the per-frame wav2vec2 states already in the shards rather than MFCCs, and
  the offset is signed, not its magnitude. NOT ``syncnet_v2``-compatible (that one takes 5 three-channel BGR
  0..255 224x224 face crops and 13x20 MFCCs into 3-D / 2-D conv towers): the public weights load into
  ``model/syncnet.py``'s ``SyncNetV2``, the project's one sync expert for the data-quality filter and the
  evaluation's LSE-C/LSE-D; the training setting ``sync_expert`` makes the sync loss use it too
  (``SyncNetV2LossExpert``, same ``estimate`` interface, in place of this module). This one is the default,
  trained by ``synchrorama train-experts`` (``model/training/train_experts.py``).
* ``AURegressor``: per-frame AU intensities ``(B, T, N_AU)``, targets from preprocessing.
* ``ValenceArousalRegressor``: per-frame (valence, arousal) ``(B, T, 2)`` from faces. The paper reads VA
  from the generated video's *audio*, which is the driving audio and carries no gradient; the face is the
  only part of the output the generator controls, so we regress VA from it.
* ``DescriptionProjector``: a video embedding ``(B, 768)`` trained to match the CLIP-text embedding of the
  clip's description: the differentiable proxy for "caption the generated video with VideoLLaMA2, embed it".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from model.config import ModelConfig
from model.losses import SyncEstimate


def load_expert_weights(module: nn.Module, path: str) -> nn.Module:
    """Load a safetensors state dict (strictly) and freeze the module."""
    module.load_state_dict(load_file(path))
    return module.requires_grad_(False).eval()


# Which expert each stage-2 pixel loss needs: (LossWeights field, TrainConfig setting, LossExperts child).
EXPERT_OF_LOSS = (("sync", "loss_sync", "sync"), ("emo", "loss_emo", "valence_arousal"),
                  ("au", "loss_au", "au"), ("attr_action", "loss_attr_action", "description"))


class MissingExpertError(ValueError):
    """A pixel loss is weighted but its expert was never trained (it would train the generator on noise)."""


def load_loss_experts(cfg: ModelConfig, weights, folder: str, allow_untrained: bool = False,
                      sync_expert: str = "") -> LossExperts:
    """``LossExperts`` with each ``<child>.safetensors`` under ``folder`` loaded (frozen).

    Every expert whose loss has a non-zero weight in ``weights`` (a ``LossWeights``) must be there, unless
    ``allow_untrained`` (smoke runs of the tiny model, whose VAE and wav2vec2 are random too): otherwise raises
    ``MissingExpertError`` naming the weight, the missing file and the command that trains it. ``sync_expert``
    (a ``syncnet_v2.model`` path) replaces the ``sync`` child by ``model/syncnet.py``'s ``SyncNetV2LossExpert``,
    and ``sync.safetensors`` is then neither needed nor read."""
    experts = LossExperts(cfg)
    if sync_expert:
        from model.syncnet import load_sync_loss_expert  # python_speech_features etc. only when asked for

        experts.sync = load_sync_loss_expert(sync_expert, cfg.sync_max_shift)
    for loss, setting, child in EXPERT_OF_LOSS:
        if child == "sync" and sync_expert:
            continue
        path = Path(folder) / f"{child}.safetensors" if folder else None
        if path is not None and path.is_file():
            load_expert_weights(getattr(experts, child), str(path))
        elif getattr(weights, loss) and not allow_untrained:
            where = str(path) if path is not None else "(experts= is empty)"
            raise MissingExpertError(
                f"{setting}={getattr(weights, loss)} needs a trained {child} expert, and there is none at {where}. "
                f"Train the experts on your shards with `synchrorama train-experts --shards DIR --out EXPERTS "
                f"--model-size {cfg.name}` and pass experts=EXPERTS, or set {setting}=0 to switch this loss off.")
    return experts.requires_grad_(False).eval()


class FrameEncoder(nn.Module):
    """``(N, C_in, S, S)`` -> ``(N, width * 4)``: four stride-2 conv stages and global average pooling."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        layers, channels = [], in_channels
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.SiLU()]
            channels = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width * 4

    def forward(self, x):
        return self.net(x)


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, T, 3, H, W)`` -> ``(B*T, 3, size, size)``."""
    return F.interpolate(frames.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)


# MediaPipe face-mesh indices of the outer and inner lip contours (mediapipe's FACEMESH_LIPS).
LIP_LANDMARKS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
                 78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)
# Box around the lips, as multiples of the lip width: wide enough for chin and cheeks to move in, twice as wide as
# high like the expert's crop (SyncNet crops the lower half of the face).
MOUTH_BOX_WIDTH, MOUTH_BOX_HEIGHT = 1.8, 0.9


def mouth_box(landmarks: torch.Tensor) -> torch.Tensor:
    """Landmarks ``(T, 478, 3)`` (x, y in [0, 1] of the frame, NaN rows where no face) -> one box per clip
    ``(4,)`` = (x0, y0, x1, y1) in [0, 1]: the median lip centre and width over the frames, so the crop is steady
    (as SyncNet crops a face track, not each frame). Raises ``ValueError`` if no frame has a face."""
    lips = landmarks[:, list(LIP_LANDMARKS), :2].float()
    found = ~torch.isnan(lips).any(-1).any(-1)
    if not found.any():
        raise ValueError("no frame has face landmarks: cannot locate the mouth")
    lips = lips[found]
    centre = (lips.amin(1) + lips.amax(1)).median(0).values / 2
    width = (lips[..., 0].amax(1) - lips[..., 0].amin(1)).median().clamp(min=0.05)
    half = torch.stack([MOUTH_BOX_WIDTH * width, MOUTH_BOX_HEIGHT * width]) / 2
    return torch.cat([centre - half, centre + half])


def crop_boxes(frames: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Differentiable crop-and-resize: frames ``(B, T, C, H, W)``, boxes ``(B, 4)`` or ``(4,)`` (x0, y0, x1, y1
    in [0, 1]; outside the frame reads zeros) -> ``(B, T, C, height, width)`` (bilinear, through grid_sample)."""
    b, t = frames.shape[:2]
    boxes = boxes.to(device=frames.device, dtype=frames.dtype).expand(b, 4)
    scale_x, scale_y = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centre_x, centre_y = boxes[:, 0] + boxes[:, 2] - 1, boxes[:, 1] + boxes[:, 3] - 1  # in grid units [-1, 1]
    zero = torch.zeros_like(scale_x)
    theta = torch.stack([torch.stack([scale_x, zero, centre_x], -1), torch.stack([zero, scale_y, centre_y], -1)], 1)
    theta = theta.repeat_interleave(t, 0)  # (B*T, 2, 3)
    grid = F.affine_grid(theta, [b * t, frames.shape[2], height, width], align_corners=False)
    return F.grid_sample(frames.flatten(0, 1), grid, mode="bilinear", align_corners=False).unflatten(0, (b, t))


class SyncNetExpert(nn.Module):
    """Two towers that embed ``sync_window``-frame windows of mouth crops and of wav2vec2 states into one space
    (cosine similarity: high when in sync). Trained contrastively by ``model/training/train_experts.py``."""

    def __init__(self, cfg: ModelConfig, temperature: float = 0.1):
        super().__init__()
        d = cfg.data
        self.window, self.max_shift, self.fps = cfg.sync_window, cfg.sync_max_shift, d.fps
        self.size, self.temperature = cfg.expert_image_size, temperature
        self.video = FrameEncoder(3 * self.window, cfg.expert_width)
        self.audio = nn.Sequential(nn.Linear(self.window * d.wav2vec_layers * d.wav2vec_dim, 4 * cfg.expert_width),
                                   nn.SiLU(), nn.Linear(4 * cfg.expert_width, self.video.out_features))
        # Untrained: the lower half of the frame (SyncNet's crop); train_experts stores the median mouth box.
        self.register_buffer("default_mouth_box", torch.tensor([0.0, 0.5, 1.0, 1.0]))

    def crop_mouths(self, frames: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> mouth crops ``(B, T, 3, size/2, size)``; ``boxes (B, 4)`` or the default box."""
        return crop_boxes(frames, self.default_mouth_box if boxes is None else boxes, self.size // 2, self.size)

    def embed_mouths(self, mouths: torch.Tensor) -> torch.Tensor:
        """Mouth crops ``(B, T, 3, h, w)`` -> ``(B, T-w+1, E)``, one unit embedding per window."""
        b = mouths.shape[0]
        windows = mouths.unfold(1, self.window, 1)  # (B, K, 3, h, w, win)
        windows = windows.permute(0, 1, 5, 2, 3, 4).flatten(2, 3)  # (B, K, win*3, h, w)
        return F.normalize(self.video(windows.flatten(0, 1)).unflatten(0, (b, -1)), dim=-1)

    def embed_video(self, frames: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T-w+1, E)`` one embedding per window of the mouth region."""
        return self.embed_mouths(self.crop_mouths(frames, boxes))

    def embed_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """``(B, T, L, D)`` -> ``(B, T-w+1, E)``."""
        windows = audio_features.flatten(2).unfold(1, self.window, 1).transpose(2, 3).flatten(2)
        return F.normalize(self.audio(windows.float()), dim=-1)

    def shift_similarity(self, video: torch.Tensor, audio: torch.Tensor, shifts: int) -> torch.Tensor:
        """Window embeddings ``video (B, K, E)`` and ``audio (B, K + 2*shifts, E)`` (audio window ``k + shifts``
        is in sync with video window ``k``) -> cosine similarity ``(B, K, 2*shifts + 1)``; index ``j`` compares
        video window ``k`` with the audio ``j - shifts`` windows later (positive: audio delayed)."""
        k = video.shape[1]
        return torch.stack([(video * audio[:, j:j + k]).sum(-1) for j in range(2 * shifts + 1)], -1)

    def detect_offset_from_mouths(self, mouths: torch.Tensor, audio_features: torch.Tensor,
                                  search: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SyncNet's offset search: mouth crops ``(B, T, 3, h, w)`` and audio ``(B, T, L, D)`` of the same frames
        -> (offset in frames ``(B,)``, positive when the audio lags the video; confidence ``(B,)`` = best minus
        median mean similarity). Every shift in ``-search..search`` is scored on the same video windows."""
        video, audio = self.embed_mouths(mouths), self.embed_audio(audio_features)
        k = video.shape[1] - 2 * search
        if k < 1:
            raise ValueError(f"{mouths.shape[1]} frames are too few for windows of {self.window} and shifts up to "
                             f"{search}: need at least {self.window + 2 * search}")
        mean = self.shift_similarity(video[:, search:search + k], audio, search).mean(1)  # (B, 2*search + 1)
        return mean.argmax(-1) - search, mean.amax(-1) - mean.median(-1).values

    def detect_offset(self, frames: torch.Tensor, audio_features: torch.Tensor, search: int,
                      boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``detect_offset_from_mouths`` on frames ``(B, T, 3, H, W)`` cropped at ``boxes`` (default box if None):
        what an evaluation (LSE-style offset) or a data-quality filter calls."""
        return self.detect_offset_from_mouths(self.crop_mouths(frames, boxes), audio_features, search)

    def estimate(self, frames: torch.Tensor, audio_features: torch.Tensor,
                 boxes: torch.Tensor | None = None) -> SyncEstimate:
        """Frames ``(B, T, 3, H, W)`` and their audio ``(B, T, L, D)`` (same frames, aligned); ``T >= window``
        gives ``K = T - window + 1`` windows, over which eq. 2's misalignment time is located."""
        s = self.max_shift
        video = self.embed_video(frames, boxes)  # (B, K, E)
        padded = torch.cat([audio_features[:, :1].expand(-1, s, -1, -1), audio_features,
                            audio_features[:, -1:].expand(-1, s, -1, -1)], 1)
        similarity = self.shift_similarity(video, self.embed_audio(padded), s)  # (B, K, 2s+1)
        k = video.shape[1]
        shifts = torch.arange(-s, s + 1, device=frames.device, dtype=similarity.dtype)
        offset = (similarity.mean(1) / self.temperature).softmax(-1) @ shifts
        in_sync = similarity[..., s]  # (B, K)
        centres = torch.arange(k, device=frames.device, dtype=similarity.dtype) + self.window / 2
        where = (-in_sync / self.temperature).softmax(-1) @ centres
        return SyncEstimate(offset / self.fps, where / self.fps)


class AURegressor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, cfg.data.au_count)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, N_AU)``."""
        return self.head(self.encoder(_resize(frames, self.size))).unflatten(0, frames.shape[:2])


class ValenceArousalRegressor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, 2)`` (valence, arousal)."""
        return self.head(self.encoder(_resize(frames, self.size))).unflatten(0, frames.shape[:2])


class DescriptionProjector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.expert_image_size
        self.encoder = FrameEncoder(3, cfg.expert_width)
        self.head = nn.Linear(self.encoder.out_features, cfg.data.text_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, text_dim)``, in the space of ``description_embedding``."""
        per_frame = self.encoder(_resize(frames, self.size)).unflatten(0, frames.shape[:2])
        return self.head(per_frame.mean(1))


def description_embedding(description_tokens: torch.Tensor) -> torch.Tensor:
    """CLIP-text last hidden state ``(B, 77, D)`` -> one vector ``(B, D)`` (mean over tokens: the shards keep
    the hidden states but not the token ids that would locate the end-of-text token)."""
    return description_tokens.float().mean(1)


class LossExperts(nn.Module):
    """The four evaluators together; frozen. Build, then ``load_expert_weights`` each from its file."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.sync = SyncNetExpert(cfg)
        self.au = AURegressor(cfg)
        self.valence_arousal = ValenceArousalRegressor(cfg)
        self.description = DescriptionProjector(cfg)
        self.requires_grad_(False).eval()
