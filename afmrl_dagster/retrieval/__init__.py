"""Retrieval over listing embeddings: the gallery index, identical-product metrics, the further
evaluation tasks, and RAR's reward (how well generated attributes make a query find its
product). Above :mod:`afmrl_dagster.encoders` and :mod:`afmrl_dagster.attributes`.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "index_config": ["IndexConfig", "resolve_kind"],
    "index": ["build_index", "index_bytes", "load_index", "recall_against_exact", "save_index", "search"],
    "index_template": ["IndexTemplate"],
    "metrics": ["recall_fraction_at_k", "retrieval_metrics", "top_indices"],
    "reward": ["INVALID_REWARD", "RetrievalReward"],
    "shards": ["ShardedIndex", "open_line_shards", "publish_line_shards"],
    "tasks": ["clustering_scores", "combine_retrieval", "cross_set_retrieval", "knn_classification_accuracy"],
})
