"""A stand-in of the ``full`` scale's setting, small enough for a CPU: the dry run's data and weights.

:func:`build_standin` writes, under a folder of the caller's (a test's ``tmp_path``):

- ``data/roxford5k/``: revisited Oxford in its download layout (``jpg/<name>.jpg`` and
  ``gnd_roxford5k.pkl``), its ground truth cut from the real ``gnd_roxford5k.pkl`` when the data
  root beside the checkout has it (``revisited_gnd/``), else a made-up one with Oxford-style names;
  :data:`N_QUERIES` queries, each with its easy, hard and junk images, and a few negatives. The
  photos are real171's when present (resized), else generated; each query's box is scaled with it
  and lies inside its image.
- ``torch/hub/checkpoints/``: random ResNet-101 (and ResNet-50 for CUB) weights under the names
  torchvision's ImageNet weights have, so ``load_backbone("resnet101")`` loads them with
  ``TORCH_HOME`` pointing there. Their BatchNorm statistics are re-estimated on a few images, so the
  maps have a trained network's magnitude (raw statistics give maps of ~1e5, which GeM/wGeM powers
  overflow; the real weights never do).
- with ``extra=True``: ``data/train/retrieval-SfM-120k/`` (cirtorch's layout: 10 clusters x 2
  images for ``train``, 3 x 2 for ``val``) and ``data/CUB_200_2011/`` (classes 1-8 and 101-104,
  4 images each): what 05's section 7 and 07's section 6 need.

Nothing is downloaded. Numbers measured on it mean nothing; only whether the code runs counts.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

N_QUERIES = 3
N_NEGATIVES = 3
PHOTO_SIDE = 160  # longer side of the stand-in photos, px (the real ones are 1024)


def _real_gnd(shared: Path | None):
    path = shared / "revisited_gnd" / "gnd_roxford5k.pkl" if shared is not None else None
    if path is None or not path.is_file():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _made_up_gnd():
    """Oxford-style names and boxes (in 1024 x 768 pixels) when the real ground truth is absent."""
    imlist = [f"{n}_{i:06d}" for n in ("all_souls", "ashmolean", "balliol") for i in range(4)] + \
             [f"oxford_{i:06d}" for i in range(6)]
    qimlist = ["all_souls_000900", "ashmolean_000900", "balliol_000900"]
    gnd = [{"bbx": [100.0, 80.0, 900.0, 700.0], "easy": [4 * q, 4 * q + 1], "hard": [4 * q + 2],
            "junk": [4 * q + 3]} for q in range(3)]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def cut_gnd(doc: dict, n_queries: int = N_QUERIES, n_negatives: int = N_NEGATIVES) -> dict:
    """The ground truth cut to ``n_queries`` queries of distinct landmarks, each with its first 2 easy,
    1 hard and 1 junk image, plus ``n_negatives`` images no kept query lists; indices remapped."""
    chosen, seen = [], set()
    for q, name in enumerate(doc["qimlist"]):
        landmark = name.rsplit("_", 1)[0]
        g = doc["gnd"][q]
        if landmark not in seen and len(g["easy"]) >= 2 and g["hard"] and g["junk"]:
            chosen.append(q)
            seen.add(landmark)
        if len(chosen) == n_queries:
            break
    keep = set()
    for q in chosen:
        g = doc["gnd"][q]
        keep.update(g["easy"][:2] + g["hard"][:1] + g["junk"][:1])
    listed = {i for g in doc["gnd"] for k in ("easy", "hard", "junk") for i in g[k]}
    negatives = [i for i in range(len(doc["imlist"])) if i not in listed and i not in keep][::97][:n_negatives]
    keep = sorted(keep | set(negatives))
    new = {old: i for i, old in enumerate(keep)}
    gnd = [{"bbx": list(map(float, doc["gnd"][q]["bbx"])),
            **{k: [new[i] for i in doc["gnd"][q][k] if i in new] for k in ("easy", "hard", "junk")}}
           for q in chosen]
    return {"imlist": [doc["imlist"][i] for i in keep], "qimlist": [doc["qimlist"][q] for q in chosen], "gnd": gnd}


def _photos(shared: Path | None, n: int, seed: int = 0) -> list:
    """``n`` RGB images: real171's landmark photos when present, else generated (noise + a block)."""
    real = sorted((shared / "real171" / "landmarks23").glob("*.jpg")) if shared is not None else []
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i < len(real):
            out.append(Image.open(real[i]).convert("RGB"))
            continue
        a = rng.integers(0, 120, size=(384, 512, 3)).astype(np.uint8)
        y, x = int(rng.integers(0, 256)), int(rng.integers(0, 340))
        a[y:y + 128, x:x + 170] = rng.integers(60, 256, size=3)
        out.append(Image.fromarray(a))
    return out


def _fit(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)


def write_roxford(data: Path, shared: Path | None) -> dict:
    """revisited Oxford's download layout under ``data/roxford5k``; returns the ground truth written."""
    doc = cut_gnd(_real_gnd(shared) or _made_up_gnd())
    jpg = data / "roxford5k" / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    names = doc["imlist"] + doc["qimlist"]
    for name, img in zip(names, _photos(shared, len(names))):
        _fit(img, PHOTO_SIDE).save(jpg / f"{name}.jpg", quality=90)
    for q, name in enumerate(doc["qimlist"]):
        # the real box is in the original photo's pixels (longer side about 1024): scale it, keep it inside
        w, h = Image.open(jpg / f"{name}.jpg").size
        x0, y0, x1, y1 = (v * PHOTO_SIDE / 1024 for v in doc["gnd"][q]["bbx"])
        x0, y0 = min(max(0.0, x0), w - 40.0), min(max(0.0, y0), h - 40.0)
        doc["gnd"][q]["bbx"] = [x0, y0, min(max(x1, x0 + 40.0), w - 1.0), min(max(y1, y0 + 40.0), h - 1.0)]
    with open(data / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(doc, f, protocol=2)
    return doc


def write_sfm120k(data: Path, shared: Path | None) -> None:
    """rSfM-120k in cirtorch's layout: ``train`` 10 clusters x 2 images, ``val`` 3 x 2; pairs within clusters.

    Ten clusters, so that a dry run's pool of 16 images always holds the 5 negatives of other clusters the
    recipe mines per tuple (four clusters could not: ``hardest_negatives`` refuses such a pool)."""
    from retrieval_lib.data.sfm120k import SFM_NAME, cid2filename

    base = data / "train" / SFM_NAME
    photos = _photos(None, 26, seed=5)
    db, k = {}, 0
    for mode, (n_clusters, per) in (("train", (10, 2)), ("val", (3, 2))):
        cids, cluster, qidxs, pidxs = [], [], [], []
        for c in range(n_clusters):
            first = len(cids)
            for j in range(per):
                cid = f"{k:040x}"
                path = Path(cid2filename(cid, base / "ims"))
                path.parent.mkdir(parents=True, exist_ok=True)
                _fit(photos[k], 96).save(path, format="JPEG", quality=90)
                cids.append(cid)
                cluster.append(c)
                k += 1
            qidxs += [first, first + 1]
            pidxs += [first + 1, first]
        db[mode] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    with open(base / f"{SFM_NAME}.pkl", "wb") as f:
        pickle.dump(db, f, protocol=2)


def write_cub(data: Path) -> None:
    """CUB-200-2011's layout: classes 1-8 (train) and 101-104 (test), 4 images each (CGD's K)."""
    base = data / "CUB_200_2011"
    photos = _photos(None, 48, seed=9)
    images, labels, classes = [], [], []
    for c in list(range(1, 9)) + list(range(101, 105)):
        (base / "images" / f"{c:03d}.Bird").mkdir(parents=True, exist_ok=True)
        classes.append(f"{c} {c:03d}.Bird")
        for j in range(4):
            rel = f"{c:03d}.Bird/bird_{j}.jpg"
            _fit(photos[len(images)], 96).save(base / "images" / rel, quality=90)
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {c}")
    for name, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes)):
        (base / name).write_text("\n".join(rows) + "\n")


def write_weights(torch_home: Path, archs=("resnet101",), shared: Path | None = None) -> list:
    """Random weights of torchvision's ResNets where ``torch.hub`` looks for the ImageNet files
    (``$TORCH_HOME/hub/checkpoints/<file>``), BatchNorm statistics re-estimated on 16 photos at 128 x 96 px."""
    import torchvision

    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    batch = torch.stack([(torch.from_numpy(np.asarray(img.resize((128, 96)), dtype=np.float32)).permute(2, 0, 1) / 255
                          - mean) / std for img in _photos(shared, 16, seed=3)])  # 16 ImageNet-normalised photos
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    try:
        paths = []
        for arch in archs:
            weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
            path = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]  # where torch.hub looks
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            net = torchvision.models.get_model(arch, weights=None)
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None  # a cumulative average over the batches below
            net.train()
            with torch.no_grad():
                for i in range(0, len(batch), 4):
                    net(batch[i:i + 4])
            torch.save(net.eval().state_dict(), path)
            paths.append(path)
        return paths
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def build_standin(where: Path, shared: Path | None, extra: bool = False) -> dict:
    """The whole stand-in under ``where``; returns ``{"data", "torch_home", "gnd"}``."""
    data, torch_home = where / "data", where / "torch"
    gnd = write_roxford(data, shared)
    write_weights(torch_home, ("resnet101",), shared)
    if extra:
        add_extra(data, torch_home)
    return {"data": data, "torch_home": torch_home, "gnd": gnd}


def add_extra(data: Path, torch_home: Path) -> None:
    """rSfM-120k and CUB-200-2011 stand-ins beside revisited Oxford, and the ResNet-50 that CGD trains."""
    write_sfm120k(data, None)
    write_cub(data)
    write_weights(torch_home, ("resnet50",))
