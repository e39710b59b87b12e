"""Evaluation: what is scored on a catalog, with which encoder, and how it is reported. Above
:mod:`afmrl_dagster.retrieval` (the metrics), :mod:`afmrl_dagster.encoders` and
:mod:`afmrl_dagster.catalog` (the loaders); below :mod:`afmrl_dagster.training`, whose stages score what they train.

- ``splits``: the pipeline's split of a catalog by product (train, validation, test) and the
  listings each part queries and searches.
- ``protocols``: the protocol of each dataset as an :class:`EvaluationPlan` of retrieval tasks.
- ``encoders``: the encoder a spec names (``zero-shot``, ``champion``, a head folder, an MLflow
  URI) and the embeddings it gives a plan's listings.
- ``scoring``: metrics of embeddings per part, per plan, and of a registered version as it serves.
- ``statistics``: per-query ranks, bootstrap intervals and paired differences.
- ``report``: the JSON record of ``afmrl evaluate`` and the markdown tables.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "encoders": ["CHAMPION", "EmbeddedListings", "Encoder", "ZERO_SHOT", "embed_listings", "resolve_encoder", "tower_features"],
    "protocols": ["AMAZON_GOOGLE_TABLES", "EvaluationError", "EvaluationPlan", "GROCERY_ICONIC_PREFIX", "RetrievalTask", "amazon_google_plan",
                  "CLOSED_SET", "NOT_SPLIT", "PRODUCT_LABELS", "UNSEEN_PRODUCTS", "UNSEEN_SPLIT", "WDC_CLOSED_SET_MARK", "builtin_or_parquet",
                  "grocery_plan", "make_plan", "plan_evaluation", "resolve_splits", "unseen_products_split", "wdc_plan", "wdc_unseen_plan"],
    "report": ["REPORTED_METRICS", "RETRIEVAL_COLUMNS", "evaluation_report", "report_markdown", "results_markdown"],
    "scoring": ["KNN_K", "QueryScores", "evaluate_embeddings", "evaluate_parts", "evaluation_set_fingerprint", "query_scores", "score_plan",
                "score_registered_version", "score_served"],
    "splits": ["HeldOutSplit", "PARTS"],
    "statistics": ["Estimate", "bootstrap_interval", "estimate", "first_match_ranks", "paired_difference", "ranks_from_scores"],
})
