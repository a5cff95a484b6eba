"""``htsr plot``: six figure subcommands, each a thin call of one :mod:`htsr_cli.plotting`
function."""

from __future__ import annotations

from typing import Any, Optional

import typer

from htsr_cli.cli import options
from htsr_cli.cli.app import app

plot_app = typer.Typer(
    name="plot",
    help="Figures (PNG, SVG or PDF by the -o extension) from checkpoints, analyses, plans "
    "and finetune runs.\n\n" + options.exit_codes(),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(plot_app, name="plot")

_OUTPUT_HELP = "Image to write (atomically): .png, .svg or .pdf."
_DPI_HELP = "Resolution of PNG output (dots per inch)."
_LABEL_HELP = "Legend label of each input, in order (repeat once per input)."


# Options shared by several commands (typer reads these as plain option descriptions).
_OUTPUT = typer.Option(..., "--output", "-o", help=_OUTPUT_HELP)
_DPI = typer.Option(150, "--dpi", min=30, max=1200, help=_DPI_HELP)
_LABELS = typer.Option([], "--label", help=_LABEL_HELP)


def _notes(notes: list[str], path: Any) -> None:
    # Notes name layers and paths from the inputs: shown with control characters escaped.
    from htsr_cli.io.terminal import printable

    for note in notes:
        typer.echo(f"htsr: note: {printable(note)}", err=True)
    typer.echo(f"htsr: wrote {printable(path)}", err=True)


@plot_app.command(
    "esd",
    epilog=(
        "Examples:\n\n"
        "  htsr plot esd -o esd.png                            # every layer of the demo model\n\n"
        "  htsr plot esd model.safetensors --layer 'layer4.*' -o esd.pdf\n\n"
        "  htsr plot esd model.pt --layer fc --fit median --linear -o fc.svg\n\n"
        "The histogram is the density of the eigenvalues above 1e-5; the line is the fitted "
        "power-law density from xmin, scaled by the tail's share, slope -alpha on log-log axes."
        "\n\n" + options.exit_codes()
    ),
)
def esd_command(
    source: Optional[str] = typer.Argument(  # noqa: UP045 (typer needs Optional here)
        None,
        metavar="[CKPT]",
        help="A checkpoint (.safetensors/.pt/HF directory). Default: the built-in demo CNN.",
    ),
    output: str = _OUTPUT,
    layer: list[str] = typer.Option(
        [],
        "--layer",
        "--layers",
        help="Layers whose name matches this glob (repeatable; each must match).",
    ),
    fit: str = options.fit(),
    linear: bool = typer.Option(False, "--linear", help="Linear axes and bins, not log-log."),
    max_layers: int = typer.Option(
        16, "--max-layers", min=1, help="At most this many panels (the first layers)."
    ),
    device: str = options.device(),
    trust_pickle: bool = options.trust_pickle(),
    key: Optional[str] = options.key(),  # noqa: UP045
    dpi: int = _DPI,
) -> None:
    """ESD of layers on log-log axes with the fitted power law, xmin, alpha and D."""
    from htsr_cli.io.terminal import ProgressBar
    from htsr_cli.plotting.esd import plot_esd

    with ProgressBar("analyze") as bar:  # the slow part of an ESD figure is the analysis
        result = plot_esd(
            source,
            output,
            layers=layer,
            fit=fit,
            linear=linear,
            max_layers=max_layers,
            device=device,
            trust_pickle=trust_pickle,
            key=key,
            dpi=dpi,
            on_progress=bar.callback,
        )
    _notes(result.notes, result.path)


@plot_app.command(
    "metrics",
    epilog=(
        "Examples:\n\n"
        "  htsr analyze m.safetensors -f json -o a.json && "
        "htsr plot metrics a.json -o alpha.png\n\n"
        "  htsr plot metrics before.json after.json --label before --label after -o alpha.png\n\n"
        "  htsr plot metrics a.json --metric stable_rank -o sr.svg"
        "\n\n" + options.exit_codes()
    ),
)
def metrics_command(
    analyses: list[str] = typer.Argument(
        ...,
        metavar="ANALYSIS.json...",
        help="Analyses from 'htsr analyze --format json' ('-' reads one from stdin).",
    ),
    output: str = _OUTPUT,
    metric: str = typer.Option("alpha", "--metric", "-m", help="The metric to plot."),
    label: list[str] = _LABELS,
    dpi: int = _DPI,
) -> None:
    """A metric per layer; for alpha the 2..6 band shaded and layers outside it ringed."""
    from htsr_cli.plotting import plot_metrics

    result = plot_metrics(analyses, output, metric=metric, labels=label, dpi=dpi)
    _notes(result.notes, result.path)


@plot_app.command(
    "lr-plan",
    epilog=(
        "Examples:\n\n"
        "  htsr allocate a.json --lr 0.1 -f json -o tb.json && htsr plot lr-plan tb.json -o lr.png"
        "\n\n"
        "  htsr plot lr-plan tb.json sqrt.json log2.json -o lr.pdf"
        "\n\n" + options.exit_codes()
    ),
)
def lr_plan_command(
    plans: list[str] = typer.Argument(
        ..., metavar="PLAN.json...", help="Plans from 'htsr allocate --format json'."
    ),
    output: str = _OUTPUT,
    label: list[str] = _LABELS,
    dpi: int = _DPI,
) -> None:
    """LR multipliers in layer order and ranked, side by side (thesis Figs 2.3-2.5)."""
    from htsr_cli.plotting import plot_lr_plans

    result = plot_lr_plans(plans, output, labels=label, dpi=dpi)
    _notes(result.notes, result.path)


@plot_app.command(
    "prune-plan",
    epilog=(
        "Examples:\n\n"
        "  htsr prune a.json --sparsity 0.5 -f json > p50.json && htsr plot prune-plan p50.json "
        "-o p.png\n\n"
        "  htsr plot prune-plan alpha30.json uniform30.json alpha70.json uniform70.json "
        "-o p.pdf\n\n"
        "Several methods at several sparsities give one panel per sparsity."
        "\n\n" + options.exit_codes()
    ),
)
def prune_plan_command(
    plans: list[str] = typer.Argument(
        ..., metavar="PLAN.json...", help="Plans from 'htsr prune --format json'."
    ),
    output: str = _OUTPUT,
    label: list[str] = _LABELS,
    dpi: int = _DPI,
) -> None:
    """Per-layer pruning ratio (thesis Figs 3.6-3.21), methods and sparsities overlaid."""
    from htsr_cli.plotting import plot_prune_plans

    result = plot_prune_plans(plans, output, labels=label, dpi=dpi)
    _notes(result.notes, result.path)


@plot_app.command(
    "history",
    epilog=(
        "Examples:\n\n"
        "  htsr plot history runs/tb -o tb.png\n\n"
        "  htsr plot history runs/global runs/tb --per-layer --layer 'features.*' -o alpha.png"
        "\n\n" + options.exit_codes()
    ),
)
def history_command(
    runs: list[str] = typer.Argument(
        ..., metavar="RUN_DIR...", help="Run directories of 'htsr finetune'."
    ),
    output: str = _OUTPUT,
    per_layer: bool = typer.Option(
        False,
        "--per-layer",
        help="One panel per layer: its metric across epochs for every run (thesis Fig 3.22).",
    ),
    layer: list[str] = typer.Option(
        [], "--layer", "--layers", help="Only layers matching this glob (repeatable)."
    ),
    max_layers: int = typer.Option(
        16, "--max-layers", min=1, help="--per-layer: at most this many."
    ),
    label: list[str] = _LABELS,
    dpi: int = _DPI,
) -> None:
    """Loss and accuracy, per-layer metric and per-layer LR across epochs."""
    from htsr_cli.plotting import plot_history

    result = plot_history(
        runs,
        output,
        labels=label,
        layers=layer,
        per_layer=per_layer,
        max_layers=max_layers,
        dpi=dpi,
    )
    _notes(result.notes, result.path)


@plot_app.command(
    "tradeoff",
    epilog=(
        "Examples:\n\n"
        "  htsr plot tradeoff runs/* -o tradeoff.png\n\n"
        "  htsr plot tradeoff runs/uniform-* runs/alpha-* --best -o tradeoff.pdf\n\n"
        "Runs are grouped by the 'method' of their final.json (and by LR mode where that differs)."
        "\n\n" + options.exit_codes()
    ),
)
def tradeoff_command(
    runs: list[str] = typer.Argument(
        ..., metavar="RUN_DIR...", help="Finished run directories of 'htsr finetune'."
    ),
    output: str = _OUTPUT,
    best: bool = typer.Option(
        False, "--best", help="Best test accuracy of each run instead of the final one."
    ),
    dpi: int = _DPI,
) -> None:
    """Test accuracy against parameters remaining, one line per method (Figs 3.3, 3.25)."""
    from htsr_cli.plotting import plot_tradeoff

    result = plot_tradeoff(runs, output, best=best, dpi=dpi)
    _notes([], result.path)
