"""When assets update on their own: the per-line assets and the index, evaluation and
promotion follow their inputs; model training stays a deliberate (scheduled or clicked) run."""

import dagster as dg

# As soon as an input updates (a new or refreshed product line, a newly trained model), once
# every input exists, none is being written, and each input's blocking checks passed.
FOLLOWS_INPUTS = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager, after blocking checks"
)

# The promotion decides on the evaluation: it follows the evaluation, the index and the models,
# never a per-line input alone. Without this, a new line's attributes (an input it reads to
# re-score a champion) started it while that line's embeddings were still being written, and it
# decided on the evaluation of the catalog before the line.
LINE_INPUTS = dg.AssetSelection.assets("raw_catalog", "listing_features", "generated_attributes")
FOLLOWS_EVALUATION = (dg.AutomationCondition.eager().ignore(LINE_INPUTS) & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager on the evaluation, index and models, after blocking checks"
)
