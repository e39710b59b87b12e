"""The registry gate on hand-made metrics."""

import os

import pytest

from afmrl_dagster.promotion import paired_difference, promotion_decision


def hits(correct: int, queries: int = 135, offset: int = 0) -> dict[str, float]:
    """Per-query recall@1 of ``queries`` validation queries: the ``correct`` from ``offset`` on are hits."""
    return {f"q{i:03d}": float(offset <= i < offset + correct) for i in range(queries)}


def compared(candidate: dict, champion: dict):
    """The metrics and the paired comparison the gate is given for two per-query score sets."""
    mean = lambda values: sum(values.values()) / len(values)  # noqa: E731
    return {"recall@1": mean(candidate)}, {"recall@1": mean(champion)}, paired_difference(candidate, champion)


def test_first_candidate_becomes_champion():
    decision = promotion_decision("1", {"recall@1": 0.4}, None, None, "recall@1")
    assert decision.promote and "no champion" in decision.reason


def test_candidate_must_beat_champion_by_the_margin_and_beyond_chance():
    candidate, champion, paired = compared(hits(120), hits(92))  # 28 more of 135, none fewer
    promoted = promotion_decision("2", candidate, "1", champion, "recall@1", margin=0.01, paired=paired)
    assert promoted.promote and "lower bound" in promoted.reason and "135 validation queries" in promoted.reason
    assert not promotion_decision("2", candidate, "1", champion, "recall@1", margin=0.25, paired=paired).promote  # 0.207 < margin
    # 95 against 92 hits (3 more, 5 queries flip each way plus 3): above the champion, but not a resolved gain.
    candidate, champion, paired = compared(hits(95, offset=5), hits(92))
    assert candidate["recall@1"] > champion["recall@1"] and paired.discordant == 13 and paired.lower < 0
    kept = promotion_decision("2", candidate, "1", champion, "recall@1", paired=paired)
    assert not kept.promote and "not a resolved gain" in kept.reason and "champion kept" in kept.reason
    candidate, champion, paired = compared(hits(54), hits(67))
    assert not promotion_decision("2", candidate, "1", champion, "recall@1", paired=paired).promote
    with pytest.raises(ValueError, match="needs their per-query recall@1"):
        promotion_decision("2", {"recall@1": 0.9}, "1", {"recall@1": 0.5}, "recall@1")


def test_the_paired_comparison_refuses_different_queries_and_is_reproducible():
    with pytest.raises(ValueError, match="scored on different queries"):
        paired_difference(hits(10, 20), hits(10, 21))
    with pytest.raises(ValueError, match="no query was scored"):
        paired_difference({}, {})
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(hits(3, 5), hits(2, 5), confidence=1.0)
    assert paired_difference(hits(95, offset=5), hits(92)) == paired_difference(hits(95, offset=5), hits(92))
    nan = paired_difference({"a": float("nan")}, {"a": 1.0})
    assert not promotion_decision("2", {"recall@1": 0.9}, "1", {"recall@1": 0.5}, "recall@1", paired=nan).promote


def test_a_score_that_is_not_a_number_never_promotes_and_the_margin_cannot_be_negative():
    nan = float("nan")
    for champion, metrics in ((None, None), ("1", {"recall@1": 0.7})):
        decision = promotion_decision("2", {"recall@1": nan}, champion, metrics, "recall@1", paired=paired_difference(hits(1, 2), hits(1, 2)))
        assert not decision.promote and "never promotes" in decision.reason
    broken_champion = promotion_decision("2", {"recall@1": 0.5}, "1", {"recall@1": nan}, "recall@1", paired=paired_difference(hits(1, 2), hits(1, 2)))
    assert not broken_champion.promote and "cannot be made" in broken_champion.reason
    for margin in (-0.5, nan, float("inf")):
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            promotion_decision("2", {"recall@1": 0.30}, "1", {"recall@1": 0.70}, "recall@1", margin=margin)
    with pytest.raises(KeyError, match="champion version 1's metrics"):
        promotion_decision("2", {"recall@1": 0.5}, "1", {"mrr": 0.7}, "recall@1")
    # A NaN candidate listed first is not "the best" by default: the scored one is chosen.
    from afmrl_dagster.promotion import Candidate, best_candidate

    broken = Candidate("AGCL encoder", "3", {"recall@1": nan}, "set", {})
    scored = Candidate("CIT encoder", "4", {"recall@1": 0.6}, "set", {})
    best, notes = best_candidate([broken, scored], "recall@1", "set")
    assert best is scored and any("is not a number" in note for note in notes)
    assert best_candidate([broken], "recall@1", "set")[0] is None


def test_a_candidate_whose_blocking_check_failed_is_never_chosen():
    from afmrl_dagster.promotion import Candidate, best_candidate, failed_blocking_checks

    manifest = {"checks": {"cit_weights_finite": {"passed": False, "blocking": True, "metadata": {}},
                           "cit_keeps_recall": {"passed": False, "blocking": False, "metadata": {}}}}
    assert failed_blocking_checks(manifest, {"checks": {}}, None) == ("cit_weights_finite",)  # warnings do not block
    cit = Candidate("CIT encoder", "4", {"recall@1": 0.9}, "set", {}, failed_blocking_checks(manifest))
    agcl = Candidate("AGCL encoder", "3", {"recall@1": 0.6}, "set", {})
    best, notes = best_candidate([cit, agcl], "recall@1", "set")
    assert best is agcl and any("blocking check(s) failed: cit_weights_finite" in note for note in notes)


def test_champion_is_not_promoted_over_itself_and_metric_must_exist():
    assert not promotion_decision("3", {"recall@1": 0.9}, "3", None, "recall@1").promote
    with pytest.raises(ValueError, match="same evaluation set"):
        promotion_decision("4", {"recall@1": 0.9}, "3", None, "recall@1")
    with pytest.raises(KeyError, match="map@10"):
        promotion_decision("3", {"recall@1": 0.9}, None, None, "map@10")


def test_a_registry_that_cannot_answer_never_reads_as_no_champion(tmp_path, monkeypatch):
    """Only the registry saying "no such model or alias" means no champion; a stopped server
    stops the promotion and the rollback with an error naming it, instead of promoting blind."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from mlflow_server import running_mlflow_server

    from afmrl_dagster.promotion import RegistryError, alias_version

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast once the server is gone
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with running_mlflow_server(tmp_path / "mlflow") as server:
        client = MlflowClient(tracking_uri=server.url)
        client.create_registered_model("afmrl-encoder")
        assert alias_version(client, "afmrl-encoder", "champion") is None  # the registry says: no such alias
        assert alias_version(client, "afmrl-no-such-model", "champion") is None  # nor such model
    with pytest.raises(RegistryError, match=f"cannot read the 'champion' alias of afmrl-encoder from {server.url}"):
        alias_version(client, "afmrl-encoder", "champion")
    # The command bounds MLflow's retries itself (its default backoff waited over 400 s in silence).
    quiet = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    done = subprocess.run([sys.executable, "-m", "afmrl_dagster.apps.cli", "rollback", "--tracking-uri", server.url],
                          capture_output=True, text=True, env=quiet, timeout=120)
    assert done.returncode == 2 and "cannot read the 'champion' alias" in done.stderr, done.stderr[-2000:]
    assert f"reading the aliases of afmrl-encoder from {server.url} (at most 2 retries, 15 s each" in done.stderr
    assert "nothing to roll back to" not in done.stderr


def test_the_gate_stops_when_the_registry_stops_mid_promotion_and_nothing_moves(tmp_path, monkeypatch):
    """A real ``mlflow server`` holds champion version 2; it stops between the candidate's
    registration and the gate. The gate's registry read (the pipeline's MLflow resource, its retries
    bounded by the project) and the alias move both raise, naming the server; started again on
    the same store, the registry still says version 2 with no previous champion."""
    from mlflow.tracking import MlflowClient
    from mlflow_server import running_mlflow_server

    from afmrl_dagster.promotion import RegistryError, alias_version, move_champion
    from afmrl_dagster.resources.tracking import MlflowTracking

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the project's bound, not a test's
    with running_mlflow_server(tmp_path / "mlflow") as server:
        client = MlflowClient(tracking_uri=server.url)
        client.create_registered_model("afmrl-encoder")
        for _ in range(2):
            client.create_model_version("afmrl-encoder", source="s3://afmrl-test/models/encoder")
        client.set_registered_model_alias("afmrl-encoder", "champion", "2")
        tracking = MlflowTracking(tracking_uri=server.url)
        assert tracking.champion_version("afmrl-encoder").version == "2"
    with pytest.raises(RegistryError, match=f"cannot read the 'champion' alias of afmrl-encoder from {server.url}"):
        tracking.champion_version("afmrl-encoder")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # bounded by the resource itself
    with pytest.raises(RegistryError):
        move_champion(client, "afmrl-encoder", "1", "must not happen")
    with running_mlflow_server(tmp_path / "mlflow") as restarted:
        client = MlflowClient(tracking_uri=restarted.url)
        assert alias_version(client, "afmrl-encoder", "champion") == "2"
        assert alias_version(client, "afmrl-encoder", "previous_champion") is None
