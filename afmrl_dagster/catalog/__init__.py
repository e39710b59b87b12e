"""The product catalog: one schema for every source, the built-in synthetic catalog, loaders of
real datasets, and held-out splits by product. The bottom of the library: it imports no other
package of it.

- ``schema``: the canonical catalog schema, its validation and conformance.
- ``builtin`` / ``images``: the built-in fine-grained catalog and its Pillow drawings.
- ``loaders``: real datasets (Grocery Store, WDC Products, Amazon-Google, ABO) in their own layouts.
- ``source``: where product lines come from, behind one interface; ``ingest``: storing and checking images.
- ``splits``: deterministic held-out products.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "builtin": ["BUILTIN_PRODUCT_LINES", "BuiltinCatalogConfig", "NEAR_COLOURS", "design_distance", "generate_builtin_catalog",
                "generate_product_line", "product_attributes", "product_designs"],
    "ingest": ["find_image_problems", "store_batch_images"],
    "loaders": ["CATALOG_LOADERS", "CatalogLoadError", "GROCERY_SPLITS", "grocery_split_listing_ids", "load_abo", "load_amazon_google",
                "load_catalog", "load_error", "load_grocery", "load_wdc_products", "parse_catalog_spec", "read_lines", "require_path"],
    "schema": ["CATALOG_SCHEMA", "CatalogBatch", "CatalogValidationError", "REQUIRED_FIELDS", "SLUG_PATTERN", "conform", "make_catalog",
               "seller_attributes_dict", "slugify", "validate_catalog"],
    "source": ["CatalogSourceSpec", "builtin_config", "list_product_lines", "load_product_line"],
    "splits": ["holdout_products"],
})
