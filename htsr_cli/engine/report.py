"""Rendering an analysis: rich table, JSON, CSV and NDJSON (docs/analysis-schema.md).

``run_analysis`` is the library function behind ``htsr analyze``: it runs :func:`analyze`,
streams NDJSON as layers finish, writes the chosen format atomically and returns the result.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from htsr_cli.engine.analysis import SCHEMA, Analysis, analyze, parse_metrics
from htsr_cli.engine.columns import ALPHA_HIGH, ALPHA_LOW, NUMERIC_COLUMNS
from htsr_cli.engine.distributed import dist_env
from htsr_cli.errors import InputError
from htsr_cli.io.output import check_writable, dump_json, jsonable, open_output
from htsr_cli.io.output import choose_format as output_format
from htsr_cli.io.terminal import ProgressBar, printable, stderr_console, table_console

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


#: Table headers of the long column names (the headers decide most column widths).
_SHORT = {
    "stable_rank": "srank",
    "rand_distance": "rand_dist",
    "log_spectral_norm": "log_spec_norm",
    "spectral_norm": "spec_norm",
    "alpha_weighted": "alpha_w",
}

#: Table columns in the order a narrow terminal gives them up last: ``name``, ``shape`` and
#: ``alpha`` always show; then the headline metrics; the rest when the width allows.
TABLE_PRIORITY = (
    "shape",
    "alpha",
    "alpha_weighted",
    "stable_rank",
    "log_spectral_norm",
    "entropy",
    "rand_distance",
    "log_norm",
    "log_alpha_norm",
    "norm",
    "spectral_norm",
    "D",
    "num_evals",
)
#: Columns every terminal gets (when computed), whatever its width.
TABLE_ALWAYS = ("shape", "alpha")

#: The warning flags: a short code in the ``!`` column, explained under the table.
FLAGS = {
    "U": "under-trained (alpha > 6)",
    "O": "over-trained (alpha < 2)",
    "S": "small sample (fewer than 50 eigenvalues in the fit)",
    "F": "the fit has a problem (see --verbose)",
}


def warning_flags(warning: str) -> str:
    """The short codes of a layer's ``warning`` text (see :data:`FLAGS`): ``U``, ``O``, ``S``
    for the three known notes, ``F`` for anything else (a failed or doubtful fit)."""
    codes = []
    for note in (n.strip() for n in (warning or "").split(";")):
        if not note or note == "no fit metric requested":  # --metrics without a fit: by choice
            continue
        code = (
            "U"
            if note == "under-trained"
            else "O"
            if note == "over-trained"
            else "S"
            if note.startswith("small sample")
            else "F"
        )
        if code not in codes:
            codes.append(code)
    return "".join(sorted(codes, key=list(FLAGS).index))


def table_columns(metrics: Sequence[str]) -> list[str]:
    """Every column ``--columns`` accepts for an analysis of ``metrics``: ``shape``, the
    metrics, the other per-layer values, ``status`` and ``warning`` (``name`` is always the
    first column)."""
    return ["shape", *metrics, *NUMERIC_COLUMNS, "status", "warning"]


def parse_columns(spec: str | Sequence[str] | None, metrics: Sequence[str]) -> list[str] | None:
    """``--columns`` (comma-separated or a list) checked against :func:`table_columns`;
    ``all`` is every column; None when not given."""
    if spec is None:
        return None
    names = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [c for c in names if c and c != "name"]
    known = table_columns(metrics)
    if names == ["all"]:
        return known
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        raise InputError(
            f"unknown --columns {', '.join(unknown) or '(none given)'}; choose from name, "
            f"{', '.join(known)} or all"
        )
    return list(dict.fromkeys(names))


def _cell(row: dict[str, Any], col: str) -> Text:
    if col == "shape":
        rf = f"·{row['rf']}" if row.get("rf", 1) != 1 else ""
        return Text(f"{row['N']}×{row['M']}{rf}")
    if col == "warning":
        return Text(printable(row.get("warning") or ""), style="dim")
    v = row.get(col)
    text = Text(printable(_fmt(v)))
    if col == "alpha" and isinstance(v, float) and math.isfinite(v):
        text.stylize("red" if v < ALPHA_LOW else ("yellow" if v > ALPHA_HIGH else "green"))
    return text


def _header(col: str) -> str:
    return _SHORT.get(col, col)


def _columns_cells(analysis: Analysis, cols: Sequence[str], flags: bool) -> list[list[Text]]:
    """The body of the table, column by column (``layer``, ``cols``, then ``!`` with
    ``flags``): one cell per layer, then the ``mean`` row (the metric means only)."""
    summary = analysis.summary
    out = [[Text(printable(row["name"])) for row in analysis.layers] + [Text("mean", style="bold")]]
    for c in cols:
        cells = [_cell(row, c) for row in analysis.layers]
        out.append(cells + [Text(_fmt(summary[c]) if c in summary else "")])
    if flags:
        out.append(
            [Text(warning_flags(row.get("warning", ""))) for row in analysis.layers] + [Text("")]
        )
    return out


def _build_table(analysis: Analysis, cols: Sequence[str], flags: bool) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,  # two spaces between columns, not three: more fit at 80
        pad_edge=False,
        header_style="bold",
        show_edge=False,
    )
    table.add_column("layer", overflow="fold")
    for c in cols:
        if c == "warning":
            table.add_column("warning", overflow="fold")
        else:
            table.add_column(_header(c), justify="right", no_wrap=True)
    if flags:
        table.add_column("!", no_wrap=True, style="yellow")
    body = list(zip(*_columns_cells(analysis, cols, flags), strict=True))
    for cells in body[:-1]:
        table.add_row(*cells)
    table.add_section()
    table.add_row(*body[-1])
    return table


#: Width a column of the analyze table adds beside its cells: one space of padding after
#: every column but the last (``collapse_padding``, no ``pad_edge``) and one between columns
#: (``SIMPLE_HEAD`` without edges), as rich lays out :func:`_build_table`.
_COLUMN_GAP = 2


def choose_table_columns(analysis: Analysis, width: int, console: Console) -> list[str]:
    """The columns that fit ``width``: :data:`TABLE_ALWAYS`, then :data:`TABLE_PRIORITY` in
    order while the table, as wide as its widest cell, still fits (no cell is ever cut)."""
    computed = set(analysis.metrics) | {"shape", "D", "num_evals"}
    wanted = [c for c in TABLE_PRIORITY if c in computed]
    cols = [c for c in wanted if c in TABLE_ALWAYS]
    flags = any(warning_flags(row.get("warning", "")) for row in analysis.layers)
    # Each column's natural width, measured once: its widest cell, header included.
    unbounded = console.options.update_width(100_000)
    names = ["layer", *wanted, *(["!"] if flags else [])]
    width_of = {
        name: max(Measurement.get(console, unbounded, c).maximum for c in [_header(name), *cells])
        for name, cells in zip(names, _columns_cells(analysis, wanted, flags), strict=True)
    }
    fixed = ["layer", *(["!"] if flags else [])]

    def natural_width(trial: list[str]) -> int:
        shown = fixed + trial
        return sum(width_of[c] for c in shown) + _COLUMN_GAP * (len(shown) - 1)

    for c in wanted:
        if c in cols:
            continue
        trial = [x for x in wanted if x in cols or x == c]
        if natural_width(trial) > width:
            break
        cols = trial
    return cols


def render_table(
    analysis: Analysis,
    console: Console,
    *,
    columns: Sequence[str] | None = None,
    verbose: bool = False,
) -> None:
    """A table that fits the console: one row per layer, the metric means, then what the
    ``!`` flags mean (every layer's warning in full with ``verbose``) and the skipped layers.

    Args:
        columns: the columns after ``layer`` (see :func:`table_columns`); None chooses them by
            the console's width (:func:`choose_table_columns`).
        verbose: list every layer's full warning under the table.
    """
    if columns is None:
        cols = choose_table_columns(analysis, console.width, console)
    else:
        cols = list(columns)
    warned = [row for row in analysis.layers if warning_flags(row.get("warning", ""))]
    flags = bool(warned) and "warning" not in cols
    src = printable(analysis.source.get("path") or "(in memory)")
    title = (
        f"{src}  fit={printable(analysis.options['fit'])}  {len(analysis.layers)} layers  "
        f"{analysis.seconds:.1f}s"
    )
    console.print(Text(title), soft_wrap=True)  # a long path wraps as text, cutting no cell
    console.print(_build_table(analysis, cols, flags))
    if flags:
        counts: dict[str, int] = {}
        for row in warned:
            for code in warning_flags(row["warning"]):
                counts[code] = counts.get(code, 0) + 1
        for code, n in sorted(counts.items(), key=lambda kv: list(FLAGS).index(kv[0])):
            console.print(
                Text(f"! {code}  {FLAGS[code]}: {n} layer{'s' if n != 1 else ''}"),
                soft_wrap=True,
            )
    if verbose:
        for row in warned:
            console.print(
                Text(f"{printable(row['name'])}: {printable(row['warning'])}"), soft_wrap=True
            )
    elif flags:
        console.print(Text("--verbose lists every layer's warning", style="dim"))
    for rec in analysis.skipped:
        console.print(
            Text("skipped ", style="dim")
            + Text(f"{printable(rec['name'])}: {printable(rec['reason'])}"),
            soft_wrap=True,
        )


def write_table(
    analysis: Analysis,
    fh: TextIO,
    terminal: bool,
    *,
    columns: Sequence[str] | None = None,
    verbose: bool = False,
) -> None:
    """The table; styled only on a terminal without ``NO_COLOR`` (then plain text). On a
    terminal it fits the terminal's width (``COLUMNS`` when set); off a terminal there is no
    width to respect, so every column shows."""
    console = table_console(fh, terminal, 400)
    render_table(analysis, console, columns=columns, verbose=verbose)


def run_analysis(
    source: Any,
    *,
    fmt: str | None = None,
    output: str | None = None,
    progress: bool | None = None,
    stderr: Console | None = None,
    columns: str | Sequence[str] | None = None,
    verbose: bool = False,
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
        columns: the table's columns (``--columns``, see :func:`table_columns`); None fits
            them to the terminal.
        verbose: list every layer's full warning under the table.
    """
    err = stderr or stderr_console()
    if source is None:
        from htsr_cli.assets import default_checkpoint

        source = str(default_checkpoint())
    if dist_env()[1] != 0:
        # Another rank of a sharded run (docs/distributed.md): its share, nothing written.
        return analyze(source, **options)
    fmt = choose_format(fmt, output, sys.stdout.isatty())
    table_cols = parse_columns(columns, parse_metrics(options.get("metrics")))
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
            terminal = (output is None or output == "-") and sys.stdout.isatty()
            write_table(result, fh, terminal, columns=table_cols, verbose=verbose)
    print_gates(result.gates, err)
    return result


def print_gates(results: Sequence[Any], console: Console) -> None:
    """One line per gate on stderr; failing gates list their offending layers."""
    from rich.text import Text

    for g in results:
        # Analysis.gates holds plain dicts; the gate evaluator returns GateResult objects.
        passed, message = (
            (g["passed"], g["message"]) if isinstance(g, dict) else (g.passed, g.message)
        )
        style = "green" if passed else "red"
        console.print(Text(printable(message), style=style), soft_wrap=True)
        warnings = g.get("warnings", []) if isinstance(g, dict) else g.warnings
        for w in warnings:  # a glob that matches no layer (docs/gates.md)
            console.print(Text(f"htsr: warning: {printable(w)}"), soft_wrap=True)


__all__ = [
    "FLAGS",
    "FORMATS",
    "SCHEMA",
    "TABLE_PRIORITY",
    "choose_table_columns",
    "parse_columns",
    "render_table",
    "table_columns",
    "warning_flags",
    "choose_format",
    "run_analysis",
    "print_gates",
    "write_csv",
    "write_table",
    "ndjson_record",
    "ndjson_summary",
]
