"""The experiments: the ablation ladder (``quality_ladder``: zero-shot towers, plain InfoNCE,
AGCL's parts and full AGCL, over seeds) and its generator side (``attribute_ladder``: distilled
generator, RAR, CIT), trained and scored through the library's code. ``benchmarks/quality.py``
runs them and writes the README's tables; nothing in the library or the pipeline imports them.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "attribute_ladder": ["ATTRIBUTE_ROWS", "AttributeChainSettings", "CIT_ROW", "DISTILLED_ROW", "RAR_ROW", "attribute_chain_markdown",
                         "run_attribute_chain"],
    "quality_ladder": ["LadderDataset", "LadderSettings", "REPORTED", "ROWS", "TRAINED_ROWS", "WDC_TEST_FILE", "WDC_TRAIN_FILES", "ZERO_SHOT_ROW",
                       "dataset_features", "ladder_markdown", "load_ladder_dataset", "mean_sd", "paired_differences", "rows_of", "run_ladder",
                       "seller_attributes"],
})
