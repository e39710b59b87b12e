"""WDC-PAVE: the loader, and the external attribute check script on a slice of the real file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from afmrl_dagster.catalog.loaders import CatalogLoadError
from afmrl_dagster.attributes.pave import load_wdc_pave

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_loader_keeps_annotated_values_and_drops_not_applicable(tmp_path):
    offer = {"id": 7, "cluster_id": 3.0, "category": "Office Products", "input_title": "Xerox toner 25K", "input_description": "Black",
             "target_scores": {"Brand": {"Xerox": {"pid": [0], "score": 1}}, "Page Yield": {"25K": {"pid": [1], "score": 1}},
                               "Width": {"n/a": 1}}}
    path = tmp_path / "pave.jsonl"
    path.write_text(json.dumps(offer) + "\n\n")
    table = load_wdc_pave(path)
    assert table.row(0, named=True) == {"listing_id": "pave-7", "product_id": "3.0", "category": "Office Products",
                                        "title": "Xerox toner 25K", "description": "Black",
                                        "gold_json": '{"brand": "xerox", "page_yield": "25k"}'}
    path.write_text(json.dumps(offer) + "\n" + json.dumps({"id": 8}) + "\n")
    with pytest.raises(CatalogLoadError, match=r"pave.jsonl:2: not a WDC-PAVE offer"):
        load_wdc_pave(path)


def test_pave_check_runs_on_the_real_file(shared_data, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- pave-check:start -->\n<!-- pave-check:end -->\n")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "pave.py"), "--data", str(shared_data / "wdc_pave"),
                           "--limit", "150", "--epochs", "2", "--write-results", str(readme)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = readme.read_text()
    assert "| brand |" in text and "pair F1" in text
