"""What a notebook needs at a scale: said up front, checked on disk, nothing downloaded."""
import pickle

import pytest

from retrieval_lib.book.needs import check_needs, scale_needs


def _sfm(root):
    base = root / "train" / "retrieval-SfM-120k"
    (base / "ims").mkdir(parents=True)
    (base / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps({}))


def test_the_learned_notebooks_say_what_full_skips_and_how_to_fetch_it(tmp_path):
    needs = check_needs("05_wgem", "full", tmp_path)
    assert [n.item for n in needs.needs] == ["real171", "rsfm120k", "roxford5k"]
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
