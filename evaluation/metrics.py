"""The metrics of the paper's Table 1 (section 4, "Evaluation Metrics"), each on numpy clips.

Clips are ``(T, H, W, 3)`` uint8 RGB at 25 fps; a generated clip and its ground truth have the same size and
frame count (``evaluation.evaluate`` makes them so). Where a well-kept implementation exists it is used:

- PSNR: ``torchmetrics.functional.peak_signal_noise_ratio`` per frame, data range 255, averaged over frames
  (identical frames give +inf, so a clip with any identical frame is +inf: that is the metric, not a bug);
  cross-checked against ``skimage.metrics.peak_signal_noise_ratio`` in the tests.
- SSIM: ``torchmetrics.functional.structural_similarity_index_measure`` per frame on RGB in [0, 1] (Wang et al.
  2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, mean over channels), averaged over frames; equals
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)`` (tested).
- LPIPS: v0.1 AlexNet (``evaluation.networks.AlexNetLPIPS``), averaged over frames.
- FID / FVD / E-FID: ``frechet_distance`` of two feature sets, the formula of pytorch-fid
  (``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))``, unbiased covariances, ``scipy.linalg.sqrtm`` with
  pytorch-fid's 1e-6 diagonal offset when the product is singular); the tests check it against torchmetrics'
  ``FrechetInceptionDistance`` fed the same feature network. FID features: every ``stride``-th frame through
  FID's Inception-v3; FVD: non-overlapping 16-frame windows from frame 0 (StyleGAN-V's FVD_16 samples one
  16-frame window per video; taking every window uses all frames), StyleGAN-V's I3D at 224x224.
- CCC: ``torchmetrics.functional.concordance_corrcoef`` (Lin 1989 with unbiased n-1 variances and covariance:
  ``2 cov / (var_x + var_y + (mean_x - mean_y)^2)``).
- AU F1: per action unit, F1 of "active" frames of the generated clip against the ground truth's (frames
  where both have a face), averaged over AUs (macro F1). "Active" is decided by ``au_activation``; see there.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch
from torchmetrics.functional import concordance_corrcoef
from torchmetrics.functional.classification import binary_f1_score
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from evaluation.networks import FVD_FRAMES, i3d_features


def _frames_tensor(clip: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float() / 255.0


def _check_pair(generated: np.ndarray, truth: np.ndarray) -> None:
    if generated.shape != truth.shape or generated.ndim != 4 or generated.shape[-1] != 3:
        raise ValueError(f"expected two (T, H, W, 3) clips of one shape, got {generated.shape} and {truth.shape}")


def psnr(generated: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of per-frame PSNR in dB (data range 255); +inf when any frame is identical."""
    _check_pair(generated, truth)
    values = peak_signal_noise_ratio(torch.from_numpy(generated).double(), torch.from_numpy(truth).double(),
                                     data_range=255.0, reduction="none", dim=(1, 2, 3))
    return float(values.mean())


def ssim(generated: np.ndarray, truth: np.ndarray, batch: int = 16) -> float:
    """Mean over frames of per-frame SSIM (Gaussian 11x11, sigma 1.5, RGB averaged); 1 for identical clips."""
    _check_pair(generated, truth)
    values = []
    for first in range(0, len(generated), batch):
        values.append(structural_similarity_index_measure(
            _frames_tensor(generated[first:first + batch]), _frames_tensor(truth[first:first + batch]),
            data_range=1.0, gaussian_kernel=True, sigma=1.5, kernel_size=11, reduction="none"))
    return float(torch.cat(values).mean())


def lpips(model: torch.nn.Module, generated: np.ndarray, truth: np.ndarray, batch: int = 8) -> float:
    """Mean over frames of LPIPS (``evaluation.networks.AlexNetLPIPS``); 0 for identical clips."""
    _check_pair(generated, truth)
    values = []
    with torch.no_grad():
        for first in range(0, len(generated), batch):
            values.append(model(_frames_tensor(generated[first:first + batch]), _frames_tensor(truth[first:first + batch])))
    return float(torch.cat(values).mean())


# ---------------------------------------------------------------------------------------- Frechet distances


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a (N, D)`` and ``b (M, D)`` (N, M >= 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of one width, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product is expected for few samples; handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: pytorch-fid's small diagonal offset
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # numerical error leaves tiny imaginary parts
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    return max(value, 0.0)  # a set against itself can come out at -1e-10


def inception_features(model: torch.nn.Module, clip: np.ndarray, stride: int = 1, batch: int = 16) -> np.ndarray:
    """FID features of every ``stride``-th frame: ``(ceil(T / stride), num_features)``."""
    frames = clip[::stride]
    out = []
    with torch.no_grad():
        for first in range(0, len(frames), batch):
            out.append(model(_frames_tensor(frames[first:first + batch])).double().numpy())
    return np.concatenate(out)


def fvd_windows(clip: np.ndarray, frames: int = FVD_FRAMES) -> np.ndarray:
    """Non-overlapping ``frames``-long windows from frame 0: ``(floor(T / frames), frames, H, W, 3)``."""
    count = len(clip) // frames
    return clip[:count * frames].reshape(count, frames, *clip.shape[1:])


def video_features(i3d, clip: np.ndarray, batch: int = 4) -> np.ndarray:
    """I3D features of the clip's 16-frame windows: ``(windows, D)`` (zero rows when shorter than 16 frames)."""
    windows = fvd_windows(clip)
    out = [i3d_features(i3d, torch.from_numpy(windows[first:first + batch])).double().numpy()
           for first in range(0, len(windows), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def set_distance(generated: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Frechet distance of the pooled rows (NaN rows dropped) of per-clip feature arrays; NaN if < 2 rows."""
    a = np.concatenate([f for f in generated if f.size]) if any(f.size for f in generated) else np.zeros((0, 1))
    b = np.concatenate([f for f in truth if f.size]) if any(f.size for f in truth) else np.zeros((0, 1))
    a, b = a[~np.isnan(a).any(axis=1)], b[~np.isnan(b).any(axis=1)]
    if min(len(a), len(b)) < 2:
        return math.nan
    return frechet_distance(a, b)


# ------------------------------------------------------------------------------------------- CCC and AU F1


def ccc(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Concordance correlation coefficient of two paired 1-D sequences (NaN pairs dropped; NaN if < 2 pairs)."""
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of one length, got {predicted.shape} and {truth.shape}")
    keep = ~(np.isnan(predicted) | np.isnan(truth))
    if keep.sum() < 2:
        return math.nan
    return float(concordance_corrcoef(torch.from_numpy(predicted[keep]), torch.from_numpy(truth[keep])))


def au_activation(generated: np.ndarray, truth: np.ndarray, quantile: float | None,
                  threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(T, A)`` activations of both clips' AUs.

    ``threshold`` (an absolute intensity, e.g. 0.5 on a learned detector's FACS 0-5 scale) when given; otherwise
    the ground-truth clip's per-AU ``quantile`` (e.g. 0.7) is the threshold for both clips. The geometric AUs of
    ``preprocess.visual.action_units`` are unitless proxies with no neutral baseline, so an absolute threshold would
    mean different things for different faces; the same per-clip threshold applied to both clips asks "is the
    generated face doing more of this action at the frames where the real one does?"."""
    if threshold is not None:
        limit = np.full(truth.shape[1], float(threshold))
    elif quantile is not None:
        limit = np.nanquantile(truth, quantile, axis=0)
    else:
        raise ValueError("au_activation needs a quantile or a threshold")
    return generated > limit, truth > limit


def au_f1(generated: np.ndarray, truth: np.ndarray, quantile: float | None = 0.7,
          threshold: float | None = None) -> float:
    """Macro F1 over AUs of the activations (``au_activation``) on frames where both clips have a face."""
    generated, truth = np.asarray(generated, np.float64), np.asarray(truth, np.float64)
    if generated.shape != truth.shape or generated.ndim != 2:
        raise ValueError(f"expected two (T, AUs) arrays of one shape, got {generated.shape} and {truth.shape}")
    keep = ~(np.isnan(generated).any(axis=1) | np.isnan(truth).any(axis=1))
    if not keep.any():
        return math.nan
    active_g, active_t = au_activation(generated[keep], truth[keep], quantile, threshold)
    scores = [float(binary_f1_score(torch.from_numpy(active_g[:, k]).long(), torch.from_numpy(active_t[:, k]).long()))
              for k in range(truth.shape[1])]
    return float(np.mean(scores))
