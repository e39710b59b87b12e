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


def test_a_score_that_is_not_a_number_never_promotes_and_the_margin_cannot_be_negative():
    nan = float("nan")
    for champion, metrics in ((None, None), ("1", {"recall@1": 0.7})):
        decision = promotion_decision("2", {"recall@1": nan}, champion, metrics, "recall@1")
        assert not decision.promote and "never promotes" in decision.reason
    broken_champion = promotion_decision("2", {"recall@1": 0.5}, "1", {"recall@1": nan}, "recall@1")
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
    assert f"reading the aliases of afmrl-encoder from {server.url} (at most 2 retries)" in done.stderr
    assert "nothing to roll back to" not in done.stderr
