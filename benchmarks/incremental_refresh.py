"""Incremental refresh, measured in one run on a fresh store and Dagster instance: the time to
absorb one new product line of n listings against recomputing all N listings, and a
rematerialisation with unchanged inputs against the first run.

1. First run: every line but the last is ingested and featurised (``catalog_refresh_job``),
   the models are trained on them (``model_training_job``, small settings: training is not
   what is measured), each line gets attributes and embeddings (``catalog_embedding_job``),
   and the index is built (``retrieval_index``).
2. The same again with unchanged inputs: every job re-runs, and what it finds cached it
   reads instead of computing.
3. The last line arrives: its refresh and embedding jobs run, and the index is rebuilt from
   the stored embeddings (no other line is recomputed): the new line's shard is built, the
   other lines' shards are found in the store as they were.

"Recomputing all N" is the sum of every line's measured data path (refresh + embedding) plus
one index build, each measured in this run.

    python benchmarks/incremental_refresh.py [--catalog builtin] [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BLOCK = "incremental-refresh"


def log(message: str) -> None:
    print(f"incremental: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default="builtin", help="built-in catalog spec with two or more lines")
    parser.add_argument("--workdir", help="where the store, MLflow and the instance go (default: a temporary folder)")
    parser.add_argument("--write-results", metavar="FILE")
    args = parser.parse_args(argv)

    import dagster as dg

    from afmrl_dagster.assets.attributes import AttributeGeneratorConfig
    from afmrl_dagster.assets.encoder import EncoderTrainingRunConfig
    from afmrl_dagster.catalog.source import builtin_config, list_product_lines
    from afmrl_dagster.definitions import ASSETS, build_definitions, build_resources
    from afmrl_dagster.readme import publish_result

    lines = list_product_lines(args.catalog)
    if len(lines) < 2 or not args.catalog.startswith("builtin"):
        parser.error("--catalog must be a built-in catalog with two or more product lines")
    *first_lines, new_line = lines
    config = builtin_config(args.catalog)
    sizes = {line: config.families_per_line * config.siblings_per_family * config.listings_per_product for line in lines}
    training = {"ops": {"attribute_generator": {"config": AttributeGeneratorConfig(epochs=20).model_dump()},
                        "agcl_encoder": {"config": EncoderTrainingRunConfig(epochs=5).model_dump()}}}

    with tempfile.TemporaryDirectory(prefix="afmrl-incremental-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        os.environ.update({"AFMRL_CATALOG": args.catalog, "AFMRL_STORE": str(root / "store"),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
        definitions = build_definitions(build_resources())
        home = root / "dagster_home"
        home.mkdir(exist_ok=True)
        (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            def run(job: str, partition: str | None = None, run_config: dict | None = None) -> float:
                started = time.perf_counter()
                result = definitions.resolve_job_def(job).execute_in_process(
                    instance=instance, partition_key=partition, run_config=run_config or {}, raise_on_error=False)
                if not result.success:
                    raise RuntimeError(f"{job} [{partition}] failed (run {result.run_id})")
                return time.perf_counter() - started

            def index() -> float:
                started = time.perf_counter()
                if not dg.materialize(ASSETS, selection=["retrieval_index"], resources=definitions.resources, instance=instance).success:
                    raise RuntimeError("retrieval_index failed")
                return time.perf_counter() - started

            instance.add_dynamic_partitions("product_lines", first_lines)
            path: dict[str, float] = {}

            def first_lines_run() -> tuple[dict[str, float], float, float]:
                refresh = {line: run("catalog_refresh_job", line) for line in first_lines}
                trained = run("model_training_job", run_config=training)
                paths = {line: refresh[line] + run("catalog_embedding_job", line) for line in first_lines}
                return paths, trained, index()

            started = time.perf_counter()
            first_paths, training_seconds, first_index = first_lines_run()
            first_run = time.perf_counter() - started
            path.update(first_paths)
            log(f"first run {first_run:.1f} s: trained in {training_seconds:.0f} s; data path {path}; index {first_index:.1f} s")

            started = time.perf_counter()
            again_paths, again_training, again_index = first_lines_run()
            again = time.perf_counter() - started
            log(f"rematerialised with unchanged inputs in {again:.1f} s (training {again_training:.1f} s, index {again_index:.1f} s)")

            instance.add_dynamic_partitions("product_lines", [new_line])
            path[new_line] = run("catalog_refresh_job", new_line) + run("catalog_embedding_job", new_line)
            new_index = index()
            shards = {name: value.value for name, value in instance.get_latest_materialization_event(
                dg.AssetKey("retrieval_index")).asset_materialization.metadata.items() if name.startswith("shards")}
            absorb = path[new_line] + new_index
            log(f"new line {new_line}: data path {path[new_line]:.1f} s, index {new_index:.1f} s")

    total_listings = sum(sizes.values())
    recompute_all = sum(path.values()) + new_index
    rows = [f"| {line}{' (new)' if line == new_line else ''} | {sizes[line]} | {path[line]:.1f} |" for line in lines]
    runs = 2 * len(first_lines) + 2  # Dagster runs in the rematerialisation: refresh and embedding per line, training, index
    text = "\n".join([
        f"Built-in catalog `{args.catalog}`, {len(lines)} lines, {total_listings} listings; each job run in process "
        f"with a fresh store and instance, on this machine's CPU.",
        "",
        "| product line | listings | refresh + attributes + embeddings (s) |",
        "|---|---|---|",
        *rows,
        f"| index from stored embeddings ({shards['shards_built']} shard built, {shards['shards_reused']} reused) | {total_listings} "
        f"| {new_index:.1f} |",
        "",
        f"- Absorbing the new line ({sizes[new_line]} of {total_listings} listings, n/N = {sizes[new_line] / total_listings:.2f}): "
        f"**{absorb:.1f} s**, against {recompute_all:.1f} s to recompute every line: ratio **{absorb / recompute_all:.2f}**.",
        f"- Rematerialising the first run ({', '.join(first_lines)}: refresh, training, embeddings, index; {runs} runs) with "
        f"unchanged inputs: **{again:.1f} s**, against {first_run:.1f} s the first time: **{again / first_run:.1%}** "
        f"(training {again_training:.1f} s instead of {training_seconds:.1f} s, index {again_index:.1f} s).",
    ])
    return publish_result(text, args.write_results, BLOCK)


if __name__ == "__main__":
    raise SystemExit(main())
