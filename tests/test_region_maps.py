"""show_region_map: one panel per level over the real map, one filled square per region."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from retrieval_lib.book.regional import region_levels
from retrieval_lib.book.region_maps import cell_activation, show_region_map
from retrieval_lib.layers.functional import rmac_regions


def _fmap(C=5, h=6, w=9):
    g = torch.Generator().manual_seed(0)
    return torch.rand(C, h, w, generator=g)


def test_cell_activation_is_the_channel_mean():
    f = _fmap()
    ref = np.array([[float(sum(f[c, i, j] for c in range(f.shape[0]))) / f.shape[0] for j in range(9)]
                    for i in range(6)])
    np.testing.assert_allclose(cell_activation(f), ref, rtol=1e-6)


def test_one_panel_per_level_with_filled_squares_on_the_map():
    f = _fmap()
    regions, levels = rmac_regions(6, 9, 3), region_levels(6, 9, 3)
    fig = show_region_map(f, regions, levels, labels=[str(i) for i in range(len(regions))])
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_xlabel()]
    assert len(panels) == 3
    for level, ax in zip((1, 2, 3), panels):
        n = int((levels == level).sum())
        filled = [p for p in ax.patches if p.get_fill()]
        assert len(filled) == n and all(p.get_alpha() == 0.25 for p in filled)
        ax_boxes = sorted((p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in filled)
        want = sorted(tuple(float(v) for v in r) for r, lv in zip(regions.tolist(), levels.tolist()) if lv == level)
        assert ax_boxes == want
        np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), cell_activation(f), rtol=1e-6)
        assert ax.get_xlabel() == "x (cells)" and ax.get_ylabel() == "y (cells)"
        assert ax.get_title().startswith(f"level {level}: {n} square")
    assert "(9x6 cells)" in fig._suptitle.get_text()
    plt.close(fig)


def test_bad_inputs():
    f = _fmap()
    regions, levels = rmac_regions(6, 9, 2), region_levels(6, 9, 2)
    with pytest.raises(ValueError, match=r"expected a feature map tensor \(C, h, w\)"):
        show_region_map(f[None], regions, levels)
    with pytest.raises(ValueError, match="one level"):
        show_region_map(f, regions, levels[:-1])
    with pytest.raises(ValueError, match="one level"):
        show_region_map(f, regions, levels, labels=["a"])
    with pytest.raises(ValueError, match="one level"):
        show_region_map(f, regions[:0], levels[:0])
    with pytest.raises(ValueError, match="do not fit the 9x6 map"):
        show_region_map(f, rmac_regions(12, 18, 2), region_levels(12, 18, 2))
    plt.close("all")
