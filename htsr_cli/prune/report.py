"""Rendering a pruning plan (table, JSON) and ``run_prune``, the function behind ``htsr prune``."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from htsr_cli.io.output import choose_format as output_format
from htsr_cli.io.output import open_output, write_json
from htsr_cli.io.terminal import ProgressBar, bar, number_cell, printable, table_console

PLAN_FORMATS = ("table", "json")


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _method(plan: Any) -> str:
    p = plan.params
    if plan.method != "metric":
        text = plan.method
    else:
        text = f"metric={plan.metric} ({p.get('mapping')}"
        text += f" eps={p['eps']:g}" if p.get("eps") is not None else ""
        text += f", more where {p.get('more_where')})"
    if p.get("budget_step") is not None:
        text += f"  budget-step={p['budget_step']:g}"
    if plan.mode == "structured":
        text += f"  importance={p.get('importance')}"
    return text


def summary_lines(plan: Any) -> list[str]:
    """Requested and achieved totals (and MACs), one fact per line."""
    t, a = plan.target, plan.achieved
    lines = [
        f"requested: remove {_count(t['removed'])} of {_count(t['params_before'])} prunable "
        f"parameters ({t['sparsity']:.2%}), keep {_count(t['params_after'])}",
        f"achieved:  removed {_count(a['removed'])} ({a['sparsity']:.2%}), kept "
        f"{_count(a['params_after'])} ({_deviation(a['params_after'], t['params_after'])})",
    ]
    if a.get("macs_before") is not None:
        lines.append(
            f"MACs:      {_count(a['macs_before'])} -> {_count(a['macs_after'])} "
            f"({1 - a['macs_after'] / a['macs_before']:.1%} fewer)"
        )
    if a.get("total_params_before") is not None:
        lines.append(
            f"all parameters: {_count(a['total_params_before'])} -> "
            f"{_count(a['total_params_after'])}"
        )
    return lines


def _deviation(got: int, want: int) -> str:
    if got == want:
        return "exactly the target"
    if want == 0:
        return f"{got:+} vs the target"
    return f"{(got - want) / want:+.3%} vs the target"


def render_plan_table(plan: Any, console: Console) -> None:
    """A rich table: one row per prunable layer (metric, budget, achieved ratio with a bar,
    parameters, channels), then the coupled groups, the totals and the notes."""
    src = plan.source.get("analysis") or plan.source.get("path") or "(in memory)"
    structured = plan.mode == "structured"
    # Strings from files (path, names, metric, notes) are plain text: never rich markup,
    # controls escaped.
    table = Table(
        title=Text(printable(f"{src}  {plan.mode}  {_method(plan)}")),
        title_justify="left",
        header_style="bold",
    )
    table.add_column("layer", overflow="fold")
    table.add_column(Text(printable(plan.metric or "metric")), justify="right")
    table.add_column("budget", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("params", justify="right")
    if structured:
        table.add_column("channels", justify="right")
        table.add_column("coupled group", overflow="fold")
    table.add_column("note", overflow="fold", style="dim")
    coupled_roots = {g.name for g in plan.groups if len(g.members) > 1}
    for lp in plan.layers:
        cells: list[Any] = [
            Text(printable(lp.name)),
            number_cell(lp.metric_value),
            f"{lp.budget:.3f}",
            f"{lp.ratio:.3f}",
            Text(bar(lp.ratio, 1.0), style="cyan"),
            f"{lp.params_before:,} -> {lp.params_after:,}",
        ]
        if structured:
            cells += [
                f"{lp.channels_before} -> {lp.channels_after}",
                Text(printable(lp.group)) if lp.group in coupled_roots else "",
            ]
        cells.append(Text(printable(lp.note)))
        table.add_row(*cells)
    console.print(table)
    coupled = [g for g in plan.groups if len(g.members) > 1]
    if coupled:
        console.print(
            f"[bold]coupled groups[/] ({len(coupled)} of {len(plan.groups)}): one "
            "channel ratio each, parameter-weighted over its layers"
        )
        for g in coupled:
            console.print(
                Text(
                    printable(
                        f"  {g.name}: {len(g.members)} layers, budget {g.budget:.3f}, "
                        f"channels {g.channels_before} -> {g.channels_after} "
                        f"({g.channel_ratio:.1%}): {', '.join(g.members)}"
                    )
                ),
                soft_wrap=True,
            )
    for line in summary_lines(plan):
        console.print(Text(line), soft_wrap=True)
    for note in plan.notes:
        console.print(Text("note: ", style="yellow") + Text(printable(note)), soft_wrap=True)
    if plan.output:
        console.print(Text(f"wrote {printable(plan.output)}"))


def write_plan(plan: Any, fmt: str, *, terminal: bool = False) -> None:
    """The plan as ``table`` or ``json`` on stdout; ``fmt`` is one
    :func:`~htsr_cli.io.output.choose_format` returned for :data:`PLAN_FORMATS` (it checks
    ``--format`` for users; any other value is a caller's bug, a ValueError)."""
    if fmt not in PLAN_FORMATS:
        raise ValueError(f"write_plan: format {fmt!r} is not one of {PLAN_FORMATS}")
    if fmt == "json":
        write_json(plan.to_dict(), None)
        return
    with open_output(None) as out:
        render_plan_table(plan, table_console(out, terminal, 160))


def run_prune(
    source: Any,
    *,
    fmt: str | None = None,
    output: str | None = None,
    progress: bool | None = None,
    stderr: Console | None = None,
    **kwargs: Any,
) -> Any:
    """Build (and with ``output``, apply and save) a plan with
    :func:`~htsr_cli.prune.prune`, then print the plan on stdout.

    Args:
        source: as :func:`prune`; ``-`` reads an analysis document from stdin.
        fmt: ``table`` or ``json`` (the ``htsr.prune-plan/1`` document); None: a table on a
            terminal, JSON in a pipe (as analyze and allocate do).
        output: the pruned ``.safetensors`` checkpoint to write (atomically).
        progress: a progress bar on stderr; None means only when stderr is a terminal.
        **kwargs: every other keyword of :func:`prune`.
    """
    from htsr_cli.prune import prune

    # The plan goes to stdout whatever -o names (the pruned checkpoint), so only the terminal
    # decides the default.
    fmt = output_format(fmt, None, sys.stdout.isatty(), PLAN_FORMATS)
    err = stderr or Console(stderr=True, highlight=False)
    with ProgressBar("prune", console=err, enabled=progress) as bar:
        plan = prune(source, output=output, on_progress=bar.callback, **kwargs)
    terminal = sys.stdout.isatty()
    write_plan(plan, fmt, terminal=terminal)
    if output and fmt != "table":
        err.print(Text(f"wrote {printable(output)}"), highlight=False)
    return plan


__all__ = ["PLAN_FORMATS", "render_plan_table", "summary_lines", "write_plan", "run_prune"]
