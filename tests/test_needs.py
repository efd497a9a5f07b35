"""What a notebook needs at a scale: said up front, checked on disk, nothing downloaded."""
import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import pytest

from retrieval_lib.book import needs as needs_module
from retrieval_lib.book.needs import NOTEBOOKS, check_needs, default_downloads, item_present, scale_needs
from retrieval_lib.book.paper_networks import RELEASED_FOR
from retrieval_lib.models.released import released_networks

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _sfm(root):
    base = root / "train" / "retrieval-SfM-120k"
    (base / "ims").mkdir(parents=True)
    (base / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps({}))


def test_the_learned_notebooks_say_what_full_skips_and_how_to_fetch_it(tmp_path):
    needs = check_needs("05_wgem", "full", tmp_path)
    assert [n.item for n in needs.needs] == ["real171", "rsfm120k", "roxford5k", RELEASED_FOR["05_wgem"],
                                         "rparis6k"]
    assert not needs.have("rsfm120k") and needs.missing_required() == []  # optional: section 7 is skipped
    text = needs._repr_markdown_()
    assert f"python -m retrieval_lib download rsfm120k --data {tmp_path}" in text
    assert "rsfm120k** -- section 7" in text and "missing, so skipped" in text
    assert "real171** -- the real photos of the honest split; missing, so the offline default is used" in text
    assert "not revisited Oxford" in text  # what 05 measures at full instead, and why
    _sfm(tmp_path)
    assert check_needs("05_wgem", "full", tmp_path).have("rsfm120k")
    cub = check_needs("07_cgd", "full", tmp_path)
    assert not cub.have("cub") and "download cub" in str(cub)


def test_the_benchmark_of_a_scale_is_required_and_real171_optional(tmp_path):
    full = check_needs("03_gem", "full", tmp_path)
    assert full.missing_required() == ["roxford5k"] and "**missing**, required" in str(full)
    cpu = check_needs("03_gem", "cpu", tmp_path)
    assert [n.item for n in cpu.needs] == ["real171"] and cpu.missing_required() == []
    assert "the benchmark every section measures; missing, so the offline default is used" in str(cpu)
    assert scale_needs("09_reproductions", "full") == ()  # reads the run's results only


def test_real171_counts_as_present_only_when_complete(data_root):
    if data_root is None:
        pytest.skip("real171 is not beside the checkout (the absent case is checked above)")
    assert check_needs("05_wgem", "cpu", data_root).have("real171")


def test_every_notebook_checks_its_needs_right_after_its_parameters():
    """Each numbered notebook's cell after the parameters cell is its needs cell, naming the notebook."""
    assert tuple(p.stem for p in sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))) == NOTEBOOKS
    for nb in NOTEBOOKS:
        cells = [c for c in json.loads((NB_DIR / f"{nb}.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
        i = next(k for k, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        assert "".join(cells[i + 1]["source"]).startswith(f'needs = check_needs("{nb}", SCALE, DATA_ROOT)'), nb


def test_each_notebook_at_full_measures_revisited_oxford_or_says_what_instead(tmp_path):
    for nb in NOTEBOOKS:
        text = str(check_needs(nb, "full", tmp_path))
        assert "**roxford5k** -- the benchmark every section measures" in text or "At this scale it measures" in text, nb
    assert "no benchmark: it searches a collection" in str(check_needs("10_explorer", "full", tmp_path))
    assert [n.item for n in scale_needs("10_explorer", "full")] == ["real171"]  # not revisited Oxford


def test_a_released_network_is_fetched_without_a_data_root_and_counts_only_when_its_hash_checks(tmp_path, monkeypatch):
    name = RELEASED_FOR["08_whitening"]
    report = check_needs("08_whitening", "full", tmp_path)
    assert report.command(name) == f"python -m retrieval_lib download {name}"  # into the network cache
    assert not report.have(name) and "about 0.17 GB" in str(report)
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    entry = released_networks()[name]
    path = tmp_path / "cache" / "networks" / entry.file_name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the released file")
    assert not item_present(name, tmp_path)  # there, but its hash does not start with the one in its name
    fake = dataclasses.replace(entry, sha256_prefix=hashlib.sha256(b"not the released file").hexdigest()[:8])
    monkeypatch.setattr(needs_module, "released_networks", lambda: {name: fake})
    assert item_present(name, tmp_path) and not item_present("no-such-network", tmp_path)


def test_default_downloads_are_every_item_used_less_the_large_ones():
    assert default_downloads("cpu") == default_downloads("smoke") == ["real171"]
    assert default_downloads("full") == ["roxford5k", "real171", RELEASED_FOR["05_wgem"], "rparis6k",
                                         RELEASED_FOR["08_whitening"]]
    assert {n.item for nb in NOTEBOOKS for n in scale_needs(nb, "full") if n.on_request} == {"rsfm120k", "cub"}
