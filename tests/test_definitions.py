"""The code location loads, every asset is documented, and the graph matches its snapshot."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import dagster as dg

from afmrl_dagster.definitions import build_definitions, defs
from afmrl_dagster.resources.catalog_source import CatalogSource
from afmrl_dagster.resources.storage import ArtifactStore

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def graph_snapshot(definitions: dg.Definitions) -> dict:
    graph = definitions.resolve_asset_graph()
    snapshot = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        snapshot[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partitioned": node.partitions_def is not None,
            "checks": sorted(check.name for check in node.check_keys),
            "kinds": sorted(node.kinds),
            "pools": sorted(node.pools or []),
            "automation": node.automation_condition.label if node.automation_condition else None,
        }
    return snapshot


def test_definitions_load():
    definitions = defs()
    dg.Definitions.validate_loadable(definitions)
    assert {job.name for job in definitions.jobs} == {"catalog_refresh_job", "model_training_job", "catalog_embedding_job", "retrieval_job"}


def test_every_asset_is_documented_grouped_and_typed():
    graph = defs().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.group_name != "default", key
        assert node.kinds, key


def test_asset_graph_matches_snapshot():
    """Changes to the graph's shape are deliberate: regenerate with UPDATE_SNAPSHOTS=1."""
    current = graph_snapshot(defs())
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_new_product_line_sensor_adds_partitions_once(tmp_path):
    from afmrl_dagster.assets.automation import new_product_line_sensor

    with dg.instance_for_test() as instance:
        source = CatalogSource(spec="builtin", store=ArtifactStore(location=str(tmp_path)))
        with dg.build_sensor_context(instance=instance, resources={"catalog_source": source}) as context:
            result = new_product_line_sensor(context)
        assert sorted(r.partition_key for r in result.run_requests) == ["bags", "mugs", "tops"]
        assert result.dynamic_partitions_requests[0].partition_keys == ["bags", "mugs", "tops"]
        with dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={"catalog_source": source}) as context:
            again = new_product_line_sensor(context)
        assert isinstance(again, dg.SkipReason)


def test_catalog_refresh_schedule_requests_every_known_line():
    from afmrl_dagster.assets.automation import catalog_refresh_schedule

    with dg.instance_for_test() as instance:
        empty = catalog_refresh_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(empty, dg.SkipReason)
        instance.add_dynamic_partitions("product_lines", ["bags", "tops"])
        when = datetime.datetime(2026, 11, 27, 3, tzinfo=datetime.timezone.utc)
        requests = catalog_refresh_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
        assert sorted(r.partition_key for r in requests) == ["bags", "tops"]
        assert {r.run_key for r in requests} == {"bags-20261127", "tops-20261127"}


def test_build_definitions_accepts_other_resources(tmp_path):
    resources = dict(build_definitions().resources)
    resources["catalog_source"] = CatalogSource(spec=f"parquet:{tmp_path}", store=ArtifactStore(location=str(tmp_path)))
    assert build_definitions(resources).resources["catalog_source"].spec == f"parquet:{tmp_path}"


def test_loading_the_definitions_leaves_the_model_libraries_unloaded():
    """The webserver, the daemon and every CLI call load the definitions: the libraries of the
    Hugging Face backends, the registry and the data checks load only inside asset bodies."""
    import subprocess
    import sys

    probe = ("import sys, afmrl_dagster.definitions; "
             "print(','.join(m for m in ('transformers', 'peft', 'mlflow', 'great_expectations', 'rapidocr_onnxruntime', 'faiss') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True).stdout.strip()
    assert loaded == "", f"loading the definitions imported {loaded}"
