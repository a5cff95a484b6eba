"""``allocate``: per-layer learning-rate multipliers from an HT-SR metric (docs/allocate.md).

The schemes are those of the thesis (EECS-2023-126, chapter 2) and of TempBalance (reference
section 4). A plan stores, for every analysed layer, the multiplier ``s_i = lr_i / lr_t`` of the
base learning rate ``lr_t``; guarded layers keep ``1.0``. The result is an
:class:`~htsr_cli.allocate.plan.LRPlan` (the ``htsr.lr-plan/1`` document).

This module does not import torch unless a checkpoint has to be analysed, so reading an
analysis document stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from htsr_cli import defaults
from htsr_cli.allocate.plan import LRPlan, PlanLayer
from htsr_cli.engine.columns import METRICS
from htsr_cli.engine.presets import Preset, check_fit, get_preset
from htsr_cli.errors import InputError
from htsr_cli.io.documents import finite, is_analysis_document, read_analysis

#: Scheme names as the CLI accepts them (``power:P`` takes an exponent, e.g. ``power:1/2``).
SCHEMES: tuple[str, ...] = (
    "tb-linear",
    "rank",
    "proportional",
    "power:P",
    "log2",
    "softmax",
    "negpow2",
    "sample-normal",
    "sample-rank",
    "sample-emg",
)
#: Schemes whose multipliers always average exactly 1 over the allocated layers.
MEAN_PRESERVING = frozenset(
    {
        "proportional",
        "power",
        "log2",
        "softmax",
        "negpow2",
        "sample-normal",
        "sample-rank",
        "sample-emg",
    }
)
#: Schemes that draw random numbers (``seed``).
SAMPLED = frozenset({"sample-normal", "sample-rank", "sample-emg"})
WD_SCHEMES: tuple[str, ...] = ("tb-linear",)
#: Smallest multiplier a share-based scheme may give: a layer whose share falls below one
#: millionth of the base LR is frozen in all but name, and a zero or negative LR is never
#: meant. Shares below it (or non-positive/non-finite ones) are raised to it and counted.
MIN_MULTIPLIER = 1e-6
DEFAULT_MIN_EVALS = defaults.PLAN_MIN_EVALS
#: Keyword options of :func:`htsr_cli.engine.analysis.analyze` that allocate passes on for a
#: checkpoint source (``analysis_seed`` is analyze's ``seed``).
ANALYZE_OPTIONS = frozenset(
    {"fit", "device", "layers", "exclude", "trust_pickle", "key", "analysis_seed"}
)
#: The fit of an on-the-fly analysis for a plan (allocate, Reallocator, finetune): one default.
DEFAULT_FIT = defaults.PLAN_FIT


_NAMES = tuple(s.split(":")[0] for s in SCHEMES)


# --------------------------------------------------------------------------------------------
# Schemes


def parse_scheme(text: str) -> tuple[str, dict[str, Any]]:
    """Split a scheme text into its name and parameters.

    ``"power:0.5"`` and ``"power:1/2"`` give ``("power", {"p": 0.5})``; other schemes take no
    parameter and give ``(name, {})``.

    Raises:
        InputError: unknown scheme, or ``power`` without a positive, finite exponent.
    """
    text = str(text).strip()
    name, sep, arg = text.partition(":")
    if name == "power":
        if not sep or not arg.strip():
            raise InputError("scheme power needs an exponent: power:P (e.g. power:2, power:1/2)")
        p = _parse_number(arg.strip())
        if p is None or not math.isfinite(p) or p <= 0:
            raise InputError(
                f"scheme {text!r}: P must be a positive number or fraction "
                "(e.g. 2, 0.5, 1/3); for the inverse direction use --invert"
            )
        return "power", {"p": p}
    if name in _NAMES and not sep:
        return name, {}
    raise InputError(f"unknown scheme {text!r}; choose from {', '.join(SCHEMES)}")


def _parse_number(text: str) -> float | None:
    num, slash, den = text.partition("/")
    try:
        if not slash:
            return float(num)
        d = float(den)
        return float(num) / d if d != 0 else None
    except ValueError:
        return None


def _check_ratios(s1: float, s2: float) -> None:
    if not (math.isfinite(s1) and math.isfinite(s2)):
        raise InputError(f"--s1 and --s2 must be finite numbers, got {s1} and {s2}")
    if s1 <= 0:
        raise InputError(f"--s1 must be positive (a multiplier of the base LR), got {s1}")
    if s1 > s2:
        raise InputError(f"--s1 ({s1}) must not exceed --s2 ({s2})")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")


def linear_map(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo + (hi - lo) * (v - min)/(max - min)``; all 1.0 when max == min."""
    if v.size == 0:
        return np.ones(0)
    scale = float(np.max(np.abs(v)))
    u = v / scale if scale > 0 else v  # scaled so that max - min cannot overflow
    span = float(u.max() - u.min())
    if span == 0:
        return np.ones(v.size)
    return lo + (hi - lo) * ((u - u.min()) / span)


def _ranks(v: np.ndarray, descending: bool) -> np.ndarray:
    """0-based rank of each value; ties keep layer order (stable sort)."""
    order = np.argsort(-v if descending else v, kind="stable")
    ranks = np.empty(v.size, dtype=np.int64)
    ranks[order] = np.arange(v.size)
    return ranks


def _shares(w: np.ndarray) -> tuple[np.ndarray, int]:
    """``n * w / sum(w)``, with the clipping rule of docs/allocate.md.

    Weights that are not finite and positive, and shares below :data:`MIN_MULTIPLIER`, are
    raised to it; the result is rescaled to mean 1 and the raised entries counted.
    """
    n = w.size
    if n == 0:
        return np.ones(0), 0
    with np.errstate(all="ignore"):
        valid = np.isfinite(w) & (w > 0)
        if valid.any():
            w = np.where(valid, w / np.max(w[valid]), 0.0)  # largest 1: the sum cannot overflow
            s = n * w / w.sum()
        else:
            s = np.zeros(n)
        low = ~(np.isfinite(s) & (s >= MIN_MULTIPLIER))
        clipped = int(low.sum())
        if clipped == n:
            return np.ones(n), clipped  # nothing usable: every layer at the base LR
        if clipped:
            s = np.where(low, MIN_MULTIPLIER, s)
            s = n * s / s.sum()
    return s, clipped


def _log_weights(v: np.ndarray, scheme: str, p: float) -> np.ndarray:
    """``ln f(m)`` of the proportional family (NaN outside the domain of f), so that weights
    are formed as ``exp(lw - max lw)`` without overflow."""
    with np.errstate(all="ignore"):
        if scheme == "softmax":
            return v.astype(float)
        if scheme == "log2":
            lg = np.log2(v)
            return np.where(lg > 0, np.log(np.where(lg > 0, lg, 1.0)), np.nan)
        return np.where(v > 0, p * np.log(np.where(v > 0, v, 1.0)), np.nan)  # m^P, P = 1 too


def _from_log_weights(lw: np.ndarray, invert: bool) -> np.ndarray:
    if invert:
        lw = -lw  # 1/f(m): inversely proportional
    ok = np.isfinite(lw)
    if not ok.any():
        return np.full(lw.size, np.nan)
    with np.errstate(all="ignore"):
        return np.where(ok, np.exp(lw - np.max(lw[ok])), np.nan)


def _samples(
    v: np.ndarray, name: str, seed: int, base_lr: float | None, invert: bool
) -> np.ndarray:
    """The weights of the sampled schemes (before normalisation)."""
    rng = np.random.default_rng(seed)
    n = v.size
    if name == "sample-rank":
        if base_lr is None:
            raise InputError("scheme sample-rank draws from N(base LR, 1): give base_lr")
        x = np.sort(rng.normal(base_lr, 1.0, n))
        # the layer with the j-th largest metric gets the j-th largest draw (the j-th
        # smallest when inverted)
        r = _ranks(v, descending=invert)
        return x[r]
    if name == "sample-normal":
        y = v + rng.standard_normal(n)
    else:  # sample-emg: y = m + (Z - 1/nu) + eps, Z ~ Exp(nu), nu = 1/mean(m)
        z = rng.standard_exponential(n)
        eps = rng.standard_normal(n)
        with np.errstate(all="ignore"):
            mean = float(np.mean(v))
        # Exp(nu) needs nu > 0; for a metric with mean <= 0 only the Gaussian noise remains
        scale = mean if math.isfinite(mean) and mean > 0 else 0.0
        y = v + (z * scale - scale) + eps
    if invert:
        with np.errstate(all="ignore"):
            return np.where(y > 0, 1.0 / np.where(y > 0, y, 1.0), np.nan)
    return y


def scheme_multipliers(
    values: Sequence[float],
    scheme: str,
    *,
    s1: float = 0.5,
    s2: float = 1.5,
    seed: int = 0,
    invert: bool = False,
    base_lr: float | None = None,
) -> tuple[np.ndarray, int]:
    """Multipliers ``s_i = lr_i / lr_t`` of the allocated layers from their metric values.

    Args:
        values: the metric of each allocated layer, in layer order; all finite.
        scheme: a name from :data:`SCHEMES` (``power:P`` with its exponent).
        s1, s2: the range of ``tb-linear`` and ``rank``.
        seed: seed of ``numpy.random.default_rng`` for the sampled schemes.
        invert: larger metric gets a smaller multiplier (see docs/allocate.md).
        base_lr: the base LR ``lr_t``; only ``sample-rank`` uses it (it draws N(lr_t, 1)).

    Returns:
        ``(multipliers, clipped)``: float64 multipliers, every one finite and positive, and
        how many were raised to :data:`MIN_MULTIPLIER` (only share-based schemes clip).

    Raises:
        InputError: unknown scheme or bad parameter.
        ValueError: a value is not finite (allocate guards those layers first).
    """
    name, params = parse_scheme(scheme)
    _check_ratios(s1, s2)
    _check_seed(seed)
    v = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError(
            "scheme_multipliers needs finite values (allocate() keeps layers "
            "with a non-finite metric at the base LR)"
        )
    n = v.size
    if n == 0:
        return np.ones(0), 0
    if name == "tb-linear":
        return (linear_map(-v if invert else v, s1, s2), 0)
    if name == "rank":
        if n == 1:
            return np.ones(1), 0  # nothing to rank against (as tb-linear with max == min)
        return s1 + (s2 - s1) * _ranks(v, descending=invert) / n, 0
    if name == "negpow2":
        # the j-th smallest (1-based) gets 2^-(n-j+1); the residue 2^-n goes to the largest
        j = _ranks(v, descending=invert) + 1
        share = np.ldexp(1.0, -(n - j + 1).astype(np.int64))
        share[j == n] += math.ldexp(1.0, -n)
        return _shares(share)
    if name in SAMPLED:
        return _shares(_samples(v, name, seed, base_lr, invert))
    lw = _log_weights(v, name, params.get("p", 1.0))
    return _shares(_from_log_weights(lw, invert))


# --------------------------------------------------------------------------------------------
# The source: an analysis document or a checkpoint


def load_analysis(
    source: Any,
    metric: str,
    analyze_options: Mapping[str, Any],
    preset: Preset | None = None,
    default_fit: str = DEFAULT_FIT,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analysis document behind ``source`` and the plan's ``source`` record.

    A document (``-``, a ``.json`` path, a dict with ``schema``, an :class:`Analysis`) is
    validated, and with a ``preset`` it must have been made with that preset; anything else is
    a checkpoint, analysed for ``metric`` only (fit ``default_fit`` unless given, the preset's
    conventions with a preset).
    """
    unknown = set(analyze_options) - ANALYZE_OPTIONS
    if unknown:
        raise TypeError(f"allocate() got unexpected keyword argument(s) {sorted(unknown)}")
    given = {
        k: v
        for k, v in analyze_options.items()
        if v is not None and v is not False and not (isinstance(v, list | tuple) and not v)
    }
    if is_analysis_document(source):
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            verb = "applies" if len(given) == 1 else "apply"
            raise InputError(
                f"{names} {verb} only to a checkpoint source; SOURCE is an analysis document"
            )
        doc, label = read_analysis(source)
        made_with = doc.get("options", {}).get("preset") if isinstance(doc, Mapping) else None
        if preset is not None and made_with != preset.name:
            raise InputError(
                f"--preset {preset.name} needs an analysis made with it (htsr analyze --preset "
                f"{preset.name}); this one was made with "
                + (f"--preset {made_with}" if made_with else "htsr's own conventions")
            )
        record = dict(doc["source"]) if isinstance(doc["source"], Mapping) else {}
        if label is not None:
            record["analysis"] = label
        return doc, record
    from htsr_cli.engine.analysis import analyze_metric  # torch: only for a checkpoint

    given.setdefault("fit", preset.fit if preset else default_fit)
    if preset is not None:
        check_fit(preset, given["fit"])
        given["preset"] = preset.name
    result = analyze_metric(source, metric, **given)
    if not result.layers:
        skipped = "; ".join(f"{r['name']}: {r['reason']}" for r in result.skipped[:3])
        raise InputError(f"no layer could be analysed ({skipped})")
    doc = result.to_dict()
    return doc, dict(doc["source"])


# --------------------------------------------------------------------------------------------
# allocate


def _check_allocate(
    lr: float,
    metric: str,
    s1: float,
    s2: float,
    seed: int,
    min_evals: int,
    wd: float | None,
    wd_scheme: str | None,
    wd_min_ratio: float,
    wd_max_ratio: float,
) -> None:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"--lr must be a positive number, got {lr}")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    _check_ratios(s1, s2)
    _check_seed(seed)
    if isinstance(min_evals, bool) or not isinstance(min_evals, int) or min_evals < 0:
        raise InputError(f"--min-evals must be a non-negative integer, got {min_evals!r}")
    if wd is None:
        if wd_scheme is not None:
            raise InputError("--wd-scheme needs --wd (the base weight decay)")
        return
    if not math.isfinite(wd) or wd < 0:
        raise InputError(f"--wd must be a non-negative number, got {wd}")
    if (wd_scheme or "tb-linear") not in WD_SCHEMES:
        raise InputError(f"unknown --wd-scheme {wd_scheme!r}; choose from {', '.join(WD_SCHEMES)}")
    if (
        not (math.isfinite(wd_min_ratio) and math.isfinite(wd_max_ratio))
        or wd_min_ratio <= 0
        or wd_min_ratio > wd_max_ratio
    ):
        raise InputError(
            f"--wd-min-ratio ({wd_min_ratio}) and --wd-max-ratio ({wd_max_ratio}) "
            "must be finite with 0 < min <= max"
        )


def _guard_reasons(
    layers: list[dict[str, Any]], metric: str, min_evals: int, all_layers: bool
) -> list[str]:
    """Why each layer keeps the base LR ("" when it is allocated)."""
    reasons = []
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        why = []
        if not math.isfinite(finite(layer.get(metric))):
            what = "missing" if metric not in layer else "not finite"
            note = str(layer.get("warning") or "")
            why.append(f"{metric} {what}" + (f" ({note})" if note else ""))
        evals = finite(layer.get("num_evals"))
        if not evals >= min_evals:
            why.append(f"{layer.get('num_evals')} eigenvalues < min_evals {min_evals}")
        if not all_layers and i == 0:
            why.append("first layer (base LR unless --all-layers)")
        elif not all_layers and i == last:
            why.append("last layer (base LR unless --all-layers)")
        reasons.append("; ".join(why))
    return reasons


def allocate(
    source: Any,
    *,
    lr: float,
    scheme: str = "tb-linear",
    metric: str = "alpha",
    s1: float = defaults.S1,
    s2: float = defaults.S2,
    seed: int = defaults.SEED,
    invert: bool = False,
    min_evals: int = DEFAULT_MIN_EVALS,
    all_layers: bool = False,
    wd: float | None = None,
    wd_scheme: str | None = None,
    wd_min_ratio: float = defaults.WD_MIN_RATIO,
    wd_max_ratio: float = defaults.WD_MAX_RATIO,
    preset: str | None = None,
    **analyze_options: Any,
) -> LRPlan:
    """A per-layer learning-rate plan from an analysis or a checkpoint.

    Args:
        source: an ``htsr.analysis/1`` dict, an :class:`~htsr_cli.engine.analysis.Analysis`, a path
            to an analysis ``.json`` or ``-`` (stdin); otherwise a checkpoint path,
            ``nn.Module`` or state dict, analysed on the fly for ``metric``.
        lr: the base learning rate ``lr_t``; ``lr_i = lr * multiplier``.
        scheme: one of :data:`SCHEMES` (docs/allocate.md gives each formula).
        metric: one of the ten metrics (:data:`htsr_cli.engine.metrics.METRICS`).
        s1, s2: the multiplier range of ``tb-linear`` and ``rank``.
        seed: seed of the sampled schemes (the same seed gives the same plan).
        invert: larger metric gets a smaller LR.
        min_evals: layers with fewer eigenvalues keep the base LR (TempBalance: 50).
        all_layers: also allocate the first and the last analysed layer.
        wd: base weight decay; adds AlphaDecay ``wd_multiplier`` to every layer.
        wd_scheme: ``tb-linear`` (the default when ``wd`` is given).
        wd_min_ratio, wd_max_ratio: the AlphaDecay range (larger metric, more decay).
        preset: ``tempbalance``: TempBalance's analysis (fit median, its eigenvalue filter
            and layer set; docs/presets.md). Its allocation conventions (tb-linear 0.5..1.5,
            50 eigenvalues, first and last layer at the base LR) are htsr's defaults. A
            document source must have been analysed with the same preset.
        **analyze_options: for a checkpoint source only: ``fit`` (default
            :data:`DEFAULT_FIT`, ``median``), ``device``, ``layers``, ``exclude``,
            ``trust_pickle``, ``analysis_seed`` (analyze's ``seed``).

    Raises:
        InputError: bad option, unreadable or invalid source, metric absent from the analysis.
    """
    _check_allocate(lr, metric, s1, s2, seed, min_evals, wd, wd_scheme, wd_min_ratio, wd_max_ratio)
    name, scheme_params = parse_scheme(scheme)
    lr = float(lr)
    tool = get_preset(preset, "allocate")
    doc, source_record = load_analysis(source, metric, analyze_options, tool)
    layers: list[dict[str, Any]] = doc["layers"]
    if not any(metric in layer for layer in layers):
        raise InputError(
            f"analysis has no metric {metric} (rerun htsr analyze with --metrics {metric})"
        )
    reasons = _guard_reasons(layers, metric, min_evals, all_layers)
    chosen = [i for i, r in enumerate(reasons) if not r]
    values = np.array([finite(layers[i].get(metric)) for i in chosen], dtype=float)
    mult, clipped = scheme_multipliers(
        values, scheme, s1=s1, s2=s2, seed=seed, invert=invert, base_lr=lr
    )
    multipliers = [1.0] * len(layers)
    for i, m in zip(chosen, mult, strict=True):
        multipliers[i] = float(m)
    wd_mult: list[float | None] = [None] * len(layers)
    if wd is not None:
        wd_mult = [1.0] * len(layers)
        for i, m in zip(chosen, linear_map(values, wd_min_ratio, wd_max_ratio), strict=True):
            wd_mult[i] = float(m)
    plan_layers = [
        PlanLayer(
            name=str(layer["name"]),
            metric_value=finite(layer.get(metric)),
            multiplier=multipliers[i],
            lr=lr * multipliers[i],
            status="base" if reasons[i] else "allocated",
            reason=reasons[i],
            wd_multiplier=wd_mult[i],
        )
        for i, layer in enumerate(layers)
    ]
    # A plan never holds a non-finite number (JSON would write null, and a trainer would
    # read no learning rate): options whose product overflows are refused.
    for p in plan_layers:
        wd_value = None if wd is None or p.wd_multiplier is None else wd * p.wd_multiplier
        if not all(math.isfinite(v) for v in (p.multiplier, p.lr, wd_value or 0.0)):
            raise InputError(
                f"layer {p.name!r}: --lr {lr:g} times its multiplier {p.multiplier:g} "
                "(--s1/--s2, --wd) is not a finite number; choose smaller values"
            )
    params: dict[str, Any] = {
        **scheme_params,
        "s1": s1,
        "s2": s2,
        "seed": seed,
        "invert": bool(invert),
        "min_evals": min_evals,
        "all_layers": bool(all_layers),
        "clipped": clipped,
        "min_multiplier": MIN_MULTIPLIER,
        "mean_preserving": name in MEAN_PRESERVING,
        "allocated": len(chosen),
        "preset": tool.name if tool else None,
    }
    if wd is not None:
        params.update(wd_min_ratio=wd_min_ratio, wd_max_ratio=wd_max_ratio)
    if isinstance(doc.get("options"), Mapping):
        params["analysis_options"] = dict(doc["options"])
    return LRPlan(
        scheme=str(scheme).strip(),
        metric=metric,
        base_lr=lr,
        params=params,
        layers=plan_layers,
        source=source_record,
        base_wd=None if wd is None else float(wd),
        wd_scheme=None if wd is None else (wd_scheme or "tb-linear"),
    )


__all__ = [
    "SCHEMES",
    "MEAN_PRESERVING",
    "SAMPLED",
    "MIN_MULTIPLIER",
    "WD_SCHEMES",
    "parse_scheme",
    "scheme_multipliers",
    "load_analysis",
    "allocate",
]
