"""``plot esd``: the empirical spectral density of layers with their fitted power law.

The histogram is the density of the eigenvalues that enter the fit (those above
``evals_thresh``): counts / (n * bin width), so its area is 1. The power law
``p(x) = (alpha - 1) / xmin * (x / xmin) ** -alpha`` is a density of the tail alone; scaled by
the tail fraction ``n_tail / n`` it has the tail's share of that area and overlays the
histogram. On log-log axes the line's slope is ``-alpha``. With log bins one bin edge is put on
``xmin`` so that the tail bars hold exactly the fitted tail.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from htsr_cli.assets import default_checkpoint
from htsr_cli.engine.analysis import analyze, exact_glob, layer_refs
from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import open_checkpoint
from htsr_cli.plotting.common import (
    DEFAULT_DPI,
    PALETTE,
    log_ticks,
    new_figure,
    output_format,
    outside_legend,
    save,
    select_layers,
    shorten,
)

DEFAULT_MAX_LAYERS = 16
_LINE_POINTS = 64
_BODY, _TAIL, _LINE = "#9BB7D4", PALETTE[0], PALETTE[3]


@dataclass
class ESDPanel:
    """What one panel shows (also the test's view of the figure)."""

    name: str
    fit: str
    alpha: float
    xmin: float
    xmax: float
    D: float
    num_evals: int  #: all eigenvalues of the layer
    num_fit: int  #: those above the threshold: the histogram's n
    num_tail: int  #: those at or above xmin
    status: str
    warning: str
    linear: bool
    bin_edges: np.ndarray
    density: np.ndarray
    #: The fitted power law as drawn (empty when the fit failed).
    line_x: np.ndarray = field(default_factory=lambda: np.empty(0))
    line_y: np.ndarray = field(default_factory=lambda: np.empty(0))


@dataclass
class ESDPlot:
    path: Path
    panels: list[ESDPanel]
    notes: list[str] = field(default_factory=list)


def power_law_line(
    alpha: float, xmin: float, xmax: float, tail_fraction: float, points: int = _LINE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The fitted density from xmin to xmax, scaled by the tail fraction."""
    x = np.geomspace(xmin, max(xmax, xmin * (1 + 1e-9)), points)
    y = tail_fraction * (alpha - 1) / xmin * (x / xmin) ** (-alpha)
    return x, y


def log_bins(values: np.ndarray, xmin: float | None, bins: int) -> np.ndarray:
    """Log-spaced bin edges over ``values`` (positive), one edge exactly at ``xmin``."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.array([lo / 1.25, lo * 1.25])
    hi *= 1 + 1e-12  # np.histogram closes the last bin: keep the maximum inside it
    if xmin is None or not lo < xmin < hi:
        return np.geomspace(lo, hi, bins + 1)
    share = math.log(xmin / lo) / math.log(hi / lo)
    below = max(1, round(bins * share))
    above = max(1, bins - below)
    return np.concatenate(
        [np.geomspace(lo, xmin, below + 1)[:-1], np.geomspace(xmin, hi, above + 1)]
    )


def _bin_count(n: int) -> int:
    return int(np.clip(round(2 * math.sqrt(n)), 8, 60))


def esd_panel(
    name: str,
    evals: np.ndarray,
    row: dict[str, Any],
    *,
    fit: str,
    thresh: float,
    linear: bool = False,
) -> ESDPanel:
    """Histogram and fitted line of one layer from its eigenvalues and its analysis row."""
    evals = np.asarray(evals, dtype=np.float64)
    pos = np.sort(evals[evals > thresh])
    alpha, xmin, xmax = (
        float(row.get(k) if row.get(k) is not None else math.nan) for k in ("alpha", "xmin", "xmax")
    )
    fitted = row.get("status") == "success" and all(map(math.isfinite, (alpha, xmin, xmax)))
    n_fit = int(pos.size)
    n_tail = int((pos >= xmin).sum()) if fitted else 0
    if n_fit == 0:
        edges, density = np.array([0.0, 1.0]), np.zeros(1)
    else:
        if linear:
            edges = np.linspace(0.0, float(pos.max()) * (1 + 1e-12), _bin_count(n_fit) + 1)
        else:
            edges = log_bins(pos, xmin if fitted else None, _bin_count(n_fit))
        counts, _ = np.histogram(pos, bins=edges)
        density = counts / (n_fit * np.diff(edges))
    panel = ESDPanel(
        name=name,
        fit=fit,
        alpha=alpha,
        xmin=xmin,
        xmax=xmax,
        D=float(row.get("D") if row.get("D") is not None else math.nan),
        num_evals=int(evals.size),
        num_fit=n_fit,
        num_tail=n_tail,
        status=str(row.get("status", "")),
        warning=str(row.get("warning", "")),
        linear=linear,
        bin_edges=edges,
        density=density,
    )
    if fitted and n_fit:
        panel.line_x, panel.line_y = power_law_line(alpha, xmin, xmax, n_tail / n_fit)
    return panel


def _draw(ax: Any, p: ESDPanel) -> None:
    left, widths = p.bin_edges[:-1], np.diff(p.bin_edges)
    nz = p.density > 0
    tail = (left >= p.xmin) if p.line_x.size else np.zeros_like(nz)
    for mask, col, lab in ((nz & ~tail, _BODY, "ESD"), (nz & tail, _TAIL, "ESD tail (λ ≥ xmin)")):
        if mask.any():
            ax.bar(
                left[mask],
                p.density[mask],
                width=widths[mask],
                align="edge",
                color=col,
                edgecolor="white",
                linewidth=0.3,
                label=lab,
            )
    if p.line_x.size:
        ax.plot(
            p.line_x,
            p.line_y,
            color=_LINE,
            linewidth=2,
            label="power-law fit" + ("" if p.linear else " (slope −α)"),
        )
        ax.axvline(p.xmin, color="black", linestyle="--", linewidth=1, label="xmin")
        title2 = f"α = {p.alpha:.2f}   D = {p.D:.3f}   fit = {p.fit}"
    else:
        title2 = f"fit {p.status or 'failed'} (fit = {p.fit})"
    if p.linear:
        top = float(p.density.max()) if p.density.size else 1.0
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
    else:
        ax.set_xscale("log")
        ax.set_yscale("log", nonpositive="clip")
        if nz.any():
            ax.set_ylim(float(p.density[nz].min()) / 3, float(p.density.max()) * 3)
        log_ticks(ax.xaxis, float(p.bin_edges[0]), float(p.bin_edges[-1]))
    ax.set_title(f"{shorten(p.name, 40)}\n{title2}", fontsize=9)
    ax.set_xlabel("eigenvalue λ of WᵀW" + ("" if p.linear else " (log)"), fontsize=8)
    ax.set_ylabel("density" + ("" if p.linear else " (log)"), fontsize=8)
    ax.tick_params(labelsize=7)
    if p.warning:
        ax.text(
            0.98,
            0.97,
            p.warning.replace("; ", "\n"),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=6.5,
            color="#555555",
        )


def plot_esd(
    source: Any,
    output: str | os.PathLike,
    *,
    layers: Sequence[str] = (),
    fit: str = "ww",
    linear: bool = False,
    max_layers: int = DEFAULT_MAX_LAYERS,
    device: str = "auto",
    trust_pickle: bool = False,
    key: str | None = None,
    dpi: float = DEFAULT_DPI,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> ESDPlot:
    """ESD of one or more layers of a checkpoint, log-log with the fitted power law.

    Args:
        source: a checkpoint (any format :func:`~htsr_cli.engine.analysis.analyze` reads) or None
            for the built-in demo checkpoint.
        output: ``.png``, ``.svg`` or ``.pdf`` path, written atomically.
        layers: fnmatch globs on layer names; each must match at least one layer.
        fit: the power-law fit mode (``ww``, ``median``, ``peak``, ``clip-xmax``).
        key: where the state dict is inside a torch file (see
            :func:`~htsr_cli.io.checkpoint.find_state_dict`).
        linear: linear axes and bins instead of log-log.
        max_layers: at most this many panels (the first matching layers, in model order).

    Returns:
        The panels as drawn, and notes (layers left out) for the user.
    """
    fmt = output_format(output)
    if max_layers < 1:
        raise InputError(f"--max-layers must be a positive integer, got {max_layers}")
    if source is None:
        source = default_checkpoint()
    if isinstance(source, str | os.PathLike) and Path(source).suffix.lower() == ".json":
        raise InputError(
            f"{source}: plot esd needs a checkpoint (an analysis JSON holds no eigenvalues)"
        )
    notes: list[str] = []
    ckpt = open_checkpoint(source, trust_pickle=trust_pickle, key=key)
    try:
        available = [r.key[: -len(".weight")] for r in layer_refs(ckpt)]
        chosen = select_layers(available, layers)
        if len(chosen) > max_layers:
            notes.append(
                f"showing the first {max_layers} of {len(chosen)} layers "
                "(see --max-layers, --layer)"
            )
            chosen = chosen[:max_layers]
        result = analyze(
            ckpt,
            fit=fit,
            metrics=["alpha"],
            device=device,
            layers=[exact_glob(n) for n in chosen],
            keep_spectra=True,
            on_progress=on_progress,
        )
    finally:
        ckpt.close()
    notes += [f"{s['name']} left out: {s['reason']}" for s in result.skipped]
    if not result.layers:
        raise InputError(
            "no layer to plot: every selected layer was skipped ("
            + "; ".join(f"{s['name']}: {s['reason']}" for s in result.skipped)
            + ")"
        )
    thresh = float(result.options["evals_thresh"])
    panels = [
        esd_panel(
            r["name"], result.spectra[r["name"]].numpy(), r, fit=fit, thresh=thresh, linear=linear
        )
        for r in result.layers
    ]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(max(5.0, 3.6 * ncols), 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, panels, strict=False):
        _draw(ax, p)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes[: len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    outside_legend(fig, list(handles.values()), list(handles))
    save(fig, output, fmt, dpi)
    return ESDPlot(path=Path(output), panels=panels, notes=notes)
