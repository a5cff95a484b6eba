"""``htsr diff A B`` over :func:`htsr_cli.gate.diff.run_diff`, and ``htsr plot diff A B``
over :func:`htsr_cli.plotting.diff.plot_diff` (registered on the ``plot`` group here, beside
its table twin)."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli.cli import options
from htsr_cli.cli.app import app
from htsr_cli.cli.plot import plot_app

_WHEN = "Checkpoint A/B only: "
_A_HELP = "The reference: an analysis JSON ('-' for stdin) or a checkpoint."
_B_HELP = "The model compared with A: delta = B - A, ratio = B / A."


@app.command(
    "diff",
    epilog=(
        "Examples:\n\n"
        "  htsr diff main.json pr.json                       # a table of B - A per metric\n\n"
        "  htsr diff base.pth new.pth --metrics alpha --format csv -o diff.csv\n\n"
        "  htsr diff main.json new.safetensors --format json | jq '.layers[0]'\n\n"
        "Layers are paired by name, as 'htsr gate B --baseline A' pairs them; layers on one "
        "side only are listed (added: only in B; removed: only in A).\n\n" + options.exit_codes()
    ),
)
def diff_command(
    a: str = typer.Argument(..., metavar="A", help=_A_HELP),
    b: str = typer.Argument(..., metavar="B", help=_B_HELP),
    fmt: Optional[str] = typer.Option(  # noqa: UP045 (typer needs Optional here)
        None,
        "--format",
        "-f",
        help="table | json | csv. Default: from the -o extension, else a table on a terminal "
        "and json in a pipe.",
    ),
    output: Optional[str] = options.output(),  # noqa: UP045
    metrics: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--metrics",
        "-m",
        help="Comma-separated metrics to compare. Default: every metric both have.",
    ),
    fit: Optional[str] = options.fit(None, when=_WHEN),  # noqa: UP045
    device: Optional[str] = options.device(None, when=_WHEN),  # noqa: UP045
    layers: list[str] = options.layers(when=_WHEN),
    exclude: list[str] = options.exclude(
        _WHEN + "leave out layers whose name matches this glob (repeatable)."
    ),
    min_evals: Optional[int] = typer.Option(  # noqa: UP045
        None, "--min-evals", help=_WHEN + "skip layers with fewer pooled eigenvalues."
    ),
    trust_pickle: bool = options.trust_pickle(when=_WHEN),
    progress: Optional[bool] = options.progress(),  # noqa: UP045
) -> None:
    """The per-layer change of every metric between two analyses or checkpoints."""
    from htsr_cli.gate.diff import run_diff

    run_diff(
        a,
        b,
        fmt=fmt,
        output=output,
        metrics=metrics,
        progress=progress,
        fit=fit,
        device=device,
        layers=layers or None,
        exclude=exclude or None,
        min_evals=min_evals,
        trust_pickle=trust_pickle or None,
    )


@plot_app.command(
    "diff",
    epilog=(
        "Examples:\n\n"
        "  htsr plot diff main.json pr.json -o alpha-diff.png\n\n"
        "  htsr plot diff base.pth new.pth --metric spectral_norm --ratio -o sn.svg\n\n"
        + options.exit_codes()
    ),
)
def plot_diff_command(
    a: str = typer.Argument(..., metavar="A", help=_A_HELP),
    b: str = typer.Argument(..., metavar="B", help=_B_HELP),
    output: str = typer.Option(
        ..., "--output", "-o", help="Image to write (atomically): .png, .svg or .pdf."
    ),
    metric: str = typer.Option("alpha", "--metric", "-m", help="The metric to compare."),
    ratio: bool = typer.Option(False, "--ratio", help="Draw B / A instead of B - A."),
    label: list[str] = typer.Option(
        [], "--label", help="Legend label of A, then of B (give both or none)."
    ),
    dpi: int = typer.Option(150, "--dpi", min=30, max=1200, help="Resolution of PNG output."),
    fit: Optional[str] = options.fit(None, when=_WHEN),  # noqa: UP045
    device: Optional[str] = options.device(None, when=_WHEN),  # noqa: UP045
    trust_pickle: bool = options.trust_pickle(when=_WHEN),
) -> None:
    """A metric per layer in A and B, and its change B - A (or B / A)."""
    from htsr_cli.plotting.diff import plot_diff

    result = plot_diff(
        a,
        b,
        output,
        metric=metric,
        ratio=ratio,
        labels=label,
        dpi=dpi,
        fit=fit,
        device=device,
        trust_pickle=trust_pickle or None,
    )
    for note in result.notes:
        typer.echo(f"htsr: note: {note}", err=True)
    typer.echo(f"htsr: wrote {result.path}", err=True)
