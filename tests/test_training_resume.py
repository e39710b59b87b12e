"""A training killed mid-run resumes from its last checkpoint when the asset is rematerialised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
from afmrl_dagster.training.checkpoints import checkpoint_step
from pipeline_fixtures import tiny_resources

EPOCHS = 60
CATALOG = "builtin:families=2,siblings=2,listings=3,lines=mugs"
TRAINING = """
import sys
from pathlib import Path

import dagster as dg

from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
from afmrl_dagster.definitions import build_definitions
from pipeline_fixtures import tiny_resources

root = Path(sys.argv[1])
definitions = build_definitions(tiny_resources(root, catalog_spec=sys.argv[3]))
config = {"ops": {"agcl_encoder": {"config": EncoderTrainingRunConfig(epochs=int(sys.argv[2]), batch_size=8).model_dump()}}}
with dg.DagsterInstance.from_config(str(root / "dagster_home")) as instance:
    definitions.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, run_config=config, asset_selection=[dg.AssetKey("agcl_encoder")])
"""


def test_agcl_encoder_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    """The encoder's training runs in its own process and is SIGKILLed once its checkpoints pass step 10; the
    same asset materialised again resumes from the last checkpoint (not from step 0), finishes, publishes the
    encoder and removes the checkpoints; its files are byte for byte those of the run never stopped."""
    from afmrl_dagster.definitions import build_definitions

    home = tmp_path / "dagster_home"
    home.mkdir()
    # No pool limit here: the killed process never gives its "gpu" slot back, and no daemon runs to
    # mark it failed and free the slot (the project's dagster.yaml has run monitoring do that).
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    resources = tiny_resources(tmp_path, catalog_spec=CATALOG)
    definitions = build_definitions(resources)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        lines = resources["catalog_source"].product_lines()
        instance.add_dynamic_partitions("product_lines", lines)
        for line in lines:
            assert definitions.resolve_job_def("catalog_refresh_job").execute_in_process(instance=instance, partition_key=line).success
    checkpoints = tmp_path / "checkpoints" / "agcl_encoder"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", TRAINING, str(tmp_path), str(EPOCHS), CATALOG], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed_at = time.monotonic() + 300, None
        while time.monotonic() < deadline and process.poll() is None:
            steps = [checkpoint_step(folder) or 0 for folder in checkpoints.glob("*")] if checkpoints.is_dir() else []
            if steps and max(steps) >= 10:
                process.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
            time.sleep(0.05)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert killed_at is not None, f"no checkpoint past step 10 before the training ended: {process.stderr.read()[-3000:]}"
    (folder,) = checkpoints.iterdir()  # one training, named by its input fingerprint
    left = checkpoint_step(folder)
    assert left >= killed_at

    config = {"ops": {"agcl_encoder": {"config": EncoderTrainingRunConfig(epochs=EPOCHS, batch_size=8).model_dump()}}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = definitions.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, run_config=config, asset_selection=[dg.AssetKey("agcl_encoder")])
        assert result.success
        metadata = instance.get_latest_materialization_event(dg.AssetKey("agcl_encoder")).asset_materialization.metadata
    assert metadata["resumed_from_step"].value == left and metadata["status"].value == "trained"
    assert not folder.exists()  # published: the checkpoints are gone

    # The same training never stopped (the published folder removed, so nothing is cached or
    # resumed) publishes byte-identical files: the resumed run is the uninterrupted one.
    store = resources["artifact_store"].open()
    prefix = store.key_of(metadata["uri"].value)
    resumed = {entry["path"]: entry["sha256"] for entry in store.read_manifest(prefix)["files"]}
    store.delete_prefix(prefix + "/")
    store.delete_prefix(prefix + ".manifest.json")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = definitions.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, run_config=config, asset_selection=[dg.AssetKey("agcl_encoder")])
        assert result.success
        again = instance.get_latest_materialization_event(dg.AssetKey("agcl_encoder")).asset_materialization.metadata
    assert again["resumed_from_step"].value == 0
    assert {entry["path"]: entry["sha256"] for entry in store.read_manifest(prefix)["files"]} == resumed
