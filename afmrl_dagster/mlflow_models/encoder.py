"""MLflow "model from code" for the encoder: MLflow stores this file, not a pickle."""

import mlflow

from afmrl_dagster.registry import EncoderPyfunc

mlflow.models.set_model(EncoderPyfunc())
