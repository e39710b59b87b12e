"""Latency of one search, stage by stage, and what attribute generation adds: catalog listings
(photo + title) sent one at a time through :class:`afmrl_dagster.apps.search.SearchEngine` over what
``make demo`` stored, as its serving record names it (the champion encoder, its index and generator).

    python benchmarks/search_latency.py [--queries 50] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from afmrl_dagster.readme import publish_result
from afmrl_dagster.apps.search import SearchEngine
from afmrl_dagster.settings import Settings
from afmrl_dagster.storage import open_store, read_uri_bytes

BLOCK = "search-latency"
STAGES = ("features", "generate", "embed", "search")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--write-results", metavar="FILE")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
    engine = SearchEngine.from_store(store)
    listings = list(engine.listings.head(args.queries).iter_rows(named=True))  # the served index's own listings
    engine.search(image=read_uri_bytes(listings[0]["image_uri"]), text=listings[0]["title"], k=args.k)  # warm-up
    stages = (*STAGES[:3], "read", STAGES[3]) if engine.fusion is not None else STAGES  # the reader's OCR, when its fusion serves
    timings = {stage: [] for stage in stages}
    for listing in listings:
        image = read_uri_bytes(listing["image_uri"]) if listing["image_uri"] else None
        result = engine.search(image=image, text=listing["title"], k=args.k)
        for stage in stages:
            timings[stage].append(result.seconds.get(stage, 0.0))
    medians = {stage: statistics.median(values) * 1e3 for stage, values in timings.items()}
    total = sum(medians.values())
    lines = [
        f"{len(listings)} catalog listings (photo + title) searched one at a time over the demo's index "
        f"({engine.index.ntotal} listings, k = {args.k}); median per stage; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| stage | median ms | share |",
        "|---|---|---|",
        *(f"| {stage} | {medians[stage]:.1f} | {medians[stage] / total:.0%} |" for stage in stages),
        f"| **total** | **{total:.1f}** | |",
        "",
        f"Attribute generation adds {medians['generate']:.1f} ms per query "
        f"({medians['generate'] / (total - medians['generate']):.0%} on top of search without it).",
    ]
    text = "\n".join(lines)
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
