"""Stage 1: ingest one product line from the catalog source into the catalog store."""


import dagster as dg
import polars as pl
from pydantic import Field

from afmrl_dagster.catalog.ingest import find_image_problems, store_batch_images
from afmrl_dagster.catalog.schema import validate_catalog

from ..resources.catalog_source import CatalogSource
from ..resources.storage import ArtifactStore
from .partitions import product_lines


class RawCatalogConfig(dg.Config):
    max_bad_share: float = Field(
        default=0.05,
        description="Fail the run when more than this share of a line's listings is invalid; below it, bad rows are quarantined.",
    )


@dg.asset(
    partitions_def=product_lines,
    group_name="catalog",
    kinds={"polars", "parquet"},
    check_specs=[
        dg.AssetCheckSpec("catalog_schema", asset="raw_catalog", blocking=True,
                          description="Columns, unique listing ids, required fields, slug-safe product line (Great Expectations)."),
        dg.AssetCheckSpec("images_decodable", asset="raw_catalog", blocking=True,
                          description="Every referenced image lies under the catalog's image roots, reads and decodes."),
    ],
)
def raw_catalog(
    context: dg.AssetExecutionContext, config: RawCatalogConfig, catalog_source: CatalogSource, artifact_store: ArtifactStore
):
    """Listings of one product line in the canonical catalog schema.

    Rendered or referenced images are stored beside the tables; invalid listings (missing
    fields, duplicate ids, undecodable images, bad text) go to a quarantine table naming the
    listing and field, and the run fails when their share passes ``max_bad_share``.
    """
    from afmrl_dagster.quality import catalog_expectations, validate_frame

    line = context.partition_key
    store = artifact_store.open()
    batch = catalog_source.load_line(line)
    frame = store_batch_images(batch, store.put_bytes, line)
    image_issues = find_image_problems(frame, artifact_store.read_uri, catalog_source.uri_roots())
    report = validate_catalog(frame, extra_issues=image_issues)
    quarantine_key = f"quarantine/raw_catalog/{line}.parquet"
    if report.issues.height:
        store.write_parquet(quarantine_key, report.issues)
        context.log.warning(f"{report.bad_rows} listing(s) of {line!r} quarantined:\n{report.describe()}")
    elif store.exists(quarantine_key):
        store.delete_prefix(quarantine_key)
    report.raise_if_above(config.max_bad_share)

    catalog = report.valid
    quality = validate_frame(catalog, "raw_catalog", catalog_expectations())
    with_image = catalog.filter(pl.col("image_uri").is_not_null()).height
    return dg.MaterializeResult(
        value=catalog,
        metadata={
            "dagster/row_count": catalog.height,
            "products": catalog["product_id"].n_unique(),
            "listings_with_image": with_image,
            "quarantined": report.bad_rows,
            "source": catalog_source.spec,
            "preview": dg.MetadataValue.md(catalog.select("listing_id", "product_id", "title").head(5).to_pandas().to_markdown(index=False)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="catalog_schema", passed=quality.passed, metadata=quality.as_metadata()),
            # Undecodable images below the threshold were quarantined: a warning, not a gate.
            dg.AssetCheckResult(
                check_name="images_decodable",
                passed=not image_issues,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"undecodable": len(image_issues), "checked": with_image + len(image_issues)},
            ),
        ],
    )
