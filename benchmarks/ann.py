"""Approximate search at catalog scale: HNSW and IVF-PQ against exact search, in one run.

The gallery is ``--size`` clustered unit vectors of ``--dim`` dimensions shaped like a
catalog's embeddings (product lines, products in a line, listings of a product: each a
random direction plus noise around its parent), never i.i.d. random vectors, whose
neighbours are all equidistant. Queries are new listings of gallery products. For each index:
build time, memory per vector (the serialised index over the vector count), queries/s on a
batch of ``--queries`` (faiss's threads: every core), recall@10 against exact search, and
the queries/s ratio over exact search. Then a new product line of ``--line-size`` listings
arrives: its vectors added to the existing index against a full rebuild over the grown
gallery (IVF-PQ adds through its trained template, retrained in the rebuild), with the drift
of the new line against the template.

    python benchmarks/ann.py [--size 1000000] [--dim 256] [--line-size 100000] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np

from afmrl_dagster.readme import publish_result
from afmrl_dagster.retrieval.index import TRAINING_SAMPLE, IndexConfig, build_index, index_bytes, search
from afmrl_dagster.retrieval.index_template import IndexTemplate

BLOCK = "ann-benchmark"
LISTINGS_PER_PRODUCT = 10
PRODUCTS_PER_LINE = 1000
TARGET_RECALL = 0.95
TARGET_RATIO = 20.0


def log(message: str) -> None:
    print(f"ann: {message}", file=sys.stderr, flush=True)


def _unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def catalog_vectors(lines: int, products_per_line: int, dim: int, rng: np.random.Generator,
                    product_spread: float = 0.9, listing_spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Listing vectors of ``lines`` new product lines (``LISTINGS_PER_PRODUCT`` a product) and
    their product centres, built a line at a time."""
    listings, products = [], []
    for _ in range(lines):
        line = _unit(rng.standard_normal((1, dim)))
        centre = _unit(line + product_spread * _unit(rng.standard_normal((products_per_line, dim))))
        products.append(centre)
        noise = _unit(rng.standard_normal((products_per_line * LISTINGS_PER_PRODUCT, dim)))
        listings.append(_unit(np.repeat(centre, LISTINGS_PER_PRODUCT, axis=0) + listing_spread * noise))
    return np.concatenate(listings), np.concatenate(products)


def new_listings(products: np.ndarray, count: int, rng: np.random.Generator, listing_spread: float = 0.5) -> np.ndarray:
    """``count`` new listings of randomly drawn ``products`` (queries the gallery has not seen)."""
    chosen = products[rng.integers(len(products), size=count)]
    return _unit(chosen + listing_spread * _unit(rng.standard_normal(chosen.shape)))


def timed(work):
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="gallery vectors (a multiple of 10,000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--line-size", type=int, default=100_000, help="listings of the new product line (a multiple of 10)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw-ef", default="64,128,256", help="HNSW efSearch values measured")
    parser.add_argument("--nprobe", default="8,16,32", help="IVF-PQ nprobe values measured")
    parser.add_argument("--refine-factor", type=int, default=IndexConfig.refine_factor, help="IVF-PQ candidates re-ranked, times k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-results", metavar="FILE", help=f"replace the {BLOCK} block of this file with the tables")
    args = parser.parse_args(argv)
    unit = LISTINGS_PER_PRODUCT * PRODUCTS_PER_LINE
    if args.size < unit or args.size % unit or args.line_size < LISTINGS_PER_PRODUCT or args.line_size % LISTINGS_PER_PRODUCT:
        parser.error(f"--size must be a positive multiple of {unit}, --line-size of {LISTINGS_PER_PRODUCT}")
    rng = np.random.default_rng(args.seed)
    started_all = time.perf_counter()
    gallery, products = catalog_vectors(args.size // unit, PRODUCTS_PER_LINE, args.dim, rng)
    line, line_products = catalog_vectors(1, args.line_size // LISTINGS_PER_PRODUCT, args.dim, rng)
    queries = new_listings(products, args.queries, rng)
    line_queries = new_listings(line_products, args.queries, rng)
    log(f"{len(gallery)} x {args.dim} gallery, a new line of {len(line)}, {len(queries)} queries; {faiss.omp_get_max_threads()} faiss threads")

    rows, grown = [], np.concatenate([gallery, line])
    exact, build_seconds = timed(lambda: build_index(gallery, IndexConfig(kind="flat")))
    (_, truth), exact_seconds = timed(lambda: search(exact, queries, args.k))
    exact_qps = len(queries) / exact_seconds
    rows.append(("exact (flat)", "-", build_seconds, index_bytes(exact) / exact.ntotal, exact_qps, 1.0))
    log(f"exact: {exact_qps:.0f} q/s")

    hnsw, hnsw_build = timed(lambda: build_index(gallery, IndexConfig(kind="hnsw")))
    log(f"hnsw built in {hnsw_build:.0f} s")
    hnsw_bytes = index_bytes(hnsw) / hnsw.ntotal
    for ef in (int(value) for value in args.hnsw_ef.split(",")):
        hnsw.hnsw.efSearch = ef
        (_, found), seconds = timed(lambda: search(hnsw, queries, args.k))
        rows.append(("HNSW (M 32)", f"efSearch {ef}", hnsw_build, hnsw_bytes, len(queries) / seconds, recall_at(found, truth)))
        log(f"hnsw efSearch {ef}: {len(queries) / seconds:.0f} q/s, recall@{args.k} {rows[-1][-1]:.3f}")

    config = IndexConfig(kind="ivfpq", refine_factor=args.refine_factor)
    sample = gallery[np.sort(rng.choice(len(gallery), min(TRAINING_SAMPLE, len(gallery)), replace=False))]
    template, train_seconds = timed(lambda: IndexTemplate.train(sample, config, size=len(gallery)))
    ivfpq, fill_seconds = timed(lambda: template.filled(gallery))
    ivf = faiss.extract_index_ivf(ivfpq)
    log(f"ivfpq: {ivf.nlist} lists trained on {len(sample)} in {train_seconds:.0f} s, filled in {fill_seconds:.0f} s")
    ivfpq_bytes = index_bytes(ivfpq) / ivfpq.ntotal
    setting = f"nlist {ivf.nlist}, m {config.pq_m} x {config.pq_nbits} bits, {config.refine} re-rank x{config.refine_factor}"
    for nprobe in (int(value) for value in args.nprobe.split(",")):
        ivf.nprobe = nprobe
        (_, found), seconds = timed(lambda: search(ivfpq, queries, args.k))
        rows.append((f"IVF-PQ ({setting})", f"nprobe {nprobe}", train_seconds + fill_seconds, ivfpq_bytes, len(queries) / seconds,
                     recall_at(found, truth)))
        log(f"ivfpq nprobe {nprobe}: {len(queries) / seconds:.0f} q/s, recall@{args.k} {rows[-1][-1]:.3f}")

    # A new product line arrives.
    updates = []
    _, add_seconds = timed(lambda: exact.add(line))
    _, rebuild_seconds = timed(lambda: build_index(grown, IndexConfig(kind="flat")))
    (_, line_truth), _ = timed(lambda: search(exact, line_queries, args.k))
    updates.append(("exact (flat)", add_seconds, rebuild_seconds, 1.0, "-"))
    _, add_seconds = timed(lambda: hnsw.add(line))
    log(f"hnsw: line added in {add_seconds:.0f} s; rebuilding over {len(grown)}")
    rebuilt, rebuild_seconds = timed(lambda: build_index(grown, IndexConfig(kind="hnsw")))
    del rebuilt
    hnsw.hnsw.efSearch = int(args.hnsw_ef.split(",")[-1])
    updates.append(("HNSW (M 32)", add_seconds, rebuild_seconds, recall_at(search(hnsw, line_queries, args.k)[1], line_truth), "-"))
    drift = template.drift(line)
    _, add_seconds = timed(lambda: ivfpq.add(line))

    def rebuild_ivfpq():
        grown_sample = grown[np.sort(rng.choice(len(grown), min(TRAINING_SAMPLE, len(grown)), replace=False))]
        return IndexTemplate.train(grown_sample, config, size=len(grown)).filled(grown)

    _, rebuild_seconds = timed(rebuild_ivfpq)
    ivf.nprobe = int(args.nprobe.split(",")[-1])
    updates.append((f"IVF-PQ ({setting})", add_seconds, rebuild_seconds, recall_at(search(ivfpq, line_queries, args.k)[1], line_truth),
                    f"{drift:.2f}"))
    log(f"ivfpq: line added in {add_seconds:.1f} s, rebuilt in {rebuild_seconds:.0f} s, drift {drift:.2f}")
    total = time.perf_counter() - started_all

    lines = [
        f"{len(gallery):,} x {args.dim} clustered unit vectors ({len(gallery) // unit} product lines x {PRODUCTS_PER_LINE} products x "
        f"{LISTINGS_PER_PRODUCT} listings), inner product; {len(queries)} queries (new listings of gallery products) in one batch, "
        f"top {args.k}; recall@{args.k} against exact search; faiss {faiss.__version__} on {faiss.omp_get_max_threads()} CPU threads. "
        f"Build: for IVF-PQ, training its template on {len(sample):,} sampled vectors and filling it. Whole run {total / 60:.1f} min.",
        "",
        f"| index | search setting | build s | bytes per vector | queries/s | recall@{args.k} | queries/s over exact | "
        f"meets {TARGET_RATIO:.0f}x at recall >= {TARGET_RECALL} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, search_setting, build, per_vector, qps, recall in rows:
        ratio = qps / exact_qps
        meets = "-" if name.startswith("exact") else ("yes" if ratio >= TARGET_RATIO and recall >= TARGET_RECALL else "no")
        lines.append(f"| {name} | {search_setting} | {build:.1f} | {per_vector:.0f} | {qps:,.0f} | {recall:.3f} | {ratio:.1f} | {meets} |")
    lines += [
        "",
        f"A new product line of {len(line):,} listings (a new direction, {len(line) // LISTINGS_PER_PRODUCT:,} products) joins the "
        f"{len(gallery):,}: added to the index as it stands, against a full rebuild over {len(grown):,} (IVF-PQ's rebuild retrains its "
        f"template). Recall@{args.k} of {len(line_queries)} new listings of the line's products after the add (HNSW and IVF-PQ at "
        f"their last search setting above). Drift: the line's mean squared distance to its nearest coarse list over the training sample's "
        f"(retrain above 1.25).",
        "",
        f"| index | add the line s | full rebuild s | rebuild / add | recall@{args.k} of the line after the add | drift |",
        "|---|---|---|---|---|---|",
    ]
    for name, add, rebuild, recall, drift_cell in updates:
        lines.append(f"| {name} | {add:.1f} | {rebuild:.1f} | {rebuild / max(add, 1e-9):.0f}x | {recall:.3f} | {drift_cell} |")
    return publish_result("\n".join(lines), args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
