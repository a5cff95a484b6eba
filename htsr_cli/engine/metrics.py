"""The ten HT-SR metrics of one layer, from its pooled eigenvalues (reference section 3).

Names are WeightWatcher's column names. Logs are base 10 except the natural logs inside the
entropies.
"""

from __future__ import annotations

import math

import torch

from htsr_cli.engine.columns import METRICS  # noqa: F401  (re-exported)

#: Metrics that need the power-law fit.
FIT_METRICS = frozenset({"alpha", "alpha_weighted", "log_alpha_norm"})


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def matrix_entropy(evals: torch.Tensor, rank: int) -> float:
    """``-sum p ln p / ln R`` with ``p = lambda / sum(lambda)`` over all pooled eigenvalues.

    A layer of rank <= 1 has zero entropy (WeightWatcher divides by ``ln(1 + 1e-10)`` there).
    """
    total = float(evals.sum())
    if total <= 0 or rank <= 1:
        return 0.0 if total > 0 else math.nan
    p = evals / total
    h = -float(torch.special.xlogy(p, p).sum())
    return h / math.log(rank)


def js_distance(evals: torch.Tensor, rand_evals: torch.Tensor) -> float:
    """Jensen-Shannon distance (natural log) between two sorted eigenvalue vectors, each divided
    by its sum and compared element by element."""
    p = evals / evals.sum()
    q = rand_evals / rand_evals.sum()
    m = (p + q) / 2
    kl_pm = torch.special.xlogy(p, p).sum() - torch.special.xlogy(p, m).sum()
    kl_qm = torch.special.xlogy(q, q).sum() - torch.special.xlogy(q, m).sum()
    return math.sqrt(max(float(kl_pm + kl_qm) / 2, 0.0))


def layer_metrics(
    evals: torch.Tensor,
    alpha: float,
    rank: int,
    rand_evals: torch.Tensor | None,
    wanted: frozenset[str],
) -> dict[str, float]:
    """The requested metrics of one layer.

    Args:
        evals: pooled eigenvalues, ascending, float64.
        alpha: the fitted exponent (NaN when the fit failed or was not asked for).
        rank: ``matrix_rank`` of the layer.
        rand_evals: eigenvalues of the shuffled weight (only needed for ``rand_distance``).
        wanted: metric names to compute.
    """
    norm = float(evals.sum())
    lam_max = float(evals[-1])
    out: dict[str, float] = {}
    if "alpha" in wanted:
        out["alpha"] = alpha
    if "rand_distance" in wanted:
        out["rand_distance"] = (
            js_distance(evals, rand_evals) if rand_evals is not None else math.nan
        )
    if "stable_rank" in wanted:
        out["stable_rank"] = norm / lam_max if lam_max > 0 else math.nan
    if "entropy" in wanted:
        out["entropy"] = matrix_entropy(evals, rank)
    if "norm" in wanted:
        out["norm"] = norm
    if "log_norm" in wanted:
        out["log_norm"] = _log10(norm)
    if "spectral_norm" in wanted:
        out["spectral_norm"] = lam_max
    if "log_spectral_norm" in wanted:
        out["log_spectral_norm"] = _log10(lam_max)
    if "alpha_weighted" in wanted:
        out["alpha_weighted"] = alpha * _log10(lam_max)
    if "log_alpha_norm" in wanted:
        # log-sum-exp: lambda**alpha overflows float64 for large alpha on large eigenvalues.
        out["log_alpha_norm"] = (
            float(torch.logsumexp(alpha * torch.log(evals), 0)) / math.log(10)
            if math.isfinite(alpha)
            else math.nan
        )
    return out
