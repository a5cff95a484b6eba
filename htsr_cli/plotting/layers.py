"""Per-layer figures from JSON documents: ``plot metrics``, ``plot lr-plan``, ``plot prune-plan``.

Each takes one or more documents and overlays them on a layer axis: the union of their layer
names in the order of the first document (then layers only later documents have).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from htsr_cli.allocate.plan import LRPlan, load_plan
from htsr_cli.engine.columns import ALPHA_HIGH, ALPHA_LOW, METRICS
from htsr_cli.errors import InputError
from htsr_cli.io import documents as plans
from htsr_cli.io.documents import finite
from htsr_cli.plotting.common import (
    DEFAULT_DPI,
    abbreviate,
    colour,
    layer_axis,
    layer_figure_width,
    marker,
    new_figure,
    output_format,
    outside_legend,
    path_labels,
    save,
    series_labels,
    union_order,
)
from htsr_cli.prune.plan import plan_ratios, read_plan

_BASELINES = ("uniform", "erk", "lamp")


@dataclass
class LayerSeries:
    """One document's values on the shared layer axis."""

    label: str
    names: list[str]
    values: np.ndarray
    #: Index of each name on the figure's layer axis.
    positions: np.ndarray
    #: Extra per-series facts (flagged layers, guard status, target sparsity...).
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerPlot:
    path: Path
    layers: list[str]
    series: list[LayerSeries]
    notes: list[str] = field(default_factory=list)
    #: The matplotlib ``Figure`` as saved, for a caller that inspects or redraws it.
    figure: Any = None


def _positions(names: Sequence[str], order: Sequence[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(order)}
    return np.array([index[n] for n in names], dtype=int)


def _label_of(src: Any, i: int) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else f"document {i + 1}"


def _file_labels(sources: Sequence[Any]) -> list[str]:
    if all(isinstance(s, str | os.PathLike) for s in sources):
        return path_labels(sources)
    return [f"#{i + 1}" for i in range(len(sources))]


def _need_inputs(sources: Sequence[Any], what: str) -> None:
    if not sources:
        raise InputError(f"no {what} given")


# ---------------------------------------------------------------- metrics


def read_analysis(source: Any, label: str = "analysis") -> dict[str, Any]:
    """An ``htsr.analysis/1`` document from a path, ``-``, a dict or an :class:`Analysis`."""
    return plans.read_analysis(source, label)[0]


def plot_metrics(
    analyses: Sequence[Any],
    output: str | os.PathLike,
    *,
    metric: str = "alpha",
    labels: Sequence[str] | None = None,
    dpi: float = DEFAULT_DPI,
) -> LayerPlot:
    """One metric per layer, in layer order, for one or more analyses overlaid.

    For ``alpha`` the well-trained band 2..6 is shaded and layers outside it are ringed:
    below 2 over-trained, above 6 under-trained.
    """
    fmt = output_format(output)
    _need_inputs(analyses, "analysis")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    docs = [read_analysis(a, _label_of(a, i)) for i, a in enumerate(analyses)]
    names_per_doc, values_per_doc = [], []
    for i, doc in enumerate(docs):
        if not any(metric in row for row in doc["layers"]):
            computed = ", ".join(m for m in METRICS if m in doc["layers"][0]) or "none"
            raise InputError(
                f"{_label_of(analyses[i], i)} has no {metric!r} values (computed: {computed})"
            )
        names_per_doc.append([str(r["name"]) for r in doc["layers"]])
        values_per_doc.append(np.array([finite(r.get(metric)) for r in doc["layers"]]))
    defaults = _file_labels(analyses)
    names = series_labels(defaults, defaults, labels, "analyses")
    order = union_order(names_per_doc)
    series = []
    for lab, ns, vs in zip(names, names_per_doc, values_per_doc, strict=True):
        info: dict[str, Any] = {}
        if metric == "alpha":
            info["over_trained"] = [n for n, v in zip(ns, vs, strict=True) if v < ALPHA_LOW]
            info["under_trained"] = [n for n, v in zip(ns, vs, strict=True) if v > ALPHA_HIGH]
        series.append(LayerSeries(lab, ns, vs, _positions(ns, order), info))

    width = layer_figure_width(len(order))
    fig = new_figure(width, 4.6)
    ax = fig.subplots()
    if metric == "alpha":
        ax.axhspan(
            ALPHA_LOW,
            ALPHA_HIGH,
            color="#009E73",
            alpha=0.12,
            linewidth=0,
            label=f"{ALPHA_LOW:g} ≤ α ≤ {ALPHA_HIGH:g} (well trained)",
        )
    dense = len(order) > 60  # smaller marks where layers crowd the axis
    for i, s in enumerate(series):
        ax.plot(
            s.positions,
            s.values,
            color=colour(i),
            marker=marker(i),
            markersize=3 if dense else 5,
            linewidth=1.2 if dense else 1.4,
            label=s.label,
        )
    if metric == "alpha":
        for key, sym, text in (
            ("over_trained", "v", f"over-trained (α < {ALPHA_LOW:g})"),
            ("under_trained", "^", f"under-trained (α > {ALPHA_HIGH:g})"),
        ):
            pts = [
                (p, v)
                for s in series
                for n, p, v in zip(s.names, s.positions, s.values, strict=True)
                if n in s.info[key]
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(
                    xs,
                    ys,
                    s=60 if dense else 150,
                    marker=sym,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=1.3,
                    zorder=5,
                    label=text,
                )
    layer_axis(ax, order, width - 1.2)
    # Short: the axis shrinks as rotated layer names grow, and a longer label was cut off.
    ax.set_ylabel("α (ESD tail exponent)" if metric == "alpha" else metric)
    ax.set_title(
        f"{metric} per layer" + (" — " + series[0].label if len(series) == 1 else ""), fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)
    outside_legend(fig, *ax.get_legend_handles_labels())
    save(fig, output, fmt, dpi)
    return LayerPlot(Path(output), order, series, figure=fig)


# ---------------------------------------------------------------- LR plans


def plot_lr_plans(
    plans: Sequence[Any],
    output: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    dpi: float = DEFAULT_DPI,
) -> LayerPlot:
    """Per-layer LR multipliers in layer order (left) and ranked, largest first (right),
    several plans overlaid (thesis Figs 2.3-2.5). Layers a guard kept at the base LR are
    drawn hollow."""
    fmt = output_format(output)
    _need_inputs(plans, "plan")
    loaded: list[LRPlan] = [load_plan(p) for p in plans]
    defaults = [
        pl.scheme if pl.metric == "alpha" else f"{pl.scheme} ({pl.metric})" for pl in loaded
    ]
    names = series_labels(
        defaults,
        [f"{d} [{f}]" for d, f in zip(defaults, _file_labels(plans), strict=True)],
        labels,
        "plans",
    )
    order = union_order([[ly.name for ly in pl.layers] for pl in loaded])
    series = []
    for lab, pl in zip(names, loaded, strict=True):
        ns = [ly.name for ly in pl.layers]
        series.append(
            LayerSeries(
                lab,
                ns,
                np.array([ly.multiplier for ly in pl.layers]),
                _positions(ns, order),
                {
                    "base": [ly.name for ly in pl.layers if ly.status == "base"],
                    "base_lr": pl.base_lr,
                },
            )
        )

    width = layer_figure_width(len(order), columns=2)
    fig = new_figure(width, 4.6)
    ax, ax_rank = fig.subplots(1, 2, width_ratios=(3, 2))
    for i, s in enumerate(series):
        base = np.array([n in s.info["base"] for n in s.names])
        kw = dict(color=colour(i), marker=marker(i), markersize=5)
        ax.plot(
            s.positions,
            s.values,
            linewidth=1.3,
            label=s.label,
            markevery=list(np.flatnonzero(~base)),
            **kw,
        )
        if base.any():
            ax.plot(
                s.positions[base], s.values[base], linestyle="none", markerfacecolor="white", **kw
            )
        ranked = np.sort(s.values)[::-1]
        ax_rank.plot(np.arange(1, ranked.size + 1), ranked, linewidth=1.3, **kw)
    if any(s.info["base"] for s in series):
        ax.plot(
            [],
            [],
            linestyle="none",
            marker="o",
            color="grey",
            markerfacecolor="white",
            label="kept at the base LR (guard)",
        )
    for a in (ax, ax_rank):
        a.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        a.set_ylabel("LR multiplier (× base LR)")
        a.grid(axis="y", alpha=0.3)
    layer_axis(ax, order, width * 0.6 - 1.0)
    ax.set_title("per-layer learning rate, in layer order", fontsize=10)
    ax_rank.set_title("ranked, largest first", fontsize=10)
    ax_rank.set_xlabel("rank of the layer's multiplier")
    base_lrs = {s.info["base_lr"] for s in series}
    if len(base_lrs) == 1:
        lr0 = base_lrs.pop()
        sec = ax_rank.secondary_yaxis("right", functions=(lambda m: m * lr0, lambda v: v / lr0))
        sec.set_ylabel(f"learning rate (base {lr0:g})")
    outside_legend(fig, *ax.get_legend_handles_labels())
    save(fig, output, fmt, dpi)
    return LayerPlot(Path(output), order, series, figure=fig)


# ---------------------------------------------------------------- pruning plans


def read_prune_plan(source: Any, label: str = "prune plan") -> dict[str, Any]:
    """An ``htsr.prune-plan/1`` document (path, ``-`` or dict), read by the one plan reader
    (:func:`htsr_cli.prune.plan.read_plan`)."""
    return read_plan(source, label)[0]


def plan_sparsity(doc: Mapping[str, Any]) -> float:
    """The plan's model-level sparsity: achieved when reported, else the target."""
    for key in ("achieved", "target"):
        part = doc.get(key)
        if isinstance(part, Mapping) and math.isfinite(finite(part.get("sparsity"))):
            return finite(part["sparsity"])
    return math.nan


def plan_method(doc: Mapping[str, Any]) -> str:
    """Legend name of a plan's method: the metric for metric-driven plans, the baseline name
    otherwise (``alpha``, ``uniform``, ``erk (alpha)``...)."""
    method, metric = str(doc["method"]), doc.get("metric")
    if method == "metric" and metric:
        return str(metric)
    if method not in _BASELINES and metric:
        return f"{method} ({metric})"
    return method


def plot_prune_plans(
    plans: Sequence[Any],
    output: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    dpi: float = DEFAULT_DPI,
) -> LayerPlot:
    """Per-layer pruning ratio in layer order (thesis Figs 3.6-3.21), plans overlaid.

    With several methods at several sparsities there is one panel per sparsity (top: least
    pruned), the methods overlaid in each, as in the thesis. A dotted line marks each plan's
    model-level sparsity: what uniform pruning would give every layer.
    """
    fmt = output_format(output)
    _need_inputs(plans, "prune plan")
    docs = [read_prune_plan(p, _label_of(p, i)) for i, p in enumerate(plans)]
    methods = [plan_method(d) for d in docs]
    sparsities = [plan_sparsity(d) for d in docs]
    levels = sorted({round(s, 3) for s in sparsities if math.isfinite(s)})
    by_level = len(levels) > 1 and len(set(methods)) > 1 and not labels
    sp_text = [f"{s:.0%} sparsity" if math.isfinite(s) else "sparsity ?" for s in sparsities]
    defaults = methods if by_level else [f"{m}, {t}" for m, t in zip(methods, sp_text, strict=True)]
    if by_level:  # a method's plans share one legend entry, one colour across the panels
        names = methods
    else:
        names = series_labels(
            defaults,
            [f"{d} [{f}]" for d, f in zip(defaults, _file_labels(plans), strict=True)],
            labels,
            "prune plans",
        )
    order = union_order([[str(r["name"]) for r in d["layers"]] for d in docs])
    series = []
    for lab, d, sp, m in zip(names, docs, sparsities, methods, strict=True):
        ns = [str(r["name"]) for r in d["layers"]]
        series.append(
            LayerSeries(
                lab,
                ns,
                np.array(list(plan_ratios(d).values())),
                _positions(ns, order),
                {"sparsity": sp, "method": m},
            )
        )

    panels = levels if by_level else [None]
    width = layer_figure_width(len(order))
    fig = new_figure(width, 1.2 + 3.0 * len(panels) + (0.9 if len(panels) == 1 else 0.0))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False).ravel()
    method_colour = {m: i for i, m in enumerate(dict.fromkeys(methods))}
    for ax, level in zip(axes, panels, strict=True):
        for i, s in enumerate(series):
            if level is not None and round(s.info["sparsity"], 3) != level:
                continue
            c = method_colour[s.info["method"]] if by_level else i
            ax.plot(
                s.positions,
                s.values,
                color=colour(c),
                marker=marker(c),
                markersize=4.5,
                linewidth=1.3,
                label=s.label,
            )
            if math.isfinite(s.info["sparsity"]):
                ax.axhline(s.info["sparsity"], color=colour(c), linestyle=":", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("fraction of the layer's\nparameters removed", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if level is not None:
            ax.set_title(f"model sparsity {level:.0%}", fontsize=9)
    axes[0].plot([], [], color="grey", linestyle=":", label="model sparsity (uniform)")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    layer_axis(axes[-1], order, width - 1.2)
    fig.suptitle("per-layer pruning ratio", fontsize=10)
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    outside_legend(fig, list(handles.values()), list(handles))
    save(fig, output, fmt, dpi)
    return LayerPlot(Path(output), order, series, figure=fig)


__all__ = [
    "LayerPlot",
    "LayerSeries",
    "abbreviate",
    "plan_method",
    "plan_sparsity",
    "plot_lr_plans",
    "plot_metrics",
    "plot_prune_plans",
    "read_analysis",
    "read_prune_plan",
]
