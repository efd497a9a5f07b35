"""Max pooling over many rectangular regions at once, by a grid of cells (R-MAC, DARAC).

The borders of all regions cut a feature map into a grid of cells; every region is a block
of whole cells, so its maximum is the maximum of its cells' maxima. :func:`cell_plan` builds
(and caches) the index tensors for one map size and region list, :func:`cell_maxima` takes
the cells' maxima in one pass over the map and :func:`region_mac_from_cells` the regions'.
:func:`~retrieval_lib.layers.functional.region_mac` and ``rmac`` and the heads of
:mod:`retrieval_lib.layers.aggregation` pool this way; ``tests/test_functional.py`` checks the
result against a loop over the regions.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["CellPlan", "cell_plan", "cell_maxima", "region_mac_from_cells"]


class CellPlan:
    """Index tensors that turn cell maxima into region maxima for one (H, W, regions).

    All region borders cut the map into a grid of ``ny x nx`` cells; every region is a
    block of whole cells, so its max is the max of its cells' maxima.
    """

    def __init__(self, H: int, W: int, regions: tuple, device: torch.device):
        ybreaks = sorted({0, H} | {y for _, y, _, _ in regions} | {y + h for _, y, _, h in regions})
        xbreaks = sorted({0, W} | {x for x, _, _, _ in regions} | {x + w for x, _, w, _ in regions})
        self.row_bands = list(zip(ybreaks[:-1], ybreaks[1:]))  # cell rows, in map rows
        self.col_bands = list(zip(xbreaks[:-1], xbreaks[1:]))  # cell columns, in map columns
        yi = {v: i for i, v in enumerate(ybreaks)}
        xi = {v: i for i, v in enumerate(xbreaks)}
        # Each region spans cell rows [r0, r1) and cell columns [c0, c1). Index lists are
        # padded by repeating their last entry: repeating an element does not change a max.
        row_ranges = sorted({(yi[y], yi[y + h]) for _, y, _, h in regions})
        width = max((r1 - r0 for r0, r1 in row_ranges), default=1)
        self.rows = torch.tensor(
            [[min(r0 + k, r1 - 1) for k in range(width)] for r0, r1 in row_ranges],
            dtype=torch.int64, device=device,
        ).reshape(-1, width)  # (n_row_ranges, width)
        # Region r then spans, in the (n_row_ranges * nx) flattened band grid, the entries
        # rank(row range) * nx + c for its cell columns c in [c0, c1).
        rank = {rr: i for i, rr in enumerate(row_ranges)}
        nx = len(self.col_bands)
        width = max((xi[x + w] - xi[x] for x, _, w, _ in regions), default=1)
        self.band_cells = torch.tensor(
            [
                [
                    rank[(yi[y], yi[y + h])] * nx + min(xi[x] + k, xi[x + w] - 1)
                    for k in range(width)
                ]
                for x, y, w, h in regions
            ],
            dtype=torch.int64, device=device,
        ).reshape(-1, width)  # (R, width)


@functools.lru_cache(maxsize=256)
def cell_plan(H: int, W: int, regions: tuple, device: torch.device) -> CellPlan:
    return CellPlan(H, W, regions, device)


def cell_maxima(x: torch.Tensor, plan: CellPlan) -> torch.Tensor:
    """Max of every cell of the plan's grid, channels last: ``(B, C, H, W) -> (B, ny, nx, C)``."""
    # One pass over the map. (1) Each band of cell rows: a running elementwise maximum of
    # its map rows, each row a (B, C, W) view of the whole batch. On CPU this is several
    # times faster than x[:, :, r0:r1].amax(dim=2), whose reduction over a middle axis with
    # a short contiguous W axis is slow. (2) Channels go last, so the max over each band of
    # columns reduces contiguous C-vectors.
    row_max = []
    for r0, r1 in plan.row_bands:
        band = x[:, :, r0]
        for r in range(r0 + 1, r1):
            band = torch.maximum(band, x[:, :, r])
        row_max.append(band)  # (B, C, W)
    rows = torch.stack(row_max, dim=1).transpose(2, 3).contiguous()  # (B, ny, W, C)
    return torch.stack([rows[:, :, c0:c1].amax(dim=2) for c0, c1 in plan.col_bands], dim=2)


def _gather_max(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``out[.., n, ..] = max_j t[.., index[n, j], ..]`` along ``dim``; ``index`` is ``(N, J)``."""
    out = t.index_select(dim, index[:, 0])
    for j in range(1, index.shape[1]):  # J = the most cells one region spans on one axis
        out = torch.maximum(out, t.index_select(dim, index[:, j]))
    return out


def region_mac_from_cells(cells: torch.Tensor, plan: CellPlan) -> torch.Tensor:
    """Region maxima from cell maxima: ``(B, ny, nx, C) -> (B, R, C)``."""
    bands = _gather_max(cells, 1, plan.rows)  # (B, n_row_ranges, nx, C)
    return _gather_max(bands.flatten(1, 2), 1, plan.band_cells)  # (B, R, C)
