"""``htsr diff A B``: the per-layer change of every metric from analysis A to analysis B,
paired by layer name as ``htsr gate B --baseline A`` pairs them (delta = B - A, ratio = B / A;
added = only in B, removed = only in A). Torch-free unless A or B is a checkpoint."""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from htsr_cli.engine.columns import METRICS
from htsr_cli.engine.gates import compare
from htsr_cli.errors import InputError
from htsr_cli.gate.render import safe
from htsr_cli.gate.sources import LoadedAnalysis, check_sources, load_pair, pair
from htsr_cli.io import schemas
from htsr_cli.io.documents import finite
from htsr_cli.io.output import check_writable, choose_format, dump_json, open_output

FORMATS = ("table", "json", "csv")


@dataclass
class LayerDiff:
    """One layer present in both: its values in A and B, B - A and B / A per metric (NaN where
    a value is missing, e.g. a layer skipped on one side)."""

    name: str
    a: dict[str, float]
    b: dict[str, float]
    delta: dict[str, float]
    ratio: dict[str, float]


@dataclass
class Diff:
    a: LoadedAnalysis
    b: LoadedAnalysis
    metrics: list[str]
    layers: list[LayerDiff]
    added: list[str]  # only in B
    removed: list[str]  # only in A
    warnings: list[str] = field(default_factory=list)
    #: The values of the layers on one side only, per metric (NaN where that side skipped
    #: the layer): ``added`` ones in B, ``removed`` ones in A. Not in ``to_dict()``.
    added_values: dict[str, dict[str, float]] = field(default_factory=dict)
    removed_values: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``htsr.diff/1`` document (NaN as null)."""
        return {
            "schema": schemas.DIFF,
            "a": self.a.describe(),
            "b": self.b.describe(),
            "metrics": list(self.metrics),
            "layers": [
                {"name": d.name, "a": d.a, "b": d.b, "delta": d.delta, "ratio": d.ratio}
                for d in self.layers
            ],
            "added": list(self.added),
            "removed": list(self.removed),
            "warnings": list(self.warnings),
        }


def _metric_values(side: LoadedAnalysis, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    return {str(row.get("name")): {m: finite(row.get(m)) for m in metrics} for row in side.layers}


def diff_analyses(
    a: LoadedAnalysis, b: LoadedAnalysis, metrics: Sequence[str] | None = None
) -> Diff:
    """Pair ``b`` with ``a`` by layer name and compute every metric's change.

    Args:
        metrics: a subset of the metrics both computed; None for all of them.

    Raises:
        InputError: no layer in common; a requested metric one side lacks; none in common.
    """
    pairing = pair(b, a)
    both = [m for m in METRICS if m in a.metrics and m in b.metrics]
    if metrics is None:
        chosen = both
    else:
        chosen = []
        for m in metrics:
            if m not in METRICS:
                raise InputError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
            if m not in both:
                side = a if m not in a.metrics else b
                raise InputError(f"{safe(side.label)} has no {m!r} values")
        chosen = [m for m in METRICS if m in metrics]
    if not chosen:
        raise InputError(
            f"{safe(a.label)} and {safe(b.label)} have no metric in common "
            f"({', '.join(a.metrics) or 'none'} / {', '.join(b.metrics) or 'none'})"
        )
    va, vb = _metric_values(a, chosen), _metric_values(b, chosen)
    missing = dict.fromkeys(chosen, math.nan)
    layers = []
    for name in pairing.common:
        xa, xb = va.get(name, missing), vb.get(name, missing)
        layers.append(
            LayerDiff(
                name,
                dict(xa),
                dict(xb),
                {m: compare("delta", xb[m], xa[m]) for m in chosen},
                {m: compare("ratio", xb[m], xa[m]) for m in chosen},
            )
        )
    return Diff(
        a, b, chosen, layers, pairing.added, pairing.removed, pairing.warnings,
        added_values={name: dict(vb.get(name, missing)) for name in pairing.added},
        removed_values={name: dict(va.get(name, missing)) for name in pairing.removed},
    )  # fmt: skip


def _cell(v: float) -> str:
    if math.isnan(v):
        return ""
    return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def write_csv(diff: Diff, fh: TextIO) -> None:
    """One row per layer: ``name, status`` (both, added, removed), then per metric its value
    in A, in B, the delta and the ratio (empty where there is none)."""
    cols = ["name", "status"]
    for m in diff.metrics:
        cols += [f"{m}_a", f"{m}_b", f"{m}_delta", f"{m}_ratio"]
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(cols)
    for d in diff.layers:
        row = [safe(d.name), "both"]
        for m in diff.metrics:
            row += [_cell(d.a[m]), _cell(d.b[m]), _cell(d.delta[m]), _cell(d.ratio[m])]
        writer.writerow(row)
    for status, names in (("added", diff.added), ("removed", diff.removed)):
        for n in names:
            writer.writerow([safe(n), status] + [""] * (4 * len(diff.metrics)))


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:+.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:+.3f}"


def write_table(diff: Diff, fh: TextIO, terminal: bool) -> None:
    """A table of B - A per metric, one row per layer, then the layers on one side only."""
    from rich.table import Table
    from rich.text import Text

    from htsr_cli.io.terminal import table_console

    console = table_console(fh, terminal, 400)
    console.print(Text(f"delta = B - A   A: {safe(diff.a.label)}   B: {safe(diff.b.label)}"))
    table = Table(header_style="bold")
    table.add_column("layer", no_wrap=True)
    for m in diff.metrics:
        table.add_column(f"Δ{m}", justify="right")
    for d in diff.layers:
        table.add_row(Text(safe(d.name)), *[Text(_fmt(d.delta[m])) for m in diff.metrics])
    console.print(table)
    for what, names in (("only in B (added)", diff.added), ("only in A (removed)", diff.removed)):
        for n in names:
            console.print(Text(f"{what}: {safe(n)}"))


def run_diff(
    a: Any,
    b: Any,
    *,
    fmt: str | None = None,
    output: str | os.PathLike | None = None,
    metrics: str | Sequence[str] | None = None,
    progress: bool | None = None,
    **analyze_options: Any,
) -> Diff:
    """Compare ``a`` and ``b`` (analysis documents or checkpoints) and write the table, JSON
    or CSV. A checkpoint analysed beside a stored analysis takes its analysis options unless
    they are given (:data:`~htsr_cli.gate.sources.INHERITED_OPTIONS`)."""
    fmt = choose_format(fmt, None if output is None else str(output), sys.stdout.isatty(), FORMATS)
    check_sources([a, b])
    check_writable(output, [a, b])
    names = None
    if metrics is not None:
        names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
        names = [m for m in names if m]
    side_a, side_b = load_pair(a, b, metrics=names, progress=progress, **analyze_options)
    diff = diff_analyses(side_a, side_b, names)
    for w in diff.warnings:
        sys.stderr.write(f"htsr: warning: {safe(w)}\n")
    with open_output(output) as fh:
        if fmt == "json":
            dump_json(diff.to_dict(), fh)
        elif fmt == "csv":
            write_csv(diff, fh)
        else:
            write_table(diff, fh, (output is None or str(output) == "-") and sys.stdout.isatty())
    return diff
