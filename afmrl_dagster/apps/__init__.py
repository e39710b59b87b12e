"""The applications over the library: what a person runs.

- ``cli``: the ``afmrl`` command, which starts each of the others.
- ``demo``: ``afmrl demo``, the whole Dagster pipeline materialised on the configured catalog
  (the only application that imports Dagster).
- ``search``: ``afmrl search``, the serving path over what the serving record names.
- ``evaluate``: ``afmrl evaluate``, an encoder scored on a catalog (:mod:`afmrl_dagster.evaluation`).
- ``teacher_server``: ``afmrl serve-teacher``, an OpenAI-compatible endpoint for the HTTP teacher.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "cli": ["main"],
    "demo": ["failure_messages", "materialize_pipeline", "results_report", "run_demo"],
    "evaluate": ["run_evaluate"],
    "search": ["SearchEngine", "SearchError", "SearchHit", "SearchResult", "result_json", "result_table"],
    "teacher_server": ["TeacherServer", "add_arguments", "build_server", "hf_model", "serve", "title_facts_model"],
})
