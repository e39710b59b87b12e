"""MLflow "model from code" for the attribute generator: MLflow stores this file, not a pickle."""

import json

import mlflow
import pandas as pd

from afmrl_dagster.registry import _read_image


class GeneratorPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a frame with ``title`` and optional ``image_uri`` and ``description``. Output:
    attribute JSON texts. Any kind of generator: the folder's ``generator.json`` says which."""

    def load_context(self, context):
        from .training.generator_backends import CompactWriter, load_writer

        self.writer = load_writer(context.artifacts["generator"])
        self.featurizers = None
        if isinstance(self.writer, CompactWriter):  # it reads the frozen towers' features
            from .encoders.towers import ImageFeaturizer, TextFeaturizer

            towers = json.loads(open(f"{context.artifacts['generator']}/towers.json").read())
            self.featurizers = ImageFeaturizer(towers["image_tower"]), TextFeaturizer(towers["text_tower"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from .encoders.dual_tower import ListingFeatures
        from .encoders.listing_encoder import ListingInputs

        n = len(model_input)
        ids, titles = [str(i) for i in range(n)], [str(title or "") for title in model_input["title"]]
        images = [_read_image(uri) for uri in model_input.get("image_uri", pd.Series([None] * n))]
        descriptions = list(model_input.get("description", pd.Series([None] * n)))
        features = None
        if self.featurizers is not None:
            image, mask = self.featurizers[0].encode(images)
            features = ListingFeatures(ids, image, mask, self.featurizers[1].encode(titles))
        return self.writer.write(ListingInputs(ids, titles, features=features, images=images, descriptions=descriptions))


mlflow.models.set_model(GeneratorPyfunc())
