"""Tables as parquet and small manifests as JSON, one object per asset partition.

Binary artefacts (checkpoints, indexes, images) never pass through here: their assets
write them to content-addressed paths in the artefact store and hand downstream a JSON
manifest (uri, fingerprint, MLflow ids), which is what this IO manager stores.
"""


import json

import dagster as dg
import polars as pl

from .storage import ArtifactStore

UNPARTITIONED = "__all__"


class TableIOManager(dg.ConfigurableIOManager):
    """polars frames -> ``tables/<asset>/<partition>.parquet``; dicts -> ``manifests/<asset>/<partition>.json``."""

    store: ArtifactStore

    @staticmethod
    def _base(asset_key: dg.AssetKey, partition: str) -> str:
        return "/".join(asset_key.path) + f"/{partition}"

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        partition = context.partition_key if context.has_partition_key else UNPARTITIONED
        store = self.store.open()
        base = self._base(context.asset_key, partition)
        if isinstance(obj, pl.DataFrame):
            uri = store.write_parquet(f"tables/{base}.parquet", obj)
            context.add_output_metadata({"uri": uri, "dagster/row_count": obj.height})
        elif isinstance(obj, dict):
            uri = store.put_bytes(f"manifests/{base}.json", json.dumps(obj, indent=2, sort_keys=True).encode())
            context.add_output_metadata({"manifest_uri": uri})
        else:
            raise TypeError(f"{context.asset_key.to_user_string()}: TableIOManager stores polars DataFrames and dicts, got {type(obj).__name__}")

    def _load_one(self, asset_key: dg.AssetKey, partition: str):
        store = self.store.open()
        base = self._base(asset_key, partition)
        if store.exists(f"tables/{base}.parquet"):
            return store.read_parquet(f"tables/{base}.parquet")
        if store.exists(f"manifests/{base}.json"):
            return json.loads(store.get_bytes(f"manifests/{base}.json"))
        raise FileNotFoundError(
            f"no stored output for asset {asset_key.to_user_string()} partition {partition!r} in {store.root_uri}: "
            "materialise it first"
        )

    def load_input(self, context: dg.InputContext):
        asset_key = context.asset_key
        if not context.has_asset_partitions:
            return self._load_one(asset_key, UNPARTITIONED)
        partitions = list(context.asset_partition_keys)
        loaded = [self._load_one(asset_key, partition) for partition in partitions]
        if len(partitions) == 1 and context.has_partition_key:
            return loaded[0]
        if all(isinstance(item, pl.DataFrame) for item in loaded):
            return pl.concat(loaded, how="vertical") if loaded else pl.DataFrame()
        return dict(zip(partitions, loaded))
