"""MLflow tracking and registry, as a small project resource.

dagster-mlflow's resource is built on deprecated MLflow APIs; this one wraps the few calls
the pipeline makes and tags every run with the Dagster run id and partition, so a model
version leads back to the materialisation that produced it and vice versa.
"""


import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import dagster as dg
from pydantic import Field

from afmrl_dagster.promotion import CHAMPION_ALIAS, bound_registry_retries
from afmrl_dagster.settings import DEFAULT_TRACKING_URI


def mlflow_metric_name(name: str) -> str:
    """MLflow names allow no '@': ``recall@1`` -> ``recall_at_1``."""
    return name.replace("@", "_at_")


def flat_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """Numeric entries of ``values``, nested dicts flattened as ``outer.inner``; the rest dropped."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class MlflowTracking(dg.ConfigurableResource):
    """Where runs and registered models go. Point ``tracking_uri`` at your MLflow server."""

    tracking_uri: str = Field(default=DEFAULT_TRACKING_URI, description="MLflow tracking URI (server URL or sqlite:///path).")
    registry_uri: Optional[str] = Field(default=None, description="Model registry URI; None = the tracking URI.")
    experiment_name: str = Field(default="afmrl", description="Experiment every pipeline run logs into.")
    artifact_location: Optional[str] = Field(
        default=None,
        description="Artifact root for a new experiment (local folder or s3://...); None = beside a sqlite store, else the server's default.",
    )

    def _configure(self):
        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        bound_registry_retries()
        mlflow.set_tracking_uri(self.tracking_uri)
        if self.registry_uri:
            mlflow.set_registry_uri(self.registry_uri)
        if mlflow.get_experiment_by_name(self.experiment_name) is None:
            mlflow.create_experiment(self.experiment_name, artifact_location=self._default_artifact_location())
        mlflow.set_experiment(self.experiment_name)
        return mlflow

    def _default_artifact_location(self) -> Optional[str]:
        if self.artifact_location:
            return self.artifact_location
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (database.parent / "mlartifacts").resolve().as_uri()
        return None

    @contextlib.contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, params: dict | None = None) -> Iterator[object]:
        """An MLflow run tagged with the Dagster run, asset and partition."""
        mlflow = self._configure()
        tags = {
            "dagster.run_id": context.run.run_id,
            "dagster.asset": context.asset_key.to_user_string(),
        }
        if context.has_partition_key:
            tags["dagster.partition"] = context.partition_key
        with mlflow.start_run(run_name=run_name, tags=tags) as run:
            if params:
                mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
            yield run

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (nested dicts flattened; other values skipped)."""
        import mlflow

        mlflow.log_metrics({mlflow_metric_name(k): v for k, v in flat_metrics(metrics).items()}, step=step)

    def log_png(self, data: bytes, artifact_file: str) -> None:
        """Log PNG bytes (a plot, a picture of results) as an image of the active run."""
        import io

        import mlflow
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            mlflow.log_image(image.copy(), artifact_file)

    def run_link(self, run_id: str) -> dg.MetadataValue:
        """The run as asset metadata: a clickable link on a tracking server, the URI otherwise."""
        url = self.run_url(run_id)
        return dg.MetadataValue.url(url) if url.startswith(("http://", "https://")) else dg.MetadataValue.text(url)

    def run_url(self, run_id: str) -> str:
        """A link for the Dagster UI: the run page on a server, the run's URI on a local store."""
        if self.tracking_uri.startswith(("http://", "https://")):
            experiment = self._configure().get_experiment_by_name(self.experiment_name)
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
        return f"runs:/{run_id}"

    def client(self):
        from mlflow.tracking import MlflowClient

        self._configure()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def champion_version(self, model_name: str):
        """The model version under the ``champion`` alias; None only when the registry says there
        is none. A registry that cannot be read raises (``promotion.RegistryError``): the
        promotion fails closed."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from afmrl_dagster.promotion import RegistryError, alias_version

        bound = bound_registry_retries()
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)
        version = alias_version(client, model_name, CHAMPION_ALIAS)
        if version is None:
            return None
        try:
            return client.get_model_version(model_name, version)
        except MlflowException as error:
            raise RegistryError(f"cannot read {model_name} version {version} from {self.registry_uri or self.tracking_uri} "
                                f"({bound}): {error}") from error
