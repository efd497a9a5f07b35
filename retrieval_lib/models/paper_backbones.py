"""The convolutional parts of the papers' released networks: VGG16 and ResNet-50/101/152.

The released retrieval networks of Radenović et al. (cnnimageretrieval-pytorch, "cirtorch")
and Gordo/Revaud et al. (deep-image-retrieval, "dirtorch") keep torchvision's layer layout
and only cut the classifier off:

* cirtorch, ``cirtorch/networks/imageretrievalnet.py``, ``init_network``: VGG keeps
  ``features.children()[:-1]`` (every convolution and ReLU, the last max-pool dropped), ResNet
  keeps ``children()[:-2]`` (``conv1, bn1, relu, maxpool, layer1..layer4``; average pool and
  ``fc`` dropped), stored as one ``nn.Sequential`` called ``features``: checkpoint keys
  ``features.<i>.<rest>``. :data:`CIRTORCH_RESNET_INDEX` maps ``<i>`` to torchvision's names.
* dirtorch, ``dirtorch/nets/backbones/resnet.py`` (class ``ResNet``, read from a copy in the
  index; the naver file itself is not stored there): torchvision's names (``conv1``, ``bn1``,
  ``layer1``...), stride in the 3x3 ``conv2`` of the bottleneck, BatchNorm with PyTorch's
  defaults, so torchvision's ResNet computes the same map.

Both end on a ReLU, so the map is non-negative. The backbones here follow the library's
:class:`~retrieval_lib.models.backbones.Backbone` interface (``features``, ``normalize``,
``mean``/``std``, ``config``); they start with random weights, which
:func:`retrieval_lib.models.released.load_network` replaces by the authors'. Used by
``notebooks/09_reproductions.ipynb``.
"""
from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn

from retrieval_lib.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, ResNetBackbone

__all__ = ["VGGBackbone", "paper_backbone", "PAPER_ARCHITECTURES", "CIRTORCH_RESNET_INDEX"]

# cirtorch's ``features`` Sequential for a ResNet: index -> torchvision child (2 = relu and
# 3 = maxpool hold no parameters). Source: init_network, ``list(net_in.children())[:-2]``.
CIRTORCH_RESNET_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

_RESNETS = {"resnet50": tvm.resnet50, "resnet101": tvm.resnet101, "resnet152": tvm.resnet152}
PAPER_ARCHITECTURES = ("vgg16", *_RESNETS)


class VGGBackbone(Backbone):
    """VGG16's 13 convolutions with their ReLUs, the last max-pool removed (cirtorch's cut).

    ``features``: ``(B, 3, H, W)`` -> ``(B, 512, H/16, W/16)`` (four 2x2 max-pools), the output
    of the last ReLU. ``body`` is torchvision's ``vgg16().features[:-1]``: its index ``i``
    is cirtorch's ``features.<i>``. There is no classifier (the released files hold none), so
    ``forward`` is ``features``. Simonyan & Zisserman, ICLR 2015.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.body = nn.Sequential(*list(tvm.vgg16(weights=None).features.children())[:-1])
        self.name = "vgg16"
        self.out_channels = 512
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.weights = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, 512, h, w)``, non-negative."""
        self._check_input(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def _config(self) -> dict:
        return {"weights": self.weights}


def paper_backbone(architecture: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Backbone:
    """A randomly initialised backbone of one of :data:`PAPER_ARCHITECTURES`, in eval mode.

    ResNets are torchvision's (``weights=None``) wrapped in
    :class:`~retrieval_lib.models.backbones.ResNetBackbone` (``features`` ends after ``layer4``'s
    last ReLU); ``mean``/``std`` are the input normalisation the weights were trained with.
    Raises ``ValueError`` naming the supported architectures.
    """
    if architecture == "vgg16":
        net = VGGBackbone(mean, std)
    elif architecture in _RESNETS:
        net = ResNetBackbone(_RESNETS[architecture](weights=None), architecture)
        net.mean, net.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    else:
        raise ValueError(f"unsupported architecture {architecture!r}; the released networks use "
                         f"one of {list(PAPER_ARCHITECTURES)}")
    return net.eval()
