"""Rendering an analysis: rich table, JSON, CSV and NDJSON (docs/analysis-schema.md).

``run_analysis`` is the library function behind ``htsr analyze``: it runs :func:`analyze`,
streams NDJSON as layers finish, writes the chosen format atomically and returns the result.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from htsr_cli.engine.analysis import SCHEMA, Analysis, analyze
from htsr_cli.io.output import check_writable, dump_json, jsonable, open_output
from htsr_cli.io.output import choose_format as output_format
from htsr_cli.io.terminal import ProgressBar, printable

FORMATS = ("table", "json", "csv", "ndjson")


def choose_format(fmt: str | None, output: str | None, stdout_is_tty: bool) -> str:
    """See :func:`htsr_cli.io.output.choose_format`."""
    return output_format(fmt, output, stdout_is_tty, FORMATS)


def columns(analysis: Analysis) -> list[str]:
    """Every per-layer column in document order (the CSV header)."""
    seen: dict[str, None] = {}
    for row in analysis.layers:
        seen.update(dict.fromkeys(row))
    return list(seen) or ["name"]


def write_csv(analysis: Analysis, fh: TextIO) -> None:
    """One row per analysed layer, then one per skipped layer (``status`` = ``skipped``)."""
    cols = columns(analysis)
    if "status" not in cols:
        cols.append("status")
    if "warning" not in cols:
        cols.append("warning")
    writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in analysis.layers:
        writer.writerow({k: ("" if v is None else v) for k, v in jsonable(row).items()})
    for rec in analysis.skipped:
        writer.writerow({"name": rec["name"], "status": "skipped", "warning": rec["reason"]})


def ndjson_record(record: dict[str, Any]) -> str:
    """One NDJSON line: a layer (``record: layer``) or a skipped layer (``record: skipped``)."""
    kind = "skipped" if "reason" in record and "num_evals" not in record else "layer"
    return json.dumps({"record": kind, **jsonable(record)}, allow_nan=False)


def ndjson_summary(analysis: Analysis) -> str:
    """The last NDJSON line: the document without its per-layer lists."""
    doc = analysis.to_dict()
    doc.pop("layers")
    doc.pop("skipped")
    return json.dumps({"record": "summary", **doc}, allow_nan=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.3f}"
    return str(v)


_SHORT = {
    "rand_distance": "rand_dist",
    "stable_rank": "stable_rank",
    "log_spectral_norm": "log_spec_norm",
    "spectral_norm": "spec_norm",
    "alpha_weighted": "alpha_w",
    "log_alpha_norm": "log_alpha_norm",
}


def render_table(analysis: Analysis, console: Console) -> None:
    """A rich table: one row per layer, the metric means, then the skipped layers."""
    src = analysis.source.get("path") or "(in memory)"
    opts = analysis.options
    table = Table(
        title=f"{src}  fit={opts['fit']}  device={opts['device']}  "
        f"{len(analysis.layers)} layers  {analysis.seconds:.1f}s",
        title_justify="left",
        show_lines=False,
        header_style="bold",
    )
    table.add_column(
        "layer", no_wrap=True, min_width=max((len(r["name"]) for r in analysis.layers), default=5)
    )
    table.add_column("N×M·rf", justify="right")
    for m in analysis.metrics:
        table.add_column(_SHORT.get(m, m), justify="right")
    table.add_column("D", justify="right")
    table.add_column("warning", overflow="fold", style="dim")
    for row in analysis.layers:
        cells = [row["name"], f"{row['N']}×{row['M']}·{row['rf']}"]
        for m in analysis.metrics:
            text = _fmt(row.get(m))
            if m == "alpha" and row.get(m) is not None and not math.isnan(row[m]):
                style = "red" if row[m] < 2 else ("yellow" if row[m] > 6 else "green")
                text = f"[{style}]{text}[/]"
            cells.append(text)
        cells += [_fmt(row.get("D")), row.get("warning", "")]
        table.add_row(*cells)
    summary = analysis.summary()
    table.add_section()
    table.add_row("[bold]mean[/]", "", *[_fmt(summary[m]) for m in analysis.metrics], "", "")
    console.print(table)
    for rec in analysis.skipped:
        console.print(f"[dim]skipped[/] {rec['name']}: {rec['reason']}")


def write_table(analysis: Analysis, fh: TextIO, terminal: bool) -> None:
    """The table; styled only on a terminal without ``NO_COLOR`` (then plain text), and as
    wide as it needs off a terminal (no terminal width to respect there)."""
    styled = terminal and not os.environ.get("NO_COLOR")  # no-color.org: set and non-empty
    console = Console(
        file=fh,
        force_terminal=styled,
        no_color=not styled,
        highlight=False,
        width=None if terminal else 400,
    )
    render_table(analysis, console)


def run_analysis(
    source: Any,
    *,
    fmt: str | None = None,
    output: str | None = None,
    progress: bool | None = None,
    stderr: Console | None = None,
    **options: Any,
) -> Analysis:
    """Analyse ``source`` (see :func:`analyze` for ``options``), write the result and print
    the ``--fail-if`` gates on stderr. The caller turns ``result.failed_gates`` into exit 1.

    Args:
        source: a checkpoint, or None for the built-in demo checkpoint.
        fmt: ``table``, ``json``, ``csv`` or ``ndjson``; None chooses (see
            :func:`choose_format`).
        output: a file path (written atomically), ``-`` or None for stdout.
        progress: show a progress bar on stderr; None means only when stderr is a terminal.
        stderr: console for progress and notes (defaults to sys.stderr).
    """
    err = stderr or Console(stderr=True, highlight=False)
    if source is None:
        from htsr_cli.assets import default_checkpoint

        source = str(default_checkpoint())
    fmt = choose_format(fmt, output, sys.stdout.isatty())
    check_writable(output, [source])
    with open_output(output) as fh:
        on_layer: Callable[[dict[str, Any]], None] | None = None
        if fmt == "ndjson":

            def on_layer(record: dict[str, Any]) -> None:
                fh.write(ndjson_record(record) + "\n")
                fh.flush()

        with ProgressBar("analyze", console=err, enabled=progress) as bar:
            result = analyze(source, on_layer=on_layer, on_progress=bar.callback, **options)
        if fmt == "ndjson":
            fh.write(ndjson_summary(result) + "\n")
        elif fmt == "json":
            dump_json(result.to_dict(), fh)
        elif fmt == "csv":
            write_csv(result, fh)
        else:
            write_table(result, fh, (output is None or output == "-") and sys.stdout.isatty())
    print_gates(result.gates, err)
    return result


def print_gates(results: Sequence[Any], console: Console) -> None:
    """One line per gate on stderr; failing gates list their offending layers."""
    from rich.text import Text

    for g in results:
        style = "green" if g.passed else "red"
        console.print(Text(printable(g.message), style=style), soft_wrap=True)
        for w in g.warnings:  # a glob that matches no layer (docs/gates.md)
            console.print(Text(f"htsr: warning: {printable(w)}"), soft_wrap=True)


__all__ = [
    "FORMATS",
    "SCHEMA",
    "choose_format",
    "run_analysis",
    "print_gates",
    "write_csv",
    "write_table",
    "ndjson_record",
    "ndjson_summary",
]
