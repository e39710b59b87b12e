"""``afmrl evaluate``: score an encoder on a catalog under the protocol of its dataset.

Protocols (queries and galleries are sets of listings; a query's own listing never counts):

- ``grocery`` with ``--split``: the store photos the split list names query every listing
  *not* in it (other splits' photos and the iconic catalog images); also store photo ->
  catalog image only, kNN accuracy of the coarse class and k-means of the products.
- ``wdc_products`` with ``--split``: the offers of the named pair file(s) form the catalog;
  each offer queries all the others.
- ``amazon_google``: each record of a matched product queries the other table.
- everything else (``builtin``, ``abo``, ``parquet``, a dataset without ``--split``): every
  listing queries all the others.

Text is the bare title (``listing_text(title)``); images go through the frozen image tower.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .attributes.format import listing_text
from .catalog.builtin import generate_product_line
from .catalog.loaders import (
    GROCERY_SPLITS,
    CatalogLoadError,
    grocery_split_listing_ids,
    load_amazon_google,
    load_catalog,
    load_grocery,
    load_wdc_products,
    parse_catalog_spec,
)
from .catalog.source import CatalogSourceSpec, builtin_config, list_product_lines, load_product_line
from .encoders.dual_tower import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DualTowerConfig,
    DualTowerHead,
    ListingFeatures,
    embed_features,
    load_head,
    zero_shot_embeddings,
)
from .encoders.towers import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, ImageFeaturizer, TextFeaturizer, decode_image
from .retrieval.tasks import clustering_scores, combine_retrieval, cross_set_retrieval, knn_classification_accuracy
from .devices import resolve_device
from .storage import StorageError, read_uri_bytes

from .settings import DEFAULT_TRACKING_URI  # written once, in settings.py
ZERO_SHOT = "zero-shot"
CHAMPION = "champion"  # the encoder the serving record names
KNN_K = 5
GROCERY_ICONIC_PREFIX = "grocery-iconic-"  # listing ids of the loader's catalog images
AMAZON_GOOGLE_TABLES = {"amazon-": "amazon", "gp-": "google"}  # listing id prefix -> table
_MODEL_URI = re.compile(r"^(models|runs|mlflow-artifacts|s3|gs|wasbs|dbfs|https?|file):", re.IGNORECASE)
RETRIEVAL_COLUMNS = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "map@10": "mAP@10", "mrr": "MRR"}


class EvaluationError(ValueError):
    """A bad input of ``afmrl evaluate``; the message names it."""


def progress_line(message: str) -> None:
    print(f"afmrl evaluate: {message}", file=sys.stderr, flush=True)


# ---- what is evaluated ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalTask:
    """Queries ranked against one gallery (listing ids of the evaluation catalog)."""

    name: str
    description: str
    query_ids: tuple[str, ...]
    gallery_ids: tuple[str, ...]


@dataclass
class EvaluationPlan:
    """The listings to embed and the tasks scored on them."""

    protocol: str
    description: str
    listings: pl.DataFrame  # every listing a task uses, sorted by listing id
    query_ids: list[str]
    tasks: list[RetrievalTask]
    pooled: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> tasks pooled into it
    images: dict[str, bytes] = field(default_factory=dict)  # in-memory images (built-in catalog)


def resolve_splits(split: str, root: Path) -> list[Path]:
    """Comma-separated split files, each as given (from the working folder) or inside ``root``."""
    paths = []
    for name in (part.strip() for part in split.split(",")):
        candidates = [Path(name).expanduser(), root / name]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise EvaluationError(f"split file {name!r} not found (looked at {' and '.join(map(str, dict.fromkeys(candidates)))})")
        paths.append(found.absolute())
    return paths


def _limited(ids: Sequence[str], limit: int | None) -> list[str]:
    return sorted(ids)[:limit] if limit is not None else sorted(ids)


def make_plan(protocol, description, catalog, query_ids, tasks, pooled=None, images=None) -> EvaluationPlan:
    used = set(query_ids).union(*(task.gallery_ids for task in tasks))
    listings = catalog.filter(pl.col("listing_id").is_in(list(used))).sort("listing_id")
    tasks = [task for task in tasks if task.query_ids]
    return EvaluationPlan(protocol, description, listings, list(query_ids), tasks, pooled or {}, images or {})


def _all_against_all(catalog: pl.DataFrame, limit: int | None, protocol: str, images=None) -> EvaluationPlan:
    ids = catalog["listing_id"].to_list()
    queries = _limited(ids, limit)
    description = "every listing queries all the other listings of the catalog"
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(ids)))
    return make_plan(protocol, description, catalog, queries, [task], images=images)


def grocery_plan(root: Path, splits: list[Path], limit: int | None) -> EvaluationPlan:
    present = [root / name for name in GROCERY_SPLITS if (root / name).is_file()]
    catalog = load_grocery(root, split_files=list(dict.fromkeys([*present, *splits])))
    split_ids = set().union(*(grocery_split_listing_ids(root, path) for path in splits))
    ids = catalog["listing_id"].to_list()
    queries = _limited([i for i in ids if i in split_ids], limit)
    gallery = tuple(sorted(i for i in ids if i not in split_ids))
    iconic = tuple(i for i in gallery if i.startswith(GROCERY_ICONIC_PREFIX))
    names = ", ".join(path.name for path in splits)
    tasks = [
        RetrievalTask("identical_product", f"store photos of {names} query every listing not in {names} "
                      "(other splits' photos and the iconic catalog images)", tuple(queries), gallery),
        RetrievalTask("photo_to_catalog", f"store photos of {names} query the iconic catalog images only",
                      tuple(queries), iconic),
    ]
    return make_plan("grocery", tasks[0].description, catalog, queries, tasks)


def wdc_plan(root: Path, splits: list[Path], limit: int | None) -> EvaluationPlan:
    catalog = load_wdc_products(root, files=splits)
    ids = catalog["listing_id"].to_list()
    queries = _limited(ids, limit)
    description = f"the offers of {', '.join(p.name for p in splits)} form the catalog; each offer queries all the others"
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(ids)))
    return make_plan("wdc_products", description, catalog, queries, [task])


def amazon_google_plan(root: Path, limit: int | None) -> EvaluationPlan:
    catalog = load_amazon_google(root)
    sizes = catalog.group_by("product_id").len()
    matched = catalog.join(sizes.filter(pl.col("len") >= 2), on="product_id", how="semi")["listing_id"].to_list()
    queries = _limited(matched, limit)
    ids = catalog["listing_id"].to_list()

    def table_of(listing_id: str) -> str:
        return next(table for prefix, table in AMAZON_GOOGLE_TABLES.items() if listing_id.startswith(prefix))

    tasks = []
    for source, target in (("amazon", "google"), ("google", "amazon")):
        tasks.append(RetrievalTask(
            f"{source}_to_{target}", f"matched {source} records query the whole {target} table",
            tuple(i for i in queries if table_of(i) == source), tuple(sorted(i for i in ids if table_of(i) == target)),
        ))
    description = "each record of a matched product (2+ listings) queries the other table"
    pooled = {"identical_product": tuple(task.name for task in tasks if task.query_ids)}
    return make_plan("amazon_google", description, catalog, queries, tasks, pooled)


def builtin_or_parquet(spec: str) -> tuple[pl.DataFrame, dict[str, bytes]]:
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        config = builtin_config(spec)
        batches = [generate_product_line(line, config) for line in config.product_lines]
    else:
        batches = [load_product_line(spec, line) for line in list_product_lines(spec)]
    images = {key: value for batch in batches for key, value in batch.images.items()}
    return pl.concat([batch.listings for batch in batches]), images


def plan_evaluation(catalog_spec: str, split: str | None = None, limit: int | None = None) -> EvaluationPlan:
    """The protocol of ``catalog_spec`` (see the module docstring), queries capped at ``limit``
    (the first ``limit`` by listing id)."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {limit}")
    try:
        parsed = CatalogSourceSpec.parse(catalog_spec)
        if parsed.kind in ("builtin", "parquet"):
            if split:
                raise EvaluationError(f"catalog {catalog_spec!r} has no split protocol; leave out --split {split!r}")
            catalog, images = builtin_or_parquet(catalog_spec)
            plan = _all_against_all(catalog, limit, parsed.kind, images)
        else:
            name, root = parse_catalog_spec(catalog_spec)
            root = root.absolute()
            if not root.exists():
                raise EvaluationError(f"catalog folder {root} (from {catalog_spec!r}) does not exist")
            splits = resolve_splits(split, root) if split else None
            if name == "amazon_google":
                if splits:
                    raise EvaluationError(f"amazon_google has a fixed protocol; leave out --split {split!r}")
                plan = amazon_google_plan(root, limit)
            elif splits and name == "grocery":
                plan = grocery_plan(root, splits, limit)
            elif splits and name == "wdc_products":
                plan = wdc_plan(root, splits, limit)
            elif splits:
                raise EvaluationError(f"catalog {name!r} has no split protocol; leave out --split {split!r}")
            else:
                plan = _all_against_all(load_catalog(catalog_spec), limit, name)
    except CatalogLoadError as error:
        raise EvaluationError(f"cannot load catalog {catalog_spec!r}: {error}") from error
    except EvaluationError:
        raise
    except ValueError as error:  # a malformed spec
        raise EvaluationError(str(error)) from error
    if not plan.query_ids:
        raise EvaluationError(f"no queries: catalog {catalog_spec!r}" + (f" with split {split!r}" if split else "")
                              + " gives an empty query set")
    return plan


# ---- the encoder ------------------------------------------------------------------------------


@dataclass
class Encoder:
    """Zero-shot towers (``head`` None) or a trained head with the towers its config names."""

    name: str
    image_tower: str
    text_tower: str
    head: DualTowerHead | None = None


def _head_encoder(name: str, folder: Path) -> Encoder:
    missing = [file for file in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / file).is_file()]
    if missing:
        raise EvaluationError(f"encoder folder {folder} lacks {', '.join(missing)} (expected a folder written by save_head)")
    head = load_head(folder, device=resolve_device())
    return Encoder(name, head.config.image_tower, head.config.text_tower, head)


def _served_encoder() -> Encoder:
    """The encoder the serving record of the artefact store (``AFMRL_STORE``) names."""
    from .encoders.dual_tower import load_stored_head
    from .serving import ServingError, read_serving_record
    from .settings import Settings
    from .storage import open_store

    settings = Settings.from_env()
    try:
        store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
        record = read_serving_record(store)
        head = load_stored_head(store, record.encoder_uri)
    except (ServingError, StorageError) as error:
        raise EvaluationError(f"encoder 'champion': {error}") from error
    return Encoder(f"{record.encoder_model} version {record.encoder_version} (serving record)", head.config.image_tower, head.config.text_tower, head)


def resolve_encoder(spec: str) -> Encoder:
    """``zero-shot``, ``champion`` (what the serving record names), a folder written by ``save_head``, or an MLflow model URI
    (``models:/afmrl-encoder@champion``, ``runs:/<id>/encoder``; tracking URI from
    ``MLFLOW_TRACKING_URI``, default ``sqlite:///.afmrl/mlflow.db``)."""
    if spec == ZERO_SHOT:
        return Encoder(ZERO_SHOT, os.environ.get("AFMRL_IMAGE_TOWER", DEFAULT_IMAGE_MODEL),
                       os.environ.get("AFMRL_TEXT_TOWER", DEFAULT_TEXT_MODEL))
    if spec == CHAMPION:
        return _served_encoder()
    if Path(spec).expanduser().is_dir():
        return _head_encoder(spec, Path(spec).expanduser())
    if not _MODEL_URI.match(spec):
        raise EvaluationError(f"encoder {spec!r} is not 'zero-shot', an existing folder, or an MLflow model URI (models:/..., runs:/...)")
    import mlflow  # only here: zero-shot and folder encoders never need MLflow

    from .registry import download_model_artifact

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="afmrl-encoder-") as scratch:
        try:
            folder = download_model_artifact(spec, "head", scratch)
        except Exception as error:  # MLflow raises many types for an unknown name, alias or run
            raise EvaluationError(f"cannot fetch encoder {spec!r} from MLflow at {tracking_uri}: {error}") from error
        return _head_encoder(spec, folder)


def _image_features(encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes], batch_size: int = 64):
    """Image-tower features and mask; the tower is not even loaded for a text-only catalog."""
    ids, uris = listings["listing_id"].to_list(), listings["image_uri"].to_list()
    wanted = [i for i, (lid, uri) in enumerate(zip(ids, uris)) if lid in images or uri]
    if not wanted:
        dim = encoder.head.config.image_dim if encoder.head else DualTowerConfig().image_dim
        return np.zeros((len(ids), dim), np.float32), np.zeros(len(ids), bool), []
    featurizer = ImageFeaturizer(encoder.image_tower, device=resolve_device())
    features = np.zeros((len(ids), featurizer.dim), np.float32)
    mask = np.zeros(len(ids), bool)
    unreadable = []
    for start in range(0, len(wanted), batch_size):
        rows, decoded = [], []
        for i in wanted[start : start + batch_size]:
            try:
                data = images[ids[i]] if ids[i] in images else read_uri_bytes(uris[i])
            except StorageError as error:
                raise EvaluationError(f"image of listing {ids[i]!r} cannot be read: {error}") from error
            try:
                decoded.append(decode_image(data))
                rows.append(i)
            except ValueError:
                unreadable.append(ids[i])
        if decoded:
            features[rows], mask[rows] = featurizer.encode(decoded)
        progress_line(f"image features {min(start + batch_size, len(wanted))}/{len(wanted)}")
    if unreadable:
        progress_line(f"{len(unreadable)} image(s) cannot be decoded, scored as text-only, e.g. {unreadable[:3]}")
    return features, mask, unreadable


@dataclass
class EmbeddedListings:
    """Embeddings ``[N, dim]`` of a plan's listings (in order) and how many had a usable image."""

    embeddings: np.ndarray
    with_image: int
    unreadable_images: list[str]


def tower_features(
    encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes] | None = None, text_batch: int = 512
) -> tuple[ListingFeatures, list[str]]:
    """Frozen-tower features of ``listings`` (image, and the bare title as text) and the ids
    whose image could not be decoded."""
    image, mask, unreadable = _image_features(encoder, listings, images or {})
    texts = [listing_text(title) for title in listings["title"].to_list()]
    featurizer = TextFeaturizer(encoder.text_tower, device=resolve_device())
    chunks = []
    for start in range(0, len(texts), text_batch):
        chunks.append(featurizer.encode(texts[start : start + text_batch]))
        progress_line(f"text features {min(start + text_batch, len(texts))}/{len(texts)}")
    text = np.concatenate(chunks) if chunks else np.zeros((0, featurizer.dim), np.float32)
    return ListingFeatures(listings["listing_id"].to_list(), image, mask, text), unreadable


def embed_listings(encoder: Encoder, listings: pl.DataFrame, images: dict[str, bytes] | None = None, text_batch: int = 512) -> EmbeddedListings:
    """Embed ``listings``: frozen towers on image and title, then the head (or the zero-shot fusion)."""
    features, unreadable = tower_features(encoder, listings, images, text_batch)
    if encoder.head is None:
        embeddings = zero_shot_embeddings(features)
    else:
        embeddings = embed_features(encoder.head, features, device=resolve_device())
    return EmbeddedListings(embeddings, int(features.image_mask.sum()), unreadable)


# ---- scoring and reporting --------------------------------------------------------------------


def score_plan(plan: EvaluationPlan, embeddings: np.ndarray, query_embeddings: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Retrieval metrics per task (and pooled), kNN accuracy of the product line over the
    queries when the catalog has several lines, k-means of the queries' products when they
    name several.

    ``embeddings`` has one row per listing of ``plan.listings``. ``query_embeddings`` (same
    rows) embeds the listings when they act as queries in the retrieval tasks and the
    clustering, e.g. with attributes another generator wrote; by default a query is embedded
    as in the gallery. kNN of the product line reads the gallery embeddings."""
    queries = embeddings if query_embeddings is None else query_embeddings
    if queries.shape != embeddings.shape:
        raise ValueError(f"query embeddings {queries.shape} and gallery embeddings {embeddings.shape} differ in shape")
    ids = plan.listings["listing_id"].to_list()
    row = {listing_id: i for i, listing_id in enumerate(ids)}
    products = plan.listings["product_id"].to_list()
    metrics: dict[str, dict[str, float]] = {}
    for task in plan.tasks:
        q = [row[i] for i in task.query_ids]
        g = [row[i] for i in task.gallery_ids]
        metrics[task.name] = cross_set_retrieval(
            queries[q], [products[i] for i in q], embeddings[g], [products[i] for i in g],
            query_listing_ids=list(task.query_ids), gallery_listing_ids=list(task.gallery_ids),
        )
    for name, parts in plan.pooled.items():
        metrics[name] = combine_retrieval([metrics[part] for part in parts])
    query_rows = np.array([row[i] for i in plan.query_ids])
    lines = plan.listings["product_line"].to_list()
    if len(set(lines)) > 1:
        mask = np.zeros(len(ids), bool)
        mask[query_rows] = True
        accuracy = knn_classification_accuracy(embeddings, lines, k=KNN_K, query_mask=mask)
        metrics["knn_product_line"] = {"accuracy": accuracy, "k": float(KNN_K), "num_classes": float(len(set(lines)))}
    query_products = [products[i] for i in query_rows]
    if len(set(query_products)) > 1:
        metrics["clustering_product_id"] = clustering_scores(queries[query_rows], query_products, seed=0)
    return metrics


def report_markdown(report: dict) -> str:
    """Retrieval metrics as one table (a row per task) and the other tasks as a second one."""
    header = "| task | queries | " + " | ".join(RETRIEVAL_COLUMNS.values()) + " |"
    lines = [
        f"Encoder `{report['encoder']}` on `{report['catalog']}`" + (f" (split `{report['split']}`)" if report["split"] else "")
        + f": {report['protocol']['description']}.",
        "",
        header,
        "|---|---|" + "---|" * len(RETRIEVAL_COLUMNS),
    ]
    others = []
    for name, values in report["metrics"].items():
        if "recall@1" in values:
            lines.append(f"| {name} | {int(values['num_queries'])} | " + " | ".join(f"{values[c]:.3f}" for c in RETRIEVAL_COLUMNS) + " |")
        else:
            others.extend(f"| {name} | {key} | {value:.3f} |" for key, value in values.items()
                          if key not in ("k", "num_classes", "num_clusters"))
    if others:
        lines += ["", "| task | metric | value |", "|---|---|---|", *others]
    return "\n".join(lines) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_evaluate(
    catalog: str,
    encoder: str,
    out: str | os.PathLike,
    split: str | None = None,
    markdown: str | os.PathLike | None = None,
    limit: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Plan, embed, score and write the report (JSON to ``out``, optionally markdown); returns it."""
    resolved = resolve_encoder(encoder)  # before loading data: a bad encoder fails fast
    plan = plan_evaluation(catalog, split, limit)
    progress_line(f"{plan.protocol}: {len(plan.query_ids)} queries, {len(plan.listings)} listings to embed")
    embedded = embed_listings(resolved, plan.listings, plan.images)
    metrics = score_plan(plan, embedded.embeddings)
    iconic = sum(i.startswith(GROCERY_ICONIC_PREFIX) for i in plan.listings["listing_id"].to_list())
    report = {
        "catalog": catalog,
        "split": split,
        "encoder": encoder,
        "encoder_resolved": resolved.name,
        "towers": {"image": resolved.image_tower, "text": resolved.text_tower},
        "limit": limit,
        "protocol": {
            "name": plan.protocol,
            "description": plan.description,
            "tasks": {task.name: task.description for task in plan.tasks},
        },
        "counts": {
            "listings_embedded": len(plan.listings),
            "queries": len(plan.query_ids),
            "products": plan.listings["product_id"].n_unique(),
            "product_lines": plan.listings["product_line"].n_unique(),
            "listings_with_image": embedded.with_image,
            "catalog_images": iconic,
            "images_unreadable": len(embedded.unreadable_images),
            **{f"gallery_{task.name}": len(task.gallery_ids) for task in plan.tasks},
        },
        "metrics": metrics,
    }
    write_atomic(out, json.dumps(report, indent=2, sort_keys=False) + "\n")
    table = report_markdown(report)
    if markdown:
        write_atomic(markdown, table)
    echo(table)
    return report
