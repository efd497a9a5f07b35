"""The papers' numbers beside ours (09_reproductions): catalogue, closest measurement, the computed explanation,
and reading a reproduce run back (gather_results)."""
import json
import math

import pytest

from retrieval_lib.book.report import (OFF_THE_SHELF, SETTING_FIELDS, _family, closest_measurement, explain_difference,
                                       measured, paper_catalogue, paper_result, reproduction_rows, reproduction_table,
                                       uncatalogued, write_metrics)
from retrieval_lib.book.reproduce import gather_results, offtheshelf_measured

ROXF = dict(dataset="roxford5k", protocol="mAP medium", training=OFF_THE_SHELF, backbone="resnet101",
            resolution="1024 px, 3 scales")


@pytest.mark.parametrize("method, family", [
    ("MAC", "mac"), ("R-MAC L=2, learned region projection", "rmac"), ("R-MAC L=3", "rmac"), ("GeM p=3", "gem"),
    ("GeM (learned p) + learned whitening", "gem"), ("SPoC + centre prior, PCA-whitened", "spoc"), ("wGeM", "wgem"),
    ("CGD MG, 1536-D", "cgd"), ("trainable R-MAC (rigid grid, L = 2)", "rmac"), ("DARAC untrained (plain sum)", "darac"),
    ("R–[O]–MAC", "mac"), ("GeM p=3 + learned whitening (32 dims)", "gem"), ("NetVLAD", "netvlad"), ("", ""),
])
def test_family(method, family):
    assert _family(method) == family


def test_same_setting_is_a_reproduction_gap():
    paper = paper_result(0.417, method="MAC", source="s", **ROXF)
    ours = measured(0.40, method="mac", **dict(ROXF, backbone="ResNet-101"))  # written differently, same setting
    text = explain_difference(paper, ours)
    assert text == "same setting in all six fields: ours − paper = -0.017, a reproduction gap"


def test_each_differing_field_is_named_with_both_values():
    paper = paper_result(0.647, method="GeM (learned p) + learned whitening", source="s",
                         **dict(ROXF, training="fine-tuned on SfM-120k"))
    ours = measured(0.9, method="GeM p=3", **dict(ROXF, dataset="real171", protocol="mAP", resolution=224))
    text = explain_difference(paper, ours)
    assert text.startswith("not comparable, 5 of 6 setting fields differ (dataset: ours real171, paper roxford5k; "
                           "protocol: ours mAP, paper mAP medium; method: ours GeM p=3, paper GeM (learned p) + "
                           "learned whitening; training: ours ImageNet, off the shelf, paper fine-tuned on SfM-120k; "
                           "resolution: ours 224 px, paper 1024 px, 3 scales)")
    assert "backbone" not in text.split("differ (")[1]
    assert text.endswith("ours − paper = +0.253 measures these differences, not a failure to reproduce")
    unquoted = dict(paper, value=None)
    assert explain_difference(unquoted, ours).endswith("the paper's value is not quoted (see its source)")
    assert "reproduction gap" not in explain_difference(unquoted, ours)
    assert explain_difference(paper, None) == "not measured in this run: no GEM number in the results"


def test_closest_measurement_keeps_to_the_family():
    paper = paper_result(0.5, method="GeM p=3", source="s", **ROXF)
    ours = [measured(0.9, method="MAC", **ROXF),                                   # all but the method equal
            measured(0.3, method="GeM p=3", **dict(ROXF, dataset="real171")),     # same family, one field off
            measured(0.4, method="GeM p=3", **dict(ROXF, dataset="x", backbone="y"))]
    assert closest_measurement(paper, ours)["value"] == 0.3
    assert closest_measurement(paper_result(0.5, method="wGeM", source="s", **ROXF), ours) is None
    assert closest_measurement(paper, {"mAP/gem": 0.5}) is None  # a plain mapping states no setting


def test_reproduction_rows_and_table():
    paper = [paper_result(0.5, method="GeM p=3", source="Paper, Table 1", note="n", **ROXF),
             paper_result(None, method="SPoC", source="Other", **ROXF)]
    ours = [dict(measured(0.45, method="GeM p=3", **ROXF), **{"from": "03_gem"})]
    rows = reproduction_rows(paper, ours)
    assert rows[0][:6] == ["GeM p=3; roxford5k, mAP medium; resnet101, ImageNet, off the shelf, 1024 px, 3 scales",
                           0.5, "Paper, Table 1; n", 0.45,
                           "GeM p=3; roxford5k, mAP medium; resnet101, ImageNet, off the shelf, 1024 px, 3 scales",
                           "03_gem"]
    assert rows[0][6].startswith("same setting")
    assert rows[1][3] is None and rows[1][4] == "–" and rows[1][6].startswith("not measured")
    lines = reproduction_table(paper, ours).splitlines()
    assert len(lines) == 4 and "| 0.500 | Paper, Table 1; n | 0.450 |" in lines[2]


def test_catalogue_entries_are_complete_and_sourced():
    papers = paper_catalogue()
    assert len({p["key"] for p in papers}) == len(papers)
    for p in papers:
        assert p["citation"] and p["notebook"][:2].isdigit() and p["ours_full"] and p["entries"]
        for e in p["entries"]:
            assert all(str(e[f]).strip() for f in SETTING_FIELDS) and e["source"].strip()
            assert e["value"] is None or 0 < e["value"] <= 1


def test_catalogue_cgd_numbers_are_the_recorded_ones():
    cgd = next(p for p in paper_catalogue() if p["key"] == "cgd")
    paper = {e["dataset"]: e["value"] for e in cgd["entries"] if "paper's configuration" in e["method"]}
    assert paper == {"cub200": 0.792, "cars196": 0.948, "sop": 0.842, "inshop": 0.919}
    released = [(e["protocol"], e["value"]) for e in cgd["entries"] if "released" in e["source"]]
    assert released == [("Recall@1", 0.7681), ("Recall@2", 0.8484), ("Recall@4", 0.9060), ("Recall@8", 0.9433)]
    reimpl = [(e["dataset"], e["method"], e["resolution"], e["value"]) for e in cgd["entries"]
              if "re-implementation" in e["method"]]
    assert reimpl == [("cub200", "CGD MG, 1536-D (re-implementation)", "224 px, uncropped", 0.660),
                      ("cub200", "CGD MG, 1536-D (re-implementation)", "224 px, box-cropped", 0.739),
                      ("cars196", "CGD SG, 1536-D (re-implementation)", "224 px, uncropped", 0.864),
                      ("cars196", "CGD SG, 1536-D (re-implementation)", "224 px, box-cropped", 0.924)]
    assert all("could not be reproduced" in e["source"] for e in cgd["entries"] if "re-implementation" in e["method"])


def test_uncatalogued_lists_only_new_numbers():
    gem = next(p for p in paper_catalogue() if p["key"] == "gem")
    known = gem["entries"][0]
    new = paper_result(0.5, method="GeM p=3", source="somewhere", **ROXF)
    drifted = dict(known, value=0.648)
    docs = [{"notebook": "03_gem", "paper": [known, new, drifted]}, {"notebook": "00_x", "paper": {"old": 0.3}}]
    assert uncatalogued(docs) == [("03_gem", new), ("03_gem", drifted)]


SHELF = {"benchmark": "roxford5k", "backbone": "resnet101", "image_size": 1024, "scales": [1.0, 0.7071, 0.5],
         "setting": "full: ...", "rows": {"MAC": {"mAP/easy": 0.6, "mAP/medium": 0.4, "mAP/hard": 0.2, "mP@1/medium": 0.8},
                                          "GeM (p=3)": {"mAP/medium": 0.5, "mAP/hard": None}}}


def test_offtheshelf_measured():
    entries = offtheshelf_measured(SHELF)
    got = [(e["method"], e["protocol"], e["value"]) for e in entries]
    assert got == [("MAC", "mAP easy", 0.6), ("MAC", "mAP medium", 0.4), ("MAC", "mAP hard", 0.2),
                   ("GeM p=3", "mAP medium", 0.5)]  # mP@1 is no headline; a missing value is left out
    assert all(e["resolution"] == "1024 px, 3 scales" and e["from"] == "offtheshelf" and e["training"] == OFF_THE_SHELF
               for e in entries)
    # at full scale, our off-the-shelf MAC pairs with a paper number written in the same setting
    paper = paper_result(0.41, method="MAC", source="s", **ROXF)
    assert explain_difference(paper, closest_measurement(paper, entries)).startswith("same setting")
    one = offtheshelf_measured(dict(SHELF, scales=[1.0], image_size=512))
    assert one[0]["resolution"] == "512 px"


def test_gather_results(tmp_path):
    assert gather_results(tmp_path) is None  # nothing ran
    (tmp_path / "offtheshelf.json").write_text(json.dumps(SHELF))
    assert gather_results(tmp_path)["notebooks"] == []
    m = measured(0.7, method="GeM p=3", **ROXF)
    write_metrics(tmp_path / "notebooks" / "03_gem", "03_gem", {"mAP/gem": 0.7}, [], scale="full", measured=[m])
    write_metrics(tmp_path / "notebooks" / "01_mac", "01_mac", {"mAP/mac": 0.4}, [], scale="full")
    found = gather_results(tmp_path)
    assert [d["notebook"] for d in found["notebooks"]] == ["01_mac", "03_gem"]
    assert found["measured"][-1] == dict(m, **{"from": "03_gem"})
    assert len(found["measured"]) == len(offtheshelf_measured(SHELF)) + 1
    assert found["dir"] == str(tmp_path.resolve())
    assert not math.isnan(found["measured"][0]["value"])
