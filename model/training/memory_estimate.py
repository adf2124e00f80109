"""GPU memory of one training step, estimated without a GPU by running the FULL model on the ``meta`` device.

``estimate_training_memory`` builds the model, the frozen parts (SD VAE, wav2vec2-base, loss experts) and a
batch on ``meta`` (shapes only, no memory), sets the stage and the checkpointing switches as ``model/training/train.py``
does, runs the forward pass and the losses of ``model/training/training_step.py`` under ``bf16`` autocast, and counts:

* parameters at their stored dtype (``train.py`` keeps fp32 master weights, frozen parts included),
* gradients (fp32) of the trained parameters, AdamW's two fp32 moments and ``train.py``'s fp32 EMA of them,
* ``saved``: the bytes autograd keeps for backward, summed by ``torch.autograd.graph.saved_tensors_hooks``
  once per storage (views of one buffer count once; parameters, counted above, are left out),
  including what each activation-checkpoint region keeps to recompute itself (its tensor inputs: a
  non-reentrant region saves them through autograd, and they are also added when the region is entered, once
  per storage, in case a torch version keeps them otherwise); a region hides its inner saved tensors,
* ``largest_recompute``: the most bytes one region saves when it is recomputed in backward (measured by
  running that region once more under the hooks); only one region is recomputed at a time.

``total = parameters + gradients + optimizer + ema + saved + largest_recompute``: the
memory at the start of backward plus the worst recomputation on top, an upper bound on backward's peak in
that backward frees saved tensors as it goes. Not counted: the gradients of activations in flight (a few
activation-sized tensors), the allocator's fragmentation and the CUDA context (about 1 GiB), hence the margin
the tests keep below 80 GB.

Autocast is emulated (``torch.autocast`` has no meta backend) by a ``TorchFunctionMode`` following CUDA
autocast's policy for the ops this model uses: matmuls, linear layers, convolutions and attention run in
bf16 (trained leaf weights cast once per step, as autocast's weight cache does), normalisations and the
softmax in fp32, everything else in the dtype of its inputs. Meta tensors have no values, so a branch on
one (``if mask.all():``) would raise; under this mode ``bool()`` of a meta tensor is ``True``, which in
``training_losses`` means every sample gets the pixel losses: the memory worst case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

from model.config import ModelConfig, full_config

GIB = 1024 ** 3

# CUDA autocast's lists (torch/csrc/autograd/autocast_mode / amp docs), restricted to what this model calls.
_LOWER_PRECISION = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.bmm,
                    torch.baddbmm, torch.addmm, torch.mm, torch.einsum, F.scaled_dot_product_attention,
                    torch.Tensor.matmul, torch.Tensor.__matmul__}
_FULL_PRECISION = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
                   F.mse_loss, F.cosine_similarity, F.cross_entropy, torch.cumsum, torch.norm}


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast for meta tensors (see module docstring)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.weight_cache: dict[int, torch.Tensor] = {}

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            # autocast caches the casts of trained leaf weights for the whole region (one copy per step)
            if value.is_leaf and value.requires_grad and dtype == self.dtype:
                key = id(value)
                if key not in self.weight_cache:
                    self.weight_cache[key] = value.to(dtype)
                return self.weight_cache[key]
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True  # a meta tensor has no value: take the branch that keeps the most (see module docstring)
        if func is F.scaled_dot_product_attention:
            return self._memory_efficient_attention(func, args, kwargs)
        if func in _LOWER_PRECISION or func in _FULL_PRECISION:
            dtype = self.dtype if func in _LOWER_PRECISION else torch.float32
            args = self._cast(args, dtype)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


    def _memory_efficient_attention(self, func, args, kwargs):
        """On meta, ``F.scaled_dot_product_attention`` takes the math path, which keeps the whole fp32
        attention matrix for backward (tens of GiB per layer here); on a GPU it runs a fused kernel that keeps
        only its inputs, output and log-sum-exp. Run that kernel's meta implementation instead."""
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        options = {**dict(zip(names, args[3:], strict=False)), **kwargs}
        if options.get("is_causal") or options.get("scale") is not None or options.get("dropout_p"):
            return func(*args, **kwargs)
        query, key, value = self._cast(tuple(args[:3]), self.dtype)
        mask = options.get("attn_mask")
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
            bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask.to(self.dtype)
            bias = bias.expand(*query.shape[:-1], key.shape[-2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True)[0]


@dataclass
class MemoryEstimate:
    """Bytes per GPU for one training step (see the module docstring for what each part is)."""

    parameters: int
    gradients: int
    optimizer: int
    ema: int
    saved: int
    largest_recompute: int
    trained_parameters: int  # a count, not bytes

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.ema + self.saved
                + self.largest_recompute)

    def breakdown(self) -> str:
        rows = {k: v for k, v in asdict(self).items() if k != "trained_parameters"}
        lines = [f"  {name:<18} {value / GIB:8.2f} GiB" for name, value in rows.items()]
        lines.append(f"  {'total':<18} {self.total / GIB:8.2f} GiB ({self.total / 1e9:.1f} GB)")
        return "\n".join(lines)


class _SavedBytes:
    """Sums the storages of tensors saved for backward, once each, leaving out ``exclude`` storages."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.nbytes = 0
        self.seen: dict[int, torch.Tensor] = {}  # keeps each tensor alive so its storage key stays unique

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = tensor
            self.nbytes += storage.nbytes()

    def hooks(self):
        def pack(tensor):
            self.add(tensor)
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


class _CheckpointObserver:
    """Wraps ``torch.utils.checkpoint.checkpoint`` to count each region's inputs and its recomputation."""

    def __init__(self, saved: _SavedBytes):
        self.exclude = saved.exclude
        self.inputs = saved
        self.largest_region = 0
        self.regions = 0
        self.depth = 0
        self.real = torch.utils.checkpoint.checkpoint

    def __call__(self, function, *args, **kwargs):
        if self.depth == 0 and torch.is_grad_enabled():
            self.regions += 1
            for value in [*args, *kwargs.values()]:
                if isinstance(value, torch.Tensor):
                    self.inputs.add(value)
            region = _SavedBytes(self.exclude)
            call_kwargs = {k: v for k, v in kwargs.items() if k not in ("use_reentrant", "preserve_rng_state",
                                                                        "determinism_check", "debug",
                                                                        "context_fn")}
            self.depth += 1
            try:
                with region.hooks():
                    function(*args, **call_kwargs)  # what backward recomputes, measured once more
            finally:
                self.depth -= 1
            self.largest_region = max(self.largest_region, region.nbytes)
        self.depth += 1
        try:
            return self.real(function, *args, **kwargs)
        finally:
            self.depth -= 1


def sd_vae_config() -> dict:
    """The AutoencoderKL config of Stable Diffusion 1.5's VAE (83,653,863 parameters)."""
    return {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4,
            "norm_num_groups": 32, "sample_size": 512}


def estimate_training_memory(cfg: ModelConfig | None = None, stage: str = "stage2", batch_size: int | None = None,
                             gradient_checkpointing: bool = True, motion_module_checkpointing: bool = True,
                             pixel_losses: bool = True, decode_frames_per_region: int = 1,
                             optimizer_state: bool = True) -> MemoryEstimate:
    """Estimate one GPU's memory for one training step of ``stage`` at ``cfg`` (default: the paper's full
    model) and ``batch_size`` clips (default ``cfg.recipe.batch_size``), in bf16 autocast.

    ``motion_module_checkpointing=False`` leaves the down/up motion modules un-checkpointed (diffusers'
    behaviour); ``pixel_losses=False`` zeroes the stage's pixel-loss weights; ``decode_frames_per_region``
    > 1 adds what one checkpoint region decoding that many frames would recompute at once (the decode before
    ``decode_frames`` went per frame used ``batch * pixel_frames``)."""
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from model.denoising_unet import CheckpointedMotionModule
    from model.experts import LossExperts
    from model.schedule import train_scheduler
    from model.synchrorama import SynchroRamaModel
    from model.training.batch import fake_batch
    from model.training.training_step import training_losses

    cfg = cfg or full_config()
    if not pixel_losses:
        recipe = cfg.recipe
        off = replace(recipe.stage2_losses, sync=0.0, emo=0.0, au=0.0, attr_action=0.0)
        cfg = replace(cfg, recipe=replace(recipe, stage2_losses=off,
                                          stage1_losses=replace(recipe.stage1_losses, sync=0.0, emo=0.0, au=0.0,
                                                                attr_action=0.0)))
    batch_size = batch_size or cfg.recipe.batch_size
    meta = torch.device("meta")
    with meta:
        model = SynchroRamaModel(cfg)
        vae = AutoencoderKL(**sd_vae_config()) if cfg.name == "full" else _tiny_vae(cfg)
        audio_encoder = Wav2Vec2Model(Wav2Vec2Config()) if cfg.name == "full" else None  # wav2vec2-base
        experts = LossExperts(cfg)
    vae.requires_grad_(False).eval()
    experts.requires_grad_(False).eval()
    trained = model.set_stage(stage)
    if gradient_checkpointing:
        model.denoiser.unet.enable_gradient_checkpointing()
        model.reference_net.unet.enable_gradient_checkpointing()
        if not motion_module_checkpointing:
            for module in model.denoiser.unet.modules():
                if isinstance(module, CheckpointedMotionModule):
                    module.gradient_checkpointing = False
    model.train()
    batch = _to_device(fake_batch(cfg, batch_size=batch_size), meta)

    frozen = [vae, experts] + ([audio_encoder] if audio_encoder is not None else [])
    tensors = [*model.parameters(), *model.buffers()] + [t for m in frozen for t in [*m.parameters(), *m.buffers()]]
    exclude = {t.untyped_storage()._cdata for t in tensors}
    parameter_bytes = sum(t.numel() * t.element_size() for t in tensors)
    trained_count = sum(p.numel() for p in trained)

    saved = _SavedBytes(exclude)
    observer = _CheckpointObserver(saved)
    with mock.patch.object(torch.utils.checkpoint, "checkpoint", observer), saved.hooks(), MetaAutocast():
        losses = training_losses(model, batch, train_scheduler(cfg.recipe), stage, vae, experts,
                                 torch.Generator().manual_seed(0))
    if losses["total"].device != meta:
        raise RuntimeError(f"the loss left the meta device ({losses['total'].device}): some part of the step "
                           f"creates tensors on a fixed device; the estimate would be incomplete")
    largest = observer.largest_region
    if decode_frames_per_region > 1 and pixel_losses:
        largest = max(largest, _decode_region_bytes(vae, cfg, decode_frames_per_region, exclude))
    fp32 = 4
    return MemoryEstimate(parameters=parameter_bytes, gradients=trained_count * fp32,
                          optimizer=2 * trained_count * fp32 if optimizer_state else 0, ema=trained_count * fp32,
                          saved=saved.nbytes, largest_recompute=largest,
                          trained_parameters=trained_count)


def _decode_region_bytes(vae, cfg: ModelConfig, frames: int, exclude: set[int]) -> int:
    """Bytes saved by one VAE decode of ``frames`` frames that need gradients (one checkpoint region)."""
    d = cfg.data
    latents = torch.zeros(frames, d.latent_channels, d.latent_size, d.latent_size, device="meta",
                          requires_grad=True)
    region = _SavedBytes(exclude)
    with region.hooks(), MetaAutocast():
        vae.decode(latents).sample.sum()
    return region.nbytes


def _tiny_vae(cfg):
    from model.training.tiny_components import tiny_vae

    return tiny_vae(cfg)


def _to_device(batch, device):
    from model.emotion_embedding import EmotionFeatures
    from model.training.batch import TrainingBatch

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, EmotionFeatures):
            return EmotionFeatures(*(move(getattr(value, f)) for f in value.__dataclass_fields__))
        return value

    return TrainingBatch(**{f: move(getattr(batch, f)) for f in batch.__dataclass_fields__})
