"""What is evaluated on a catalog: the protocol of its dataset, as queries ranked against galleries.

Protocols (queries and galleries are sets of listings; a query's own listing never counts):

- ``grocery`` with a split: the store photos the split list names query every listing *not*
  in it (other splits' photos and the iconic catalog images); also store photo -> catalog
  image only.
- ``wdc_products`` with a split: the offers of the named pair file(s) form the catalog; each
  offer queries all the others.
- ``wdc_products`` with ``unseen:`` and pair file(s) (the training offers): the pipeline's test
  share of their products (:class:`~afmrl_dagster.evaluation.splits.HeldOutSplit`: 30%, seed 0)
  is held out; the offers of those products form the catalog, each querying all the others,
  and an encoder scored here may train on the offers of the other products only.
- ``amazon_google``: each record of a matched product queries the other table.
- everything else (``builtin``, ``abo``, ``parquet``, a dataset without a split): every
  listing queries all the others.

Every plan says which products its queries are (``products``): a *closed set* (new photos or
offers of products the dataset's training split holds: grocery's ``val.txt``, WDC's ``000un``
gold standard), *unseen products* (products held out of training), or *not split* (the
protocol holds nothing out: the figure is of unseen products only for an encoder that never
trained on the catalog, such as the zero-shot towers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import polars as pl

from ..catalog.builtin import generate_product_line
from ..catalog.loaders import (
    GROCERY_SPLITS,
    CatalogLoadError,
    grocery_split_listing_ids,
    load_amazon_google,
    load_catalog,
    load_grocery,
    load_wdc_products,
    parse_catalog_spec,
)
from ..catalog.schema import CatalogValidationError, validate_catalog
from ..catalog.source import CatalogSourceSpec, builtin_config, catalog_roots, list_product_lines, load_product_line
from ..storage import UriRoots
from .splits import HeldOutSplit

CLOSED_SET = "closed set"
UNSEEN_PRODUCTS = "unseen products"
NOT_SPLIT = "not split"
PRODUCT_LABELS = (CLOSED_SET, UNSEEN_PRODUCTS, NOT_SPLIT)
GROCERY_ICONIC_PREFIX = "grocery-iconic-"  # listing ids of the loader's catalog images
AMAZON_GOOGLE_TABLES = {"amazon-": "amazon", "gp-": "google"}  # listing id prefix -> table
WDC_CLOSED_SET_MARK = "000un"  # WDC Products files of the release whose gold standard has 0% unseen products
UNSEEN_SPLIT = "unseen:"  # --split unseen:FILE[,FILE...]: products held out of those (training) offers


class EvaluationError(ValueError):
    """A bad input of an evaluation (catalog, split, limit or encoder); the message names it."""


@dataclass(frozen=True)
class RetrievalTask:
    """Queries ranked against one gallery (listing ids of the evaluation catalog)."""

    name: str
    description: str
    query_ids: tuple[str, ...]
    gallery_ids: tuple[str, ...]


@dataclass
class EvaluationPlan:
    """The listings to embed, the tasks scored on them, and which products the queries are
    (``products``, one of :data:`PRODUCT_LABELS`, said in full by ``products_note``)."""

    protocol: str
    description: str
    listings: pl.DataFrame  # every listing a task uses, sorted by listing id
    query_ids: list[str]
    tasks: list[RetrievalTask]
    products: str
    products_note: str
    pooled: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> tasks pooled into it
    images: dict[str, bytes] = field(default_factory=dict)  # in-memory images (built-in catalog)

    def __post_init__(self) -> None:
        if self.products not in PRODUCT_LABELS:
            raise ValueError(f"products must be one of {PRODUCT_LABELS}, got {self.products!r}")


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


def make_plan(protocol, description, catalog, query_ids, tasks, pooled=None, images=None, *, products: str, products_note: str) -> EvaluationPlan:
    """The plan of ``tasks`` over ``catalog``: only the listings a task uses are kept; tasks
    without queries are dropped. ``products``: which products the queries are (:data:`PRODUCT_LABELS`)."""
    used = set(query_ids).union(*(task.gallery_ids for task in tasks))
    listings = catalog.filter(pl.col("listing_id").is_in(list(used))).sort("listing_id")
    tasks = [task for task in tasks if task.query_ids]
    return EvaluationPlan(protocol, description, listings, list(query_ids), tasks, products, products_note, pooled or {}, images or {})


def _all_against_all(catalog: pl.DataFrame, limit: int | None, protocol: str, images=None) -> EvaluationPlan:
    ids = catalog["listing_id"].to_list()
    queries = _limited(ids, limit)
    description = "every listing queries all the other listings of the catalog"
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(ids)))
    return make_plan(protocol, description, catalog, queries, [task], images=images, products=NOT_SPLIT,
                     products_note="the whole catalog, nothing held out: unseen products only for an encoder that never "
                     "trained on this catalog (zero-shot, or trained on another), a closed set for one that did")


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
    return make_plan("grocery", tasks[0].description, catalog, queries, tasks, products=CLOSED_SET,
                     products_note="new photos of trained products: every split of the dataset photographs the same "
                     "products, and the catalog images show them too")


def wdc_plan(root: Path, splits: list[Path], limit: int | None) -> EvaluationPlan:
    catalog = load_wdc_products(root, files=splits)
    ids = catalog["listing_id"].to_list()
    queries = _limited(ids, limit)
    description = f"the offers of {', '.join(p.name for p in splits)} form the catalog; each offer queries all the others"
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(ids)))
    if all(WDC_CLOSED_SET_MARK in path.name for path in splits):
        products, note = CLOSED_SET, ("new offers of trained products: in the 000un release every product of the gold standard "
                                      "has offers in the training pair files")
    else:
        products, note = NOT_SPLIT, "the file names do not say whether their products have training offers"
    return make_plan("wdc_products", description, catalog, queries, [task], products=products, products_note=note)


def unseen_products_split(catalog: pl.DataFrame, split: HeldOutSplit | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(held_out, training)``: the listings of ``split``'s test products (default: the
    pipeline's, 30% of the products, seed 0) and those of every other product, so that no
    product has listings on both sides."""
    test = pl.Series((split or HeldOutSplit()).mask(catalog, "test"))
    return catalog.filter(test), catalog.filter(~test)


def wdc_unseen_plan(root: Path, files: list[Path], limit: int | None, split: HeldOutSplit | None = None) -> EvaluationPlan:
    """Products held out of the training offers of ``files`` (:func:`unseen_products_split`): their offers query each other."""
    split = split or HeldOutSplit()
    held_out, training = unseen_products_split(load_wdc_products(root, files=files), split)
    ids = held_out["listing_id"].to_list()
    queries = _limited(ids, limit)
    names = ", ".join(path.name for path in files)
    held, rest = held_out["product_id"].n_unique(), training["product_id"].n_unique()
    description = (f"the offers of {held} products held out of {names} ({split.fraction:.0%} of the products, seed {split.seed}) "
                   "form the catalog; each offer queries all the others")
    task = RetrievalTask("identical_product", description, tuple(queries), tuple(sorted(ids)))
    note = (f"products held out of training: an encoder scored here trains on the offers of the other {rest} products of "
            f"{names} only (the other files of the release hold offers of every product)")
    return make_plan("wdc_products", description, held_out, queries, [task], products=UNSEEN_PRODUCTS, products_note=note)


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
    return make_plan("amazon_google", description, catalog, queries, tasks, pooled, products=NOT_SPLIT,
                     products_note="every matched product of the benchmark, nothing held out (it has no training split): "
                     "unseen products only for an encoder that never trained on Amazon-Google")


def builtin_or_parquet(spec: str) -> tuple[pl.DataFrame, dict[str, bytes]]:
    """Every product line of a ``builtin[:...]`` or ``parquet:...`` source, and its in-memory images."""
    parsed = CatalogSourceSpec.parse(spec)
    if parsed.kind == "builtin":
        config = builtin_config(spec)
        batches = [generate_product_line(line, config) for line in config.product_lines]
    else:
        lines = list_product_lines(spec)
        if not lines:
            raise EvaluationError(f"catalog {spec!r} holds no product line: no <line>.parquet file at {parsed.location}")
        batches = []
        for line in lines:
            try:
                batches.append(load_product_line(spec, line))
            except CatalogValidationError:
                raise
            except (OSError, pl.exceptions.PolarsError) as error:
                raise EvaluationError(f"catalog {spec!r}: {line}.parquet cannot be read as a parquet table: {error}") from error
    images = {key: value for batch in batches for key, value in batch.images.items()}
    catalog = pl.concat([batch.listings for batch in batches])
    report = validate_catalog(catalog)
    if report.bad_rows:  # the rules raw_catalog applies; a score over broken rows would mislead
        raise EvaluationError(f"catalog {spec!r}: {report.bad_rows} of {report.total_rows} listings fail validation:\n{report.describe()}")
    return catalog, images


def confine_images(plan: EvaluationPlan, roots: UriRoots) -> None:
    """:class:`EvaluationError` naming the first listings whose ``image_uri`` lies outside ``roots``
    (in-memory images of the built-in catalog are not read from a URI)."""
    outside = []
    for listing_id, uri in plan.listings.select("listing_id", "image_uri").iter_rows():
        if uri and listing_id not in plan.images and (problem := roots.problem(uri)):
            outside.append(f"listing {listing_id!r}, field image_uri: {problem}")
    if outside:
        more = f" (and {len(outside) - 3} more)" if len(outside) > 3 else ""
        raise EvaluationError("; ".join(outside[:3]) + more)


def plan_evaluation(catalog_spec: str, split: str | None = None, limit: int | None = None,
                    image_roots: list[str] | None = None) -> EvaluationPlan:
    """The protocol of ``catalog_spec`` (see the module docstring), queries capped at ``limit``
    (the first ``limit`` by listing id). Every image URI it will read must lie under the
    catalog's own location or one of ``image_roots`` (:class:`~afmrl_dagster.storage.UriRoots`)."""
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
            unseen = bool(split) and split.startswith(UNSEEN_SPLIT)
            files = split[len(UNSEEN_SPLIT):] if unseen else split
            if unseen and (name != "wdc_products" or not files.strip()):
                raise EvaluationError(f"--split {split!r}: the unseen-product protocol takes wdc_products training pair "
                                      "file(s), as --split unseen:FILE[,FILE...]")
            splits = resolve_splits(files, root) if files else None
            if name == "amazon_google":
                if splits:
                    raise EvaluationError(f"amazon_google has a fixed protocol; leave out --split {split!r}")
                plan = amazon_google_plan(root, limit)
            elif splits and name == "grocery":
                plan = grocery_plan(root, splits, limit)
            elif splits and name == "wdc_products":
                plan = wdc_unseen_plan(root, splits, limit) if unseen else wdc_plan(root, splits, limit)
            elif splits:
                raise EvaluationError(f"catalog {name!r} has no split protocol; leave out --split {split!r}")
            else:
                plan = _all_against_all(load_catalog(catalog_spec), limit, name)
    except (CatalogLoadError, CatalogValidationError) as error:
        raise EvaluationError(f"cannot load catalog {catalog_spec!r}: {error}") from error
    except EvaluationError:
        raise
    except ValueError as error:  # a malformed spec
        raise EvaluationError(str(error)) from error
    confine_images(plan, UriRoots([*catalog_roots(catalog_spec), *(image_roots or [])]))
    if not plan.query_ids:
        raise EvaluationError(f"no queries: catalog {catalog_spec!r}" + (f" with split {split!r}" if split else "")
                              + " gives an empty query set")
    return plan
