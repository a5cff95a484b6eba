"""Pruning budgets: how much of each layer to remove, calibrated to one global target.

Pure arithmetic on per-layer numbers (numpy only, no torch): the metric-driven scores of the
thesis and AlphaPruning, and the uniform, ERK and LAMP baselines. Every method ends in per-layer
*ratios* (the fraction of a layer's parameters removed) whose parameter-weighted total equals
the requested number of parameters; :func:`integer_counts` then turns them into whole numbers
of weights that add up to the target exactly. Formulas and sources: docs/prune.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from htsr_cli import defaults
from htsr_cli.allocate.schemes import (
    linear_map,  # the [s1, s2] min-max map TempBalance and AlphaPruning share
)
from htsr_cli.errors import InputError

METHODS: tuple[str, ...] = ("metric", "uniform", "erk", "lamp")
MAPPINGS: tuple[str, ...] = ("linear", "proportional")
MORE_WHERE: tuple[str, ...] = ("larger", "smaller")
#: No layer loses more than this fraction by default: a layer pruned away cuts the network.
DEFAULT_MAX_RATIO = defaults.MAX_RATIO
_BISECT_ITERS = 200  # float64 bisection reaches the last bit long before this


def check_method(
    method: str,
    mapping: str,
    more_where: str,
    eps: float,
    max_ratio: float,
    budget_step: float | None,
) -> None:
    """Refuse unknown names and out-of-range parameters with one line each."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if mapping not in MAPPINGS:
        raise InputError(f"unknown --mapping {mapping!r}; choose from {', '.join(MAPPINGS)}")
    if more_where not in MORE_WHERE:
        raise InputError(
            f"unknown --more-where {more_where!r}; choose from {', '.join(MORE_WHERE)}"
        )
    if not (math.isfinite(eps) and 0 <= eps < 1):
        raise InputError(f"--eps must be in [0, 1) (ratios span [1-eps, 1+eps]), got {eps}")
    if not (math.isfinite(max_ratio) and 0 < max_ratio < 1):
        raise InputError(f"--max-ratio must be in (0, 1), got {max_ratio}")
    if budget_step is not None and not (math.isfinite(budget_step) and 0 < budget_step <= 0.5):
        raise InputError(f"--budget-step must be in (0, 0.5], got {budget_step}")


def metric_scores(
    values: Sequence[float],
    *,
    more_where: str = "larger",
    mapping: str = "linear",
    eps: float = 0.2,
) -> np.ndarray:
    """Relative pruning scores ``r_i`` from finite metric values (larger = prune more).

    ``linear`` (AlphaPruning): ``r_i = (1-eps) + 2*eps*(m_i - min m)/(max m - min m)``, all 1
    when the values are equal; ``smaller`` applies it to ``-m``. ``proportional`` (thesis):
    ``r_i = m_i`` (``larger``) or ``1/m_i`` (``smaller``), which needs positive values.

    Raises:
        InputError: ``proportional`` with a value that is not positive.
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError("metric_scores needs finite values")
    if mapping == "linear":
        return linear_map(-v if more_where == "smaller" else v, 1.0 - eps, 1.0 + eps)
    if np.any(v <= 0):
        raise InputError(
            f"--mapping proportional needs positive metric values (smallest is "
            f"{float(v.min()):.4g}); use --mapping linear for this metric"
        )
    scaled = v / v.max()  # the scale cancels in the calibration; keeps 1/m finite
    return scaled if more_where == "larger" else 1.0 / scaled


def _bisect(total: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The scalar ``x`` in [lo, hi] where the nondecreasing ``total(x)`` crosses ``target``."""
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate(
    scores: Sequence[float],
    numel: Sequence[int],
    removed: float,
    *,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> np.ndarray:
    """Ratios ``k_i = min(max_ratio, c * r_i)`` with ``sum numel_i * k_i = removed``.

    The global multiplier ``c`` is found by bisection (the total is nondecreasing in ``c``), so
    layers that hit ``max_ratio`` pass their share to the others. Without the clamp this is
    AlphaPruning's rescaling ``k_i = S * r_i * sum(numel) / sum(numel * r)``.

    Raises:
        InputError: ``removed`` exceeds what ``max_ratio`` allows.
    """
    r = np.asarray(scores, dtype=float)
    n = np.asarray(numel, dtype=float)
    if removed <= 0:
        return np.zeros(r.size)
    most = float((max_ratio * n[r > 0]).sum())
    if removed > most * (1 + 1e-12):
        raise InputError(
            f"cannot remove {removed:.0f} of {n.sum():.0f} parameters with "
            f"--max-ratio {max_ratio:g} (at most {most:.0f}); lower the target "
            "or raise --max-ratio"
        )
    positive = r[r > 0]
    hi = max_ratio / float(positive.min())  # every layer clamped

    def total(c: float) -> float:
        return float((n * np.minimum(max_ratio, c * r)).sum())

    return np.minimum(max_ratio, _bisect(total, removed, 0.0, hi) * r)


def erk_ratios(
    shapes: Sequence[Sequence[int]], removed: float, *, max_ratio: float = DEFAULT_MAX_RATIO
) -> np.ndarray:
    """Erdos-Renyi-Kernel ratios (Evci et al. 2020, RigL).

    Density ``d_l = eps * sum(dims_l) / prod(dims_l)`` with ``eps`` solved so that the kept
    parameters match the target; a layer whose density would exceed 1 is made dense (and one
    below ``1 - max_ratio`` held there), and ``eps`` is solved again for the others. The
    solution is the ``eps`` where ``sum n_l * clip(eps * raw_l, 1 - max_ratio, 1)`` equals the
    kept count, found by bisection. Returns ``1 - d_l``.
    """
    n = np.array([math.prod(s) for s in shapes], dtype=float)
    raw = np.array([sum(s) for s in shapes], dtype=float) / n
    keep = float(n.sum()) - removed
    floor_density = 1.0 - max_ratio
    if removed <= 0:
        return np.zeros(n.size)
    if removed > max_ratio * n.sum() * (1 + 1e-12):
        raise InputError(
            f"cannot remove {removed:.0f} of {n.sum():.0f} parameters with "
            f"--max-ratio {max_ratio:g}; lower the target or raise --max-ratio"
        )

    def kept(eps: float) -> float:
        return float((n * np.clip(eps * raw, floor_density, 1.0)).sum())

    eps = _bisect(kept, keep, 0.0, 1.0 / float(raw.min()))
    return 1.0 - np.clip(eps * raw, floor_density, 1.0)


def lamp_scores(weights: np.ndarray) -> np.ndarray:
    """LAMP scores of one layer (Lee et al. 2021), in ascending order of magnitude.

    With the squared weights sorted ascending, ``score_u = w_u^2 / sum_{v >= u} w_v^2``. The
    scores are nondecreasing along that order and the largest weight scores 1, so LAMP never
    empties a layer. A tail of zeros (0/0) scores 0.
    """
    sq = np.sort(np.square(np.asarray(weights, dtype=np.float64).reshape(-1)))
    tail = np.cumsum(sq[::-1])[::-1]  # sum_{v >= u}
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tail > 0, sq / np.where(tail > 0, tail, 1.0), 0.0)


def lamp_counts(scores: Sequence[np.ndarray], removed: int) -> np.ndarray:
    """How many weights LAMP removes from each layer: the ``removed`` smallest scores over all
    layers (each array sorted ascending, as :func:`lamp_scores` returns them). Ties at the
    threshold are taken in layer order, so the total is exact."""
    counts = np.zeros(len(scores), dtype=np.int64)
    if removed <= 0:
        return counts
    everything = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])
    if removed > everything.size:
        raise InputError(f"cannot remove {removed} of {everything.size} parameters")
    threshold = np.partition(everything, removed - 1)[removed - 1]
    for i, s in enumerate(scores):
        counts[i] = np.searchsorted(s, threshold, side="left")  # strictly below
    short = removed - int(counts.sum())
    for i, s in enumerate(scores):  # the ties at the threshold, first layers first
        if short <= 0:
            break
        ties = int(np.searchsorted(s, threshold, side="right")) - int(counts[i])
        take = min(ties, short)
        counts[i] += take
        short -= take
    return counts


def integer_counts(ratios: Sequence[float], numel: Sequence[int], removed: int) -> np.ndarray:
    """Whole numbers of weights per layer, ``floor(k_i * n_i)`` plus one for the layers with the
    largest remainders (first layers first on ties), so that they add up to ``removed``."""
    k = np.asarray(ratios, dtype=float)
    n = np.asarray(numel, dtype=np.int64)
    exact = k * n
    counts = np.minimum(np.floor(exact + 1e-9).astype(np.int64), n)
    short = int(removed) - int(counts.sum())
    if short > 0:
        frac = exact - counts
        order = np.argsort(-frac, kind="stable")
        room = [i for i in order if counts[i] < n[i]]
        for i in room[:short]:
            counts[i] += 1
    elif short < 0:  # float round-up: take the excess back from the smallest remainders
        frac = exact - counts
        order = np.argsort(frac, kind="stable")
        for i in [i for i in order if counts[i] > 0][:-short]:
            counts[i] -= 1
    return counts


def step_budgets(ratios: Sequence[float], max_ratio: float) -> np.ndarray:
    """The thesis's per-layer budgets ``k_i``: a method's ratios scaled so the largest is
    ``max_ratio`` (the shape of the plan, not its total)."""
    k = np.asarray(ratios, dtype=float)
    top = float(k.max()) if k.size else 0.0
    return k * (max_ratio / top) if top > 0 else k


def stepped_counts(
    budgets: Sequence[float], numel: Sequence[int], removed: int, step: float
) -> tuple[np.ndarray, float]:
    """The thesis's incremental rule (unstructured): all layers step their ratio up by ``step``
    together, each stopping at its budget; the model stops at the last step whose total does
    not exceed ``removed`` (rather under- than over-prune). Returns the per-layer counts
    ``floor(min(t * step, k_i) * n_i)`` and the final ``t * step``."""
    k = np.asarray(budgets, dtype=float)
    n = np.asarray(numel, dtype=np.int64)
    steps = int(math.ceil(float(k.max()) / step)) if k.size and k.max() > 0 else 0

    def counts(t: int) -> np.ndarray:
        return np.floor(np.minimum(t * step, k) * n + 1e-9).astype(np.int64)

    # The total grows with t, so the last allowed step is found by bisection: log2(steps)
    # evaluations, not ceil(1/step) (a --budget-step of 1e-300 looped without end).
    lo, hi = 0, steps
    if steps and counts(hi).sum() <= removed:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if counts(mid).sum() <= removed:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        return np.zeros(n.size, dtype=np.int64), 0.0
    return counts(lo), min(lo * step, float(k.max()))


__all__ = [
    "METHODS",
    "MAPPINGS",
    "MORE_WHERE",
    "DEFAULT_MAX_RATIO",
    "check_method",
    "metric_scores",
    "calibrate",
    "erk_ratios",
    "lamp_scores",
    "lamp_counts",
    "integer_counts",
    "step_budgets",
    "stepped_counts",
]
