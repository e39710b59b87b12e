"""The whole asset chain, materialised in process on a tiny built-in catalog with a real
Dagster instance, a real MLflow store and the real pretrained towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from afmrl_dagster.registry import ENCODER_MODEL_NAME, GENERATOR_MODEL_NAME

from conftest import REPO_ROOT
from pipeline_fixtures import TINY_CATALOG, TINY_CONFIG, materialised_chain, tiny_resources


def latest_metadata(instance, asset: str, partition: str | None = None) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset)) if partition is None else next(
        record.event_log_entry
        for record in instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    )
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, mlflow_server):
    """The whole chain, tracked and registered in a real MLflow server."""
    root = tmp_path_factory.mktemp("pipeline")
    with materialised_chain(root, tiny_resources(root, tracking_uri=mlflow_server.url), TINY_CONFIG) as (definitions, instance, outcome):
        yield definitions, instance, outcome, root


def test_whole_chain_produces_results_for_every_encoder(pipeline_run):
    _, _, outcome, _ = pipeline_run
    results = outcome["results"]
    encoders = ["zero-shot towers (title)", "zero-shot towers (title + attributes)", "AGCL encoder (title + attributes)",
                "AGCL encoder + visual reader (fused at search)"]
    assert results["encoder"].to_list() == encoders * 2
    assert results["products"].to_list() == ["unseen (validation)"] * 4 + ["unseen (test)"] * 4
    for metric in ("recall@1", "recall@5", "recall@10", "map@10"):
        assert all(0.0 <= value <= 1.0 for value in results[metric])
    assert all(r10 >= r1 for r1, r10 in zip(results["recall@1"], results["recall@10"]))
    assert all(n > 0 for n in results["num_queries"])


def test_the_demo_report_names_the_reward_rar_trained_with(pipeline_run):
    from afmrl_dagster.apps.demo import results_report

    _, _, outcome, _ = pipeline_run
    assert outcome["rar"]["reward"] == "reciprocal_rank"  # the pipeline's default, chosen on validation
    report = results_report(outcome, 60.0)
    assert "reward = reciprocal rank of the first true match over training listings only" in report
    assert "reward = Recall@" not in report


def test_evaluation_and_training_metadata_carry_pictures(pipeline_run):
    import base64
    import io

    from PIL import Image

    _, instance, _, _ = pipeline_run
    evaluation = latest_metadata(instance, "retrieval_evaluation")
    inline = evaluation["retrieval_examples"].split("data:image/png;base64,")[1].rstrip(")")
    stored = Path(evaluation["retrieval_examples_uri"]).read_bytes()
    assert base64.b64decode(inline) == stored
    width, height = Image.open(io.BytesIO(stored)).size
    assert width > 4 * 112 and height > 112  # a query and four results per line
    curve = latest_metadata(instance, "agcl_encoder")["training_curve"]
    assert Image.open(io.BytesIO(base64.b64decode(curve.split("base64,")[1].rstrip(")")))).size[0] > 200


def test_every_asset_materialised_and_blocking_checks_passed(pipeline_run):
    definitions, instance, _, _ = pipeline_run
    graph = definitions.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert instance.get_latest_materialization_event(key) is not None, key
    check_keys = [check for key in graph.get_all_asset_keys() for check in graph.get(key).check_keys]
    assert len(check_keys) >= 15
    evaluations = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    for check_key in check_keys:
        record = evaluations.get(check_key)
        assert record is not None, f"{check_key} never ran"
        evaluation = record.event.dagster_event.event_specific_data
        if graph.get_check_spec(check_key).blocking:
            assert evaluation.passed, f"{check_key} failed: {evaluation.metadata}"


def test_models_are_registered_and_champion_is_set(pipeline_run, mlflow_server):
    _, _, outcome, root = pipeline_run
    client = MlflowClient(tracking_uri=mlflow_server.url)
    champion = client.get_model_version_by_alias(ENCODER_MODEL_NAME, "champion")
    cit, promotion, serving = outcome["cit"], outcome["promotion"], outcome["serving"]
    assert str(client.get_model_version_by_alias(ENCODER_MODEL_NAME, "cit").version) == cit["model_version"]
    # Both candidates were scored on the same validation set; the better one serves (no champion before).
    assert promotion["champion_before"] is None and promotion["promoted"]
    assert set(promotion["candidates"]) == {"AGCL encoder", "CIT encoder"}
    best = max(promotion["candidates"].values(), key=lambda entry: entry["recall@1"])
    assert str(champion.version) == promotion["champion_after"] == serving["encoder_version"]
    assert promotion["candidates"][promotion["candidate_name"]]["recall@1"] == best["recall@1"]
    assert {entry["evaluation_set"] for entry in promotion["candidates"].values()} == {promotion["evaluation_set"]}
    # The AGCL candidate is judged on its validation row, never on the test one.
    results = outcome["results"]
    validation_row = results.filter((results["products"] == "unseen (validation)") & results["encoder"].str.starts_with("AGCL"))
    assert promotion["candidates"]["AGCL encoder"]["recall@1"] == validation_row["recall@1"][0]
    # The champion carries what it serves with; the generator champion is the one that wrote its index.
    assert champion.tags["serving.index_uri"] == serving["index_uri"]
    assert str(client.get_model_version_by_alias(GENERATOR_MODEL_NAME, "champion").version) == serving["generator_version"]
    for version in client.search_model_versions(f"name='{ENCODER_MODEL_NAME}'") + client.search_model_versions(f"name='{GENERATOR_MODEL_NAME}'"):
        assert {"dagster_run_id", "code_version", "catalog_snapshot", "catalog_listings", "fingerprint"} <= set(version.tags), version.tags
        assert version.tags["code_version"].startswith("0.1.0")
    assert client.get_model_version_by_alias(GENERATOR_MODEL_NAME, "sft") is not None
    assert str(client.get_model_version_by_alias(GENERATOR_MODEL_NAME, "rar").version) == outcome["rar"]["model_version"]
    runs = client.search_runs([client.get_experiment_by_name("afmrl-test").experiment_id])
    assert {run.info.run_name for run in runs} >= {"attribute_generator_sft", "agcl_encoder", "retrieval_evaluation", "rar_generator", "cit_encoder"}
    assert all("dagster.run_id" in run.data.tags for run in runs)


def test_rerun_with_unchanged_inputs_reuses_outputs(pipeline_run):
    definitions, instance, _, _ = pipeline_run
    line = "bags"
    result = definitions.resolve_job_def("catalog_refresh_job").execute_in_process(instance=instance, partition_key=line)
    assert result.success
    assert latest_metadata(instance, "listing_features", line)["status"] == "cached"
    assert latest_metadata(instance, "teacher_attributes", line)["status"] == "cached"
    config = {"ops": {name: {"config": TINY_CONFIG[name].model_dump()} for name in ("attribute_generator", "agcl_encoder")}}
    assert definitions.resolve_job_def("model_training_job").execute_in_process(instance=instance, run_config=config).success
    assert latest_metadata(instance, "attribute_generator")["status"] == "cached"
    assert latest_metadata(instance, "agcl_encoder")["status"] == "cached"


def test_cached_cit_encoder_returns_the_whole_manifest(pipeline_run):
    """A cached rerun of cit_encoder returns what the run that trained it returned (its index and
    validation scores included), since encoder_promotion and the serving record read them."""
    definitions, instance, _, _ = pipeline_run
    config = {"ops": {name: {"config": TINY_CONFIG[name].model_dump()} for name in ("rar_generator", "cit_encoder")}}
    job = definitions.resolve_job_def("retrieval_job")
    selection = [dg.AssetKey("cit_encoder")]
    assert job.execute_in_process(instance=instance, run_config=config, asset_selection=selection).success
    first = definitions.load_asset_value("cit_encoder", instance=instance)
    assert job.execute_in_process(instance=instance, run_config=config, asset_selection=selection).success
    assert latest_metadata(instance, "cit_encoder")["status"] == "cached"
    cached = definitions.load_asset_value("cit_encoder", instance=instance)
    assert cached == first
    assert {"index", "validation", "test", "evaluation_set", "uri", "model_version"} <= set(cached)


ASSET_QUERY = """
{ assetNodes { assetKey { path } groupName description kinds isPartitioned
    assetChecksOrError { ... on AssetChecks { checks { name } } } } }
"""
MATERIALIZATION_QUERY = """
query ($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { metadataEntries { label } } } } }
"""


@pytest.fixture(scope="module")
def dagster_dev(pipeline_run, tmp_path_factory, mlflow_server):
    """The real webserver + daemon over the instance, store and MLflow store of the pipeline run."""
    from dagster_server import running_dagster_dev

    _, _, _, root = pipeline_run
    # Automation off: the other tests here share this instance and store (test_automation.py runs it on).
    env = {"AFMRL_STORE": str(root / "store"), "MLFLOW_TRACKING_URI": mlflow_server.url, "AFMRL_CATALOG": TINY_CATALOG, "AFMRL_AUTOMATION": "off"}
    with running_dagster_dev(root / "dagster_home", env, tmp_path_factory.mktemp("dagster-dev")) as server:
        yield server


def test_dagster_dev_shows_the_chain_with_groups_checks_and_metadata(pipeline_run, dagster_dev):
    definitions = pipeline_run[0]
    server = dagster_dev
    nodes = {tuple(node["assetKey"]["path"]): node for node in server.graphql(ASSET_QUERY)["assetNodes"]}
    expected = {key.to_user_string() for key in definitions.resolve_asset_graph().get_all_asset_keys()}
    assert {"/".join(path) for path in nodes} == expected
    for node in nodes.values():
        assert node["groupName"] != "default" and node["description"] and node["kinds"]
    assert {check["name"] for check in nodes[("raw_catalog",)]["assetChecksOrError"]["checks"]} == {"catalog_schema", "images_decodable"}
    evaluation = server.graphql(MATERIALIZATION_QUERY, {"path": ["retrieval_evaluation"]})["assetOrError"]
    labels = {entry["label"] for entry in evaluation["assetMaterializations"][0]["metadataEntries"]}
    assert {"results", "recall@1", "mlflow_run", "evaluation_set"} <= labels
    promotion = server.graphql(MATERIALIZATION_QUERY, {"path": ["encoder_promotion"]})["assetOrError"]
    labels = {entry["label"] for entry in promotion["assetMaterializations"][0]["metadataEntries"]}
    assert {"promoted", "promotion", "champion_before", "champion_after"} <= labels


RUNS_FOR_PARTITION = """
query ($partition: String!) { runsOrError(filter: {tags: [{key: "dagster/partition", value: $partition}]}) {
    ... on Runs { results { runId status } } } }
"""


BACKFILL_MUTATION = """
mutation ($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }
"""
RUNS_QUERY = """
query ($tag: String!) { runsOrError(filter: {tags: [{key: "dagster/backfill", value: $tag}]}) {
    ... on Runs { results { runId status tags { key value } } } } }
"""


def test_backfill_over_product_lines_runs_through_the_daemon(dagster_dev):
    """A backfill of the per-line job over two product lines, launched as the UI does and run by the daemon."""
    import time

    params = {
        "selector": {
            "partitionSetName": "catalog_refresh_job_partition_set",
            "repositorySelector": {"repositoryName": "__repository__", "repositoryLocationName": "afmrl"},
        },
        "partitionNames": ["bags", "mugs"],
    }
    launched = dagster_dev.graphql(BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.monotonic() + 240
    while True:
        runs = dagster_dev.graphql(RUNS_QUERY, {"tag": launched["backfillId"]})["runsOrError"]["results"]
        statuses = {run["status"] for run in runs}
        if len(runs) == 2 and statuses <= {"SUCCESS", "FAILURE", "CANCELED"}:
            break
        assert time.monotonic() < deadline, f"backfill runs not finished: {runs}"
        time.sleep(2)
    assert statuses == {"SUCCESS"}, runs
    partitions = {tag["value"] for run in runs for tag in run["tags"] if tag["key"] == "dagster/partition"}
    assert partitions == {"bags", "mugs"}


def test_backfill_from_the_cli_runs_through_the_daemon(pipeline_run, dagster_dev, mlflow_server):
    """The README's backfill command, against the same instance the webserver and daemon use."""
    import time

    _, _, _, root = pipeline_run
    before = {run["runId"] for run in dagster_dev.graphql(RUNS_FOR_PARTITION, {"partition": "tops"})["runsOrError"]["results"]}
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "AFMRL_STORE": str(root / "store"), "MLFLOW_TRACKING_URI": mlflow_server.url,
           "AFMRL_CATALOG": TINY_CATALOG, "AFMRL_AUTOMATION": "off"}
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run([str(dagster), "job", "backfill", "-w", "workspace.yaml", "-j", "catalog_refresh_job", "--partitions", "tops", "--noprompt"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deadline = time.monotonic() + 240
    while True:
        runs = [run for run in dagster_dev.graphql(RUNS_FOR_PARTITION, {"partition": "tops"})["runsOrError"]["results"] if run["runId"] not in before]
        if runs and all(run["status"] in ("SUCCESS", "FAILURE", "CANCELED") for run in runs):
            break
        assert time.monotonic() < deadline, f"the CLI backfill's run did not finish: {runs}"
        time.sleep(2)
    assert [run["status"] for run in runs] == ["SUCCESS"], runs


def test_registered_encoder_embeds_listings_from_the_registry(pipeline_run, mlflow_server):
    import mlflow
    import numpy as np
    import pandas as pd

    _, _, _, root = pipeline_run
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(f"models:/{ENCODER_MODEL_NAME}@champion")
    embeddings = np.asarray(model.predict(pd.DataFrame({"title": ["red mug", "navy tote"], "attributes_json": ['{"colour": "red"}', None]})))
    assert embeddings.shape == (2, 256)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)


def test_search_finds_the_product_of_a_catalog_photo_and_title(pipeline_run, monkeypatch, mlflow_server):
    from afmrl_dagster.apps.search import SearchEngine, SearchError
    from afmrl_dagster.storage import LocalObjectStore, read_uri_bytes

    _, _, _, root = pipeline_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    store = LocalObjectStore(root / "store")
    engine = SearchEngine.from_store(store)
    catalog = store.read_parquet(sorted(key for key in store.list_keys("tables/raw_catalog/") if key.endswith(".parquet"))[0])
    hits_at_1 = 0
    for listing in catalog.head(6).iter_rows(named=True):
        result = engine.search(image=read_uri_bytes(listing["image_uri"]), text=listing["title"], k=3)
        assert len(result.hits) == 3 and result.hits[0].score >= result.hits[-1].score
        assert isinstance(result.attributes, dict) and result.attributes_text.startswith("{")
        assert set(result.seconds) == {"features", "generate", "embed", "search"} | ({"read"} if engine.fusion else set())
        hits_at_1 += result.hits[0].product_id == listing["product_id"]
    assert hits_at_1 >= 5  # its own listing is in the index
    with pytest.raises(SearchError, match="photo, a text, or both"):
        engine.search()
    # The documented command, text only, as JSON.
    env = {**os.environ, "AFMRL_STORE": str(root / "store"), "MLFLOW_TRACKING_URI": mlflow_server.url}
    done = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "search", "--text", catalog["title"][0], "--k", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["hits"]) == 2
    latency = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "search_latency.py"), "--queries", "3"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert latency.returncode == 0, latency.stderr[-2000:]
    assert "| generate |" in latency.stdout and "Attribute generation adds" in latency.stdout


def test_reader_fusion_is_chosen_on_validation_and_served_by_search(pipeline_run, mlflow_server):
    """The evaluation reads every held-out query photo, chooses the fusion weight on validation
    and tags it on the AGCL version; the serving record carries it; the search reads the query
    photo and re-ranks its candidates by what the reader found."""
    from afmrl_dagster.apps.search import SearchEngine
    from afmrl_dagster.serving import READER_FUSION_TAG
    from afmrl_dagster.storage import LocalObjectStore, read_uri_bytes

    _, instance, outcome, root = pipeline_run
    evaluation = latest_metadata(instance, "retrieval_evaluation")
    weight = evaluation["reader_fusion_weight"]
    by_weight = evaluation["reader_fusion_validation"]
    assert len(by_weight) == 31 and by_weight[f"{weight:.2f}"] == max(by_weight.values())
    assert evaluation["queries_with_reader_text"] > 0  # the built-in photos print their brand
    agcl_version = latest_metadata(instance, "agcl_encoder")["model_version"]
    tags = MlflowClient(tracking_uri=mlflow_server.url).get_model_version(ENCODER_MODEL_NAME, agcl_version).tags
    assert float(tags[READER_FUSION_TAG]) == weight
    store = LocalObjectStore(root / "store")
    engine = SearchEngine.from_store(store)
    served = engine.record.reader_fusion_weight
    assert served == (weight if engine.record.encoder_version == agcl_version else 0.0)
    assert (engine.fusion is not None) == (served > 0)

    engine.use_reader_fusion(10.0)  # a weight the reader's text dominates: the top hit is the best text match
    listing = engine.listings.row(0, named=True)
    result = engine.search(image=read_uri_bytes(listing["image_uri"]), k=3)
    assert result.reader_text and "read" in result.seconds and len(result.hits) == 3
    assert [hit.score for hit in result.hits] == sorted((hit.score for hit in result.hits), reverse=True)
    bonus = engine.fusion.bonus(result.reader_text, list(range(engine.index.ntotal)))
    top = engine.listings["listing_id"].to_list().index(result.hits[0].listing_id)
    assert bonus[top] == bonus.max() == 1.0
    engine.fusion = None
    assert engine.search(image=read_uri_bytes(listing["image_uri"]), k=3).reader_text is None


def test_search_and_evaluate_open_artefacts_only_through_the_serving_record(pipeline_run, tmp_path):
    """The serving record is the whole contract: in a copy of the store whose internal folders
    are renamed (and whose asset manifests and tables are gone), a record that names the new
    URIs still serves, through the library and through both documented commands."""
    import shutil

    from afmrl_dagster.apps.search import SearchEngine
    from afmrl_dagster.serving import SERVING_RECORD_KEY
    from afmrl_dagster.storage import LocalObjectStore

    _, _, outcome, root = pipeline_run
    record = json.loads((root / "store" / SERVING_RECORD_KEY).read_text())
    copy = tmp_path / "moved-store"
    moved = {}
    for field in ("encoder_uri", "index_uri", "generator_uri"):
        source = Path(record[field])
        target = copy / "relocated" / field / source.name
        shutil.copytree(source, target)
        moved[field] = str(target)
    # The index names its product lines' shards by their keys in the store (shared with other
    # index versions): they travel at the same keys.
    source_store = LocalObjectStore(root / "store")
    index_manifest = json.loads(source_store.read_directory_file(source_store.key_of(record["index_uri"]), "manifest.json"))
    for key in index_manifest["shards"].values():
        shutil.copytree(root / "store" / key, copy / key)
    (copy / "serving").mkdir(parents=True)
    (copy / SERVING_RECORD_KEY).write_text(json.dumps({**record, **moved}))
    assert not (copy / "manifests").exists() and not (copy / "tables").exists() and not (copy / "models").exists()

    engine = SearchEngine.from_store(LocalObjectStore(copy))
    assert engine.record.encoder_version == outcome["serving"]["encoder_version"]
    listing = engine.listings.row(0, named=True)
    assert engine.search(text=listing["title"], k=3).hits[0].product_id == listing["product_id"]

    env = {**os.environ, "AFMRL_STORE": str(copy), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/unused"}  # no registry needed
    done = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "search", "--text", listing["title"], "--k", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["hits"]) == 2
    report = tmp_path / "champion.json"
    done = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "evaluate", "--catalog", TINY_CATALOG, "--encoder", "champion",
                           "--out", str(report), "--limit", "6"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"version {record['encoder_version']} (serving record)" in report.read_text()


@pytest.fixture
def registry_restored(pipeline_run, mlflow_server):
    """For tests that move aliases or publish another serving record: put the aliases and the
    record back afterwards, so every other test sees the pipeline run's state, in any order."""
    from afmrl_dagster.promotion import alias_version
    from afmrl_dagster.serving import SERVING_RECORD_KEY
    from afmrl_dagster.storage import LocalObjectStore

    client = MlflowClient(tracking_uri=mlflow_server.url)
    store = LocalObjectStore(pipeline_run[3] / "store")
    aliases = {(model, alias): alias_version(client, model, alias)
               for model in (ENCODER_MODEL_NAME, GENERATOR_MODEL_NAME) for alias in ("champion", "previous_champion")}
    record = store.get_bytes(SERVING_RECORD_KEY)
    yield
    for (model, alias), version in aliases.items():
        if version is not None:
            client.set_registered_model_alias(model, alias, version)
        elif alias_version(client, model, alias) is not None:
            client.delete_registered_model_alias(model, alias)
    store.put_bytes(SERVING_RECORD_KEY, record)


def test_new_encoder_is_compared_with_the_champion_on_the_same_set(pipeline_run, mlflow_server, registry_restored):
    """A second encoder version: the promotion re-scores the registered champion before deciding."""
    from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
    from afmrl_dagster.promotion import alias_version

    definitions, instance, _, _ = pipeline_run
    client = MlflowClient(tracking_uri=mlflow_server.url)
    champion = alias_version(client, ENCODER_MODEL_NAME, "champion")
    config = {"ops": {"agcl_encoder": {"config": EncoderTrainingRunConfig(epochs=2, batch_size=8, seed=1).model_dump()},
                      "attribute_generator": {"config": TINY_CONFIG["attribute_generator"].model_dump()}}}
    assert definitions.resolve_job_def("model_training_job").execute_in_process(instance=instance, run_config=config).success
    for line in instance.get_dynamic_partitions("product_lines"):
        assert definitions.resolve_job_def("catalog_embedding_job").execute_in_process(instance=instance, partition_key=line).success
    retrieval = {"ops": {name: {"config": TINY_CONFIG[name].model_dump()} for name in ("rar_generator", "cit_encoder", "retrieval_evaluation")}}
    assert definitions.resolve_job_def("retrieval_job").execute_in_process(instance=instance, run_config=retrieval).success
    metadata = latest_metadata(instance, "encoder_promotion")
    assert metadata["champion_before"] == champion
    assert f"champion {champion}" in metadata["promotion"]
    decision = definitions.load_asset_value("encoder_promotion", instance=instance)
    assert decision["champion"] is not None and decision["candidate_version"] != champion  # re-scored, not taken from its tags
    paired = decision["paired"]  # both served and scored query by query on the validation queries
    assert paired["queries"] == latest_metadata(instance, "retrieval_evaluation")["validation_queries"]
    assert decision["promoted"] == (paired["lower"] > 0), decision["reason"]
    assert client.get_model_version(ENCODER_MODEL_NAME, decision["candidate_version"]).tags["promotion_decision"] == decision["reason"]


def test_rollback_command_restores_the_previous_champion(pipeline_run, mlflow_server, registry_restored):
    """A promotion keeps the replaced champion under previous_champion; ``afmrl rollback`` (the
    documented command, against the real server) moves the champion back, and again undoes it."""
    from afmrl_dagster.promotion import alias_version, move_champion

    client = MlflowClient(tracking_uri=mlflow_server.url)
    champion = alias_version(client, ENCODER_MODEL_NAME, "champion")
    other = next(str(v.version) for v in client.search_model_versions(f"name='{ENCODER_MODEL_NAME}'") if str(v.version) != champion)
    for key, value in client.get_model_version(ENCODER_MODEL_NAME, champion).tags.items():  # as the promotion would tag it
        if key.startswith("serving."):
            client.set_model_version_tag(ENCODER_MODEL_NAME, other, key, value)
    assert move_champion(client, ENCODER_MODEL_NAME, other, "test: a newer candidate") == champion
    assert alias_version(client, ENCODER_MODEL_NAME, "previous_champion") == champion
    assert client.get_model_version(ENCODER_MODEL_NAME, other).tags["promotion"] == "test: a newer candidate"

    _, _, _, root = pipeline_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "AFMRL_STORE": str(root / "store")}

    def rollback(model: str = ENCODER_MODEL_NAME) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "rollback", "--model", model],
                              capture_output=True, text=True, env=env, timeout=120)

    done = rollback()
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from version {other} back to version {champion}" in done.stdout
    assert alias_version(client, ENCODER_MODEL_NAME, "champion") == champion
    assert alias_version(client, ENCODER_MODEL_NAME, "previous_champion") == other
    assert f"serving record {root / 'store'}" in done.stdout  # what search serves follows the champion
    assert json.loads((root / "store" / "serving" / "record.json").read_text())["encoder_version"] == champion
    assert client.get_model_version(ENCODER_MODEL_NAME, other).tags["rolled_back"] == f"replaced by version {champion}"
    assert rollback().returncode == 0 and alias_version(client, ENCODER_MODEL_NAME, "champion") == other  # undone
    assert rollback().returncode == 0 and alias_version(client, ENCODER_MODEL_NAME, "champion") == champion

    missing = rollback("afmrl-no-such-model")
    assert missing.returncode == 2 and "nothing to roll back to" in missing.stderr


def test_failed_evaluation_gate_stops_promotion_and_cit(pipeline_run, mlflow_server, registry_restored):
    """A blocking gate that fails keeps what depends on it in the run from materialising."""
    from afmrl_dagster.promotion import alias_version

    definitions, instance, outcome, _ = pipeline_run
    assert outcome["results"]["recall@1"][2] < 1.0  # so a floor of 1.0 cannot be met
    client = MlflowClient(tracking_uri=mlflow_server.url)
    champion = alias_version(client, ENCODER_MODEL_NAME, "champion")
    config = {"ops": {"retrieval_evaluation": {"config": {"min_gate_metric": 1.0, "min_gain_over_zero_shot": 1.0}},
                      "rar_generator": {"config": TINY_CONFIG["rar_generator"].model_dump()}}}
    result = definitions.resolve_job_def("retrieval_job").execute_in_process(instance=instance, run_config=config, raise_on_error=False)
    assert not result.success
    materialised = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert "retrieval_evaluation" in materialised
    assert not materialised & {"encoder_promotion", "cit_encoder", "serving_record"}  # downstream of the gate (RAR is not)
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert not checks["meets_quality_floor"].passed and checks["meets_quality_floor"].metadata["floor"].value == 1.0
    assert not checks["trained_beats_zero_shot"].passed and checks["trained_beats_zero_shot"].metadata["required_gain"].value == 1.0
    assert alias_version(client, ENCODER_MODEL_NAME, "champion") == champion



def test_ui_in_headless_chromium_materialises_a_line_and_shows_the_evaluation(pipeline_run, dagster_dev, mlflow_server):
    """What a person does in the Dagster UI, in a real browser: the asset graph, a materialisation
    of one product line launched from the asset page, and the evaluation's metadata (metrics,
    MLflow link, the retrieval-examples picture). Screenshots go to .afmrl/test-artifacts/ui
    (or $AFMRL_TEST_ARTIFACTS/ui)."""
    from selenium.webdriver.common.by import By

    from browser import button, choose_only_partition, chromium_driver, click_first, dismiss_prompts, screenshot, wait_for

    shots = Path(os.environ.get("AFMRL_TEST_ARTIFACTS", REPO_ROOT / ".afmrl" / "test-artifacts")) / "ui"
    url = dagster_dev.url
    driver = chromium_driver()
    try:
        driver.get(f"{url}/asset-groups")
        wait_for(lambda: "Global asset lineage" in driver.page_source, what="the asset graph")
        wait_for(lambda: button(driver, "Skip") or "catalog" in driver.find_element(By.TAG_NAME, "body").text, what="the graph's groups")
        dismiss_prompts(driver)
        body = wait_for(lambda: driver.find_element(By.TAG_NAME, "body").text, what="the page text")
        assert {"catalog", "attributes", "encoder", "retrieval", "rar"} <= set(body.split()), body[:500]
        screenshot(driver, shots, "01-asset-graph")

        before = {run["runId"] for run in dagster_dev.graphql(RUNS_FOR_PARTITION, {"partition": "mugs"})["runsOrError"]["results"]}
        driver.get(f"{url}/assets/raw_catalog")

        def launch_dialog_open() -> bool:
            if "Launch runs to materialize" in driver.find_element(By.TAG_NAME, "body").text:
                return True
            dismiss_prompts(driver)  # the first-visit prompt may cover the page, or appear late
            click_first([button(driver, "Materialize…")])
            return False

        wait_for(launch_dialog_open, interval=2, what="the launch dialog")
        choose_only_partition(driver, "mugs")
        wait_for(lambda: button(driver, "Launch", starts=True), what="the launch button")
        screenshot(driver, shots, "02-launch-one-line")
        wait_for(lambda: click_first([button(driver, "Launch", starts=True)]), what="the launch button to take the click")

        def new_run_status():
            runs = dagster_dev.graphql(RUNS_FOR_PARTITION, {"partition": "mugs"})["runsOrError"]["results"]
            fresh = [run for run in runs if run["runId"] not in before]
            return fresh and fresh[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED") and fresh[0]

        run = wait_for(new_run_status, timeout=300, interval=2, what="the launched run to finish")
        assert run["status"] == "SUCCESS", run
        driver.get(f"{url}/runs/{run['runId']}")
        wait_for(lambda: "raw_catalog" in driver.page_source, what="the run page")
        screenshot(driver, shots, "03-run")

        driver.get(f"{url}/assets/retrieval_evaluation")
        text = wait_for(lambda: (lambda t: "recall@1" in t and t)(driver.find_element(By.TAG_NAME, "body").text), what="the evaluation's metadata")
        assert "mlflow_run" in text and "retrieval_examples" in text
        href = wait_for(lambda: next(h for h in (a.get_attribute("href") or "" for a in driver.find_elements(By.TAG_NAME, "a"))
                                     if h.startswith(f"{mlflow_server.url}/#/experiments/")), what="the MLflow run link")
        assert "/runs/" in href
        # Markdown metadata opens in a dialog from the row's "[Show Markdown]" link.
        row = driver.find_element(By.XPATH, "//*[text()='retrieval_examples']/ancestor::tr")
        driver.execute_script("arguments[0].scrollIntoView();", row)
        wait_for(lambda: click_first(row.find_elements(By.XPATH, ".//*[contains(text(), 'Show Markdown')]")), what="the picture's Show Markdown link")
        width, height = wait_for(lambda: next((img.size["width"], img.size["height"]) for img in driver.find_elements(By.TAG_NAME, "img")
                                              if (img.get_attribute("src") or "").startswith("data:image/png") and img.size["width"] > 100),
                                 what="the retrieval-examples picture")
        assert height > 50
        screenshot(driver, shots, "04-evaluation-metadata")
    except Exception:
        screenshot(driver, shots, "failure")
        (shots / "failure.html").write_text(driver.page_source)
        raise
    finally:
        driver.quit()
