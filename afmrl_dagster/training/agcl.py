"""AGCL: attribute-guided contrastive loss (method.md, Stage 1).

For query i and candidate j with cosine similarity s_ij, temperature tau and BM25 B_ij
between their attribute texts:

    w_ij = exp(1 + tanh(B_ij))                          (positive pair included)
    N_i  = {j != i : not (s_ij > s_ii + delta), not same_product(i, j)}
    L_i  = -log( w_ii e^{s_ii/tau} / (w_ii e^{s_ii/tau} + sum_{j in N_i} w_ij e^{s_ij/tau}) )

computed as a log-sum-exp over logits s/tau + log w with excluded entries at -inf.
``AGCLConfig.bm25_normalisation`` puts each row of B on a scale first (``raw`` = the paper's
formula, the default; ``positive``: B_ij / B_ii; ``zscore``: standardised within the row):
the fair test (``benchmarks/quality.py``) found neither beating the raw form on validation.
With weights and mask switched off this is plain InfoNCE (the baseline); listings of the
same product are never negatives in either case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AGCLConfig:
    """Which AGCL parts are on; both off gives plain InfoNCE."""

    use_weights: bool = True
    use_false_negative_mask: bool = True
    delta: float = 0.1
    symmetric: bool = True
    # Not in the paper (1.0 = the paper's formula). Raw BM25 of attribute texts sharing a
    # rare term is often > 2, where tanh saturates and all such weights are ~e^2; a scale
    # below 1 keeps them apart.
    bm25_scale: float = 1.0
    # Not in the paper either (True = the paper's formula, which weights the positive pair by
    # its own BM25). With False the positive keeps the lowest weight e, so a negative whose
    # attributes overlap the query's outweighs the positive instead of matching it.
    weight_positive: bool = True
    # How each row of B is put on a scale before tanh ("raw" = the paper's formula). Raw BM25
    # of texts sharing a rare fact is often > 2, where tanh saturates; "positive" divides row
    # i by its positive's score B_ii (a share of what the true match shares), "zscore"
    # standardises row i over its candidates (the spread of the batch, whatever the scale).
    bm25_normalisation: str = "raw"

    def __post_init__(self) -> None:
        if self.bm25_normalisation not in BM25_NORMALISATIONS:
            raise ValueError(f"bm25_normalisation must be one of {BM25_NORMALISATIONS}, got {self.bm25_normalisation!r}")
        if not -2.0 <= self.delta <= 2.0:
            raise ValueError(f"delta compares cosine similarities and must be in [-2, 2], got {self.delta}")
        if self.bm25_scale <= 0:
            raise ValueError(f"bm25_scale must be > 0, got {self.bm25_scale}")


BM25_NORMALISATIONS = ("raw", "positive", "zscore")


def normalise_bm25(bm25: torch.Tensor, normalisation: str = "raw") -> torch.Tensor:
    """Row-wise scale of a square BM25 matrix whose diagonal holds each row's positive.

    ``raw``: unchanged. ``positive``: ``B_ij / B_ii`` (a row whose positive shares nothing
    becomes 0, every weight equal). ``zscore``: ``(B_ij - mean_i) / sd_i`` over row i (0 for a
    constant row)."""
    if normalisation == "raw":
        return bm25
    if normalisation == "positive":
        own = bm25.diagonal().unsqueeze(1)
        return torch.where(own > 0, bm25 / own.clamp_min(1e-12), torch.zeros_like(bm25))
    if normalisation == "zscore":
        mean = bm25.mean(dim=1, keepdim=True)
        sd = bm25.std(dim=1, unbiased=False, keepdim=True)
        return torch.where(sd > 1e-6, (bm25 - mean) / sd.clamp_min(1e-6), torch.zeros_like(bm25))
    raise ValueError(f"unknown BM25 normalisation {normalisation!r}; expected one of {BM25_NORMALISATIONS}")


def bm25_log_weights(bm25: torch.Tensor, scale: float = 1.0, normalisation: str = "raw") -> torch.Tensor:
    """log w = 1 + tanh(scale * normalised B): weights lie in [e, e^2) raw, in (1, e^2) z-scored."""
    bm25 = normalise_bm25(bm25, normalisation)
    return 1.0 + torch.tanh(bm25 * scale if scale != 1.0 else bm25)


class AGCLLoss(nn.Module):
    """Attribute-guided InfoNCE over B in-batch (query, candidate) pairs; row i's positive is column i."""

    def __init__(self, config: AGCLConfig | None = None):
        super().__init__()
        self.config = config or AGCLConfig()

    def _direction(
        self, similarity: torch.Tensor, temperature: torch.Tensor, bm25: torch.Tensor | None, same_product: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, mean weight over kept negatives, fraction of off-diagonal entries dropped)."""
        size = similarity.shape[0]
        off_diagonal = ~torch.eye(size, dtype=torch.bool, device=similarity.device)
        excluded = same_product.to(torch.bool) & off_diagonal
        if self.config.use_false_negative_mask:
            detached = similarity.detach()
            excluded = excluded | ((detached > detached.diagonal().unsqueeze(1) + self.config.delta) & off_diagonal)
        logits = similarity / temperature
        if self.config.use_weights:
            log_weights = bm25_log_weights(bm25.to(logits.dtype), self.config.bm25_scale, self.config.bm25_normalisation)
            if not self.config.weight_positive:
                log_weights = log_weights.masked_fill(~off_diagonal, 1.0)
            logits = logits + log_weights
        logits = logits.masked_fill(excluded, float("-inf"))
        loss = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
        with torch.no_grad():
            kept = (off_diagonal & ~excluded).to(logits.dtype)
            if self.config.use_weights:
                # Mean over kept negatives; 1 when there is none, as for unweighted InfoNCE.
                weighted = (log_weights.detach().exp() * kept).sum()
                mean_weight = torch.where(kept.sum() > 0, weighted / kept.sum().clamp_min(1.0), torch.ones_like(weighted))
            else:
                mean_weight = torch.ones((), device=similarity.device)
            dropped = excluded.sum().float() / max(size * (size - 1), 1)
        return loss, mean_weight, dropped

    def forward(
        self,
        query_emb: torch.Tensor,
        candidate_emb: torch.Tensor,
        temperature: torch.Tensor | float,
        bm25: torch.Tensor | None,
        same_product: torch.Tensor,
        bm25_reverse: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss and diagnostics for L2-normalised ``query_emb`` and ``candidate_emb`` [B, D].

        ``bm25[i, j]`` = BM25(query=text of query i, doc=text of candidate j);
        ``same_product[i, j]`` says query i and candidate j are listings of one product. The
        candidate-to-query direction uses ``bm25_reverse[i, j]`` = BM25(candidate i, query j)
        when given (BM25 is not symmetric), else ``bm25.T``. ``bm25`` may be ``None`` only
        when weights are off.
        """
        if bm25 is None and self.config.use_weights:
            raise ValueError("bm25 is required when use_weights is on")
        if query_emb.shape != candidate_emb.shape or query_emb.dim() != 2:
            raise ValueError(f"query and candidate embeddings must both be [B, D], got {tuple(query_emb.shape)}, {tuple(candidate_emb.shape)}")
        size = query_emb.shape[0]
        for name, matrix in (("bm25", bm25), ("same_product", same_product), ("bm25_reverse", bm25_reverse)):
            if matrix is not None and tuple(matrix.shape) != (size, size):
                raise ValueError(f"{name} must be [{size}, {size}], got {tuple(matrix.shape)}")
        temperature = torch.as_tensor(temperature, dtype=query_emb.dtype, device=query_emb.device)
        similarity = query_emb @ candidate_emb.T
        forward_loss, forward_weight, forward_dropped = self._direction(similarity, temperature, bm25, same_product)
        if not self.config.symmetric:
            return {
                "loss": forward_loss,
                "query_to_candidate_loss": forward_loss,
                "candidate_to_query_loss": torch.full_like(forward_loss, float("nan")),
                "mean_negative_weight": forward_weight,
                "masked_fraction": forward_dropped,
            }
        reverse_bm25 = bm25_reverse if bm25_reverse is not None else (None if bm25 is None else bm25.T)
        reverse_loss, reverse_weight, reverse_dropped = self._direction(similarity.T, temperature, reverse_bm25, same_product.T)
        return {
            "loss": 0.5 * (forward_loss + reverse_loss),
            "query_to_candidate_loss": forward_loss,
            "candidate_to_query_loss": reverse_loss,
            "mean_negative_weight": 0.5 * (forward_weight + reverse_weight),
            "masked_fraction": 0.5 * (forward_dropped + reverse_dropped),
        }
