"""How a trained model leaves an asset: a registered MLflow version plus a content-addressed
folder in the artefact store whose manifest (written last) is what downstream assets receive."""

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dagster as dg

from ..resources.tracking import MlflowTracking, flat_metrics, mlflow_metric_name


def manifest_key(prefix: str) -> str:
    """Where a model folder's manifest (uri, MLflow ids, checks) is kept: beside the folder, written
    after the folder is stored and the version registered."""
    return f"{prefix}.manifest.json"


def cached_manifest(store, prefix: str) -> dict | None:
    """The manifest of a complete, registered artefact folder at ``prefix``, or None (never a
    half-written one). Folders published before the manifest moved beside them keep it inside,
    where it is read through the folder's checksums."""
    if not store.is_complete_directory(prefix):
        return None
    if store.exists(manifest_key(prefix)):
        return json.loads(store.get_bytes(manifest_key(prefix)))
    if any(entry["path"] == "manifest.json" for entry in store.read_manifest(prefix)["files"]):
        return json.loads(store.read_directory_file(prefix, "manifest.json"))
    return None


def cached_result(manifest: dict) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        value=manifest,
        metadata={"status": "cached", "uri": manifest["uri"], "model_version": manifest["model_version"]},
        check_results=check_results(manifest),
    )


@dataclass(frozen=True)
class ModelSlot:
    """Where a model asset's output lives for its current inputs: ``models/<asset>/<key>``,
    and the cached result when a complete output is already there."""

    key: str
    prefix: str
    cached: dg.MaterializeResult | None


def model_slot(store, asset: str, *inputs) -> ModelSlot:
    """The prologue every model asset shares: fingerprint the inputs and configuration, and
    return the stored output when one exists for them (``status: cached``)."""
    from afmrl_dagster.fingerprint import fingerprint

    key = fingerprint(asset, *inputs)
    prefix = f"models/{asset}/{key}"
    manifest = cached_manifest(store, prefix)
    return ModelSlot(key, prefix, cached_result(manifest) if manifest else None)


def model_check(passed: bool, blocking: bool, **metadata) -> dict:
    """One check outcome, stored in the manifest so a cached rerun reports the same result."""
    return {"passed": bool(passed), "blocking": blocking, "metadata": metadata}


def check_results(manifest: dict) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            check_name=name,
            passed=check["passed"],
            severity=dg.AssetCheckSeverity.ERROR if check["blocking"] else dg.AssetCheckSeverity.WARN,
            metadata=check["metadata"],
        )
        for name, check in manifest.get("checks", {}).items()
    ]


def weights_finite(module) -> bool:
    import torch

    return all(bool(torch.isfinite(parameter).all()) for parameter in module.parameters())


def publish_model(
    context: dg.AssetExecutionContext,
    kind: str,
    save: Callable[[Path], None],
    store,
    prefix: str,
    model_name: str,
    run,
    extra: dict,
) -> dict:
    """Save the model with ``save(folder)``, upload the folder to ``prefix``, then log and register
    it in MLflow, and last write its manifest (uri, MLflow ids, ``extra``) beside the folder and
    return it. In that order a registered version always has its artefact stored, and a run
    killed before the manifest is written leaves no cache hit."""
    import tempfile

    from afmrl_dagster.registry import log_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / kind
        save(folder)
        store.upload_directory(folder, prefix)
        info = log_model(kind, folder, model_name)
    manifest = {
        "uri": store.uri(prefix),
        "mlflow_run_id": run.info.run_id,
        "model_name": model_name,
        "model_version": str(info.registered_model_version),
        **extra,
    }
    store.put_bytes(manifest_key(prefix), json.dumps(manifest, indent=2).encode())
    return manifest


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, with the git commit when the code runs from a checkout (asked once per process)."""
    import importlib.metadata
    import subprocess

    version = importlib.metadata.version("afmrl-dagster")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return version
    return f"{version}+g{commit.stdout.strip()}" if commit.returncode == 0 and commit.stdout.strip() else version


def tag_model_version(
    mlflow_tracking: MlflowTracking, context: dg.AssetExecutionContext, manifest: dict, metrics: dict, catalog=None
) -> None:
    """Record where a version came from (Dagster run, catalog snapshot, code version, input
    fingerprint) and how it scored, on the version itself."""
    from afmrl_dagster.fingerprint import fingerprint

    client = mlflow_tracking.client()
    tags = {"dagster_run_id": context.run.run_id, "fingerprint": manifest.get("fingerprint", ""), "code_version": code_version(),
            **{mlflow_metric_name(k): f"{v:.6f}" for k, v in flat_metrics(metrics).items()}}
    if catalog is not None:  # the listings it learnt from or was scored on
        tags["catalog_snapshot"] = fingerprint("catalog", catalog)
        tags["catalog_listings"] = str(catalog.height)
    for key, value in tags.items():
        client.set_model_version_tag(manifest["model_name"], manifest["model_version"], key, value)


def model_metadata(manifest: dict, mlflow_tracking: MlflowTracking) -> dict:
    """What the UI shows for a freshly trained model."""
    return {
        "status": "trained",
        "uri": manifest["uri"],
        "mlflow_run_id": manifest["mlflow_run_id"],
        "mlflow_run": mlflow_tracking.run_link(manifest["mlflow_run_id"]),
        "model_version": manifest["model_version"],
    }


def png_metadata(data: bytes, caption: str) -> dg.MetadataValue:
    """A PNG shown in the asset's metadata (markdown with the picture inline)."""
    import base64

    return dg.MetadataValue.md(f"{caption}\n\n![{caption}](data:image/png;base64,{base64.b64encode(data).decode()})")
