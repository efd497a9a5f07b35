"""The interface every backbone shares, so poolings never need to know which network made the map.

A backbone is an ``nn.Module`` with:

* ``features(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, C, h, w)`` non-negative map
  (the last activation of the network has been applied);
* ``forward(x)``: ``(B, 3, H, W)`` -> ``(B, 1000)`` ImageNet logits (to check the weights);
* ``normalize(x)``: ``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(x - mean) / std``;
* attributes ``out_channels`` (``C``), ``mean`` and ``std`` (3-tuples), ``name``, and
  ``config``: a dict of every setting that changes the feature map for given weights;
* two declarations the book reads instead of the backbone's private attributes (as timm's
  models declare ``feature_info`` and the library's poolings ``multiscale_p``):
  ``conv_path()``, the convolutions and max-pools on the longest path from the image to the
  map (:func:`retrieval_lib.book.receptive_fields.conv_chain` turns it into receptive
  fields), and ``in_order_modules()``, the module classes whose forward applies their
  children in registration order, so that :func:`retrieval_lib.engine.fold.fold_batchnorm`
  may fold a BatchNorm into the convolution registered right before it.

The families: :mod:`retrieval_lib.models.effnet_lite` (EfficientNet-Lite, offline weights),
:mod:`retrieval_lib.models.resnets` (torchvision's ResNet-50/101) and
:mod:`retrieval_lib.models.paper_backbones` (the released networks' VGG16 and ResNets).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Backbone", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Common interface of the backbones (see the module docstring).

    Subclasses set ``name``, ``out_channels``, ``mean``, ``std`` and implement
    ``features`` and ``forward``.
    """

    name: str
    out_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def conv_path(self) -> list[nn.Module]:
        """The ``Conv2d`` / ``MaxPool2d`` modules on the longest path from the image to the output
        of ``features``, in order, residual shortcuts left out (an identity or strided 1x1
        shortcut sees a subset of what the main path sees). Read by
        :func:`retrieval_lib.book.receptive_fields.conv_chain`; a backbone that does not list its
        path raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} does not list its convolution path")

    def in_order_modules(self) -> tuple[type, ...]:
        """The module classes of this backbone (itself and its blocks) whose forward applies
        their children in registration order, each BatchNorm right after the convolution
        registered before it: :func:`retrieval_lib.engine.fold.fold_batchnorm` folds those
        pairs only inside modules of exactly these classes. ``()`` (the default): the forward
        order is not declared, and the BatchNorms are not folded."""
        return ()

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
