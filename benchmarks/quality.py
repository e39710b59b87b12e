"""The ablation ladder on every dataset: zero-shot towers, plain InfoNCE, AGCL weights only,
AGCL mask only, full AGCL; and on the datasets of ``--attribute-rows`` the generator side
(+ distilled generator attributes, + RAR, + CIT; see :mod:`afmrl_dagster.experiments.attribute_ladder`).
Each trained row runs over several seeds, reported as mean ± sd.

Protocols are those of :mod:`afmrl_dagster.experiments.quality_ladder`. Tower features are computed once
per dataset (cached under ``--cache``; ``--no-cache`` recomputes them, as a first run does),
so each (row, seed) costs the head's training only. The JSON of every run and the README
table are written at the end; a dataset whose folder is missing is skipped with a message.

    python benchmarks/quality.py [--datasets builtin,grocery,wdc_products,amazon_google]
        [--data ../shared/data] [--seeds 3] [--epochs N] [--attribute-rows builtin,grocery]
        [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from afmrl_dagster.experiments.attribute_ladder import AttributeChainSettings, attribute_chain_markdown, run_attribute_chain
from afmrl_dagster.encoders.towers import DEFAULT_TEXT_MODEL, TextFeaturizer
from afmrl_dagster.experiments.quality_ladder import LadderSettings, dataset_features, ladder_markdown, load_ladder_dataset, run_ladder
from afmrl_dagster.local_files import write_text_atomically
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings
from afmrl_dagster.training.encoder_training import EncoderTrainingConfig

BLOCK = "quality-ladder"  # docs/results.md markers <!-- quality-ladder:start --> ... <!-- quality-ladder:end -->
DATASETS = {  # name -> (catalog spec, folder under --data or None)
    "builtin": ("builtin", None),
    "grocery": ("grocery:{}", "grocery_store"),
    "wdc_products": ("wdc_products:{}", "wdc_products"),
    "amazon_google": ("amazon_google:{}", "amazon_google"),
}


def log(message: str) -> None:
    print(f"quality: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from: " + ", ".join(DATASETS))
    parser.add_argument("--data", default=Settings.from_env().data, help="folder holding the dataset folders")
    parser.add_argument("--builtin", default="builtin", help="catalog spec of the built-in dataset (e.g. builtin:families=4)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs (a quick look)")
    parser.add_argument("--cache", default=".afmrl/cache/ladder", help="tower-feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="recompute tower features (and refresh the cache)")
    parser.add_argument("--out", default=".afmrl/benchmarks/quality.json")
    parser.add_argument("--attribute-rows", default="builtin,grocery",
                        help="datasets that also run the generator rows (distilled generator, RAR, CIT); '' for none")
    parser.add_argument("--rar-steps", type=int, default=None, help="GRPO steps of the RAR rows (default: the pipeline's)")
    parser.add_argument("--reward-k", type=int, default=None, help="RAR reward = Recall@k (default: the pipeline's choice)")
    parser.add_argument("--write-results", metavar="FILE", help=f"replace the {BLOCK} block of this file with the tables")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    settings = LadderSettings(seeds=tuple(range(args.seeds)))
    if args.epochs is not None:
        settings.training["epochs"] = args.epochs
    chain_datasets = {name.strip() for name in args.attribute_rows.split(",") if name.strip()}
    if chain_datasets - set(DATASETS):
        parser.error(f"unknown dataset(s) in --attribute-rows: {sorted(chain_datasets - set(DATASETS))}")
    chain = AttributeChainSettings(reward_k=args.reward_k)
    if args.rar_steps is not None:
        chain.grpo.steps = args.rar_steps
    text_featurizer = None

    results, sections = [], []
    started_all = time.perf_counter()
    for name in names:
        template, folder = DATASETS[name]
        if folder is not None:
            root = Path(args.data) / folder
            if not root.is_dir():
                log(f"skipping {name}: {root} does not exist")
                continue
            spec = template.format(root)
        else:
            spec = args.builtin
        started = time.perf_counter()
        dataset = load_ladder_dataset(spec)
        if args.epochs is not None:
            dataset.training.pop("epochs", None)
        log(f"{name}: {dataset.train.height} training listings, {len(dataset.plan.query_ids)} queries, "
            f"{dataset.plan.listings.height} listings in the evaluation catalog")
        if args.no_cache:
            for stale in Path(args.cache).glob(f"{dataset.name}-*.npz"):
                stale.unlink()
        features = dataset_features(dataset, args.cache, progress=log)
        feature_seconds = time.perf_counter() - started
        log(f"{name}: tower features ready in {feature_seconds:.0f} s")
        records = run_ladder(dataset, features, settings, progress=log)
        chain_table = ""
        if name in chain_datasets:
            text_featurizer = text_featurizer or TextFeaturizer(DEFAULT_TEXT_MODEL)
            chain_records = run_attribute_chain(dataset, features, text_featurizer, settings, chain, progress=log)
            records += chain_records
            chain_table = ("\n\nThe generator side, step by step (validity on the queries; reward = "
                           f"Recall@k of the training queries' products, {chain.grpo.steps} GRPO steps):\n\n"
                           + attribute_chain_markdown(chain_records, dataset.headline))
        seconds = time.perf_counter() - started
        epochs = {"epochs": EncoderTrainingConfig.epochs, **settings.training, **dataset.training}["epochs"]
        results.append({"dataset": name, "spec": spec, "description": dataset.description, "products": dataset.plan.products, "seconds": seconds,
                        "feature_seconds": feature_seconds, "epochs": epochs, "records": records,
                        "train_listings": dataset.train.height, "queries": len(dataset.plan.query_ids)})
        sections.append(
            f"**{name}** ({dataset.train.height} training listings, {len(dataset.plan.query_ids)} queries; {epochs} epochs; "
            f"{seconds / 60:.1f} min, of which tower features {feature_seconds / 60:.1f} min): {dataset.description}. "
            f"Products: **{dataset.plan.products}**, {dataset.plan.products_note}.\n\n"
            + ladder_markdown(name, records, dataset.headline) + chain_table
        )
    total = time.perf_counter() - started_all
    report = {"seeds": args.seeds, "seconds": total, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "datasets": results}
    write_text_atomically(args.out, json.dumps(report, indent=2) + "\n")
    text = "\n\n".join([
        f"Mean ± sample sd over {args.seeds} seeds (seed = initialisation and batch order; zero-shot has no seed). "
        f"The AGCL rows read the image and the bare title, attributes only weighting AGCL's negatives in training; "
        f"the generator rows (+ distilled generator attributes, + RAR, + CIT) append generated attributes to the title. "
        f"ΔR@1 is each seed's R@1 minus plain InfoNCE's with the same seed. "
        f"Whole run: {total / 60:.1f} min on {torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        *sections,
    ])
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
