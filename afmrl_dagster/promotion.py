"""The registry gate: a candidate replaces the champion only when it is measurably better."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

PROMOTION_CONFIDENCE = 0.95  # one-sided: the candidate's gain must exceed the margin at this confidence
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus champion on the same queries: the mean per-query difference and a one-sided
    bootstrap lower bound at ``confidence`` (resampling queries, so each query's pair stays together)."""

    mean: float
    lower: float
    confidence: float
    queries: int
    discordant: int  # queries on which the two differ

    def text(self) -> str:
        return (f"Δ {self.mean:+.4f}, {self.confidence:.0%} lower bound {self.lower:+.4f} over {self.queries} validation queries "
                f"({self.discordant} differ)")


def paired_difference(candidate: Mapping[str, float], champion: Mapping[str, float], confidence: float = PROMOTION_CONFIDENCE,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> PairedDifference:
    """The paired comparison of two encoders' per-query scores (query id -> value) on the same queries."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"the promotion confidence must be in [0.5, 1), got {confidence!r}")
    if set(candidate) != set(champion):
        only = sorted(set(candidate) ^ set(champion))
        raise ValueError(f"candidate and champion were scored on different queries ({len(only)} differ, e.g. {only[:3]}): "
                         "nothing is compared")
    if not candidate:
        raise ValueError("no query was scored: nothing can be compared")
    ids = sorted(candidate)
    diff = np.array([candidate[i] for i in ids], dtype=np.float64) - np.array([champion[i] for i in ids], dtype=np.float64)
    if not np.isfinite(diff).all():
        return PairedDifference(math.nan, math.nan, confidence, len(ids), int((diff != 0).sum()))
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    return PairedDifference(float(diff.mean()), float(np.quantile(means, 1 - confidence)), confidence, len(ids), int((diff != 0).sum()))


def promotion_decision(
    candidate_version: str,
    candidate_metrics: dict[str, float],
    champion_version: str | None,
    champion_metrics: dict[str, float] | None,
    metric: str,
    margin: float = 0.0,
    paired: PairedDifference | None = None,
) -> PromotionDecision:
    """Promote when there is no champion, or when the candidate beats it by more than ``margin``
    on ``metric`` and the ``paired`` per-query comparison on the same validation queries says the
    gain is real (its one-sided lower bound is above ``margin`` too): 95 against 92 hits out of 135
    queries does not move the champion."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"the promotion margin must be a finite number >= 0, got {margin!r}: a negative margin promotes a worse model")
    if metric not in candidate_metrics:
        raise KeyError(f"promotion metric {metric!r} not among the candidate's metrics {sorted(candidate_metrics)}")
    candidate = float(candidate_metrics[metric])
    if champion_version is not None and champion_version == candidate_version:
        return PromotionDecision(False, f"version {candidate_version} is already the champion")
    if not math.isfinite(candidate):
        return PromotionDecision(False, f"version {candidate_version} scored {metric}={candidate}: a score that is not a number never "
                                        f"promotes; champion {champion_version or '(none)'} kept")
    if champion_version is None:
        return PromotionDecision(True, f"no champion yet: version {candidate_version} becomes champion ({metric}={candidate:.4f})")
    if champion_metrics is None:
        raise ValueError(f"champion version {champion_version} must be scored on the same evaluation set before comparing")
    if metric not in champion_metrics:
        raise KeyError(f"promotion metric {metric!r} not among champion version {champion_version}'s metrics {sorted(champion_metrics)}")
    champion = float(champion_metrics[metric])
    if not math.isfinite(champion):
        return PromotionDecision(False, f"champion version {champion_version} re-scored {metric}={champion}: the comparison cannot be "
                                        "made, nothing moves; check the champion's artefact and serving inputs")
    if paired is None:
        raise ValueError(f"comparing version {candidate_version} with champion {champion_version} needs their per-query {metric} "
                         "on the same validation queries (paired_difference)")
    if not (math.isfinite(paired.mean) and math.isfinite(paired.lower)):
        return PromotionDecision(False, f"the per-query comparison of version {candidate_version} with champion {champion_version} "
                                        "is not a number: nothing moves")
    if candidate > champion + margin and paired.lower > margin:
        return PromotionDecision(
            True, f"version {candidate_version} {metric}={candidate:.4f} beats champion {champion_version} ({champion:.4f}) by more than "
                  f"{margin}: {paired.text()}"
        )
    if candidate > champion + margin:
        return PromotionDecision(
            False, f"version {candidate_version} {metric}={candidate:.4f} over champion {champion_version} ({champion:.4f}) is not a "
                   f"resolved gain ({paired.text()}, not above {margin}); champion kept"
        )
    return PromotionDecision(
        False,
        f"version {candidate_version} {metric}={candidate:.4f} does not beat champion {champion_version} ({champion:.4f}) "
        f"by more than {margin}; champion kept",
    )


@dataclass(frozen=True)
class Candidate:
    """A registered encoder version offered for serving, scored on validation queries."""

    name: str  # e.g. "AGCL encoder", "CIT encoder"
    version: str
    metrics: dict[str, float]
    evaluation_set: str  # fingerprint of the validation queries it was scored on
    serving_tags: dict[str, str]  # what it would serve with (see serving.serving_tags)
    failed_checks: tuple[str, ...] = ()  # blocking checks of its artefacts that failed: never promoted


def failed_blocking_checks(*manifests: dict) -> tuple[str, ...]:
    """The names of the blocking checks that failed in model manifests (``{"checks": {name:
    {"passed", "blocking", ...}}}``): a candidate with any is never promoted."""
    return tuple(name for manifest in manifests for name, check in (manifest or {}).get("checks", {}).items()
                 if check.get("blocking") and not check.get("passed"))


def best_candidate(candidates: list[Candidate], metric: str, evaluation_set: str) -> tuple[Candidate | None, list[str]]:
    """The candidate with the highest ``metric`` among those scored on ``evaluation_set`` (the
    first listed wins a tie), and one line for each candidate left out and why."""
    comparable, notes = [], []
    for candidate in candidates:
        if candidate.evaluation_set != evaluation_set:
            notes.append(f"{candidate.name} version {candidate.version} left out: scored on another evaluation set "
                         f"({candidate.evaluation_set[:12]} vs {evaluation_set[:12]}); rematerialise it")
        elif metric not in candidate.metrics:
            raise KeyError(f"promotion metric {metric!r} not among {candidate.name}'s metrics {sorted(candidate.metrics)}")
        elif candidate.failed_checks:
            notes.append(f"{candidate.name} version {candidate.version} left out: blocking check(s) failed: {', '.join(candidate.failed_checks)}")
        elif not math.isfinite(float(candidate.metrics[metric])):
            notes.append(f"{candidate.name} version {candidate.version} left out: {metric}={candidate.metrics[metric]} is not a number")
        else:
            comparable.append(candidate)
    if not comparable:
        return None, notes
    best = max(comparable, key=lambda candidate: candidate.metrics[metric])  # max keeps the first of equals
    notes += [f"{other.name} version {other.version} {metric}={other.metrics[metric]:.4f} not chosen: {best.name} scores "
              f"{best.metrics[metric]:.4f}" for other in comparable if other is not best]
    return best, notes


# ---- the registry's aliases ----------------------------------------------------------------------

CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous_champion"


# MLflow's own defaults retry a registry that does not answer for minutes, in silence; every
# process of the project that talks to the registry (the pipeline's MLflow resource, ``afmrl
# rollback``) retries at most this much unless the MLFLOW_HTTP_* variables say otherwise.
REGISTRY_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                           "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def bound_registry_retries(environ: MutableMapping[str, str] = os.environ) -> str:
    """Apply :data:`REGISTRY_RETRY_DEFAULTS` where the environment sets nothing; return a line saying the bound."""
    for name, value in REGISTRY_RETRY_DEFAULTS.items():
        environ.setdefault(name, value)
    return (f"at most {environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES']} retries, {environ['MLFLOW_HTTP_REQUEST_TIMEOUT']} s each "
            f"(MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)")


class RollbackError(RuntimeError):
    """The registry holds nothing to roll back to."""


class RegistryError(RuntimeError):
    """The registry could not be read: no decision is taken on what it did not say."""


def _says_absent(error) -> bool:
    """Whether an MLflow error means "no such model or alias" (as opposed to a server that
    could not answer): the registry answers RESOURCE_DOES_NOT_EXIST for a model, and
    INVALID_PARAMETER_VALUE "... alias ... not found" for an alias."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


def alias_version(client, model_name: str, alias: str) -> str | None:
    """The version under ``alias`` of ``model_name`` in the MLflow registry of ``client``; None
    only when the registry says the model or alias does not exist. Any other failure (a server
    that does not answer, an error of its own) raises RegistryError: promotion fails closed."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as error:
        if _says_absent(error):
            return None
        where = getattr(client, "tracking_uri", None) or "the registry"
        raise RegistryError(f"cannot read the {alias!r} alias of {model_name} from {where}: {error}") from error


def move_champion(client, model_name: str, version: str, reason: str) -> str | None:
    """Make ``version`` the champion, keeping the one it replaces under ``previous_champion``
    (for rollback), and record ``reason`` on the version. Returns the replaced version."""
    import time

    version = str(version)
    previous = alias_version(client, model_name, CHAMPION_ALIAS)
    if previous is not None and previous != version:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION_ALIAS, previous)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(model_name, version, "promotion", reason[:5000])
    client.set_model_version_tag(model_name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return previous


def rollback_champion(client, model_name: str) -> tuple[str, str]:
    """Move the champion back to the ``previous_champion`` version; the version rolled back from
    becomes ``previous_champion`` (so a second rollback undoes the first). Returns (from, to)."""
    current = alias_version(client, model_name, CHAMPION_ALIAS)
    previous = alias_version(client, model_name, PREVIOUS_CHAMPION_ALIAS)
    if previous is None:
        raise RollbackError(
            f"{model_name} has no {PREVIOUS_CHAMPION_ALIAS!r} alias: no promotion replaced a champion yet, so there is "
            f"nothing to roll back to (champion: {current or 'none'})"
        )
    if current is None:
        raise RollbackError(f"{model_name} has no {CHAMPION_ALIAS!r} alias to roll back from")
    move_champion(client, model_name, previous, f"rollback from version {current}")
    client.set_model_version_tag(model_name, current, "rolled_back", f"replaced by version {previous}")
    return current, previous
