"""``afmrl evaluate``: score an encoder on a catalog under the protocol of its dataset
(:mod:`afmrl_dagster.evaluation.protocols`) and write the report as JSON, and as markdown."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..evaluation.encoders import embed_listings, resolve_encoder
from ..evaluation.protocols import EvaluationError, plan_evaluation
from ..evaluation.report import evaluation_report, report_markdown
from ..evaluation.scoring import score_plan
from ..local_files import write_text_atomically


def progress_line(message: str) -> None:
    print(f"afmrl evaluate: {message}", file=sys.stderr, flush=True)


def writable_destination(path: str | os.PathLike) -> None:
    """Raise :class:`EvaluationError` unless a file can be written at ``path`` (its folder exists or
    can be made, and takes a file), so that a bad ``--out`` fails before the work, not after it."""
    target = Path(path)
    if target.is_dir():
        raise EvaluationError(f"--out {str(path)!r} is a folder; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise EvaluationError(f"cannot write {str(path)!r}: {error.strerror or error}") from error


def run_evaluate(
    catalog: str,
    encoder: str,
    out: str | os.PathLike,
    split: str | None = None,
    markdown: str | os.PathLike | None = None,
    limit: int | None = None,
    echo: Callable[[str], None] = print,
    image_roots: list[str] | None = None,
) -> dict:
    """Plan, embed, score and write the report (JSON to ``out``, optionally markdown); returns it.
    A bad input raises :class:`afmrl_dagster.evaluation.EvaluationError` before anything is written; an
    image URI outside the catalog's folder and ``image_roots`` is one (it is never read)."""
    for path in (out, markdown):
        if path:
            writable_destination(path)  # before any embedding work
    resolved = resolve_encoder(encoder)  # before loading data: a bad encoder fails fast
    plan = plan_evaluation(catalog, split, limit, image_roots=image_roots)
    progress_line(f"{plan.protocol}: {len(plan.query_ids)} queries, {len(plan.listings)} listings to embed")
    embedded = embed_listings(resolved, plan.listings, plan.images, progress=progress_line)
    report = evaluation_report(catalog, split, encoder, resolved, limit, plan, embedded, score_plan(plan, embedded.embeddings))
    write_text_atomically(out, json.dumps(report, indent=2, sort_keys=False) + "\n")
    table = report_markdown(report)
    if markdown:
        write_text_atomically(markdown, table)
    echo(table)
    return report
