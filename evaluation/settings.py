"""Evaluation settings: which feature networks (local paths) and which thresholds made each number.

Profiles, as in ``preprocess.run.settings``: ``default`` names the real weights under ``.models/eval/`` (where
docs/evaluation.md says to put them; any local path can be given instead); ``tiny`` names tiny networks of the
same classes with random weights, built on first use under ``.models/tiny/eval`` by ``build_tiny_networks``:
their numbers MEAN NOTHING (a smoke test of the machinery). The AU estimator and the valence-arousal model are
the preprocessing ones, chosen by ``preprocess_profile`` (``preprocess.run.settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from evaluation import networks
from preprocess.run.model_loading import REPO_ROOT, TINY_DIR
from preprocess.run.settings import _deep_merge

EVAL_MODELS_DIR = ".models/eval"
TINY_EVAL_DIR = TINY_DIR / "eval"


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "default"
    inception: str = Field(f"{EVAL_MODELS_DIR}/{networks.INCEPTION_WEIGHTS}",
                           description="pytorch-fid's FID Inception-v3 state dict (FID)")
    lpips_alexnet: str = Field(f"{EVAL_MODELS_DIR}/{networks.ALEXNET_WEIGHTS}",
                               description="torchvision's AlexNet state dict (LPIPS backbone)")
    lpips_heads: str | None = Field(None, description="LPIPS v0.1 alex heads; None: the ones inside torchmetrics' wheel")
    i3d: str = Field(f"{EVAL_MODELS_DIR}/{networks.I3D_TORCHSCRIPT}", description="StyleGAN-V's I3D TorchScript (FVD)")
    syncnet: str | None = Field(None, description="syncnet_v2 weights for LSE-C / LSE-D (model.syncnet); None: "
                                "the sync columns are left empty with a note")
    syncnet_size: Literal["full", "tiny"] = Field("full", description="SyncNetV2 sizes (full: the released one)")
    network_width: float = Field(1.0, gt=0, le=1, description="channel factor of the Inception/AlexNet (tiny only)")
    inception_input_size: int = Field(299, ge=75, description="Inception's input side (299; tiny only smaller)")
    preprocess_profile: str = Field("default", description="preprocessing profile of the AU estimator and VA model")
    fid_frame_stride: int = Field(1, ge=1, description="FID uses every n-th frame of each clip")
    au_quantile: float | None = Field(0.7, gt=0, lt=1, description="an AU is active above the ground-truth clip's "
                                      "per-AU quantile (geometric AUs); ignored when au_threshold is set")
    au_threshold: float | None = Field(None, description="absolute AU activation threshold (learned detectors)")
    va_window_s: float | None = Field(None, gt=0, description="valence-arousal window in seconds (hop = half); None: "
                                      "the preprocessing's (2 s)")
    sync_max_shift: int = Field(15, ge=1, description="audio shifts searched for the sync offset, in frames (+/-)")

    def path(self, value: str) -> Path:
        """A setting's path: relative ones are relative to the repository root."""
        path = Path(value)
        return path if path.is_absolute() else REPO_ROOT / path

    @property
    def is_tiny(self) -> bool:
        return self.profile == "tiny"


PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "inception": str(TINY_EVAL_DIR / "inception-tiny.pth"),
        "lpips_alexnet": str(TINY_EVAL_DIR / "alexnet-tiny.pth"),
        "lpips_heads": str(TINY_EVAL_DIR / "lpips-heads-tiny.pth"),
        "i3d": str(TINY_EVAL_DIR / "i3d-tiny.pt"),
        "syncnet": str(TINY_EVAL_DIR / "syncnet-tiny.pth"),
        "syncnet_size": "tiny",
        "network_width": 0.0625,
        "inception_input_size": 75,
        "preprocess_profile": "tiny",
    },
}


def load_evaluation_settings(profile: str = "default", overrides: dict[str, Any] | None = None) -> EvaluationSettings:
    if profile not in PROFILES:
        raise ValueError(f"unknown evaluation profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = _deep_merge({"profile": profile}, PROFILES[profile])
    return EvaluationSettings.model_validate(_deep_merge(values, overrides or {}))


def build_tiny_networks(settings: EvaluationSettings, seed: int = 0) -> None:
    """Write random tiny Inception / AlexNet-LPIPS / I3D / SyncNet files where ``settings`` expects them (if missing)."""
    torch.manual_seed(seed)
    inception, alexnet = settings.path(settings.inception), settings.path(settings.lpips_alexnet)
    heads, i3d = settings.path(settings.lpips_heads), settings.path(settings.i3d)
    for path in (inception, alexnet, heads, i3d):
        path.parent.mkdir(parents=True, exist_ok=True)
    if not inception.is_file():
        model = networks.tiny_inception(settings.network_width, settings.inception_input_size, seed)
        torch.save(model.state_dict(), inception)
    if not (alexnet.is_file() and heads.is_file()):
        model = networks.AlexNetLPIPS(width=settings.network_width)
        torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, alexnet)
        torch.save({f"lin{k}.model.1.weight": head.weight.detach().abs() for k, head in enumerate(model.heads)}, heads)
    if not i3d.is_file():
        networks.save_tiny_i3d(i3d, seed)
    if settings.syncnet and settings.syncnet_size == "tiny" and not settings.path(settings.syncnet).is_file():
        from model.syncnet import SyncNetV2, SyncNetV2Size

        torch.save(SyncNetV2(**vars(SyncNetV2Size.tiny())).state_dict(), settings.path(settings.syncnet))

