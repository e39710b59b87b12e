"""Jobs, the catalog refresh schedule, the new-product-line sensor and the sensor that runs
declarative automation (see ``conditions.py``).

``AFMRL_AUTOMATION=off`` starts both sensors stopped (toggle them in the UI);
``AFMRL_SENSOR_INTERVAL_SECONDS`` (default 300) is how often the catalog source is listed.
The definitions build the sensors from those settings when they load (:func:`build_sensors`);
the module's own ``new_product_line_sensor`` and ``catalog_automation_sensor`` carry the defaults.
"""


import json

import dagster as dg

from afmrl_dagster.settings import Settings

from ..resources.catalog_source import CatalogSource
from .partitions import product_lines

# Per product line: ingest, annotate with the teacher, compute tower features.
catalog_refresh_job = dg.define_asset_job(
    "catalog_refresh_job",
    selection=dg.AssetSelection.assets("raw_catalog", "teacher_attributes", "listing_features"),
    partitions_def=product_lines,
    description="Ingest one product line and prepare its attributes and features.",
)
# Across all lines: distil the generator and train the encoder.
model_training_job = dg.define_asset_job(
    "model_training_job",
    selection=dg.AssetSelection.assets("attribute_generator", "agcl_encoder"),
    description="Train the student attribute generator (SFT) and the AGCL encoder on every product line.",
)
# Per product line: generated attributes and embeddings with the current models.
catalog_embedding_job = dg.define_asset_job(
    "catalog_embedding_job",
    selection=dg.AssetSelection.assets("generated_attributes", "catalog_embeddings"),
    partitions_def=product_lines,
    description="Generate attributes for and embed one product line with the current models.",
)
# Across all lines: index and evaluate, RAR and CIT, then the one promotion and the serving record.
retrieval_job = dg.define_asset_job(
    "retrieval_job",
    selection=dg.AssetSelection.assets("retrieval_index", "retrieval_evaluation", "rar_generator", "cit_encoder", "encoder_promotion", "serving_record"),
    description="Build the index and evaluate, refine the generator with RAR and retrain the encoder on its attributes (CIT), "
    "promote the best candidate encoder and publish the serving record.",
)


@dg.schedule(cron_schedule="0 3 * * *", job=catalog_refresh_job, execution_timezone="UTC")
def catalog_refresh_schedule(context: dg.ScheduleEvaluationContext):
    """Nightly: re-ingest every known product line (unchanged lines reuse their cached work)."""
    lines = context.instance.get_dynamic_partitions(product_lines.name)
    if not lines:
        return dg.SkipReason("no product lines registered yet: the new_product_line_sensor adds them")
    return [dg.RunRequest(run_key=f"{line}-{context.scheduled_execution_time:%Y%m%d}", partition_key=line) for line in lines]


def _new_product_line_sensor(context: dg.SensorEvaluationContext, catalog_source: CatalogSource):
    """Adds a partition and requests an ingestion run for each product line that appears in the source."""
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    known = set(context.instance.get_dynamic_partitions(product_lines.name))
    new_lines = sorted(set(catalog_source.product_lines()) - seen - known)
    if not new_lines:
        return dg.SkipReason("no new product lines in the catalog source")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"new-line-{line}", partition_key=line) for line in new_lines],
        dynamic_partitions_requests=[product_lines.build_add_request(new_lines)],
        cursor=json.dumps(sorted(seen | set(new_lines))),
    )


def build_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    """The new-product-line sensor and the automation sensor, running or stopped and listing
    the catalog as often as ``settings`` say."""
    status = dg.DefaultSensorStatus.RUNNING if settings.automation else dg.DefaultSensorStatus.STOPPED
    new_lines = dg.sensor(
        name="new_product_line_sensor", job=catalog_refresh_job,
        minimum_interval_seconds=settings.sensor_interval_seconds, default_status=status,
    )(_new_product_line_sensor)
    # Evaluates every asset's automation condition: a refreshed or new line flows on to its
    # attributes, embeddings, the index, the evaluation and the promotion without a click.
    automation = dg.AutomationConditionSensorDefinition(
        "catalog_automation_sensor",
        target=dg.AssetSelection.all(),
        default_status=status,
        minimum_interval_seconds=min(30, settings.sensor_interval_seconds),
        description="Runs the per-line assets, index, evaluation and promotion when their inputs update (declarative automation).",
    )
    return [new_lines, automation]


new_product_line_sensor, catalog_automation_sensor = build_sensors(Settings())
