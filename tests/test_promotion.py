"""The registry gate on hand-made metrics."""

import pytest

from afmrl_dagster.promotion import promotion_decision


def test_first_candidate_becomes_champion():
    decision = promotion_decision("1", {"recall@1": 0.4}, None, None, "recall@1")
    assert decision.promote and "no champion" in decision.reason


def test_candidate_must_beat_champion_by_the_margin():
    assert promotion_decision("2", {"recall@1": 0.52}, "1", {"recall@1": 0.50}, "recall@1", margin=0.01).promote
    kept = promotion_decision("2", {"recall@1": 0.505}, "1", {"recall@1": 0.50}, "recall@1", margin=0.01)
    assert not kept.promote and "champion kept" in kept.reason
    assert not promotion_decision("2", {"recall@1": 0.40}, "1", {"recall@1": 0.50}, "recall@1").promote


def test_champion_is_not_promoted_over_itself_and_metric_must_exist():
    assert not promotion_decision("3", {"recall@1": 0.9}, "3", None, "recall@1").promote
    with pytest.raises(ValueError, match="same evaluation set"):
        promotion_decision("4", {"recall@1": 0.9}, "3", None, "recall@1")
    with pytest.raises(KeyError, match="map@10"):
        promotion_decision("3", {"recall@1": 0.9}, None, None, "map@10")
