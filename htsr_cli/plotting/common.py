"""What every figure shares: output format and atomic saving, palette, labels, layer axes.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot: no
GUI backend is touched (headless anywhere), nothing global is switched for a program that
imports htsr, and a figure is freed as soon as it goes out of scope.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io.output import check_writable, open_output

#: Output extension -> matplotlib format.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DEFAULT_DPI = 150

#: Okabe & Ito (2008), the colour-blind-safe qualitative palette; yellow last (weak on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
#: A marker per series as well, so that overlays stay apart without colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
#: Sequential map for "layer depth" colouring (perceptually uniform, colour-blind safe).
DEPTH_CMAP = "viridis"

#: Longest tick label for a layer name; longer ones lose their middle.
MAX_NAME = 24
_TICK_FONT = 7.0
#: Horizontal room one vertical tick label needs, in inches (font height plus a gap).
_TICK_ROOM_IN = _TICK_FONT * 1.5 / 72


def output_format(path: str | os.PathLike) -> str:
    """The image format of ``-o PATH`` from its extension; checks it is writable.

    Called before any work, so a typo in the path costs nothing.
    """
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise InputError(
            f"cannot tell the image format of {path}: the extension must be "
            f"{', '.join(FORMATS)} (got {ext or 'none'!r})"
        )
    check_writable(path)
    return FORMATS[ext]


def new_figure(width: float, height: float) -> Any:
    """A detached figure (no pyplot) laid out with constrained layout."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_layout_engine("constrained", h_pad=0.04, w_pad=0.04)
    return fig


def save(fig: Any, path: str | os.PathLike, fmt: str, dpi: float = DEFAULT_DPI) -> Path:
    """Write ``fig`` atomically (temporary file + rename, via :func:`open_output`).

    Dates are left out of SVG/PDF metadata so that the same input gives the same file.
    """
    metadata: dict[str, Any] = {"Software": "htsr (matplotlib)"}
    if fmt == "svg":
        metadata = {"Date": None, "Creator": "htsr (matplotlib)"}
    elif fmt == "pdf":
        metadata = {"CreationDate": None, "Creator": "htsr (matplotlib)"}
    with open_output(path, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=dpi, metadata=metadata)
    return Path(path)


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def shorten(text: str, max_len: int = MAX_NAME) -> str:
    """Cut the middle of a long string, keeping both ends (``features…conv2``)."""
    if len(text) <= max_len:
        return text
    head = (max_len - 1) // 2
    tail = max_len - 1 - head
    return f"{text[:head]}…{text[-tail:]}"


def abbreviate(names: Sequence[str], max_len: int = MAX_NAME) -> list[str]:
    """Short, unique tick labels for layer names.

    Each name keeps its last two dotted components (``0.conv1``), more where that is
    ambiguous (``layer1.0.conv1`` vs ``layer2.0.conv1``), then loses its middle beyond
    ``max_len`` characters. Labels still equal after that get their position appended.
    """
    parts = [n.split(".") for n in names]
    keep = [min(2, len(p)) for p in parts]
    while True:
        labels = [".".join(p[-k:]) for p, k in zip(parts, keep, strict=True)]
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        grow = [
            i for idx in groups.values() if len(idx) > 1 for i in idx if keep[i] < len(parts[i])
        ]
        if not grow:
            break
        for i in grow:
            keep[i] += 1
    out = [shorten(lab, max_len) for lab in labels]
    seen: dict[str, int] = {}
    for lab in out:
        seen[lab] = seen.get(lab, 0) + 1
    return [f"{lab} [{i}]" if seen[lab] > 1 else lab for i, lab in enumerate(out)]


def label_step(n: int, axis_width_in: float) -> int:
    """Label every k-th of ``n`` vertical tick labels so that none overlaps another."""
    room = max(1, int(axis_width_in / _TICK_ROOM_IN))
    return max(1, math.ceil(n / room))


def layer_axis(ax: Any, names: Sequence[str], axis_width_in: float) -> None:
    """Layer names as vertical tick labels: abbreviated, and thinned when too many to fit."""
    n = len(names)
    step = label_step(n, axis_width_in)
    shown = list(range(0, n, step))
    labels = abbreviate(names)
    ax.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=_TICK_FONT)
    if step > 1:
        ax.set_xticks(range(n), minor=True)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("layer" if step == 1 else f"layer (1 name in {step} shown)")


def log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Readable ticks on a log axis spanning less than two decades, where matplotlib would
    otherwise label its crowded minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    axis.set_minor_formatter(NullFormatter())
    span = math.log10(hi / lo) if hi > 0 and lo > 0 else 99.0
    if span < 2:
        # Under half a decade log ticks would leave one label: linear steps look the same.
        axis.set_major_locator(
            MaxNLocator(nbins=4) if span < 0.5 else LogLocator(base=10, subs=(1.0, 2.0, 5.0))
        )
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def layer_figure_width(n_layers: int, columns: int = 1) -> float:
    """Width in inches for ``columns`` layer-axis panels side by side: grows with the layer
    count so that names stay legible, within 7..16 inches."""
    per_panel = min(11.0, max(5.0, 1.6 + n_layers * _TICK_ROOM_IN))
    return min(16.0, max(7.0, per_panel * columns))


def union_order(name_lists: Sequence[Sequence[str]]) -> list[str]:
    """All layer names, in the order they first appear (the first document's order first)."""
    seen: dict[str, None] = {}
    for names in name_lists:
        for n in names:
            seen.setdefault(n, None)
    return list(seen)


def series_labels(
    defaults: Sequence[str], fallbacks: Sequence[str], given: Sequence[str] | None, what: str
) -> list[str]:
    """Legend labels: ``given`` (one per input) when passed, else ``defaults``, else
    ``fallbacks`` (file-based) where defaults collide."""
    if given:
        if len(given) != len(defaults):
            raise InputError(
                f"{len(given)} --label for {len(defaults)} {what}: give one per input or none"
            )
        return list(given)
    if len(set(defaults)) == len(defaults):
        return list(defaults)
    return list(fallbacks)


def path_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Unique short labels for input files or run directories: the file stem (or directory
    name), with parent directories added until the labels differ."""
    ps = [Path(p).resolve() if str(p) != "-" else Path("stdin") for p in paths]
    depth = 1
    while True:
        labs = []
        for p in ps:
            last = p.stem if p.suffix else p.name
            labs.append(
                "/".join([*p.parent.parts[len(p.parent.parts) - depth + 1 :], last])
                if depth > 1
                else last
            )
        if len(set(labs)) == len(labs) or depth > 8:
            return labs
        depth += 1


def outside_legend(fig: Any, handles: list[Any], labels: list[str]) -> None:
    """One legend for the whole figure, below the panels (never over the data)."""
    if not handles:
        return
    # Row-major filling reads best; as many columns as the figure's width allows.
    ncols = min(len(handles), max(2, int(fig.get_figwidth() / 2.3)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def select_layers(available: Sequence[str], globs: Sequence[str]) -> list[str]:
    """Layers matching any glob, in model order; every glob must match something."""
    if not globs:
        return list(available)
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in available):
            listed = ", ".join(available[:6]) + (", ..." if len(available) > 6 else "")
            raise InputError(f"--layer {g!r} matches no layer ({len(available)} layers: {listed})")
    return [n for n in available if any(fnmatch.fnmatchcase(n, g) for g in globs)]
