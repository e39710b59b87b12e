"""What an evaluation reports: the JSON record of ``afmrl evaluate`` and the markdown tables of
it and of the pipeline's results."""

from __future__ import annotations

import polars as pl

from .encoders import EmbeddedListings, Encoder
from .protocols import GROCERY_ICONIC_PREFIX, EvaluationPlan

REPORTED_METRICS = ("recall@1", "recall@5", "recall@10", "map@10")  # the pipeline's tables
RETRIEVAL_COLUMNS = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "map@10": "mAP@10", "mrr": "MRR"}  # metric -> header


def results_markdown(results: pl.DataFrame, metrics: tuple[str, ...] = REPORTED_METRICS, caption: str | None = None) -> str:
    """A markdown table with one row per encoder (``encoder`` column; ``products`` too when the
    table carries it: which products queried, e.g. ``unseen (test)``) and the reported metrics."""
    columns = ["encoder"] + (["products"] if "products" in results.columns else [])
    header = "| " + " | ".join(columns) + " | " + " | ".join(metric.replace("recall@", "R@").replace("map@", "mAP@") for metric in metrics) + " |"
    lines = ([caption, ""] if caption else []) + [header, "|" + "---|" * (len(columns) + len(metrics))]
    for row in results.iter_rows(named=True):
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)


def evaluation_report(
    catalog: str, split: str | None, encoder: str, resolved: Encoder, limit: int | None,
    plan: EvaluationPlan, embedded: EmbeddedListings, metrics: dict[str, dict[str, float]],
) -> dict:
    """The JSON record of one evaluation: what was asked, the protocol, the counts and the metrics."""
    iconic = sum(i.startswith(GROCERY_ICONIC_PREFIX) for i in plan.listings["listing_id"].to_list())
    return {
        "catalog": catalog,
        "split": split,
        "encoder": encoder,
        "encoder_resolved": resolved.name,
        "towers": {"image": resolved.image_tower, "text": resolved.text_tower},
        "limit": limit,
        "protocol": {
            "name": plan.protocol,
            "description": plan.description,
            "products": plan.products,
            "products_note": plan.products_note,
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


def report_markdown(report: dict) -> str:
    """Retrieval metrics as one table (a row per task) and the other tasks as a second one,
    under a header that says the protocol and which products the queries are."""
    protocol = report["protocol"]
    header = "| task | queries | " + " | ".join(RETRIEVAL_COLUMNS.values()) + " |"
    lines = [
        f"Encoder `{report['encoder']}` on `{report['catalog']}`" + (f" (split `{report['split']}`)" if report["split"] else "")
        + f": {protocol['description']}.",
        "",
        f"Products: **{protocol['products']}**, {protocol['products_note']}.",
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
