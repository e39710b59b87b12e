"""The serving record: the one description of what answers queries.

It names the champion encoder version and where its weights are, the index built with that
encoder, the generator that writes query attributes (the same one that wrote the gallery's),
the catalog snapshot the index covers, and the evaluation set the promotion was decided on.
``afmrl search``, ``afmrl evaluate --encoder champion`` and the benchmarks read only this
record and open every artefact by the URI it holds; nothing else about the store's layout
is part of the contract. The record is written atomically (one object PUT / rename), so a
reader sees the previous record or the new one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields

from .storage import ObjectStore

SERVING_RECORD_KEY = "serving/record.json"


class ServingError(RuntimeError):
    """No usable serving record; the message says what to do."""


@dataclass(frozen=True)
class ServingRecord:
    encoder_model: str  # registered model name
    encoder_version: str  # registered version under the ``champion`` alias
    encoder_uri: str  # store URI of the encoder folder (head weights + config)
    index_uri: str  # store URI of the index folder (listings.parquet, and index.faiss or the product lines' shards)
    index_rows: int
    generator_uri: str  # store URI of the generator folder that writes query (and gallery) attributes
    generator_version: str | None  # its registered version, when registered
    catalog_snapshot: str  # fingerprint of the listings the index covers
    evaluation_set: str  # fingerprint of the validation queries the promotion compared on
    decision: str  # why this encoder serves
    # Weight of the visual reader's text fused into the search of a query photo (chosen on validation
    # by retrieval_evaluation; 0: not fused). Records written before it existed read as 0.
    reader_fusion_weight: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "the serving record") -> ServingRecord:
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise ServingError(f"{where} is not JSON: {error}") from error
        names = {field.name for field in fields(cls)}
        required = {field.name for field in fields(cls) if field.default is MISSING}
        missing = sorted(required - set(raw)) if isinstance(raw, dict) else sorted(required)
        if missing:
            raise ServingError(f"{where} lacks {', '.join(missing)}: rematerialise serving_record")
        return cls(**{name: raw[name] for name in names if name in raw})


def write_serving_record(store: ObjectStore, record: ServingRecord) -> str:
    """Publish ``record`` (atomically replacing the previous one); return its URI."""
    return store.put_bytes(SERVING_RECORD_KEY, record.to_json())


def read_serving_record(store: ObjectStore) -> ServingRecord:
    """The current serving record of ``store``; ServingError when none was published yet."""
    if not store.exists(SERVING_RECORD_KEY):
        raise ServingError(f"{store.uri(SERVING_RECORD_KEY)} is missing: no encoder is served yet; materialise the pipeline first (make demo)")
    return ServingRecord.from_json(store.get_bytes(SERVING_RECORD_KEY), where=store.uri(SERVING_RECORD_KEY))


# ---- the registry side: what a promoted version carries so that it can be served -----------------

# Tags the promotion writes on a version before it becomes champion; the record is built from them.
SERVING_TAG_PREFIX = "serving."
_TAGGED_FIELDS = ("encoder_uri", "index_uri", "index_rows", "generator_uri", "generator_version", "catalog_snapshot", "evaluation_set")
READER_FUSION_TAG = f"{SERVING_TAG_PREFIX}reader_fusion_weight"  # set by the evaluation that chose it; absent: 0


def reader_fusion_tags(weight: float) -> dict[str, str]:
    """The tag that makes a version serve with the visual reader fused at ``weight`` (0: not fused)."""
    return {READER_FUSION_TAG: repr(float(weight))}


def serving_tags(encoder_uri: str, index: dict, generator_uri: str, generator_version: str | None, evaluation_set: str) -> dict[str, str]:
    """The tags that make a model version servable: its weights, the index built with it (a
    published index manifest: ``uri``, ``rows``, ``catalog_snapshot``) and the generator that
    wrote the index's attributes."""
    values = {"encoder_uri": encoder_uri, "index_uri": index["uri"], "index_rows": index["rows"], "generator_uri": generator_uri,
              "generator_version": generator_version or "", "catalog_snapshot": index["catalog_snapshot"], "evaluation_set": evaluation_set}
    return {f"{SERVING_TAG_PREFIX}{name}": str(value) for name, value in values.items()}


def record_from_version(model_name: str, version) -> ServingRecord:
    """The serving record of a registered model version (an MLflow ``ModelVersion``) from its serving tags."""
    tags = version.tags or {}
    missing = [name for name in _TAGGED_FIELDS if f"{SERVING_TAG_PREFIX}{name}" not in tags]
    if missing:
        raise ServingError(f"{model_name} version {version.version} carries no serving tags ({', '.join(missing)}): it was never "
                           "promoted through encoder_promotion, so no index is known for it; promote a new version")
    value = {name: tags[f"{SERVING_TAG_PREFIX}{name}"] for name in _TAGGED_FIELDS}
    return ServingRecord(
        encoder_model=model_name, encoder_version=str(version.version), encoder_uri=value["encoder_uri"], index_uri=value["index_uri"],
        index_rows=int(value["index_rows"]), generator_uri=value["generator_uri"], generator_version=value["generator_version"] or None,
        catalog_snapshot=value["catalog_snapshot"], evaluation_set=value["evaluation_set"], decision=tags.get("promotion", ""),
        reader_fusion_weight=_weight(tags.get(READER_FUSION_TAG, "0"), model_name, version.version),
    )


def _weight(text: str, model_name: str, version) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = -1.0
    if not weight >= 0.0:
        raise ServingError(f"{model_name} version {version}: tag {READER_FUSION_TAG} is {text!r}, not a weight >= 0")
    return weight


def publish_champion_record(client, store: ObjectStore, model_name: str) -> tuple[ServingRecord, str]:
    """Publish the serving record of ``model_name``'s current ``champion`` (from its serving
    tags); the promotion and ``afmrl rollback`` both end here. Returns (record, its URI)."""
    from .promotion import CHAMPION_ALIAS

    version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    record = record_from_version(model_name, version)
    return record, write_serving_record(store, record)
