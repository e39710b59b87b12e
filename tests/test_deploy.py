"""The production deployment as the README documents it: deploy/dagster.yaml validates against
Dagster's schema and dagster-k8s's, its Postgres storage runs a real job against a real
PostgreSQL server, and the Kubernetes executor and GPU requests are wired into the definitions."""

from __future__ import annotations

import re

import dagster as dg
import pytest
import yaml

from afmrl_dagster.definitions import build_definitions
from conftest import REPO_ROOT
from pipeline_fixtures import tiny_resources
from postgres_server import find_postgres_bin, running_postgres

DEPLOY = REPO_ROOT / "deploy"
PG_VARIABLES = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def test_deploy_instance_config_is_valid_for_dagster_and_dagster_k8s(monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    for name in PG_VARIABLES:
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "x")
    config, _ = dagster_instance_config(str(DEPLOY))
    assert "postgres_db" in config["storage"]["postgres"]
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    readme = (REPO_ROOT / "README.md").read_text()
    for name in PG_VARIABLES:
        assert name in readme, f"README does not say how to set {name}"


def test_k8s_executor_and_gpu_requests(monkeypatch):
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.job import get_user_defined_k8s_config

    from afmrl_dagster.resources.compute import GPU_POOL, gpu_op_tags

    monkeypatch.setenv("AFMRL_EXECUTOR", "k8s")
    definitions = build_definitions(tiny_resources(REPO_ROOT / ".afmrl" / "unused"))
    assert definitions.executor is k8s_job_executor
    dg.Definitions.validate_loadable(definitions)
    graph = definitions.resolve_asset_graph()
    gpu_assets = [key for key in graph.get_all_asset_keys() if GPU_POOL in (graph.get(key).pools or set())]
    assert len(gpu_assets) >= 8
    for key in gpu_assets:
        # Read back the way dagster-k8s reads a step's tags when it builds the step's pod.
        k8s = get_user_defined_k8s_config(graph.assets_def_for_key(key).op.tags)
        assert k8s.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}, key
    monkeypatch.setenv("AFMRL_K8S_GPUS", "2")
    assert gpu_op_tags()["dagster-k8s/config"]["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    monkeypatch.setenv("AFMRL_K8S_GPUS", "0")
    assert gpu_op_tags() == {}
    monkeypatch.setenv("AFMRL_EXECUTOR", "kubernetes")
    with pytest.raises(ValueError, match="'multiprocess' or 'k8s'"):
        build_definitions(tiny_resources(REPO_ROOT / ".afmrl" / "unused"))


def test_postgres_backed_instance_records_a_real_run(tmp_path, monkeypatch):
    """deploy/dagster.yaml's storage section (the run launcher swapped for the local one, as
    there is no cluster here) against a real PostgreSQL server: a catalog refresh runs and its
    run, events and materialisations are in the database."""
    import psycopg2

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql")
    with running_postgres(bin_dir) as server:
        connection = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE dagster")
        connection.close()
        for name, value in server.env("dagster").items():
            monkeypatch.setenv(name, value)
        deployed = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
        home = tmp_path / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": deployed["telemetry"], "storage": deployed["storage"],
                                                          "concurrency": deployed["concurrency"]}))
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            instance.add_dynamic_partitions("product_lines", ["mugs"])
            job = build_definitions(tiny_resources(tmp_path)).resolve_job_def("catalog_refresh_job")
            result = job.execute_in_process(instance=instance, partition_key="mugs")
            assert result.success
        finally:
            instance.dispose()
        with psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname="dagster") as connection:
            cursor = connection.cursor()
            cursor.execute("SELECT run_id, status FROM runs")
            assert cursor.fetchall() == [(result.run_id, "SUCCESS")]
            cursor.execute("SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            keys = {re.sub(r'[\[\]"]', "", row[0]) for row in cursor.fetchall()}
            assert keys == {"raw_catalog", "teacher_attributes", "listing_features"}
