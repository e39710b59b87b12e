"""The registry gate: a candidate replaces the champion only when it is measurably better."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def promotion_decision(
    candidate_version: str,
    candidate_metrics: dict[str, float],
    champion_version: str | None,
    champion_metrics: dict[str, float] | None,
    metric: str,
    margin: float = 0.0,
) -> PromotionDecision:
    """Promote when there is no champion, or when the candidate beats it by more than ``margin``
    on ``metric``; both sets of metrics must come from the same evaluation set."""
    if metric not in candidate_metrics:
        raise KeyError(f"promotion metric {metric!r} not among the candidate's metrics {sorted(candidate_metrics)}")
    candidate = candidate_metrics[metric]
    if champion_version is not None and champion_version == candidate_version:
        return PromotionDecision(False, f"version {candidate_version} is already the champion")
    if champion_version is None:
        return PromotionDecision(True, f"no champion yet: version {candidate_version} becomes champion ({metric}={candidate:.4f})")
    if champion_metrics is None:
        raise ValueError(f"champion version {champion_version} must be scored on the same evaluation set before comparing")
    champion = champion_metrics[metric]
    if candidate > champion + margin:
        return PromotionDecision(True, f"version {candidate_version} {metric}={candidate:.4f} beats champion {champion_version} ({champion:.4f}) by more than {margin}")
    return PromotionDecision(False, f"version {candidate_version} {metric}={candidate:.4f} does not beat champion {champion_version} ({champion:.4f}) by more than {margin}; champion kept")
