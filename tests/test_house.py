"""The house rules that keep the pipeline honest, checked on the code and on small hand-made data:
one writer of the ``champion`` aliases, and no decision that reads a test listing."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from afmrl_dagster.evaluation.scoring import evaluate_parts
from afmrl_dagster.evaluation.splits import HeldOutSplit
from afmrl_dagster.promotion import Candidate, best_candidate, promotion_decision

from conftest import REPO_ROOT

CODE_FOLDERS = ("afmrl_dagster", "assets", "resources", "benchmarks")


def _calls(tree: ast.AST):
    """(enclosing function name, call node) for every call in ``tree``."""
    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield function, child
            yield from walk(child, name)
    yield from walk(tree, "<module>")


def _callee(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def test_one_writer_of_the_champion_alias():
    """Only the promotion path moves ``champion``: ``move_champion`` is called by the
    ``encoder_promotion`` asset and by ``rollback_champion`` (the documented undo), and nothing
    else sets a registered-model alias except the ``sft``/``rar``/``cit`` labels of fresh versions."""
    movers, alias_setters = set(), set()
    for folder in CODE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for function, call in _calls(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(REPO_ROOT)}::{function}"
                if _callee(call) == "move_champion":
                    movers.add(where)
                elif _callee(call) == "set_registered_model_alias":
                    alias = call.args[1] if len(call.args) > 1 else None
                    label = alias.value if isinstance(alias, ast.Constant) else ast.unparse(alias) if alias is not None else "?"
                    alias_setters.add((where, label))
    assert movers == {"assets/retrieval.py::encoder_promotion", "afmrl_dagster/promotion.py::rollback_champion"}
    assert {label for _, label in alias_setters} <= {"CHAMPION_ALIAS", "PREVIOUS_CHAMPION_ALIAS", '"sft"', "sft", "rar", "cit"}, alias_setters
    champion_setters = {where for where, label in alias_setters if label in ("CHAMPION_ALIAS", "PREVIOUS_CHAMPION_ALIAS")}
    assert champion_setters == {"afmrl_dagster/promotion.py::move_champion"}


def test_every_module_sits_in_the_layers_contract():
    """A module the layers contract does not name may import anything, and anything may import
    it: each top-level module and package of ``afmrl_dagster`` is named there (for a package
    whose modules sit in different layers, such as ``apps``, each of its modules)."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    layers = next(contract["layers"] for contract in config["tool"]["importlinter"]["contracts"]
                  if contract["type"] == "layers" and "afmrl_dagster.definitions" in contract["layers"])
    named = set(re.split(r"[\s|:]+", " ".join(layers))) - {""}

    def covered(module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in named)

    missing = []
    for path in sorted((REPO_ROOT / "afmrl_dagster").iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py":
            modules = [f"afmrl_dagster.{path.stem}"]
        elif (path / "__init__.py").is_file():
            package = f"afmrl_dagster.{path.name}"
            modules = [package] if covered(package) else [f"{package}.{child.stem}" for child in sorted(path.glob("*.py")) if child.name != "__init__.py"]
        else:
            continue
        missing += [module for module in modules if not covered(module)]
    assert not missing, f"add to the layers contract in pyproject.toml: {missing}"


def _catalog(products_per_line: int = 12, listings: int = 3) -> pl.DataFrame:
    rows = [{"listing_id": f"{line}-{p}-{k}", "product_id": f"{line}-{p}", "product_line": line}
            for line in ("bags", "mugs") for p in range(products_per_line) for k in range(listings)]
    return pl.DataFrame(rows)


def test_split_parts_are_disjoint_by_product_and_stable():
    catalog = _catalog()
    split = HeldOutSplit(fraction=0.3, seed=3, validation_fraction=0.3)
    masks = {part: split.mask(catalog, part) for part in ("train", "validation", "test")}
    assert (sum(mask.astype(int) for mask in masks.values()) == 1).all()
    for part, mask in masks.items():
        assert mask.any(), part
    products = {part: set(catalog.filter(pl.Series(mask))["product_id"]) for part, mask in masks.items()}
    assert not (products["validation"] & products["test"]) and not (products["train"] & (products["validation"] | products["test"]))
    assert (split.mask(catalog, "held_out") == (masks["validation"] | masks["test"])).all()
    # Adding a line moves no product of the others between parts.
    grown = pl.concat([catalog, _catalog().with_columns(pl.col("product_line").str.replace("bags", "tops"),
                                                        pl.col("product_id").str.replace("bags", "tops"),
                                                        pl.col("listing_id").str.replace("bags", "tops"))])
    assert (split.mask(grown, "test")[: catalog.height] == masks["test"]).all()


def test_validation_scores_never_read_a_test_listing():
    """The scores every decision reads (validation) stay the same whatever the test listings'
    embeddings are, while the reported test scores change with them."""
    catalog = _catalog()
    split = HeldOutSplit(fraction=0.3, seed=0)
    rng = np.random.default_rng(0)
    codes = {p: rng.normal(size=16) for p in catalog["product_id"].unique()}
    embeddings = np.stack([codes[p] + 0.8 * rng.normal(size=16) for p in catalog["product_id"]]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    scrambled = embeddings.copy()
    test = split.mask(catalog, "test")
    scrambled[test] = embeddings[test][rng.permutation(int(test.sum()))]
    before, after = evaluate_parts(catalog, embeddings, split), evaluate_parts(catalog, scrambled, split)
    assert before["validation"] == after["validation"]
    assert before["test"] != after["test"]


def test_promotion_takes_the_best_candidate_of_the_current_validation_set():
    tags = {"serving.index_uri": "x"}
    agcl = Candidate("AGCL encoder", "3", {"recall@1": 0.60}, "set-a", tags)
    cit = Candidate("CIT encoder", "4", {"recall@1": 0.65}, "set-a", tags)
    stale = Candidate("CIT encoder", "2", {"recall@1": 0.99}, "set-old", tags)
    best, notes = best_candidate([agcl, cit], "recall@1", "set-a")
    assert best is cit and any("AGCL encoder version 3" in note for note in notes)
    best, notes = best_candidate([agcl, stale], "recall@1", "set-a")
    assert best is agcl and "another evaluation set" in notes[0]  # a score on other queries is never compared
    assert best_candidate([stale], "recall@1", "set-a")[0] is None
    assert best_candidate([agcl, Candidate("CIT encoder", "4", {"recall@1": 0.60}, "set-a", tags)], "recall@1", "set-a")[0] is agcl  # a tie keeps the first
    from afmrl_dagster.promotion import paired_difference

    def per_query(correct: int) -> dict[str, float]:  # recall@1 of 100 validation queries
        return {f"q{i}": float(i < correct) for i in range(100)}

    assert not promotion_decision("4", cit.metrics, "1", {"recall@1": 0.70}, "recall@1", 0.0, paired_difference(per_query(65), per_query(70))).promote
    assert promotion_decision("4", cit.metrics, "1", {"recall@1": 0.50}, "recall@1", 0.0, paired_difference(per_query(65), per_query(50))).promote
    with pytest.raises(ValueError, match="same evaluation set"):
        promotion_decision("4", cit.metrics, "1", None, "recall@1")


def test_serving_record_round_trips_and_names_what_is_missing(tmp_path):
    from afmrl_dagster.serving import (READER_FUSION_TAG, ServingError, ServingRecord, reader_fusion_tags, read_serving_record,
                                       record_from_version, serving_tags, write_serving_record)
    from afmrl_dagster.storage import LocalObjectStore

    store = LocalObjectStore(tmp_path)
    with pytest.raises(ServingError, match="materialise the pipeline first"):
        read_serving_record(store)
    tags = serving_tags(store.uri("models/e"), {"uri": store.uri("indexes/i"), "rows": 12, "catalog_snapshot": "c"},
                        store.uri("models/g"), "5", "set-a")

    # The two fields of an MLflow ModelVersion that the record reads.
    version = SimpleNamespace(version="7", tags={**tags, "promotion": "AGCL encoder: no champion yet"})
    record = record_from_version("afmrl-encoder", version)
    assert record == ServingRecord("afmrl-encoder", "7", store.uri("models/e"), store.uri("indexes/i"), 12, store.uri("models/g"), "5", "c",
                                   "set-a", "AGCL encoder: no champion yet")
    write_serving_record(store, record)
    assert read_serving_record(store) == record
    version.tags = {}
    with pytest.raises(ServingError, match="carries no serving tags"):
        record_from_version("afmrl-encoder", version)
    (tmp_path / "serving" / "record.json").write_text('{"encoder_model": "x"}')
    with pytest.raises(ServingError, match="lacks"):
        read_serving_record(store)
    # The reader fusion weight: optional in a record (written before it existed: 0), read from its tag, never negative.
    older = json.loads(record.to_json())
    del older["reader_fusion_weight"]
    (tmp_path / "serving" / "record.json").write_text(json.dumps(older))
    assert read_serving_record(store).reader_fusion_weight == 0.0
    version.tags = {**tags, **reader_fusion_tags(0.35)}
    assert record_from_version("afmrl-encoder", version).reader_fusion_weight == 0.35
    for bad in ("-0.1", "nan", "heavy"):
        version.tags = {**tags, READER_FUSION_TAG: bad}
        with pytest.raises(ServingError, match="reader_fusion_weight"):
            record_from_version("afmrl-encoder", version)


def test_store_key_of_refuses_uris_outside_the_store(tmp_path):
    from afmrl_dagster.storage import LocalObjectStore, StorageError

    store = LocalObjectStore(tmp_path / "store")
    assert store.key_of(store.uri("models/a/b")) == "models/a/b"
    for outside in (str(tmp_path / "elsewhere" / "x"), str(tmp_path / "store-other" / "x"), "/etc/passwd", "s3://bucket/models/a"):
        with pytest.raises(StorageError, match="not inside the artefact store"):
            store.key_of(outside)
    with pytest.raises(ValueError):
        store.key_of(store.uri("models") + "/../../etc")
