"""``afmrl demo``: materialise the whole asset graph on the configured catalog with the real
Dagster instance in ``$DAGSTER_HOME``, then print the results.

The graph mixes per-product-line assets and assets over all lines, so it runs as four jobs
in order (the same jobs the UI, the schedule and the sensor launch); every run is recorded in
the instance and shows in ``dagster dev``.
"""

from __future__ import annotations

import os
import time
from typing import Callable


def failure_messages(result) -> str:
    """The error messages of a run's failed steps, causes included (what a user needs to fix the input)."""
    messages = []
    for event in result.all_events:
        if not (event.is_step_failure and event.event_specific_data and event.event_specific_data.error):
            continue
        error = event.event_specific_data.error
        while error is not None:
            messages.append(error.message.strip())
            error = error.cause
    return "\n".join(messages)


def materialize_pipeline(definitions, instance, asset_config: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every job of the pipeline in order over every product line of the catalog source.

    ``asset_config`` maps asset names to their ``dg.Config`` (e.g. fewer epochs in tests).
    Returns the evaluation table and the RAR manifest.
    """
    from ..definitions import PIPELINE_ORDER

    asset_config = asset_config or {}
    with definitions.resources["catalog_source"].process_config_and_initialize_cm() as catalog_source:
        lines = catalog_source.product_lines()
    log(f"==> catalog source {catalog_source.spec!r}: product lines {lines}")
    known = set(instance.get_dynamic_partitions("product_lines"))
    instance.add_dynamic_partitions("product_lines", [line for line in lines if line not in known])

    for job_name, partitioned in PIPELINE_ORDER:
        job = definitions.resolve_job_def(job_name)
        job_assets = {key.path[-1] for key in job.asset_layer.executable_asset_keys}
        run_config = {
            "ops": {name: {"config": config.model_dump()} for name, config in asset_config.items() if name in job_assets},
            "loggers": {"console": {"config": {"log_level": "INFO"}}},
        }
        for partition_key in lines if partitioned else [None]:
            label = job_name + (f" [{partition_key}]" if partition_key else "")
            log(f"==> running {label}")
            began = time.perf_counter()
            result = job.execute_in_process(instance=instance, partition_key=partition_key, run_config=run_config, raise_on_error=False)
            if not result.success:
                raise RuntimeError(f"{label} failed (run {result.run_id}):\n{failure_messages(result)}")
            log(f"    done in {time.perf_counter() - began:.1f} s (run {result.run_id})")
    return {
        "results": definitions.load_asset_value("retrieval_evaluation", instance=instance),
        "rar": definitions.load_asset_value("rar_generator", instance=instance),
        "cit": definitions.load_asset_value("cit_encoder", instance=instance),
        "promotion": definitions.load_asset_value("encoder_promotion", instance=instance),
        "serving": definitions.load_asset_value("serving_record", instance=instance),
    }


def results_report(outcome: dict, seconds: float) -> str:
    """The demo's results: the test table (products unseen in training, never used to decide),
    then RAR, CIT and the promotion, each decided on validation products."""
    from ..evaluation.report import results_markdown
    from ..retrieval.reward import reward_label

    results, rar, cit, promotion = outcome["results"], outcome["rar"], outcome["cit"], outcome["promotion"]
    test = results.filter(results["products"] == "unseen (test)")
    validation = results.filter(results["products"] == "unseen (validation)")
    reward = reward_label(rar["reward"], rar["reward_k"]) if "reward" in rar else "a kind this manifest does not record"
    return (
        f"Test: {test['num_queries'][0]:.0f} queries of products unseen in training (and not used for any decision) "
        f"against the whole catalog; {validation['num_queries'][0]:.0f} validation queries of other unseen products decide "
        f"the gates and the promotion. Pipeline time {seconds / 60:.1f} min (2-core CPU, first run).\n\n"
        + results_markdown(test)
        + "\n\nRAR (GRPO) on the attribute generator, reward = "
        f"{reward} over training listings only: mean reward {rar['reward_first_steps']:.3f} over the first fifth of the "
        f"steps, {rar['reward_last_steps']:.3f} over the last fifth. Test queries with SFT attributes: R@1 "
        f"{rar['test']['sft']['recall@1']:.3f}; with RAR attributes: R@1 {rar['test']['rar']['recall@1']:.3f} "
        f"(valid outputs {rar['test']['rar']['validity_rate']:.1%})."
        f" CIT (the encoder retrained on RAR attributes): test R@1 {cit['test']['recall@1']:.3f}."
        f"\n\nPromotion (validation {promotion['metric']}): " + "; ".join(
            f"{name} {entry[promotion['metric']]:.3f}" for name, entry in promotion["candidates"].items())
        + f". {promotion['reason']}"
    )


def run_demo(write_readme: str | None = None) -> None:
    import dagster as dg

    from ..definitions import defs

    if not os.environ.get("DAGSTER_HOME"):
        raise SystemExit("DAGSTER_HOME is not set: run `make demo`, or export DAGSTER_HOME to a folder holding dagster.yaml")
    started = time.perf_counter()
    outcome = materialize_pipeline(defs(), dg.DagsterInstance.get(), log=lambda line: print(line, flush=True))
    report = results_report(outcome, time.perf_counter() - started)
    print("\n==> results\n\n" + report)
    if write_readme:
        from ..readme import write_block

        written = write_block(write_readme, "demo-results", report)
        print(f"\n(results {'written into' if written else 'not written: no demo-results markers in'} {write_readme})")
    print(
        "\nNext:\n"
        "  make dev         # Dagster UI on http://127.0.0.1:3000 : asset graph, runs, checks, metadata\n"
        "  make mlflow-ui   # MLflow UI on http://127.0.0.1:5000 : runs, curves, registered models (alias 'champion')\n",
        flush=True,
    )
