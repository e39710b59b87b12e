"""When assets update on their own: the per-line assets and the index, evaluation and
promotion follow their inputs; model training stays a deliberate (scheduled or clicked) run."""

import dagster as dg

# As soon as an input updates (a new or refreshed product line, a newly trained model), once
# every input exists, none is being written, and each input's blocking checks passed.
FOLLOWS_INPUTS = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager, after blocking checks"
)
