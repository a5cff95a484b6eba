"""``htsr plot diff A B``: one metric per layer in A and in B (top) and its change B - A
(bottom, or B / A with ``ratio``), paired by layer name as ``htsr diff`` pairs them. Layers on
one side only are marked on the layer axis. Torch-free unless A or B is a checkpoint."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from htsr_cli.engine.columns import METRICS
from htsr_cli.errors import InputError
from htsr_cli.gate.diff import Diff, diff_analyses
from htsr_cli.gate.sources import load_pair
from htsr_cli.plotting.common import (
    DEFAULT_DPI,
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
)


@dataclass
class DiffPlot:
    path: Path
    metric: str
    layers: list[str]  # the layer axis: common layers, then added, then removed
    a: np.ndarray  # metric in A per axis position (NaN for an added layer)
    b: np.ndarray  # metric in B (NaN for a removed layer)
    change: np.ndarray  # B - A (or B / A), NaN where a side is missing
    diff: Diff
    notes: list[str] = field(default_factory=list)


def plot_diff(
    a: Any,
    b: Any,
    output: str | os.PathLike,
    *,
    metric: str = "alpha",
    ratio: bool = False,
    labels: Sequence[str] | None = None,
    dpi: float = DEFAULT_DPI,
    progress: bool | None = None,
    **analyze_options: Any,
) -> DiffPlot:
    """Draw ``metric`` of A and B per layer and its change; returns the numbers drawn.

    Args:
        a, b: analysis documents (``.json``, ``-``, dicts) or checkpoints (analysed).
        ratio: draw B / A instead of B - A.
        labels: legend labels of A and B (default: the file names).
    """
    fmt = output_format(output)
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    side_a, side_b = load_pair(a, b, metrics=[metric], progress=progress, **analyze_options)
    diff = diff_analyses(side_a, side_b, [metric])
    names = [d.name for d in diff.layers] + diff.added + diff.removed
    n_common = len(diff.layers)
    va = np.array(
        [d.a[metric] for d in diff.layers]
        + [math.nan] * len(diff.added)
        + [diff.removed_values[n][metric] for n in diff.removed]
    )
    vb = np.array(
        [d.b[metric] for d in diff.layers]
        + [diff.added_values[n][metric] for n in diff.added]
        + [math.nan] * len(diff.removed)
    )
    kind = "ratio" if ratio else "delta"
    change = np.array(
        [getattr(d, kind)[metric] for d in diff.layers]
        + [math.nan] * (len(diff.added) + len(diff.removed))
    )
    files = [s if isinstance(s, str | os.PathLike) else f"#{i + 1}" for i, s in enumerate((a, b))]
    defaults = path_labels(files) if all(isinstance(f, str | os.PathLike) for f in files) else []
    lab_a, lab_b = series_labels(defaults or ["A", "B"], ["A", "B"], labels, "inputs")

    width = layer_figure_width(len(names))
    fig = new_figure(width, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    pos = np.arange(len(names))
    for i, (lab, vals) in enumerate(((f"A: {lab_a}", va), (f"B: {lab_b}", vb))):
        top.plot(pos, vals, color=colour(i), marker=marker(i), markersize=4, linewidth=1.2,
                 label=lab)  # fmt: skip
    top.set_ylabel(metric)
    top.grid(axis="y", alpha=0.3)
    top.set_title(f"{metric} per layer, A → B", fontsize=10)
    finite = np.isfinite(change)
    base = 1.0 if ratio else 0.0
    bars = np.where(finite, change - base, 0.0)
    colours = [colour(3) if v > 0 else colour(0) for v in bars]
    bottom.bar(pos, bars, bottom=base, color=colours, width=0.8)
    bottom.axhline(base, color="black", linewidth=0.8)
    bottom.set_ylabel(f"{metric} B / A" if ratio else f"Δ{metric} = B − A")
    bottom.grid(axis="y", alpha=0.3)
    for start, count, sym, text in (
        (n_common, len(diff.added), "^", "only in B (added)"),
        (n_common + len(diff.added), len(diff.removed), "v", "only in A (removed)"),
    ):
        if count:
            xs = pos[start : start + count]
            bottom.scatter(xs, [base] * count, marker=sym, s=50, facecolors="none",
                           edgecolors="black", zorder=5, label=text)  # fmt: skip
    layer_axis(bottom, names, width - 1.2)
    handles, legend = top.get_legend_handles_labels()
    more = bottom.get_legend_handles_labels()
    outside_legend(fig, handles + more[0], legend + more[1])
    save(fig, output, fmt, dpi)
    notes = list(diff.warnings)
    missing = int((~finite[:n_common]).sum())
    if missing:
        notes.append(f"{missing} common layers have no {metric} {kind} (a value missing)")
    return DiffPlot(Path(output), metric, names, va, vb, change, diff, notes)
