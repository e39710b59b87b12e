"""Frozen pretrained-tower features of every listing, computed once per product line."""


import json

import dagster as dg
import polars as pl

from afmrl_dagster.features import compute_listing_features
from afmrl_dagster.fingerprint import fingerprint

from ..resources.compute import GPU_OP_TAGS, GPU_POOL, TorchCompute
from ..resources.models import FeatureTowers
from ..resources.storage import ArtifactStore
from .conditions import FOLLOWS_INPUTS
from .partitions import product_lines


@dg.asset(automation_condition=FOLLOWS_INPUTS, partitions_def=product_lines, group_name="features", kinds={"pytorch", "parquet"},
          pool=GPU_POOL, op_tags=GPU_OP_TAGS)
def listing_features(
    context: dg.AssetExecutionContext,
    raw_catalog: pl.DataFrame,
    feature_towers: FeatureTowers,
    torch_compute: TorchCompute,
    artifact_store: ArtifactStore,
):
    """Image-tower features and bare-title text features per listing (the towers stay frozen).

    Reused by the attribute generator, the encoder and the evaluation; recomputed only when
    the line's listings or the towers change.
    """
    store = artifact_store.open()
    key = fingerprint("listing_features", raw_catalog.select("listing_id", "title", "image_uri"), feature_towers.image_model, feature_towers.text_model)
    cache_key = f"cache/listing_features/{context.partition_key}/{key}.parquet"
    if store.exists(cache_key):
        return dg.MaterializeResult(value=store.read_parquet(cache_key), metadata={"status": "cached", "fingerprint": key})
    device = torch_compute.torch_device()
    features = compute_listing_features(
        raw_catalog,
        feature_towers.image_featurizer(device),
        feature_towers.text_featurizer(device),
        artifact_store.read_uri,
        progress=lambda done, total: context.log.info(f"image features: {done}/{total} listings"),
    )
    store.write_parquet(cache_key, features)
    return dg.MaterializeResult(
        value=features,
        metadata={
            "status": "computed",
            "fingerprint": key,
            "dagster/row_count": features.height,
            "towers": json.dumps(feature_towers.as_json()),
            "device": device,
        },
    )
