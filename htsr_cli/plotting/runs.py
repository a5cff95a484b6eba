"""Figures of finetune runs: ``plot history`` and ``plot tradeoff``.

A run directory (written by ``htsr finetune``) holds ``history.jsonl``, one JSON object per
epoch, and ``final.json`` (``htsr.run/1``) once the run has finished. ``history`` reads a run
in progress too (``final.json`` optional); ``tradeoff`` needs finished runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from htsr_cli.errors import InputError
from htsr_cli.finetune.run_dir import FINAL, HISTORY, RunDir
from htsr_cli.io.documents import finite, require
from htsr_cli.plotting.common import (
    DEFAULT_DPI,
    DEPTH_CMAP,
    LINESTYLES,
    abbreviate,
    colour,
    log_ticks,
    marker,
    new_figure,
    output_format,
    outside_legend,
    path_labels,
    save,
    select_layers,
    series_labels,
    shorten,
)

_EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


@dataclass
class RunHistory:
    """A run directory's per-epoch history, as arrays indexed like ``epochs``."""

    path: Path
    label: str
    epochs: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray  #: fractions in [0, 1]
    test_loss: np.ndarray
    test_acc: np.ndarray
    #: group name -> LR per epoch (NaN where a group is absent); "base" is the base group.
    lr: dict[str, np.ndarray] = field(default_factory=dict)
    metric_name: str | None = None
    #: layer name -> metric per epoch (NaN where not measured).
    metric: dict[str, np.ndarray] = field(default_factory=dict)
    final: dict[str, Any] | None = None


def _run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"run directory {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{p} is not a run directory (expected the -o folder of htsr finetune)")
    return p


def read_final(run_dir: str | os.PathLike, *, required: bool = True) -> dict[str, Any] | None:
    """``final.json`` of a run (``htsr.run/1``); None when absent and not ``required``."""
    return RunDir(_run_dir(run_dir)).read_final(required=required)


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, np.ndarray]:
    """Per-name arrays from a dict-valued field of every epoch (names in first-seen order)."""
    names: dict[str, None] = {}
    for r in rows:
        if isinstance(r.get(key), dict):
            names.update(dict.fromkeys(r[key]))
    return {
        n: np.array(
            [finite(r[key].get(n)) if isinstance(r.get(key), dict) else math.nan for r in rows]
        )
        for n in names
    }


def read_history(run_dir: str | os.PathLike, label: str | None = None) -> RunHistory:
    """Parse ``history.jsonl`` (and ``final.json`` when present) of a run directory.

    An epoch logged twice (a resumed run) keeps its last line.
    """
    d = _run_dir(run_dir)
    run = RunDir(d)
    if not run.file(HISTORY).exists():
        raise InputError(f"{d}: no {HISTORY} (not an htsr finetune run directory?)")
    by_epoch = {row["epoch"]: row for row in run.read_history(required=_EPOCH_FIELDS)}
    if not by_epoch:
        raise InputError(f"{run.file(HISTORY)} holds no epoch yet")
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    final = read_final(d, required=False)
    metric_names = [str(r["metric_name"]) for r in rows if r.get("metric_name")]
    return RunHistory(
        path=d,
        label=label or str((final or {}).get("label") or d.name),
        epochs=np.array(sorted(by_epoch)),
        **{k: np.array([finite(r[k]) for r in rows]) for k in _EPOCH_FIELDS[1:]},
        lr=_series(rows, "lr"),
        metric_name=metric_names[-1] if metric_names else None,
        metric=_series(rows, "metric"),
        final=final,
    )


def _run_labels(
    runs: list[RunHistory] | list[dict[str, Any]], dirs: Sequence[Any], given: Sequence[str] | None
) -> list[str]:
    fallback = path_labels(dirs)
    preferred = [
        str((r.final or {}).get("label") or f)
        if isinstance(r, RunHistory)
        else str(r.get("label") or f)
        for r, f in zip(runs, fallback, strict=True)
    ]
    return series_labels(preferred, fallback, given, "run directories")


@dataclass
class HistoryPlot:
    path: Path
    runs: list[RunHistory]
    #: Layers drawn in the per-layer panels (after ``layers`` globs), in order.
    layers: list[str]
    notes: list[str] = field(default_factory=list)


def _per_layer(
    ax: Any, runs: list[RunHistory], attr: str, layers: list[str], fig: Any, ylabel: str
) -> None:
    """Layer curves across epochs: coloured by depth for one run; for several runs thin
    layer lines plus a thick mean in each run's colour."""
    if len(runs) == 1:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cmap, run = colormaps[DEPTH_CMAP], runs[0]
        data = getattr(run, attr)
        norm = Normalize(0, max(1, len(layers) - 1))
        for i, n in enumerate(layers):
            if n in data:
                ax.plot(run.epochs, data[n], color=cmap(norm(i)), linewidth=1.1)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        ticks = sorted(
            {0, len(layers) - 1} | ({(len(layers) - 1) // 2} if len(layers) > 2 else set())
        )
        bar.set_ticks(ticks, labels=[abbreviate(layers)[t] for t in ticks], fontsize=7)
        bar.set_label("layer (first → last)", fontsize=8)
    else:
        for i, run in enumerate(runs):
            data = getattr(run, attr)
            curves = [data[n] for n in layers if n in data]
            if not curves and attr == "lr" and "base" in data:
                curves = [data["base"]]  # a global-LR run: every layer at the base LR
            for c in curves:
                ax.plot(run.epochs, c, color=colour(i), linewidth=0.7, alpha=0.35)
            if curves:
                with np.errstate(all="ignore"):
                    mean = np.nanmean(np.vstack(curves), axis=0)
                ax.plot(
                    run.epochs, mean, color=colour(i), linewidth=2.4, marker=marker(i), markersize=4
                )
        ax.text(
            0.99,
            0.98,
            "thin: layers, thick: mean",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="#555555",
        )
    ax.set_ylabel(ylabel)


def _empty(ax: Any, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="#555555",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def plot_history(
    run_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    layers: Sequence[str] = (),
    per_layer: bool = False,
    max_layers: int = 16,
    dpi: float = DEFAULT_DPI,
) -> HistoryPlot:
    """Training curves of one or more runs.

    Default: four panels (loss, accuracy, the tracked metric per layer, the LR per layer
    group across epochs). ``per_layer=True``: one small panel per layer with the metric of
    every run across epochs (thesis Fig 3.22), at most ``max_layers``.
    """
    fmt = output_format(output)
    if not run_dirs:
        raise InputError("no run directory given")
    if max_layers < 1:
        raise InputError(f"--max-layers must be a positive integer, got {max_layers}")
    runs = [read_history(d) for d in run_dirs]
    for run, lab in zip(runs, _run_labels(runs, run_dirs, labels), strict=True):
        run.label = lab
    all_layers = list(dict.fromkeys(n for r in runs for n in r.metric))
    lr_groups = list(dict.fromkeys(n for r in runs for n in r.lr if n != "base"))
    chosen = select_layers(all_layers or lr_groups, layers)
    metric_name = next((r.metric_name for r in runs if r.metric_name), "metric")
    notes: list[str] = []
    if per_layer:
        fig = _per_layer_grid(runs, chosen, metric_name, max_layers, notes)
    else:
        fig = new_figure(11.0, 7.6)
        (ax_loss, ax_acc), (ax_m, ax_lr) = fig.subplots(2, 2)
        for i, run in enumerate(runs):
            for kind, ls in (("train", LINESTYLES[1]), ("test", LINESTYLES[0])):
                kw = dict(color=colour(i), linestyle=ls, marker=marker(i), markersize=3.5)
                ax_loss.plot(run.epochs, getattr(run, f"{kind}_loss"), **kw)
                ax_acc.plot(run.epochs, 100 * getattr(run, f"{kind}_acc"), **kw)
        losses = np.concatenate([np.r_[r.train_loss, r.test_loss] for r in runs])
        losses = losses[np.isfinite(losses) & (losses > 0)]
        log_loss = bool(losses.size) and losses.max() > 10 * losses.min()
        if log_loss:  # a spike (often the first test epoch) would flatten the rest
            ax_loss.set_yscale("log")
            log_ticks(ax_loss.yaxis, float(losses.min()), float(losses.max()))
        ax_loss.set_ylabel("loss (cross-entropy)" + (", log scale" if log_loss else ""))
        ax_acc.set_ylabel("accuracy (%)")
        ax_loss.set_title("loss", fontsize=10)
        ax_acc.set_title("accuracy", fontsize=10)
        if any(r.metric for r in runs) and chosen:
            _per_layer(
                ax_m, runs, "metric", [n for n in chosen if n in all_layers], fig, metric_name
            )
            ax_m.set_title(f"{metric_name} per layer across epochs", fontsize=10)
        else:
            _empty(ax_m, "no per-layer metric in history.jsonl")
        lr_layers = [n for n in (chosen if lr_groups else []) if n in lr_groups]
        if lr_layers:
            _per_layer(ax_lr, runs, "lr", lr_layers, fig, "learning rate")
        else:
            for i, run in enumerate(runs):
                if "base" in run.lr:
                    ax_lr.plot(
                        run.epochs,
                        run.lr["base"],
                        color=colour(i),
                        marker=marker(i),
                        markersize=3.5,
                    )
            ax_lr.set_ylabel("learning rate (base group)")
        ax_lr.set_title("learning rate per layer across epochs", fontsize=10)
        for ax in (ax_loss, ax_acc, ax_m, ax_lr):
            if ax.has_data():
                ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
                ax.xaxis.get_major_locator().set_params(integer=True)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=colour(i), marker=marker(i), label=r.label)
            for i, r in enumerate(runs)
        ]
        handles += [
            Line2D([], [], color="grey", linestyle=LINESTYLES[1], label="train"),
            Line2D([], [], color="grey", linestyle=LINESTYLES[0], label="test"),
        ]
        outside_legend(fig, handles, [h.get_label() for h in handles])
    save(fig, output, fmt, dpi)
    return HistoryPlot(Path(output), runs, chosen, notes)


def _per_layer_grid(
    runs: list[RunHistory], layers: list[str], metric_name: str, max_layers: int, notes: list[str]
) -> Any:
    if not any(r.metric for r in runs):
        raise InputError(
            "--per-layer needs a per-layer metric in history.jsonl; none of the runs recorded one"
        )
    if len(layers) > max_layers:
        notes.append(
            f"showing the first {max_layers} of {len(layers)} layers (see --max-layers, --layer)"
        )
        del layers[max_layers:]
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = new_figure(max(5.0, 3.1 * ncols), 2.4 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    for ax, name in zip(axes, layers, strict=False):
        for i, run in enumerate(runs):
            if name in run.metric:
                ax.plot(
                    run.epochs,
                    run.metric[name],
                    color=colour(i),
                    marker=marker(i),
                    markersize=3,
                    linewidth=1.3,
                    label=run.label,
                )
        ax.set_title(shorten(name, 36), fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[::ncols]:
        ax.set_ylabel(metric_name, fontsize=8)
    fig.suptitle(f"{metric_name} per layer across epochs", fontsize=10)
    handles, labs = axes[0].get_legend_handles_labels()
    outside_legend(fig, handles, labs)
    return fig


# ---------------------------------------------------------------- tradeoff


@dataclass
class TradeoffLine:
    """One method's runs, sorted by parameters remaining."""

    method: str
    params: np.ndarray
    accuracy: np.ndarray  #: test accuracy in %
    runs: list[Path]


@dataclass
class TradeoffPlot:
    path: Path
    lines: list[TradeoffLine]
    #: The largest ``params_total`` among the runs: 100% on the top axis.
    dense_params: int


def plot_tradeoff(
    run_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    best: bool = False,
    dpi: float = DEFAULT_DPI,
) -> TradeoffPlot:
    """Test accuracy against parameters remaining, one line per method (thesis Figs 3.3,
    3.25). Runs are grouped by ``method``; when runs of one method differ in ``lr_mode``
    (global vs layerwise LR), by method and LR mode. ``best`` plots the best test accuracy
    of each run instead of the final one."""
    fmt = output_format(output)
    if not run_dirs:
        raise InputError("no run directory given")
    finals = []
    for d in run_dirs:
        doc = read_final(d)
        require(doc, ("method", "params", "params_total", "test_acc"), str(Path(d) / FINAL))
        acc_key = "best_test_acc" if best and "best_test_acc" in doc else "test_acc"
        params, total, acc = (finite(doc[k]) for k in ("params", "params_total", acc_key))
        if not (params > 0 and total > 0 and 0 <= acc <= 1):
            raise InputError(
                f"{Path(d) / 'final.json'}: params, params_total must be positive "
                f"and {acc_key} a fraction in [0, 1]"
            )
        finals.append(
            (Path(d), str(doc["method"]), str(doc.get("lr_mode") or ""), params, total, acc)
        )
    modes: dict[str, set[str]] = {}
    for _, m, lr_mode, *_ in finals:
        modes.setdefault(m, set()).add(lr_mode)
    groups: dict[str, list[tuple[Path, float, float]]] = {}
    for d, m, lr_mode, params, _, acc in finals:
        key = f"{m}, {lr_mode} LR" if len(modes[m]) > 1 and lr_mode else m
        groups.setdefault(key, []).append((d, params, acc))
    lines = []
    for key, pts in groups.items():
        pts.sort(key=lambda t: t[1])
        lines.append(
            TradeoffLine(
                key,
                np.array([p for _, p, _ in pts]),
                np.array([100 * a for *_, a in pts]),
                [d for d, *_ in pts],
            )
        )
    dense = int(max(t[4] for t in finals))

    from matplotlib.ticker import EngFormatter

    fig = new_figure(7.5, 5.0)
    ax = fig.subplots()
    for i, line in enumerate(lines):
        ax.plot(
            line.params,
            line.accuracy,
            color=colour(i),
            marker=marker(i),
            markersize=6,
            linewidth=1.6,
            label=line.method,
        )
    ax.xaxis.set_major_formatter(EngFormatter(places=0 if dense >= 1000 else 1, sep=""))
    ax.set_xlabel("parameters remaining (nonzero)")
    ax.set_ylabel("test accuracy (%)" + (", best epoch" if best else ", final"))
    top = ax.secondary_xaxis(
        "top", functions=(lambda p: 100 * p / dense, lambda q: q * dense / 100)
    )
    top.set_xlabel(f"% of the dense model ({dense:,} parameters)", fontsize=8)
    ax.set_title("accuracy vs parameters remaining", fontsize=10)
    ax.grid(alpha=0.3)
    outside_legend(fig, *ax.get_legend_handles_labels())
    save(fig, output, fmt, dpi)
    return TradeoffPlot(Path(output), lines, dense)
