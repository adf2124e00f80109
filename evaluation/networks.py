"""The feature networks of FID, LPIPS and FVD, defined here so that no torchvision is needed.

torchvision has no CPU build in this environment (docs/install.md), and torch-fidelity and lpips both pull it,
so the two image backbones are written out here with the module names of the public checkpoints, whose state
dicts load strictly from a local path:

- ``InceptionV3FID``: the Inception-v3 variant of the original TensorFlow FID (Heusel et al. 2017), as
  pytorch-fid (mseitzer/pytorch-fid, ``inception.py``: ``FIDInceptionA``/``C``/``E_1``/``E_2``) defines it, with
  the parameter names of torchvision's ``Inception3``. Weights: ``pt_inception-2015-12-05-6726825d.pth`` from
  pytorch-fid's GitHub releases (1008 classes). The FID variant differs from torchvision's in exactly the places
  pytorch-fid lists: average pools exclude padding (``count_include_pad=False``) and the last block max-pools its
  pool branch. Input: RGB in [0, 1], resized to 299x299 bilinearly, mapped to [-1, 1]; output: the 2048
  pool features. Deviation: none in the network; the resize is torch's bilinear (as pytorch-fid), not TF's.
- ``AlexNetLPIPS``: LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity) with the AlexNet backbone:
  torchvision's ``alexnet.features`` layer for layer (weights ``alexnet-owt-7be5be79.pth``, the ``features.*``
  keys are read, the classifier is ignored), features taken after relu1..relu5, unit-normalised over channels,
  squared differences weighted by the linear heads (``lin{k}.model.1.weight``; the v0.1 heads that torchmetrics
  ships in its wheel, ``torchmetrics/functional/image/lpips_models/alex.pth``, are the default), spatially
  averaged and summed. Input: RGB in [0, 1] (mapped to [-1, 1], then LPIPS's scaling layer).
- FVD's I3D is not re-implemented: StyleGAN-V's TorchScript ``i3d_torchscript.pt`` (the Kinetics-400 I3D that
  matches the TF-Hub model of the original FVD, Unterthiner et al. 2018) is loaded with ``torch.jit.load`` and
  called as StyleGAN-V's ``compute_fvd`` calls it: ``(B, 3, 16, H, W)`` floats in [0, 255] with
  ``rescale=True, resize=True, return_features=True`` -> ``(B, 400)`` logits before the softmax. Frames are first
  resized here to 224x224 (the clips are square), so its own resize is the identity.

Every class takes a ``width`` factor so that tests build tiny instances of the SAME class (random weights: their
numbers mean nothing); ``TinyI3D`` is a TorchScript module with the I3D script's call signature.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
I3D_TORCHSCRIPT = "i3d_torchscript.pt"
FVD_FRAMES = 16
FVD_RESOLUTION = 224


class WeightsError(RuntimeError):
    """A feature network's weights file is missing or does not fit the network."""


def _load_state(path: str | Path, what: str, url: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} weights {path} not found: download {url} and give its local path in the "
                           "evaluation settings (docs/evaluation.md, 'Weights')")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- Inception


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, TF's) -> ReLU, named as torchvision names it."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # the TF graph's pools ignore the padding: pytorch-fid's one change to torchvision's blocks
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, w(pool), kernel_size=1)
        self.out_channels = w(64) + w(64) + w(96) + w(pool)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), kernel_size=3, stride=2)
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, w):
        super().__init__()
        c7 = w(c7)
        self.branch1x1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), kernel_size=1)
        self.out_channels = 4 * w(192)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), kernel_size=3, stride=2)
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block (pytorch-fid's ``FIDInceptionE_2``) max-pools its pool branch."""

    def __init__(self, cin: int, w, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, w(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(w(384), w(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), w(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, w(192), kernel_size=1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x):
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3FID(nn.Module):
    """FID's Inception-v3 (see the module docstring). ``forward(images (N, 3, H, W) in [0, 1]) -> (N, 2048)``
    pool features (``(N, num_features)`` for a narrower ``width``). ``width`` scales every layer's channels
    (1.0: the real network; tests use ~1/16)."""

    def __init__(self, width: float = 1.0, num_classes: int = 1008, input_size: int = 299):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        self.input_size = input_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), kernel_size=3)
        blocks = []
        cin = w(192)
        for name, make in (("Mixed_5b", lambda c: InceptionA(c, 32, w)), ("Mixed_5c", lambda c: InceptionA(c, 64, w)),
                           ("Mixed_5d", lambda c: InceptionA(c, 64, w)), ("Mixed_6a", lambda c: InceptionB(c, w)),
                           ("Mixed_6b", lambda c: InceptionC(c, 128, w)), ("Mixed_6c", lambda c: InceptionC(c, 160, w)),
                           ("Mixed_6d", lambda c: InceptionC(c, 160, w)), ("Mixed_6e", lambda c: InceptionC(c, 192, w)),
                           ("Mixed_7a", lambda c: InceptionD(c, w)), ("Mixed_7b", lambda c: InceptionE(c, w, False)),
                           ("Mixed_7c", lambda c: InceptionE(c, w, True))):
            block = make(cin)
            setattr(self, name, block)
            blocks.append(name)
            cin = block.out_channels
        self.blocks = blocks
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)  # unused; present so the released state dict loads strictly

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def tiny_inception(width: float = 1 / 16, input_size: int = 75, seed: int = 0) -> InceptionV3FID:
    """A random narrow ``InceptionV3FID`` for tests, its BatchNorm statistics measured on random images: with
    fresh statistics (mean 0, variance 1) the activations of random convolutions vanish over the ~90 layers and
    every feature is ~1e-7, which no distance can tell apart."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = InceptionV3FID(width=width, input_size=input_size).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model(torch.rand(16, 3, 64, 64, generator=generator))
    return model.eval().requires_grad_(False)


def load_inception(path: str | Path, width: float = 1.0, input_size: int = 299) -> InceptionV3FID:
    """``InceptionV3FID`` with the state dict at ``path`` loaded strictly, in eval mode (``width`` and
    ``input_size`` other than 1.0 / 299 only for tiny test networks)."""
    state = _load_state(path, "FID Inception",
                        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS)
    model = InceptionV3FID(width=width, input_size=input_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"{path} is not {INCEPTION_WEIGHTS} (pytorch-fid's FID Inception): {error}") from error
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------- LPIPS


class AlexNetLPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet (see the module docstring). ``forward(a, b)``: ``(N, 3, H, W)`` RGB in [0, 1]
    -> ``(N,)`` distances (0 for identical images)."""

    # torchvision's alexnet.features: index of each conv, and the ReLUs LPIPS taps (relu1 .. relu5)
    TAPS = (1, 4, 7, 9, 11)

    def __init__(self, width: float = 1.0):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        c = [w(64), w(192), w(384), w(256), w(256)]
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(),
        )  # the final max pool of torchvision's features is not used by LPIPS and has no weights
        self.heads = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in c)
        # LPIPS's ScalingLayer: ImageNet statistics in the [-1, 1] input range
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit length over channels
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = ((2 * a.float() - 1) - self.shift) / self.scale
        b = ((2 * b.float() - 1) - self.shift) / self.scale
        total = 0
        for head, fa, fb in zip(self.heads, self._taps(a), self._taps(b), strict=True):
            total = total + head((fa - fb) ** 2).mean(dim=(2, 3))
        return total[:, 0]


def bundled_lpips_heads() -> Path:
    """The LPIPS v0.1 AlexNet heads inside torchmetrics' wheel."""
    return Path(str(resources.files("torchmetrics.functional.image") / "lpips_models" / "alex.pth"))


def load_lpips(alexnet: str | Path, heads: str | Path | None = None, width: float = 1.0) -> AlexNetLPIPS:
    """``AlexNetLPIPS`` from torchvision's AlexNet state dict (``features.*`` keys) and LPIPS heads
    (``lin{k}.model.1.weight``; None: torchmetrics' bundled v0.1 heads)."""
    backbone = _load_state(alexnet, "LPIPS AlexNet backbone",
                           "https://download.pytorch.org/models/" + ALEXNET_WEIGHTS)
    head_state = _load_state(heads or bundled_lpips_heads(), "LPIPS linear heads",
                             "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth")
    state = {k: v for k, v in backbone.items() if k.startswith("features.")}
    state.update({f"heads.{k}.weight": head_state[f"lin{k}.model.1.weight"] for k in range(5)
                  if f"lin{k}.model.1.weight" in head_state})
    model = AlexNetLPIPS(width=width)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"{alexnet} / {heads or bundled_lpips_heads()} do not fit LPIPS-AlexNet (expected "
                           f"torchvision's {ALEXNET_WEIGHTS} and LPIPS v0.1 alex heads): {error}") from error
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- I3D


class TinyI3D(nn.Module):
    """A stand-in with the call signature of StyleGAN-V's ``i3d_torchscript.pt`` (random weights, for tests):
    ``forward(videos (B, 3, T, H, W) in [0, 255], rescale, resize, return_features) -> (B, features)``."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=2, padding=1)
        self.proj = nn.Linear(16, features)

    def forward(self, videos: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            videos = videos / 127.5 - 1.0
        if resize:
            b, c, t, h, w = videos.shape
            flat = videos.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            flat = F.interpolate(flat, size=[224, 224], mode="bilinear", align_corners=False)
            videos = flat.reshape(b, t, c, 224, 224).permute(0, 2, 1, 3, 4)
        x = F.relu(self.conv(videos))
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], 1)
        out = self.proj(pooled)
        return out if return_features else torch.softmax(out, dim=1)


def save_tiny_i3d(path: str | Path, seed: int = 0) -> Path:
    """Script a random ``TinyI3D`` and save it at ``path`` (loads with ``load_i3d`` like the real one)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def load_i3d(path: str | Path) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"FVD's I3D {path} not found: download StyleGAN-V's {I3D_TORCHSCRIPT} "
                           "(https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt) and give its local path")
    return torch.jit.load(str(path), map_location="cpu").eval()


def i3d_features(i3d, clips: torch.Tensor) -> torch.Tensor:
    """``clips (B, 16, H, W, 3)`` uint8 -> ``(B, D)`` I3D logits, as StyleGAN-V's ``compute_fvd`` gets them."""
    b, t, h, w, _ = clips.shape
    flat = clips.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    if (h, w) != (FVD_RESOLUTION, FVD_RESOLUTION):
        flat = F.interpolate(flat, size=(FVD_RESOLUTION, FVD_RESOLUTION), mode="bilinear", align_corners=False)
    videos = flat.reshape(b, t, 3, FVD_RESOLUTION, FVD_RESOLUTION).permute(0, 2, 1, 3, 4).contiguous()
    with torch.no_grad():
        return i3d(videos, rescale=True, resize=True, return_features=True).float()
