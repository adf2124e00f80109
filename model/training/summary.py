"""Parameter counts per component, at the full (SD 1.5) or tiny size.

The full model is built on the meta device: shapes only, no memory, about a second. Run
``python -m model.training.summary --size full``.
"""

from __future__ import annotations

import argparse

import torch

from model.config import config_for
from model.experts import LossExperts
from model.synchrorama import SynchroRamaModel


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def parameter_summary(size: str) -> list[tuple[str, int]]:
    """``[(component, parameter count), ...]`` for ``size`` ``"full"`` or ``"tiny"``."""
    cfg = config_for(size)
    with torch.device("meta"):
        model = SynchroRamaModel(cfg)
        experts = LossExperts(cfg)
    unet = dict(model.denoiser.unet.named_parameters())

    def denoiser(marker: str | None) -> int:
        if marker is None:  # the SD layers: everything not added by us
            return _count(p for n, p in unet.items() if ".motion_modules." not in f".{n}" and ".processor." not in n)
        return _count(p for n, p in unet.items() if marker in f".{n}")

    reference_tail = set(model.reference_net.unused_parameter_names())
    reference = dict(model.reference_net.unet.named_parameters())
    return [
        ("denoising UNet: SD 1.5 image layers", denoiser(None)),
        ("denoising UNet: temporal attention", denoiser(".motion_modules.")),
        ("denoising UNet: audio attention", denoiser(".audio_attention.")),
        ("denoising UNet: emotion attention", denoiser(".emotion_attention.")),
        ("ReferenceNet (SD 1.5 layout)", _count(reference.values())),
        ("ReferenceNet: frozen tail (never reaches the denoiser)",
         _count(p for n, p in reference.items() if n in reference_tail)),
        ("audio projection", _count(model.audio_projection.parameters())),
        ("emotion embedding", _count(model.emotion_embedding.parameters())),
        ("A2M: VAE", _count(p for n, p in model.a2m.named_parameters() if not n.startswith("flow."))),
        ("A2M: VP-Flow prior", _count(model.a2m.flow.parameters())),
        ("loss expert: SyncNet", _count(experts.sync.parameters())),
        ("loss expert: AU regressor", _count(experts.au.parameters())),
        ("loss expert: valence-arousal regressor", _count(experts.valence_arousal.parameters())),
        ("loss expert: description projector", _count(experts.description.parameters())),
    ]


def format_summary(size: str) -> str:
    rows = parameter_summary(size)
    generator = sum(n for name, n in rows if not name.startswith("loss expert") and "frozen tail" not in name)
    width = max(len(name) for name, _ in rows)
    lines = [f"SynchroRaMa model, size={size}", f"{'component':<{width}}  {'parameters':>13}", "-" * (width + 15)]
    lines += [f"{name:<{width}}  {count:>13,}" for name, count in rows]
    lines += ["-" * (width + 15), f"{'generator total (without loss experts)':<{width}}  {generator:>13,}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    print(format_summary(parser.parse_args(argv).size))


if __name__ == "__main__":
    main()
