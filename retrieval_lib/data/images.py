"""Opening image files the same way everywhere: upright, 8-bit RGB, never too small.

``load_image`` is the one door every image of the library goes through; ``ImageList`` is a
``torch`` dataset of paths (and optional crop boxes) that opens its items with it;
``resize_longer_side`` is the library's one resize and ``to_tensor`` its one way from a PIL
image to a tensor (``uint8``, or normalised floats for a network input).
Taught in ``notebooks/00_pipeline.ipynb``.

The rules, in the order they are applied:

1. The file is decoded completely; a missing, corrupt or truncated file raises
   :class:`ImageError` naming the file (``on_error="skip"`` turns this into a warning
   and ``None``).
2. The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), so the image
   is the way a photo viewer shows it.
3. Any pixel format becomes 8-bit RGB: palette, greyscale and CMYK are converted;
   transparency (RGBA, LA, palette with a transparent colour) is composited on white;
   16-bit and 32-bit integer greyscale (modes ``I;16``, ``I``) are scaled from
   0..65535 to 0..255; 32-bit float (mode ``F``) is clipped to 0..255.
4. ``box=(x0, y0, x1, y1)`` crops, in pixel coordinates of the upright image of step 2
   (so ``load_image(p, box)`` equals ``load_image(p).crop(box)`` up to the size rule).
   The box is rounded like ``PIL.Image.crop`` and clamped to the image; a box with
   nothing left inside the image raises :class:`ImageError`. The revisited Oxford/Paris
   query boxes are in stored-pixel coordinates; the two agree for every image without
   an EXIF orientation tag.
5. The size rule (one rule, so that no image ever fails deep inside a convolution):
   an image whose long side / short side exceeds ``max_aspect`` (default 16) is refused
   with :class:`ImageError`; otherwise, if its short side is below ``min_size``
   (default 32 px) it is enlarged with bicubic interpolation until the short side is
   ``min_size``. Together the two bound the enlarged long side by
   ``max_aspect * min_size`` (512 px by default).
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["load_image", "ImageError", "ImageList", "MIN_SIZE", "MAX_ASPECT", "resize_longer_side", "to_tensor"]

MIN_SIZE = 32
MAX_ASPECT = 16.0

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
_ON_ERROR = ("raise", "skip")


class ImageError(ValueError):
    """An image file that cannot be used: unreadable, empty crop, or a refused shape."""


def _check_on_error(on_error: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")


def _decode(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every decoding failure becomes ImageError."""
    if not path.is_file():
        raise ImageError(f"image '{path}' does not exist (or is not a file); check the path "
                         "or the data root, or drop it from the list")
    try:
        with Image.open(path) as im:
            im.load()
            # exif_transpose needs the EXIF of the opened file; do it while it is open
            return ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image '{path}' is too large to open safely ({err}); "
                         "resize it or drop it") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise ImageError(f"image '{path}' cannot be decoded ({type(err).__name__}: {err}); "
                         "the file is corrupt, truncated or not an image — re-download or "
                         "re-export it, or drop it (on_error='skip')") from err


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (transparency composited on white, 16-bit scaled)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float64)
        if mode != "F":
            arr = arr / 257.0  # 0..65535 -> 0..255
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _crop(im: Image.Image, box: Sequence[float], path: Path) -> Image.Image:
    if len(box) != 4:
        raise ImageError(f"box {tuple(box)} for image '{path}' must be (x0, y0, x1, y1)")
    w, h = im.size
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ImageError(f"box {tuple(box)} leaves nothing of image '{path}' ({w}×{h} px); "
                         "boxes are (x0, y0, x1, y1) in pixels of the upright image — "
                         "check the box or the image")
    if (cx0, cy0, cx1, cy1) == (0, 0, w, h):
        return im
    return im.crop((cx0, cy0, cx1, cy1))


def _apply_size_rule(im: Image.Image, min_size: int, max_aspect: float, path: Path) -> Image.Image:
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if long > max_aspect * short:
        raise ImageError(f"image '{path}' is {w}×{h} px (aspect {long / short:.3g}:1); images "
                         f"more elongated than {max_aspect:g}:1 are refused — crop or pad it, "
                         "raise max_aspect, or drop it")
    if short < min_size:
        s = min_size / short
        size = (max(min_size, int(round(w * s))), max(min_size, int(round(h * s))))
        im = im.resize(size, _BICUBIC)
    return im


def load_image(path, box: Optional[Sequence[float]] = None, min_size: int = MIN_SIZE,
               max_aspect: float = MAX_ASPECT, on_error: str = "raise") -> Optional[Image.Image]:
    """Open ``path`` as an upright 8-bit RGB PIL image (see the module docstring for the rules).

    Args:
        path: the image file.
        box: optional crop ``(x0, y0, x1, y1)`` in pixels of the upright image; clamped to
            the image (an empty result is an error).
        min_size: smallest short side in pixels; smaller images are enlarged (bicubic).
            ``0`` disables enlarging.
        max_aspect: largest accepted long side / short side; ``math.inf`` accepts all.
        on_error: ``"raise"`` raises :class:`ImageError`; ``"skip"`` warns
            (``warnings.warn``) and returns ``None``.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` (size ``(W, H)``), or ``None`` when skipped.

    Raises:
        ImageError: missing, corrupt or truncated file; empty box; aspect above
            ``max_aspect``.
        ValueError: ``on_error`` is not ``"raise"`` or ``"skip"``.
    """
    _check_on_error(on_error)
    if min_size < 0 or not max_aspect >= 1:
        raise ValueError(f"need min_size >= 0 and max_aspect >= 1, got {min_size}, {max_aspect}")
    path = Path(path)
    try:
        im = _decode(path)
        if box is not None:
            im = _crop(im, box, path)
        im = _to_rgb(im)
        return _apply_size_rule(im, min_size, max_aspect, path)
    except ImageError as err:
        if on_error == "raise":
            raise
        warnings.warn(f"skipping an image: {err}", stacklevel=2)
        return None


def resize_longer_side(img: Image.Image, image_size: int) -> Image.Image:
    """Resize a PIL image so that its longer side is ``image_size`` px (bicubic, aspect kept).

    The shorter side is rounded and kept at least 1 px. Returns a new PIL image (``img`` itself
    when it already has that size).
    """
    w, h = img.size
    scale = image_size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        return img
    return img.resize(new, _BICUBIC)


def to_tensor(img: Image.Image, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """PIL RGB image ``(W, H)`` -> tensor ``(3, H, W)``.

    Without ``mean``/``std``: the pixels as ``uint8`` (what extraction's data-loader workers
    send, a quarter of the float bytes). With them: ``float32`` scaled to ``[0, 1]`` and
    normalised per channel, ``(x / 255 - mean) / std`` (a backbone's ``mean``/``std``).
    Raises ``ValueError`` for an image that is not 3-channel RGB.
    """
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}; use load_image or "
                         "img.convert('RGB')")
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)
    if mean is None and std is None:
        return x
    if mean is None or std is None:
        raise ValueError("to_tensor: give both mean and std (a backbone's), or neither for uint8 pixels")
    x = x.float().div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


class ImageList(Dataset):
    """A list of image files (optionally with crop boxes) read with :func:`load_image`.

    ``images[i]`` is a PIL RGB image. With ``on_error="skip"`` an unreadable item gives
    ``None`` (after a warning) and ``i`` is appended to ``images.skipped``. Note that
    ``skipped`` only sees items read in this process: with a ``DataLoader`` and
    ``num_workers > 0`` count the ``None`` items instead, or call :meth:`validate` first,
    which opens every file once and returns the indices that fail.

    Attributes:
        paths: list of ``str``, full paths (``root`` joined in front of relative ones).
        boxes: ``None`` or one ``(x0, y0, x1, y1)`` (or ``None``) per image.
        skipped: sorted indices that failed so far (``on_error="skip"``).
        name: free text shown in ``repr``.
    """

    def __init__(self, paths, boxes=None, root=None, min_size: int = MIN_SIZE,
                 max_aspect: float = MAX_ASPECT, on_error: str = "raise", name: str = ""):
        _check_on_error(on_error)
        paths = [os.fspath(p) for p in paths]
        if root is not None:
            paths = [os.path.join(os.fspath(root), p) for p in paths]
        if boxes is not None:
            boxes = [None if b is None else tuple(float(v) for v in b) for b in boxes]
            if len(boxes) != len(paths):
                raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images; "
                                 "give one box (or None) per image")
            bad = [i for i, b in enumerate(boxes) if b is not None and len(b) != 4]
            if bad:
                raise ValueError(f"boxes must be (x0, y0, x1, y1); entry {bad[0]} is {boxes[bad[0]]}")
        self.paths = paths
        self.boxes = boxes
        self.min_size = int(min_size)
        self.max_aspect = float(max_aspect)
        self.on_error = on_error
        self.name = name
        self.skipped: list[int] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int, on_error: str):
        box = None if self.boxes is None else self.boxes[i]
        return load_image(self.paths[i], box=box, min_size=self.min_size,
                          max_aspect=self.max_aspect, on_error=on_error)

    def __getitem__(self, i: int):
        n = len(self.paths)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for an ImageList of {n} images")
        i %= n
        img = self._load(i, self.on_error)
        if img is None and i not in self.skipped:
            self.skipped.append(i)
            self.skipped.sort()
        return img

    def validate(self, progress: bool = True) -> list[int]:
        """Open every image once; return (and store in ``skipped``) the indices that fail.

        Never raises for a bad file, whatever ``on_error`` is; use it before a long run.
        """
        bad = []
        for i in tqdm(range(len(self)), desc=f"checking {self.name or 'images'}",
                      unit="img", disable=not progress):
            try:
                self._load(i, "raise")
            except ImageError:
                bad.append(i)
        self.skipped = sorted(set(self.skipped) | set(bad))
        return bad

    def __repr__(self) -> str:
        boxes = "" if self.boxes is None else ", with boxes"
        name = f"{self.name!r}, " if self.name else ""
        return f"ImageList({name}{len(self)} images{boxes}, on_error={self.on_error!r})"
