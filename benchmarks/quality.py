"""The fair test of AFMRL's three claims on every dataset, decided on validation, reported on test.

Rows (:mod:`afmrl_dagster.experiments.quality_ladder`, :mod:`afmrl_dagster.experiments.attribute_ladder`):
zero-shot towers; plain InfoNCE; AGCL in the paper's form and with the BM25 scale put right
(claim 1); InfoNCE and the false-negative mask on a training set with unlinked duplicate
products (claim 1, the mask); attributes in the encoder's text at training and serving time
(claim 2); on grocery, the visual reader's attributes fused at search, and the image tower's
last block fine-tuned (``dual-tower-finetune``, GeM) with and without the reader; and on the datasets of ``--attribute-rows`` the generator side with a graded
reward on products the encoder did not train on, and CIT against the same round without RAR
(claim 3). Every trained row runs over ``--seeds`` seeds.

Every choice reads validation only: the AGCL form the verdict uses and the trained row set
against zero-shot are the ones with the best mean validation R@1. Test is scored once per
row; intervals are 95% bootstrap intervals over test queries (per-query outcomes averaged
over seeds), differences are paired on the same queries. Tower features are cached under
``--cache``, so a rerun costs the heads' training only.

    python benchmarks/quality.py [--datasets builtin,grocery,wdc_products,amazon_google]
        [--data ../shared/data] [--seeds 3] [--epochs N] [--attribute-rows grocery,amazon_google]
        [--no-reader] [--no-finetune] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from afmrl_dagster.encoders.towers import DEFAULT_TEXT_MODEL, TextFeaturizer
from afmrl_dagster.evaluation.statistics import Estimate
from afmrl_dagster.experiments.attribute_ladder import (
    CHAIN_BASELINES,
    CHAIN_CLAIMS,
    CIT_ROW,
    RAR_RECALL_ROW,
    RAR_ROW,
    AttributeChainSettings,
    attribute_chain_markdown,
    run_attribute_chain,
)
from afmrl_dagster.experiments.finetuned_tower import FINETUNED_READER_ROW, FINETUNED_ROW, FinetunedImageBlock, run_finetuned_tower
from afmrl_dagster.experiments.reader_fusion import READER_ROW, ReaderScores, entry_texts, reader_texts, run_reader_fusion
from afmrl_dagster.experiments.quality_ladder import (
    BASELINE_ROW,
    ROWS,
    ZERO_SHOT_ROW,
    LadderSettings,
    chosen_on_validation,
    dataset_features,
    load_ladder_dataset,
    run_ladder,
    summarise,
)
from afmrl_dagster.local_files import write_text_atomically
from afmrl_dagster.readme import publish_result
from afmrl_dagster.settings import Settings

BLOCK = "quality-ladder"  # docs/results.md markers <!-- quality-ladder:start --> ... <!-- quality-ladder:end -->
DATASETS = {  # name -> (catalog spec, folder under --data or None)
    "builtin": ("builtin", None),
    "grocery": ("grocery:{}", "grocery_store"),
    "wdc_products": ("wdc_products:{}", "wdc_products"),
    "amazon_google": ("amazon_google:{}", "amazon_google"),
}
EXTRA_TASKS = {"grocery": ("photo_to_catalog", "packages_to_catalog")}
AGCL_FORMS = tuple(name for name, row in ROWS.items() if row.claim == "1: AGCL")
BARE_TITLE_ROWS = (BASELINE_ROW, *AGCL_FORMS)
MASK_ROW = next(name for name, row in ROWS.items() if row.claim == "1: mask" and row.agcl.get("use_false_negative_mask"))
ATTRIBUTES_ROW = next(name for name, row in ROWS.items() if row.attributes_in_text)
READER_DATASETS = ("grocery",)  # photos whose attributes only a reader finds: the visual reader's rows
FINETUNED_DATASETS = ("grocery",)  # store photos against catalog images: the image tower's last block trained
BASELINES = {**{row: spec.baseline for row, spec in ROWS.items()}, **CHAIN_BASELINES, READER_ROW: BASELINE_ROW,
             FINETUNED_ROW: BASELINE_ROW, FINETUNED_READER_ROW: FINETUNED_ROW}
CLAIM_OF = {READER_ROW: "2: attributes (reader)", FINETUNED_ROW: "encoder: fine-tuned tower",
            FINETUNED_READER_ROW: "2: attributes (reader)", **CHAIN_CLAIMS}
DEFAULT_CANDIDATES = (*BARE_TITLE_ROWS, ATTRIBUTES_ROW, READER_ROW, FINETUNED_ROW, FINETUNED_READER_ROW)


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"quality [{(time.perf_counter() - STARTED) / 60:5.1f} min]: {message}", file=sys.stderr, flush=True)


def verdict(delta: Estimate | None) -> str:
    if delta is None:
        return "not measured"
    if delta.resolved and delta.mean > 0:
        return f"reproduced: {delta.text(signed=True)}"
    if delta.resolved:
        return f"not reproduced, worse: {delta.text(signed=True)}"
    return f"not resolved: {delta.text(signed=True)}"


def reader_delta(summary: dict) -> Estimate | None:
    """The reader fused at search against the same encoder unfused: the fine-tuned tower's pair
    where it ran (the stronger encoder), else the frozen head's."""
    for row in (FINETUNED_READER_ROW, READER_ROW):
        if row in summary:
            return summary[row].get("test_delta")
    return None


def claims(name: str, records: list[dict], task: str) -> dict:
    """The dataset's verdict per claim, each from rows chosen on validation."""
    summary = summarise(records, task, BASELINES)
    agcl = chosen_on_validation(records, task, AGCL_FORMS)
    default = chosen_on_validation(records, task, DEFAULT_CANDIDATES)
    against_zero_shot = summarise(records, task, {default: ZERO_SHOT_ROW})[default].get("test_delta")

    def delta(row: str) -> Estimate | None:
        return summary.get(row, {}).get("test_delta")

    rar = chosen_on_validation(records, task, (RAR_ROW, RAR_RECALL_ROW)) if RAR_ROW in summary else RAR_ROW

    split = [r.get("unlinked_products", 0) for r in records if r["row"] == MASK_ROW]
    return {
        "dataset": name, "task": task, "agcl_form": agcl, "default_row": default, "unlinked_products": max(split, default=0),
        "default_validation_r1": statistics.fmean(summary[default]["validation_r1"]),
        "default_test_r1": summary[default]["test_r1"], "zero_shot_test_r1": summary[ZERO_SHOT_ROW]["test_r1"],
        "default_vs_zero_shot": against_zero_shot,
        "1: AGCL vs InfoNCE": delta(agcl), "1: mask on unlinked duplicates": delta(MASK_ROW),
        "2: attributes in the text": delta(ATTRIBUTES_ROW), "2: reader's attributes fused at search": reader_delta(summary),
        "3: RAR vs distilled": delta(rar), "rar_reward_row": rar, "3: CIT over the same round without RAR": delta(CIT_ROW),
    }


CLAIM_COLUMNS = ("1: AGCL vs InfoNCE", "1: mask on unlinked duplicates", "2: attributes in the text",
                 "2: reader's attributes fused at search", "3: RAR vs distilled",
                 "3: CIT over the same round without RAR")


def claims_markdown(verdicts: list[dict]) -> str:
    header = ["dataset (task)", "products", "chosen on validation: AGCL form; RAR reward", *(f"claim {c}, Δ test R@1 [95% CI]" for c in CLAIM_COLUMNS),
              "trained default (chosen on validation): validation R@1 → test R@1 vs zero-shot [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in verdicts:
        default = (f"{v['default_row']}: {v['default_validation_r1']:.3f} → {v['default_test_r1'].text()} vs "
                   f"{v['zero_shot_test_r1'].text()}; Δ {v['default_vs_zero_shot'].text(signed=True)}")
        choices = v["agcl_form"] + ("; " + v["rar_reward_row"] if v["3: RAR vs distilled"] is not None else "")
        verdicts_of = [verdict(v[c]) for c in CLAIM_COLUMNS]
        if not v["unlinked_products"]:  # no product had 4+ training listings to split: the row is the mask alone
            verdicts_of[1] = "no duplicates to unlink (the mask alone: " + verdicts_of[1] + ")"
        lines.append("| " + " | ".join([f"{v['dataset']} ({v['task']})", v["products"], choices, *verdicts_of, default]) + " |")
    return "\n".join(lines)


def table_markdown(records: list[dict], task: str) -> str:
    """Every row of one dataset and task: validation R@1 (mean ± sd over seeds), test R@1 and
    MRR [95% CI over queries], the paired difference against the row's baseline."""
    summary = summarise(records, task, BASELINES)
    header = ["row", "claim", "seeds", "validation R@1", "test R@1 [95% CI]", "test MRR [95% CI]", "compared with",
              "Δ validation R@1", "Δ test R@1 [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, s in summary.items():
        claim = ROWS[row].claim if row in ROWS else CLAIM_OF.get(row, "reference")
        delta = s.get("test_delta")
        validation = (f"{statistics.fmean(s['validation_r1']):.3f}"
                      + (f" ± {statistics.stdev(s['validation_r1']):.3f}" if len(s["validation_r1"]) > 1 else ""))
        cells = [row, claim, str(s["seeds"] or "-"), validation, s["test_r1"].text(), s["test_mrr"].text(), s.get("baseline", ""),
                 s["validation_delta"].text(signed=True) if delta else "",
                 (delta.text(signed=True) + (" (resolved)" if delta.resolved else "")) if delta else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def jsonable(value):
    if isinstance(value, Estimate):
        return {"mean": value.mean, "low": value.low, "high": value.high}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from: " + ", ".join(DATASETS))
    parser.add_argument("--data", default=Settings.from_env().data, help="folder holding the dataset folders")
    parser.add_argument("--builtin", default="builtin:families=12", help="catalog spec of the built-in dataset (a larger variant than the demo's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs (a quick look)")
    parser.add_argument("--cache", default=".afmrl/cache/ladder", help="tower-feature (and fine-tuned arm's frozen-block) cache folder")
    parser.add_argument("--no-cache", action="store_true", help="recompute tower features (and refresh the cache)")
    parser.add_argument("--out", default=".afmrl/benchmarks/quality.json")
    parser.add_argument("--attribute-rows", default="grocery,amazon_google",
                        help="datasets that also run the generator rows (distilled generator, RAR, CIT); '' for none")
    parser.add_argument("--rar-steps", type=int, default=None, help="GRPO steps of the RAR rows (default: the pipeline's)")
    parser.add_argument("--ocr-cache", default=".afmrl/cache/visual_reader", help="the visual reader's OCR cache (shared with visual_reader.py)")
    parser.add_argument("--no-reader", action="store_true", help="leave out the visual reader's rows on grocery (it reads the query photos once)")
    parser.add_argument("--no-finetune", action="store_true", help="leave out the fine-tuned image tower's rows on grocery (about 12 min)")
    parser.add_argument("--reward", default=AttributeChainSettings.reward, help="RAR reward: recall, reciprocal_rank or margin")
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
    chain = AttributeChainSettings(reward=args.reward)
    if args.rar_steps is not None:
        chain.grpo.steps = args.rar_steps
    text_featurizer = TextFeaturizer(DEFAULT_TEXT_MODEL)

    results, sections, verdicts = [], [], []
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
        log(f"{name}: {dataset.train.height} training listings, {len(dataset.validation.query_ids)} validation and "
            f"{len(dataset.test.query_ids)} test queries")
        if args.no_cache:
            for stale in [*Path(args.cache).glob(f"{dataset.name}-*.npz"), *Path(args.cache).glob(f"{dataset.name}-frozen-blocks-*.pt")]:
                stale.unlink()
        features = dataset_features(dataset, args.cache, progress=log)
        feature_seconds = time.perf_counter() - started
        records = run_ladder(dataset, features, settings, text_featurizer, progress=log)
        reading, reader = None, None
        if name in READER_DATASETS and not args.no_reader:
            texts, reading = reader_texts(dataset, args.ocr_cache, progress=log)
            reader = ReaderScores(dataset, texts, entry_texts(dataset))
            records += run_reader_fusion(dataset, features, reader, settings, progress=log)
        if name in FINETUNED_DATASETS and not args.no_finetune:
            block = FinetunedImageBlock(dataset, args.cache, progress=log)
            feature_seconds += block.seconds
            records += run_finetuned_tower(block, reader, settings, progress=log)
        chain_table = ""
        if name in chain_datasets:
            records += run_attribute_chain(dataset, features, text_featurizer, settings, chain, progress=log)
            chain_table = "\n\nWhat RAR did (validity on validation; reward on the reward products' listings):\n\n" + attribute_chain_markdown(records)
        seconds = time.perf_counter() - started
        for task in (dataset.headline, *EXTRA_TASKS.get(name, ())):
            verdicts.append({**claims(name, records, task), "products": dataset.products})
        results.append({"dataset": name, "spec": spec, "description": dataset.description, "products": dataset.products,
                        "seconds": seconds, "feature_seconds": feature_seconds, "train_listings": dataset.train.height,
                        "validation_queries": len(dataset.validation.query_ids), "test_queries": len(dataset.test.query_ids),
                        "reader_ocr": reading, "records": records})
        tables = "\n\n".join(f"Task `{task}`:\n\n" + table_markdown(records, task) for task in (dataset.headline, *EXTRA_TASKS.get(name, ())))
        sections.append(
            f"**{name}** ({dataset.train.height} training listings; {len(dataset.validation.query_ids)} validation and "
            f"{len(dataset.test.query_ids)} test queries; {seconds / 60:.1f} min, of which tower features and frozen blocks {feature_seconds / 60:.1f} min): "
            f"{dataset.description}. Products: **{dataset.products}**.\n\n" + tables + chain_table
        )
    total = time.perf_counter() - started_all
    report = {"seeds": args.seeds, "seconds": total, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "reward": chain.reward, "claims": jsonable(verdicts), "datasets": jsonable(results)}
    write_text_atomically(args.out, json.dumps(report, indent=2) + "\n")
    text = "\n\n".join([
        f"{args.seeds} seeds per trained row (seed = initialisation, batch order, duplicate draw of the generator rows). "
        f"Validation R@1: mean ± sd over seeds. Test: per-query outcome averaged over seeds, 95% bootstrap interval over "
        f"queries; Δ: paired difference on the same queries; *resolved* when its interval excludes 0. "
        f"Whole run: {total / 60:.1f} min on {torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        "**The claims** (each from rows chosen on validation; test read once):\n\n" + claims_markdown(verdicts) if verdicts else "",
        *sections,
    ])
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
