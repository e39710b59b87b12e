"""MLflow model flavours for the trained encoder and attribute generator.

Both are logged as pyfunc models whose artefacts are the project's own safetensors folders,
so ``mlflow.pyfunc.load_model("models:/afmrl-encoder@champion")`` gives a model that embeds
listings (and the generator one that writes attributes) wherever this package is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

ENCODER_MODEL_NAME = "afmrl-encoder"
GENERATOR_MODEL_NAME = "afmrl-attribute-generator"


def pip_requirements() -> list[str]:
    """The runtime pins of this package, without the orchestration-only ones."""
    requirements = importlib.metadata.requires("afmrl-dagster") or []
    return [r for r in requirements if "extra ==" not in r and not r.startswith("dagster")]


def _read_image(uri):
    from .encoders.towers import decode_image
    from .storage import read_uri_bytes

    return decode_image(read_uri_bytes(uri)) if isinstance(uri, str) and uri else None


class EncoderPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a frame with ``title``, optional ``attributes_json`` and ``image_uri``. Output: embeddings.
    Any encoder backend: the folder's ``encoder.json`` (or head files) says which."""

    def load_context(self, context):
        from .encoders.listing_encoder import load_encoder

        self.encoder = load_encoder(context.artifacts["head"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from .encoders.listing_encoder import ListingInputs

        attributes = model_input.get("attributes_json", pd.Series([None] * len(model_input)))
        uris = model_input.get("image_uri", pd.Series([None] * len(model_input)))
        inputs = ListingInputs(
            [str(i) for i in range(len(model_input))], list(model_input["title"]),
            [json.loads(attrs) if isinstance(attrs, str) and attrs else None for attrs in attributes],
            images=[_read_image(uri) for uri in uris],
        )
        return self.encoder.embed(inputs)


def __getattr__(name: str):
    # Generator models registered before the pyfunc moved to mlflow_models.generator import it
    # from here; it is looked up at run time so this module, which evaluation imports, does not
    # depend on training (the generator kinds).
    if name == "GeneratorPyfunc":
        import importlib

        return importlib.import_module("afmrl_dagster.mlflow_models.generator").GeneratorPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log_model(kind: str, local_dir: str, registered_model_name: str):
    """Log a trained folder as a pyfunc model in the active run and register a new version.

    The model is logged "from code" (the small modules in ``mlflow_models``), so the registry
    holds safetensors, JSON and source, never a pickled Python object.
    """
    artifact = {"encoder": "head", "generator": "generator"}[kind]
    return mlflow.pyfunc.log_model(
        name=kind,
        python_model=str(Path(__file__).parent / "mlflow_models" / f"{kind}.py"),
        artifacts={artifact: str(local_dir)},
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )


def download_model_artifact(model_uri: str, artifact: str, destination: str | Path) -> Path:
    """Fetch a registered pyfunc model and return the local folder of one of its artefacts
    (``head`` of an encoder, ``generator`` of a generator), as recorded in its MLmodel file."""
    from mlflow.models import Model

    root = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(destination)))
    artifacts = Model.load(str(root / "MLmodel")).flavors["python_function"].get("artifacts", {})
    if artifact not in artifacts:
        raise KeyError(f"{model_uri} has no artefact {artifact!r}; it has {sorted(artifacts)}")
    return root / artifacts[artifact]["path"]
