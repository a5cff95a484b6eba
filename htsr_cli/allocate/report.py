"""Rendering an LR plan (table, JSON, CSV) and ``run_allocate``, the function behind
``htsr allocate``."""

from __future__ import annotations

import csv
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from htsr_cli.allocate.plan import LRPlan
from htsr_cli.allocate.schemes import MIN_MULTIPLIER, allocate
from htsr_cli.io.output import check_writable, choose_format, jsonable, open_output, write_json
from htsr_cli.io.terminal import bar, number_cell, printable, table_console

PLAN_FORMATS = ("table", "json", "csv")


def choose_plan_format(fmt: str | None, output: str | None, stdout_is_tty: bool) -> str:
    """See :func:`htsr_cli.io.output.choose_format`."""
    return choose_format(fmt, output, stdout_is_tty, PLAN_FORMATS)


def render_plan_table(plan: LRPlan, console: Console) -> None:
    """A rich table: layer, metric value, multiplier, LR, a bar, status; then the summary and
    a note on clipped multipliers."""
    src = plan.source.get("analysis") or plan.source.get("path") or "(in memory)"
    p = plan.params
    allocated = sum(layer.status == "allocated" for layer in plan.layers)
    extra = f"  p={p['p']:g}" if "p" in p else ""
    extra += "  inverted" if p.get("invert") else ""
    extra += f"  seed={p.get('seed')}" if plan.scheme.startswith("sample-") else ""
    # Every string from a file (path, names, metric, reasons) is shown as plain text: never
    # rich markup, controls escaped (htsr_cli.io.terminal.printable).
    table = Table(
        title=Text(
            printable(
                f"{src}  scheme={plan.scheme}{extra}  metric={plan.metric}  "
                f"lr={plan.base_lr:g}  {allocated}/{len(plan.layers)} layers allocated"
            )
        ),
        title_justify="left",
        header_style="bold",
    )
    table.add_column("layer", overflow="fold")
    table.add_column(Text(printable(plan.metric)), justify="right")
    table.add_column("mult", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("", no_wrap=True)
    wd = plan.base_wd is not None
    if wd:
        table.add_column("wd mult", justify="right")
        table.add_column("wd", justify="right")
    table.add_column("status", overflow="fold")
    largest = max(layer.multiplier for layer in plan.layers)
    for layer in plan.layers:
        base = layer.status != "allocated"
        cells: list[Any] = [
            Text(printable(layer.name)),
            number_cell(layer.metric_value),
            f"{layer.multiplier:.4g}",
            f"{layer.lr:.4g}",
            Text(bar(layer.multiplier, largest), style="dim" if base else "cyan"),
        ]
        if wd:
            cells += [
                number_cell(layer.wd_multiplier),
                number_cell(
                    plan.base_wd * layer.wd_multiplier if layer.wd_multiplier is not None else None
                ),
            ]
        cells.append(Text(printable(layer.reason or layer.status), style="dim" if base else ""))
        table.add_row(*cells, style="dim" if base else None)
    s = plan.summary()
    table.caption = (
        f"multiplier mean {s['mean_multiplier']:.4g}, min {s['min']:.4g}, max {s['max']:.4g}"
    )
    table.caption_justify = "left"
    console.print(table)
    if p.get("clipped"):
        console.print(Text("note: ", style="yellow") + Text(printable(clip_note(plan))))


def clip_note(plan: LRPlan) -> str:
    """One line saying how many multipliers were clipped, empty when none were."""
    n = int(plan.params.get("clipped", 0))
    if not n:
        return ""
    return (
        f"{n} multiplier(s) of scheme {plan.scheme} were non-positive, non-finite or below "
        f"{MIN_MULTIPLIER:g} and were clipped to {MIN_MULTIPLIER:g} (see docs/allocate.md)"
    )


CSV_COLUMNS = (
    "name",
    "metric_value",
    "multiplier",
    "lr",
    "wd_multiplier",
    "wd",
    "status",
    "reason",
)


def write_plan_csv(plan: LRPlan, fh: TextIO) -> None:
    """One row per layer; the wd columns only when the plan has weight decay."""
    cols = [c for c in CSV_COLUMNS if plan.base_wd is not None or c not in ("wd_multiplier", "wd")]
    writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for layer in plan.layers:
        row = jsonable(layer.to_dict())
        if plan.base_wd is not None and layer.wd_multiplier is not None:
            row["wd"] = plan.base_wd * layer.wd_multiplier
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})


def write_plan(
    plan: LRPlan, fmt: str, output: str | os.PathLike | None, *, terminal: bool = False
) -> None:
    """Write ``plan`` as ``table``, ``json`` or ``csv`` to ``output`` (atomically) or stdout;
    ``fmt`` is one :func:`choose_plan_format` returned (it checks ``--format`` for users;
    any other value is a caller's bug, a ValueError before anything is written)."""
    if fmt not in PLAN_FORMATS:
        raise ValueError(f"write_plan: format {fmt!r} is not one of {PLAN_FORMATS}")
    if fmt == "json":
        write_json(plan.to_dict(), output)
        return
    with open_output(output) as fh:
        if fmt == "csv":
            write_plan_csv(plan, fh)
        else:
            render_plan_table(plan, table_console(fh, terminal, 160))


def run_allocate(
    source: Any,
    *,
    fmt: str | None = None,
    output: str | None = None,
    stderr: Console | None = None,
    **kwargs: Any,
) -> LRPlan:
    """Build a plan with :func:`~htsr_cli.allocate.schemes.allocate` and write it.

    Args:
        source: as :func:`allocate`; ``-`` reads the analysis from stdin (once).
        fmt: ``table``, ``json`` or ``csv``; None chooses (see :func:`choose_plan_format`).
        output: a file path (written atomically, only when the plan succeeded), ``-`` or None
            for stdout.
        stderr: console for the clipping note (defaults to sys.stderr).
        **kwargs: every other keyword of :func:`allocate`.
    """
    fmt = choose_plan_format(fmt, output, sys.stdout.isatty())
    check_writable(output, [source])
    plan = allocate(source, **kwargs)
    to_terminal = (output is None or output == "-") and sys.stdout.isatty()
    write_plan(plan, fmt, output, terminal=to_terminal)
    if plan.params.get("clipped") and fmt != "table":  # a table carries its own note
        err = stderr or Console(stderr=True, highlight=False)
        err.print(Text(f"note: {printable(clip_note(plan))}", style="yellow"), soft_wrap=True)
    return plan


__all__ = [
    "PLAN_FORMATS",
    "choose_plan_format",
    "render_plan_table",
    "clip_note",
    "write_plan",
    "write_plan_csv",
    "run_allocate",
]
