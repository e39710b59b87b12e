"""The experiments: the fair test of AFMRL's claims, trained and scored through the library's
code. ``quality_ladder``: the datasets' train / validation / test parts and the encoder rows
(zero-shot towers, plain InfoNCE, AGCL's forms, the mask on unlinked duplicates, attributes in
the text); ``attribute_ladder``: the generator side (distilled generator, RAR with a graded
reward on products the encoder did not train on, CIT against the same round without RAR);
``reader_fusion``: the visual reader's attributes fused into search on photos.
``benchmarks/quality.py`` runs them and writes the tables; nothing in the library or the
pipeline imports them.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "attribute_ladder": ["ATTRIBUTE_ROWS", "AttributeChainSettings", "CHAIN_BASELINES", "CIT_DISTILLED_ROW", "CIT_ROW", "DISTILLED_ROW",
                         "RAR_RECALL_ROW", "RAR_ROW", "attribute_chain_markdown", "run_attribute_chain"],
    "quality_ladder": ["ALL_ROWS", "BASELINE_ROW", "LadderDataset", "LadderSettings", "PARTS", "ROWS", "Row", "WDC_TEST_FILE", "WDC_TRAIN_FILES",
                       "ZERO_SHOT_ROW", "chosen_on_validation", "dataset_features", "load_ladder_dataset", "mean_sd", "plan_ranks", "rank_metrics",
                       "rows_of", "run_ladder", "seller_attributes", "summarise", "unlink_duplicates"],
    "reader_fusion": ["READER_ROW", "entry_texts", "reader_texts", "run_reader_fusion"],
})
