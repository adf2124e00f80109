"""Every setting of ``model/training/train.py`` as one plain dataclass, overridden by a TOML file and the command line.

Precedence: the defaults below < ``--config file.toml`` < ``--key value`` flags < trailing ``key=value``
overrides. TOML tables are only for readability: ``[optim] lr = 1e-5`` and ``lr = 1e-5`` mean the same.
Model sizes and recipe constants stay in ``model/config.py``; ``None`` here means "the model config's value".
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import tomllib
import types
import typing
from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    # what to train
    stage: str = "stage2"  # a2m | stage1 | stage2
    model_size: str = "tiny"  # tiny | full
    shards: str = ""  # shard dir, tar, brace spec, pipe: command or URL; several separated by commas
    out: str = "out/train"  # checkpoints/, log.jsonl, tensorboard/
    seed: int = 0
    # data
    batch_size: int = 4  # windows per GPU per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    clip_frames: int | None = None  # T; None: the model config's (14 full, 4 tiny)
    motion_frames: int | None = None  # M; None: the model config's (2)
    num_workers: int = 4
    shuffle_buffer: int = 64
    # each shard checked against its manifest when opened: sha256 (every visit), count (samples only) or off
    verify_shards: str = "sha256"
    max_skip_fraction: float = 0.1  # an epoch skipping more of its samples than this stops the run (TrainingDataError)
    prefer_cached: bool = True  # use latents.npy / wav2vec.npy when a clip has them
    min_reference_distance: int = 1  # reference frame at least this many frames from the generated ones (0: any)
    motion_from_a2m: float = 0.5  # stage 2: share of samples whose motion frames are A2M samples (paper sec. 6)
    motion_from_reference: float = 0.1  # stage 2: share whose motion frames are the reference repeated
    unconditional_dropout: float = 0.05  # drop audio, emotion and description together (the sampler's uncond.)
    overfit_batches: int = 0  # debugging: train on the first N batches over and over (0: off)
    # optimisation
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 500
    max_steps: int = 30_000  # length of the schedule
    stop_at_step: int = 0  # stop early (e.g. a job's time slot) without changing the schedule; 0: max_steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping (the norm is still logged)
    ema_decay: float = 0.9999
    # loss weights of stage 2's pixel losses; None: the recipe's (model/config.py)
    loss_sync: float | None = None
    loss_emo: float | None = None
    loss_au: float | None = None
    loss_attr_action: float | None = None
    pixel_loss_max_timestep: int | None = None  # pixel losses only for samples below it; None: the recipe's (600)
    # precision and speed
    device: str = "auto"  # auto | cpu | cuda
    autocast: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    tf32: bool = True
    compile: bool = False  # torch.compile the denoiser
    gradient_checkpointing: bool = True
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    gpu_peak_tflops: float = 0.0  # bf16 dense peak for MFU; 0: look the GPU up
    dist_timeout_minutes: float = 60.0  # process-group (NCCL) timeout: must outlast rank 0's validation and saving
    # pretrained parts (local diffusers/transformers folders; the tiny model needs none)
    image_unet: str = ""  # SD 1.5 folder: initialises ReferenceNet and denoiser
    vae: str = ""  # SD VAE folder (AutoencoderKL)
    wav2vec: str = ""  # wav2vec2-base folder
    experts: str = ""  # folder of <expert>.safetensors (synchrorama train-experts) for stage 2's pixel losses
    sync_expert: str = ""  # syncnet_v2.model (or a SyncNetV2 saved with its .json sizes) scores the sync loss instead
    untrained_experts: bool = False  # smoke runs only: allow weighted pixel losses without trained experts
    init_from: str = ""  # a checkpoint folder whose model.safetensors starts this stage (e.g. stage 1's)
    init_a2m_from: str = ""  # the a2m run's checkpoint folder: its A2M is copied in exactly and stays frozen
    init_a2m_weights: str = "ema"  # ema | model: which of that checkpoint's A2M weights to take
    motion_adapter: str = ""  # AnimateDiff MotionAdapter folder (diffusers) initialising the temporal layers
    # logging, checkpoints, validation
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: bool = True  # continue from out/checkpoints/latest when it exists
    val_samples: int = 2  # videos generated from fixed inputs at each checkpoint (0: none)
    val_frames: int = 0  # frames per validation video; 0: 2 clips' worth
    val_steps: int = 0  # DDIM steps; 0: the recipe's

    def shard_urls(self) -> list[str]:
        """``shards`` split at commas that are not inside a brace spec (``shard-{000000,000007}.tar``)."""
        return [url.strip() for url in re.split(r",(?![^{]*\})", self.shards) if url.strip()]


def _field_type(f: dataclasses.Field) -> type:
    kind = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(kind, types.UnionType):  # "int | None" -> int
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def parse_value(name: str, text: str):
    """A command-line string as the type of setting ``name`` (``none`` for optional settings)."""
    f = next((f for f in fields(TrainConfig) if f.name == name), None)
    if f is None:
        raise ValueError(f"unknown setting {name!r}")
    if text.lower() == "none" and f.default is None:
        return None
    kind = _field_type(f)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} expects true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def _flatten(table: dict) -> dict:
    flat = {}
    for key, value in table.items():
        flat.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return flat


def load_toml(path: str) -> dict:
    with open(path, "rb") as file:
        values = _flatten(tomllib.load(file))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return values


def _comments() -> dict[str, str]:
    """The comment after each field in the source above: the ``--help`` text."""
    found = re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(TrainConfig), flags=re.MULTILINE)
    return dict(found)


def build_parser(prog: str = "python -m model.training.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train SynchroRaMa (stage a2m, stage1 or stage2). Settings: defaults < --config TOML < "
                    "--flags < key=value overrides.",
        epilog="Example: python -m model.training.train --config configs/train_tiny.toml --shards out/demo/shards "
               "--out out/train lr=1e-4 max_steps=200.  Several GPUs: torchrun --nproc_per_node=8 -m model.training.train "
               "--config configs/train_stage2.toml ...")
    parser.add_argument("--config", help="TOML file of settings")
    comments = _comments()
    for f in fields(TrainConfig):
        default = "None" if f.default is None else f.default
        parser.add_argument(f"--{f.name}", dest=f.name, metavar=_field_type(f).__name__.upper(),
                            default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied last")
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "python -m model.training.train") -> TrainConfig:
    args = vars(build_parser(prog).parse_args(argv))
    values = load_toml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    overrides = args.pop("overrides")
    values.update({name: parse_value(name, text) for name, text in args.items()})
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        values[name.strip()] = parse_value(name.strip(), text.strip())
    return TrainConfig(**values)


__all__ = ["TrainConfig", "build_parser", "load_toml", "parse_config", "parse_value"]
