"""MLflow "model from code" for the attribute generator: MLflow stores this file, not a pickle."""

import mlflow

from afmrl_dagster.registry import GeneratorPyfunc

mlflow.models.set_model(GeneratorPyfunc())
