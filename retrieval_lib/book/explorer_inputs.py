"""What the explorer takes in: photos (an upload, a folder, a benchmark) and the limits it keeps to.

:func:`read_photo` turns uploaded bytes into a photo or an :class:`ExplorerInputError` that
says what was wrong; a :class:`Collection` is the list of photos searched, from a benchmark
(:func:`collection_from_benchmark`) or a folder (:func:`collection_from_folder`: ``root/<group>/<photo>``
or a flat folder); :func:`thumbnail_jpeg` and :func:`figure_jpeg` make the JPEG bytes the page
shows. Used by :mod:`retrieval_lib.book.explorer` (``notebooks/10_explorer.ipynb``).
"""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval_lib.data.datasets import IMAGE_EXTENSIONS, GroupDataset
from retrieval_lib.data.images import MAX_ASPECT, ImageList, resize_longer_side
from retrieval_lib.errors import UsageError

__all__ = ["ExplorerInputError", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "STORE_SIDE", "THUMB_SIDE", "L_MAX", "read_photo",
           "thumbnail_jpeg", "figure_jpeg", "Collection", "collection_from_benchmark", "collection_from_folder"]

MAX_UPLOAD_BYTES = 50_000_000
"""Largest uploaded file accepted, bytes."""


MAX_PIXELS = 80_000_000
"""Largest photo accepted, pixels (width x height): above this a photo is refused with a message."""


STORE_SIDE = 1024
"""Uploaded photos are stored with their longer side at most this many pixels."""


THUMB_SIDE = 128


L_MAX = 5  # the largest L of the page's slider


class ExplorerInputError(UsageError):
    """Input the explorer cannot use (a photo, a folder); the message says what was wrong and what to do."""


# ---------------------------------------------------------------------------------- photos
def read_photo(content: bytes, name: str, max_side: int = STORE_SIDE) -> Image.Image:
    """An uploaded file's bytes -> an upright RGB PIL image, longer side at most ``max_side`` px.

    Raises :class:`ExplorerInputError` naming the file for an empty file, one larger than
    :data:`MAX_UPLOAD_BYTES`, something that is not an image, a corrupt or truncated image,
    a photo of more than :data:`MAX_PIXELS` pixels, or one more elongated than 16:1.
    """
    if not content:
        raise ExplorerInputError(f"'{name}' is empty (0 bytes); choose a photo file (JPEG, PNG, ...)")
    if len(content) > MAX_UPLOAD_BYTES:
        raise ExplorerInputError(f"'{name}' is {len(content) / 1e6:.0f} MB, more than the explorer accepts "
                                 f"({MAX_UPLOAD_BYTES / 1e6:.0f} MB); save a smaller copy of the photo and upload that")
    huge = (f"'{name}' is too large a photo for the explorer (more than {MAX_PIXELS / 1e6:.0f} megapixels); "
            "downscale it (e.g. to 2000 px on its longer side) and upload it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ExplorerInputError(huge.replace("too large a photo", f"{w}x{h} px ({w * h / 1e6:.0f} "
                                                          "megapixels), too large a photo"))
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size, much faster
                im.load()
                im = ImageOps.exif_transpose(im)
    except ExplorerInputError:
        raise
    except Image.DecompressionBombError as err:
        raise ExplorerInputError(huge) from err
    except UnidentifiedImageError as err:
        raise ExplorerInputError(f"'{name}' is not an image (no image format recognised it); choose a photo "
                                 "file: JPEG, PNG, WebP, BMP, GIF or TIFF") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise ExplorerInputError(f"'{name}' could not be read as an image ({type(err).__name__}: {err}); the file "
                                 "is corrupt or truncated: export or download it again") from err
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if "transparency" in im.info else im.convert("RGB")
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ExplorerInputError(f"'{name}' is {w}x{h} px, more elongated than {MAX_ASPECT:g}:1; crop it to a "
                                 "less extreme shape and upload it again")
    return resize_longer_side(im, max_side) if max(w, h) > max_side else im


def thumbnail_jpeg(path: str, side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of a small copy of ``path`` (longer side ``side`` px); a grey square if unreadable."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (side, side))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):
        im = Image.new("RGB", (side, side), (128, 128, 128))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def figure_jpeg(fig, dpi: int = 72) -> bytes:
    """A matplotlib figure as JPEG bytes (photos: smaller and faster than PNG); the figure is closed,
    so the inline backend never shows it later."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=dpi, pil_kwargs={"quality": 88})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- collections
@dataclass
class Collection:
    """Photos to search: ``paths``, a group per photo (``labels`` into ``group_names``) or ``None``
    for a flat folder, and ``notes`` (what was left out while building it, said in the page)."""

    name: str
    paths: list
    labels: Optional[np.ndarray] = None
    group_names: Optional[list] = None
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> list:
        return [Path(p).name for p in self.paths]

    def group(self, i: int) -> Optional[str]:
        return None if self.labels is None else self.group_names[int(self.labels[i])]

    def summary(self) -> str:
        groups = "" if self.labels is None else f" in {len(self.group_names)} groups"
        return f"{self.name}: {len(self)} photos{groups}"


def collection_from_benchmark(benchmark, name: Optional[str] = None) -> Collection:
    """The database images of a benchmark (e.g. ``book.benchmark``) as a :class:`Collection`."""
    labels = getattr(benchmark, "labels", None)
    return Collection(name or benchmark.name, list(benchmark.database.paths),
                      None if labels is None else np.asarray(labels),
                      None if labels is None else list(benchmark.group_names))


def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def collection_from_folder(folder, progress: bool = False) -> Collection:
    """A folder of your photos as a :class:`Collection`.

    ``folder/<group>/<photo>`` (every sub-folder a group, as
    :meth:`~retrieval_lib.data.datasets.GroupDataset.from_folder` reads it) gives photos with
    groups, so results are marked right or wrong; a flat folder of photos (or a mix of photos
    and sub-folders) gives photos without groups. Duplicate files (the same bytes) are kept
    once and files that cannot be read as images are left out; both are listed in ``notes``.

    Raises:
        ExplorerInputError: no such folder; no photos in it; fewer than two readable, distinct photos.
    """
    root = Path(str(folder)).expanduser()
    if not str(folder).strip() or not root.is_dir():
        raise ExplorerInputError(f"no folder '{folder}'; type the path of a folder that holds your photos "
                                 "(or one sub-folder of photos per object or place)")
    loose = _image_files(root)
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and _image_files(d)]
    notes = []
    if subs and not loose:
        ds = GroupDataset.from_folder(root)
        paths, groups = list(ds.database.paths), [ds.group_names[i] for i in ds.labels]
    else:
        paths = [str(p) for p in loose] + [str(p) for d in subs for p in _image_files(d)]
        groups = None
        if subs:
            notes.append("photos lie both in the folder and in sub-folders: the sub-folders are not used as groups")
    if not paths:
        raise ExplorerInputError(f"no photos in '{root}': no file ending in {', '.join(IMAGE_EXTENSIONS)} there "
                                 "(nor in its sub-folders); put your photos in it or choose another folder")
    seen, keep, dupes = {}, [], []
    for i, p in enumerate(paths):
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        if digest in seen:
            dupes.append(f"{Path(p).name} (= {Path(paths[seen[digest]]).name})")
        else:
            seen[digest] = i
            keep.append(i)
    if dupes:
        notes.append(f"{len(dupes)} duplicate file{'s' if len(dupes) > 1 else ''} kept once: {', '.join(dupes[:5])}"
                     + (" ..." if len(dupes) > 5 else ""))
    bad = ImageList([paths[i] for i in keep]).validate(progress=progress)
    if bad:
        names = [Path(paths[keep[b]]).name for b in bad]
        notes.append(f"{len(bad)} file{'s' if len(bad) > 1 else ''} could not be read as images and "
                     f"{'are' if len(bad) > 1 else 'is'} left out: {', '.join(names[:5])}" + (" ..." if len(bad) > 5 else ""))
        keep = [k for j, k in enumerate(keep) if j not in set(bad)]
    if len(keep) < 2:
        what = "no readable photo" if not keep else f"only one photo ({Path(paths[keep[0]]).name})"
        extra = f" ({'; '.join(notes)})" if notes else ""
        raise ExplorerInputError(f"'{root}' holds {what}{extra}; the explorer needs at least two: one to query and "
                                 "one to find. Add photos, or upload one as the query against another collection")
    paths = [paths[i] for i in keep]
    if groups is None:
        return Collection(root.name, paths, notes=notes)
    groups = [groups[i] for i in keep]
    names = list(dict.fromkeys(groups))
    return Collection(root.name, paths, np.array([names.index(g) for g in groups]), names, notes)
