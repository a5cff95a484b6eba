"""The power-law fit of an ESD tail: alpha, xmin, D and friends (reference section 2).

One implementation serves every fit mode. It runs in torch on whatever device the eigenvalues
live on, so the CUDA path is the CPU path.

For sorted eigenvalues ``x_0 <= ... <= x_{n-1}`` and a candidate ``xmin = x_i`` with tail size
``n_i = n - i``, the continuous MLE is ``alpha_i = 1 + n_i / sum_{j>=i} ln(x_j / x_i)`` and the
Kolmogorov-Smirnov distance is ``D_i = max_k |1 - (x_{i+k}/x_i)^(1-alpha_i) - k/n_i|``
(``D_i = 1`` where ``alpha_i <= 1``). All ``alpha_i`` come from one reverse cumulative sum; the
``D_i`` are evaluated in blocks so memory stays bounded for pooled conv spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FIT_MODES = ("ww", "median", "peak", "clip-xmax")

#: WeightWatcher 0.7.7 switches to its small-sample estimator below this many eigenvalues.
SMALL_N_CUTOFF = 20
_SMALL_N_MIN_TAIL = 8
# clip-xmax: WeightWatcher's max_fingers=10 (k = 2..9) and finger_thresh=1.0, min_alpha=2.
_CLIP_KS = range(2, 10)
_CLIP_THRESH = 1.0
_CLIP_MIN_ALPHA = 2.0
# Elements per block of the D scan: bounded memory whatever the spectrum size.
_BLOCK_ELEMS = 1 << 22
#: xmin_peak: histogram bins of log10(lambda), and the window [0.95 p, 1.5 p] around the peak.
PEAK_BINS = 100
PEAK_LOW, PEAK_HIGH = 0.95, 1.5
#: The lower-bound conventions of ``peak``: htsr compares 0.95 p with the eigenvalues;
#: TempBalance and AlphaPruning compare log10(0.95 p) with them (docs/engine.md).
PEAK_BOUNDS = ("linear", "log10")


@dataclass(frozen=True)
class FitConventions:
    """How a fit treats the spectrum. The defaults are htsr's corrected conventions; a preset
    (:mod:`htsr_cli.engine.presets`) sets a reference tool's, quirks included.

    Attributes:
        filter_evals: fit only eigenvalues above ``thresh`` (WeightWatcher's ``EVALS_THRESH``).
            False: fit every positive eigenvalue, as TempBalance and AlphaPruning do with their
            default ``filter_zeros=False`` (an exactly-zero one has no logarithm).
        small_sample: below :data:`SMALL_N_CUTOFF` eigenvalues the argmin-D scans (``ww``,
            ``peak``, ``clip-xmax``) use WeightWatcher's small-sample estimator; False keeps the
            plain MLE (TempBalance, AlphaPruning).
        peak_bound: ``linear`` or ``log10`` (the reference tools' lower bound of ``peak``).
        float32_window: locate the ``peak`` window in float32 as the reference tools do
            (their histogram edges), so that the same candidates fall inside it.
    """

    filter_evals: bool = True
    small_sample: bool = True
    peak_bound: str = "linear"
    float32_window: bool = False


#: htsr's own conventions (the default of every fit).
HTSR = FitConventions()
#: TempBalance's and AlphaPruning's ``net_esd_estimator`` with its defaults.
REFERENCE = FitConventions(
    filter_evals=False, small_sample=False, peak_bound="log10", float32_window=True
)


@dataclass
class PowerLawFit:
    """Result of a fit. A failed fit has NaN numbers and ``status == "failed"``."""

    alpha: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    num_pl_spikes: int = 0
    status: str = "failed"
    reason: str = ""
    extra: dict = field(default_factory=dict)  # clip-xmax: num_fingers, raw_alpha


def _alphas(logx: torch.Tensor, small_n: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MLE alpha_i and the log-sum S_i = sum_{j>=i} ln(x_j/x_i) for every i in 0..n-2."""
    n = logx.numel()
    tail_sum = torch.flip(torch.cumsum(torch.flip(logx, (0,)), 0), (0,))[:-1]
    n_i = torch.arange(n, 1, -1, dtype=logx.dtype, device=logx.device)
    s = tail_sum - n_i * logx[:-1]
    num = n_i - 1 if small_n else n_i
    with torch.no_grad():
        alpha = 1 + num / s
    # A tail whose log-spread is at rounding level (all eigenvalues equal) has no exponent.
    alpha = torch.where(s > 1e-9 * n_i, alpha, torch.full_like(alpha, math.inf))
    return alpha, s


def _ks_distances(
    x: torch.Tensor, logx: torch.Tensor, alpha: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """D_i for the candidate indices ``idx`` (ascending, any subset of 0..n-2).

    With ``k = j - i``: ``|1 - (x_j/x_i)^(1-a) - k/n_i| = |(1 + i/n_i) - j/n_i - e_ij|`` with
    ``e_ij = exp((1-a)(ln x_j - ln x_i))``. A block of candidates starting at ``i0`` only needs
    the columns ``j >= i0``, and only its first columns hold ``j < i`` entries to mask.
    """
    n = x.numel()
    out = torch.ones(idx.numel(), dtype=x.dtype, device=x.device)
    if idx.numel() == 0:
        return out
    j_all = torch.arange(n, dtype=x.dtype, device=x.device)
    block = max(1, _BLOCK_ELEMS // n)
    for start in range(0, idx.numel(), block):
        ii = idx[start : start + block]
        i0 = int(ii[0])
        a = alpha[ii]
        inv_n = 1.0 / (n - ii).to(x.dtype)
        e = (logx[None, i0:] - logx[ii][:, None]).mul_((1 - a)[:, None]).exp_()
        dev = torch.addcmul(
            (1 + ii.to(x.dtype) * inv_n)[:, None], j_all[None, i0:], inv_n[:, None], value=-1.0
        )
        dev.sub_(e).abs_()
        width = min(int(ii[-1]) - i0, dev.shape[1])
        if width > 0:  # entries with j < i are not part of candidate i's tail
            below = j_all[None, i0 : i0 + width] < ii.to(x.dtype)[:, None]
            dev[:, :width].masked_fill_(below, 0.0)
        d = dev.amax(dim=1)
        out[start : start + block] = torch.where(torch.isfinite(a) & (a > 1), d, torch.ones_like(d))
    return out


#: Candidates x tail size up to which the ``ww`` scan evaluates every D_i outright (its cost is
#: quadratic in the eigenvalues); past it, :func:`ks_argmin` bounds D_i first.
EXACT_SCAN_ELEMS = 1 << 24
# Grid points of the first bounding pass over every candidate, and the number of parts an
# interval is cut into at each refinement.
_GRID_COLS = 256
_REFINE_PARTS = 16
# Candidates refined together (their intervals are held as flat tensors).
_CHUNK = 1024
# Rounding allowance when comparing numbers computed by different arithmetic.
_SLACK = 1e-9


def _cdfs(
    logx: torch.Tensor, a: torch.Tensor, i: torch.Tensor, inv_n: torch.Tensor, j: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitted CDF ``1 - (x_j/x_i)^(1-a)`` and the empirical ``(j-i)/n_i`` (broadcast)."""
    fit = 1 - ((logx[j] - logx[i]) * (1 - a)).exp()
    return fit, (j - i).to(logx.dtype) * inv_n


def _grid(n: int, device: torch.device, size: int = _GRID_COLS) -> torch.Tensor:
    stride = max(1, -(-n // size))
    cols = torch.arange(0, n, stride, device=device)
    if int(cols[-1]) != n - 1:
        cols = torch.cat([cols, torch.tensor([n - 1], device=device)])
    return cols


def _coarse(
    logx: torch.Tensor, alpha: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the candidates ``idx`` (ascending): the values ``fit``, ``emp`` at the grid columns
    (zero left of each candidate, where its tail has not begun: both CDFs are 0 at j = i),
    the lower bound of D_i (the largest ``|fit - emp|`` on the grid) and its upper bound.

    Both CDFs increase with j, so between two tail points p < q (or i itself)
    ``|fit(j) - emp(j)| <= max(fit(q) - emp(p), emp(q) - fit(p))``.
    """
    n = logx.numel()
    c = cols[cols >= idx[0]]
    a = alpha[idx][:, None]
    inv_n = (1.0 / (n - idx).to(logx.dtype))[:, None]
    fit, emp = _cdfs(logx, a, idx[:, None], inv_n, c[None, :])
    tail = c[None, :] >= idx[:, None]
    fit = torch.where(tail, fit, torch.zeros_like(fit))
    emp = torch.where(tail, emp, torch.zeros_like(emp))
    lower = (fit - emp).abs().amax(dim=1)
    upper = torch.maximum(torch.maximum(fit[:, 0], emp[:, 0]), lower)  # from j = i on
    if c.numel() > 1:
        step = torch.maximum(fit[:, 1:] - emp[:, :-1], emp[:, 1:] - fit[:, :-1])
        upper = torch.maximum(upper, step.amax(dim=1))
    return c, fit, emp, lower, upper


def _exact_chunk(
    logx: torch.Tensor,
    alpha: torch.Tensor,
    idx: torch.Tensor,
    cols: torch.Tensor,
    best: float,
) -> tuple[torch.Tensor, float]:
    """D_i of the candidates ``idx`` (ascending, valid alpha) by interval refinement: only
    the intervals whose bound exceeds the candidate's best point so far are cut further, and a
    candidate whose lower bound exceeds ``best`` is dropped (its D is returned as inf). Returns
    the D (this arithmetic) and the updated ``best``."""
    n = logx.numel()
    dev = logx.device
    c, fit, emp, lower, upper = _coarse(logx, alpha, idx, cols)
    best = min(best, float(upper.min()))
    a = alpha[idx]
    inv_n = 1.0 / (n - idx).to(logx.dtype)
    # The intervals between consecutive tail points, as flat tensors: candidate, ends, values.
    starts = torch.cat([idx[:, None], c[None, :-1].expand(idx.numel(), -1)], dim=1)
    ends = c[None, :].expand(idx.numel(), -1)
    starts = torch.maximum(starts, idx[:, None])
    fit_s = torch.cat([torch.zeros_like(fit[:, :1]), fit[:, :-1]], dim=1)
    emp_s = torch.cat([torch.zeros_like(emp[:, :1]), emp[:, :-1]], dim=1)
    bound = torch.maximum(fit - emp_s, emp - fit_s)
    live = (ends > starts) & (ends - starts > 1) & (bound > lower[:, None])
    live &= (lower <= best + _SLACK)[:, None]
    cand, col = torch.nonzero(live, as_tuple=True)
    p, q = starts[cand, col], ends[cand, col]
    while p.numel():
        step = torch.div(q - p + _REFINE_PARTS - 1, _REFINE_PARTS, rounding_mode="floor")
        parts = torch.div(q - p + step - 1, step, rounding_mode="floor")
        owner = torch.repeat_interleave(torch.arange(p.numel(), device=dev), parts)
        first = torch.cumsum(parts, 0) - parts
        k = torch.arange(owner.numel(), device=dev) - first[owner]
        lo = p[owner] + k * step[owner]
        hi = torch.minimum(lo + step[owner], q[owner])
        who = cand[owner]
        ai, ii, ni = a[who], idx[who], inv_n[who]
        f_lo, e_lo = _cdfs(logx, ai, ii, ni, lo)
        f_hi, e_hi = _cdfs(logx, ai, ii, ni, hi)
        lower = lower.scatter_reduce(0, who, (f_hi - e_hi).abs(), "amax")
        bound = torch.maximum(f_hi - e_lo, e_hi - f_lo)
        up = torch.maximum(lower, torch.zeros_like(lower).scatter_reduce(0, who, bound, "amax"))
        alive_c = lower <= best + _SLACK
        if bool(alive_c.any()):
            best = min(best, float(torch.where(alive_c, up, torch.full_like(up, math.inf)).min()))
        keep = (hi - lo > 1) & (bound > lower[who]) & alive_c[who]
        cand, p, q = who[keep], lo[keep], hi[keep]
    d = torch.where(lower <= best + _SLACK, lower, torch.full_like(lower, math.inf))
    return d, best


def ks_argmin(
    x: torch.Tensor, logx: torch.Tensor, alpha: torch.Tensor, idx: torch.Tensor
) -> tuple[int, float]:
    """``(k, D)`` with ``D = D_{idx[k]}`` the smallest KS distance over the candidates ``idx``
    (ascending) and ``k`` the first position attaining it: exactly what ``argmin`` over
    :func:`_ks_distances` gives, without evaluating every D_i over its whole tail.

    Branch and bound. A grid of 256 tail points bounds every D_i from below and above
    (:func:`_coarse`); candidates are then taken in the order of their lower bounds, in
    batches thinned by a 16x finer grid, each survivor refined over only the intervals of its
    tail whose bound exceeds its best point so far (:func:`_exact_chunk`), until no lower
    bound left is below the best D; the few candidates
    within rounding of the best are evaluated by :func:`_ks_distances`, so the choice is the
    plain scan's to the last bit.
    """
    n = x.numel()
    valid = torch.isfinite(alpha[idx]) & (alpha[idx] > 1)
    if not bool(valid.any()):
        return 0, 1.0  # every D_i is 1: the first candidate, as argmin gives
    pos = torch.nonzero(valid).reshape(-1)
    cols = _grid(n, x.device)
    lower = torch.empty(pos.numel(), dtype=x.dtype, device=x.device)
    upper = torch.empty_like(lower)
    block = max(1, _BLOCK_ELEMS // cols.numel())
    for s in range(0, pos.numel(), block):
        _, _, _, lower[s : s + block], upper[s : s + block] = _coarse(
            logx, alpha, idx[pos[s : s + block]], cols
        )
    best = float(upper.min())
    order = torch.argsort(lower, stable=True)
    pos, lower = pos[order], lower[order]
    # A 16x finer grid, dense and cheap per point, thins each chunk before its refinement
    # (many candidates come near the best on a clean power law).
    fine = _grid(n, x.device, _GRID_COLS * _REFINE_PARTS)
    done_pos, done_d = [], []
    for s in range(0, pos.numel(), _CHUNK):
        if float(lower[s]) > best + _SLACK:
            break
        part = torch.sort(pos[s : s + _CHUNK]).values
        if fine.numel() > cols.numel():
            _, _, _, lo, up = _coarse(logx, alpha, idx[part], fine)
            best = min(best, float(up.min()))
            part = part[lo <= best + _SLACK]
            if part.numel() == 0:
                continue
        d, best = _exact_chunk(logx, alpha, idx[part], cols, best)
        done_pos.append(part)
        done_d.append(d)
    pos, d_all = torch.cat(done_pos), torch.cat(done_d)
    near = pos[d_all <= float(d_all.min()) + 1e-7]  # ties to rounding: the plain scan decides
    near = torch.sort(near).values
    d = _ks_distances(x, logx, alpha, idx[near])
    k = int(torch.argmin(d))
    return int(near[k]), float(d[k])


def _result(
    x: torch.Tensor,
    i: int,
    alpha: float,
    D: float,
    all_evals: torch.Tensor,
    xmax: float | None = None,
) -> PowerLawFit:
    n_i = x.numel() - i
    if not math.isfinite(alpha):
        return PowerLawFit(reason="degenerate spectrum: the tail eigenvalues are all equal")
    xmin = float(x[i])
    return PowerLawFit(
        alpha=alpha,
        xmin=xmin,
        xmax=float(x[-1]) if xmax is None else xmax,
        D=D,
        sigma=(alpha - 1) / math.sqrt(n_i),
        num_pl_spikes=int((all_evals >= xmin).sum()),
        status="success",
    )


def _fit_scan(
    x: torch.Tensor,
    all_evals: torch.Tensor,
    candidates: torch.Tensor | None = None,
    small_sample: bool = True,
) -> PowerLawFit:
    """argmin-D scan (WeightWatcher's default), optionally over a subset of candidates;
    ``small_sample=False`` keeps the plain MLE on short spectra (the reference tools)."""
    n = x.numel()
    logx = torch.log(x)
    small = small_sample and n < SMALL_N_CUTOFF
    alpha, s = _alphas(logx, small)
    idx = torch.arange(n - 1, device=x.device) if candidates is None else candidates
    if idx.numel() == 0:
        return PowerLawFit(reason="no candidate xmin in the search window")
    if not small and idx.numel() * (n - int(idx[0])) > EXACT_SCAN_ELEMS:
        # A long spectrum: the same argmin without the quadratic scan (docs/engine.md).
        best, d_best = ks_argmin(x, logx, alpha, idx)
        i = int(idx[best])
        return _result(x, i, float(alpha[i]), d_best, all_evals)
    D = _ks_distances(x, logx, alpha, idx)
    if small:
        # WeightWatcher 0.7.7's small-sample path: bias-corrected alpha, tails of at least 8
        # and a positive log-sum; with no such tail, the whole spectrum. Its code also computes
        # J = D - 0.868/sqrt(n_i), but WWFit.__init__ then re-selects by argmin D, which is what
        # its users see, so that is what we reproduce (docs/engine.md).
        n_i = (n - idx).to(x.dtype)
        ok = (n_i >= _SMALL_N_MIN_TAIL) & (s[idx] > 1e-12) & (alpha[idx] > 1)
        if not bool(ok.any()):
            if float(s[0]) <= 1e-12:
                return PowerLawFit(reason="degenerate spectrum: the eigenvalues are all equal")
            ok = idx == int(idx[0])
        D = torch.where(ok, D, torch.ones_like(D))
    best = int(torch.argmin(D))
    i = int(idx[best])
    return _result(x, i, float(alpha[i]), float(D[best]), all_evals)


def _fit_median(x: torch.Tensor, all_evals: torch.Tensor) -> PowerLawFit:
    """TempBalance/AlphaPruning ``xmin_mid``: xmin = x[n // 2], no scan."""
    n = x.numel()
    i = min(n // 2, n - 2)
    logx = torch.log(x)
    alpha, _ = _alphas(logx, small_n=False)
    idx = torch.tensor([i], device=x.device)
    D = float(_ks_distances(x, logx, alpha, idx)[0])
    return _result(x, i, float(alpha[i]), D, all_evals)


def peak_window(x: torch.Tensor, conv: FitConventions = HTSR) -> tuple[float, float]:
    """The ``peak`` window ``(lower, upper)`` of the candidate xmin for ascending ``x``.

    ``p`` is the left edge of the peak bin (the first of equal counts) of a 100-bin histogram
    of ``log10(lambda)``; the window is ``[0.95 p, 1.5 p]``. With ``peak_bound="log10"`` the
    lower bound is ``log10(0.95 p)`` (the reference tools' unit mix-up): below every eigenvalue
    when ``p < 1/0.95 = 1.0526`` (no lower bound at all), else a looser bound than 0.95 p.
    """
    if conv.float32_window:
        # As TempBalance/AlphaPruning: float32 log10, torch.histc, linspace bin edges.
        logx10 = torch.log10(x.detach().to("cpu", torch.float32))
        lo, hi = logx10.min(), logx10.max()
        counts = torch.histc(logx10, PEAK_BINS, min=float(lo), max=float(hi))
        edges = torch.linspace(float(lo), float(hi), PEAK_BINS + 1)
        p32 = 10 ** edges[int(torch.argmax(counts))]
        upper = float(PEAK_HIGH * p32)
        lower = (
            float(torch.log10(PEAK_LOW * p32))
            if conv.peak_bound == "log10"
            else float(PEAK_LOW * p32)
        )
        return lower, upper
    logx10 = torch.log10(x).cpu()
    counts = torch.histc(logx10, bins=PEAK_BINS, min=float(logx10[0]), max=float(logx10[-1]))
    width = (float(logx10[-1]) - float(logx10[0])) / PEAK_BINS
    p = 10 ** (float(logx10[0]) + width * int(torch.argmax(counts)))
    lower = math.log10(PEAK_LOW * p) if conv.peak_bound == "log10" else PEAK_LOW * p
    return lower, PEAK_HIGH * p


def _fit_peak(x: torch.Tensor, all_evals: torch.Tensor, conv: FitConventions) -> PowerLawFit:
    """``xmin_peak``: scan only xmin in the :func:`peak_window` (htsr: both bounds in linear
    units; the reference tools compare a log10 lower bound with linear eigenvalues)."""
    lower, upper = peak_window(x, conv)
    cand = torch.nonzero((x[:-1] >= lower) & (x[:-1] <= upper)).reshape(-1)
    return _fit_scan(x, all_evals, cand, conv.small_sample)


def _fit_clip_xmax(
    x: torch.Tensor, all_evals: torch.Tensor, small_sample: bool = True
) -> PowerLawFit:
    """WeightWatcher ``fix_fingers='clip_xmax'``: refit without the top k = 2..9 eigenvalues;
    take the first clipped fit whose alpha is more than 1.0 below the raw one, stop early when a
    clipped alpha is <= 2. ``num_fingers`` is the number of eigenvalues clipped (WeightWatcher
    reports k - 1)."""
    raw = _fit_scan(x, all_evals, small_sample=small_sample)
    best, fingers = raw, 0
    if raw.status == "success":
        for k in _CLIP_KS:
            if x.numel() - k < 2:
                break
            fit = _fit_scan(x[:-k], all_evals, small_sample=small_sample)
            if fit.status != "success":
                break
            if fit.alpha + _CLIP_THRESH < raw.alpha:
                best, fingers = fit, k
                break
            if fit.alpha <= _CLIP_MIN_ALPHA:
                break
    best.extra = {"num_fingers": fingers, "raw_alpha": raw.alpha}
    return best


def fit_cut(thresh: float, conventions: FitConventions) -> float:
    """The eigenvalues a fit uses are those above this value (``thresh``, or every positive
    one when ``conventions.filter_evals`` is False): one rule for the fit and its warnings."""
    return thresh if conventions.filter_evals else 0.0


def fit_power_law(
    evals: torch.Tensor,
    mode: str = "ww",
    thresh: float = 1e-5,
    conventions: FitConventions = HTSR,
) -> PowerLawFit:
    """Fit a power law to the tail of an ESD.

    Args:
        evals: eigenvalues, ascending, float64 (any device). Only ``evals > thresh`` are fitted
            (every positive one when ``conventions.filter_evals`` is False);
            ``num_pl_spikes`` counts all of ``evals`` at or above xmin.
        mode: ``ww`` (argmin-D scan), ``median``, ``peak`` or ``clip-xmax``.
        thresh: WeightWatcher's ``EVALS_THRESH``.
        conventions: htsr's (:data:`HTSR`) or a reference tool's (:data:`REFERENCE`).

    Returns:
        A :class:`PowerLawFit`; never raises for a bad spectrum (it reports ``failed``).
    """
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}")
    if conventions.peak_bound not in PEAK_BOUNDS:
        raise ValueError(f"unknown peak bound {conventions.peak_bound!r}")
    cut = fit_cut(thresh, conventions)
    x = evals[evals > cut]
    if x.numel() < 2:
        return PowerLawFit(reason=f"{x.numel()} eigenvalue(s) above {cut:g}: nothing to fit")
    if mode == "ww":
        return _fit_scan(x, evals, small_sample=conventions.small_sample)
    if mode == "median":
        return _fit_median(x, evals)
    if mode == "peak":
        return _fit_peak(x, evals, conventions)
    return _fit_clip_xmax(x, evals, conventions.small_sample)
