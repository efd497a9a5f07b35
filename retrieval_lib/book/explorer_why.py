"""Why a result matched, drawn: the explorer's rows of results and its "why" overlays.

:func:`show_rows` draws the query and one row of its top-k per descriptor; :func:`show_why`
explains one result under one descriptor (MAC's shared channels and their cells, SPoC's and
GeM's per-cell shares, R-MAC's region contributions, a wGeM head's mask, a DARAC head's slot
weights). Both take an :class:`~retrieval_lib.book.explorer.Explorer`. Used by
``notebooks/10_explorer.ipynb``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from retrieval_lib.book.darac import show_region_weights
from retrieval_lib.book.explain import implicit_correspondences
from retrieval_lib.book.explorer_inputs import ExplorerInputError
from retrieval_lib.book.receptive_fields import cell_centers, conv_chain, receptive_field
from retrieval_lib.book.sweeps import gem_contributions
from retrieval_lib.book.viz import draw_boxes, fmap_to_image_box, overlay, show_two_rankings, to_numpy_image
from retrieval_lib.book.viz_mac import show_correspondences
from retrieval_lib.layers.contributions import rmac_contributions

__all__ = ["BASE_METHODS", "show_rows", "show_why"]

BASE_METHODS = ("MAC", "SPoC", "GeM", "R-MAC")
"""The descriptors every explorer ranks by, and the ones :func:`show_why` explains besides learned heads."""


# ---------------------------------------------------------------------------------- figures
def _rf(model, image_hw, fmap_hw):
    """Pixel centres of the map's cells: receptive-field centres when the backbone is known, else stretched."""
    try:
        chain = conv_chain(model)
        ry, rx = receptive_field(chain, image_hw[0]), receptive_field(chain, image_hw[1])
        if (ry.n_cells, rx.n_cells) == tuple(fmap_hw):
            return lambda locs: cell_centers(locs, ry, rx)
    except (TypeError, ValueError):
        pass
    sy, sx = image_hw[0] / fmap_hw[0], image_hw[1] / fmap_hw[1]
    return lambda locs: np.stack([(np.asarray(locs)[:, 1] + 0.5) * sx, (np.asarray(locs)[:, 0] + 0.5) * sy], 1)


def show_rows(ex, rows=None, title: Optional[str] = None):
    """The query, then one row of its top-k per descriptor, frames green/red when the collection has groups."""
    rows = ex.rows() if rows is None else rows
    q = ex.network_image(ex.query.path)
    spec = []
    for r in rows:
        imgs = [Image.open(io.BytesIO(ex.thumbnail(i))) for i in r.indices]
        spec.append((r.label, imgs, [ex.correct(i) for i in r.indices], list(r.scores)))
    where = f"#{ex.query.index} of {ex.collection.name}" if ex.query.index is not None else "an upload"
    fig = show_two_rankings(q, spec, title=title or f"Query '{ex.query.name}' ({where}): top {ex.k} per descriptor")
    k = max(len(r.indices) for r in rows)
    fig.set_size_inches(1.7 * (k + 1), 1.9 * len(rows) + 0.4)  # thumbnails: a smaller figure shows all there is
    fig.tight_layout()
    return fig


def show_why(ex, method: str, j: int, score: float):
    """Why collection photo ``j`` matched the query under ``method``: ``(figure, readout text)``.

    * MAC: the 5 channels with the largest terms ``x_c y_c`` of the similarity, each a line
      from the cell of its maximum in the query to the cell of its maximum in the result;
    * SPoC / GeM: each cell's share of the pooled value (``p = 1`` for SPoC, the slider's
      ``p`` for GeM) over both photos;
    * R-MAC: the result's regions coloured by their contribution to the score, which add up
      to it exactly, and the contributions as bars.
    """
    import matplotlib.pyplot as plt

    q_img, x_img = ex.network_image(ex.query.path), ex.network_image(ex.collection.paths[j])
    fq, fx = ex.query.fmap, ex.fmap(j)
    qname, xname = ex.query.name, Path(ex.collection.paths[j]).name
    if method == "MAC":
        corr = implicit_correspondences(fq, fx, k=5)
        ca = _rf(ex.model, q_img.size[::-1], fq.shape[-2:])(corr.loc_a.numpy())
        cb = _rf(ex.model, x_img.size[::-1], fx.shape[-2:])(corr.loc_b.numpy())
        labels = [f"channel {int(c)}: {float(s):.0%} of s" for c, s in zip(corr.channels, corr.share)]
        fig = show_correspondences(q_img, x_img, ca, cb, labels=labels, names=(f"query {qname}", f"result {xname}"),
                                   title=f"MAC, s = {corr.similarity:.3f}: the 5 channels that give most of it")
        text = (f"MAC: s = {corr.similarity:.3f}; its 5 largest channel terms give {float(corr.share.sum()):.0%} of "
                f"it, each pairing the cell of the channel's maximum in the query with the one in the result")
        return fig, text
    if method in ("SPoC", "GeM"):
        p = 1.0 if method == "SPoC" else ex.p
        mq, mx = gem_contributions(fq, p), gem_contributions(fx, p)
        top_q = float(mq.flatten().topk(min(5, mq.numel())).values.sum())
        top_x = float(mx.flatten().topk(min(5, mx.numel())).values.sum())
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for ax, img, m, who in ((axes[0], q_img, mq, f"query {qname}"), (axes[1], x_img, mx, f"result {xname}")):
            h = overlay(ax, img, m, alpha=0.55, title=f"{who}: the 5 top cells hold "
                                                      f"{float(m.flatten().topk(min(5, m.numel())).values.sum()):.0%}")
            fig.colorbar(h, ax=ax, fraction=0.035, pad=0.02, label="share of the pooled value")
        fig.suptitle(f"{ex.label(method) if method == 'GeM' else 'SPoC (GeM at p = 1)'}, s = {score:.3f}: "
                     "each cell's share of the pooled value")
        fig.tight_layout()
        text = (f"{method} at p = {p:.2f}: s = {score:.3f}; the 5 cells with the largest share hold {top_q:.0%} of "
                f"the query's pooled value and {top_x:.0%} of the result's (a uniform map would give "
                f"{5 / mq.numel():.0%})")
        return fig, text
    if method == "R-MAC":
        q = ex.query_descriptor("R-MAC")
        c, regions = rmac_contributions(q, fx, L=ex.L)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
        im = to_numpy_image(x_img)
        H, W = im.shape[:2]
        a.imshow(im)
        order = torch.argsort(c, descending=True)[:5].tolist()
        cmap = plt.get_cmap("tab10")
        boxes = [fmap_to_image_box(regions[r].tolist(), fx.shape[-2:], (H, W)) for r in order]
        draw_boxes(a, boxes, colors=[cmap(n) for n in range(len(order))], linewidth=2.5)
        for n, r in enumerate(order):
            x, y, _, _ = boxes[n]
            a.text(x + 4, y + 14, f"{float(c[r]):.3f}", color="white", fontsize=8,
                   bbox=dict(fc=cmap(n), ec="none", alpha=0.85))
        a.set_title(f"result {xname}: its 5 regions that add most")
        a.set_xlabel("x (px)")
        a.set_ylabel("y (px)")
        colors = ["0.6"] * len(c)
        for n, r in enumerate(order):
            colors[r] = cmap(n)
        b.bar(range(len(c)), c.numpy(), color=colors)
        b.set_xlabel(f"region (levels 1..{ex.L} in order; the last is the whole map)")
        b.set_ylabel("contribution to s")
        b.set_title(f"{len(c)} contributions, sum {float(c.sum()):.4f}")
        fig.suptitle(f"{ex.label('R-MAC')}, s = {score:.4f}: what each region of the result adds")
        fig.tight_layout()
        text = (f"R-MAC (L = {ex.L}): the {len(c)} region contributions (the whole map included) sum to "
                f"{float(c.sum()):.4f} = the score {score:.4f}; the largest, region {order[0]}, gives {float(c[order[0]]):.4f}")
        return fig, text
    head = ex.heads.get(method)
    if callable(getattr(head, "attention", None)):  # a wGeM head (05): its learned mask on both photos
        with torch.no_grad():
            masks = [head.attention(f[None].to(next(head.parameters()).device))[0, 0].cpu() for f in (fq, fx)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        tops = []
        for ax, img, m, who in ((axes[0], q_img, masks[0], f"query {qname}"), (axes[1], x_img, masks[1], f"result {xname}")):
            tops.append(float(m.flatten().topk(min(5, m.numel())).values.sum()))
            h = overlay(ax, img, m, alpha=0.55, title=f"{who}: the 5 top cells hold {tops[-1]:.0%}")
            fig.colorbar(h, ax=ax, fraction=0.035, pad=0.02, label="mask weight")
        fig.suptitle(f"{method}, s = {score:.3f}: its learned spatial mask on both photos")
        fig.tight_layout()
        text = (f"{method}: s = {score:.3f}; its learned mask gives the 5 heaviest cells {tops[0]:.0%} of the weight on the "
                f"query and {tops[1]:.0%} on the result (a uniform mask would give {5 / masks[0].numel():.0%})")
        return fig, text
    if callable(getattr(head, "vector_weights", None)):  # a DARAC head (06): the weight of each region slot
        weights = head.vector_weights().detach().cpu().numpy()
        fig = show_region_weights(weights, hw=tuple(fx.shape[-2:]),
                                  title=f"{method}, s = {score:.3f}: the learned weight of each region slot")
        top = int(weights.argmax())
        text = (f"{method}: s = {score:.3f}; its {len(weights)} region slots are weighted from {weights.min():.2f} to "
                f"{weights.max():.2f} (untrained: all 1), the heaviest is the {'average' if top < len(weights) // 2 else 'max'} "
                f"vector of slot {top % (len(weights) // 2)}")
        return fig, text
    raise ExplorerInputError(f"no explanation is drawn for {method!r}: the why overlays cover {list(BASE_METHODS)}, "
                             "wGeM heads (their mask) and DARAC heads (their slot weights)")
