"""``htsr gate``: parse options, call :func:`htsr_cli.gate.run.run_gate`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli.cli import options
from htsr_cli.cli.app import app
from htsr_cli.errors import EXIT_GATE_FAILED, InputError

_EPILOG = (
    "Examples:\n\n"
    "  htsr gate report.json --fail-if 'alpha > 6' --fail-if 'count(nonfinite) > 0'\n\n"
    "  htsr gate new.pth --baseline base.json --fail-if 'delta(alpha) > 0.2'\n\n"
    "  htsr gate report.json --baseline main.json --fail-if 'mean(delta(alpha)) > 0.1' "
    "--format github\n\n"
    "  htsr gate report.json --format junit -o gates.xml        # gates from pyproject.toml\n\n"
    "  htsr gate --show-config\n\n"
    "Gates are read from \\[tool.htsr.gate] in pyproject.toml or \\[gate] in htsr.toml, found "
    "from the working directory upwards; --fail-if adds to them. See docs/gates.md and "
    "docs/ci.md.\n\n" + options.exit_codes("a gate failed")
)
_WHEN = "Checkpoint SOURCE/baseline only: "


@app.command("gate", epilog=_EPILOG)
def gate_command(
    source: Optional[str] = typer.Argument(  # noqa: UP045 (typer needs Optional here)
        None,
        metavar="SOURCE",
        help="An analysis from 'htsr analyze --format json' (read, not recomputed; '-' is "
        "stdin) or a checkpoint (analysed first, with the options below).",
    ),
    fail_if: list[str] = typer.Option(
        [],
        "--fail-if",
        help="Gate (repeatable), added to the configuration's: 'alpha > 6', "
        "'delta(alpha) > 0.2', 'mean(ratio(spectral_norm)) > 1.5 on \"layers.*\"', "
        "'count(nonfinite) > 0', 'added > 0'. Exit 1 when any fails.",
    ),
    baseline: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--baseline",
        "-b",
        help="Analysis JSON or checkpoint to compare with, layer by layer by name "
        "(delta(), ratio(), added, removed). Overrides the configuration's.",
    ),
    fmt: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--format",
        "-f",
        help="text | json | github | junit | markdown. Default: from the -o extension "
        "(.json, .xml, .md, .txt), else text on a terminal and json in a pipe.",
    ),
    output: Optional[str] = options.output(),  # noqa: UP045
    strict: Optional[bool] = typer.Option(  # noqa: UP045
        None,
        "--strict/--no-strict",
        help="A gate whose 'on GLOB' matches no layer is an error (exit 2), not a warning.",
    ),
    no_config: bool = typer.Option(False, "--no-config", help="Ignore pyproject.toml / htsr.toml."),
    show_config: bool = typer.Option(
        False,
        "--show-config",
        help="Print the gates, baseline and strictness that apply, and where each comes "
        "from, then exit.",
    ),
    fit: Optional[str] = options.fit(None, when=_WHEN),  # noqa: UP045
    metrics: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--metrics",
        "-m",
        help=_WHEN + "metrics to compute. Default: those the gates need.",
    ),
    device: Optional[str] = options.device(None, when=_WHEN),  # noqa: UP045
    layers: list[str] = options.layers(when=_WHEN),
    exclude: list[str] = options.exclude(
        _WHEN + "leave out layers whose name matches this glob (repeatable)."
    ),
    min_evals: Optional[int] = typer.Option(  # noqa: UP045
        None, "--min-evals", help=_WHEN + "skip layers with fewer pooled eigenvalues."
    ),
    seed: Optional[int] = typer.Option(  # noqa: UP045
        None, "--seed", help=_WHEN + "seed of the shuffles behind rand_distance."
    ),
    trust_pickle: bool = options.trust_pickle(when=_WHEN),
    jobs: Optional[int] = typer.Option(  # noqa: UP045
        None, "--jobs", "-j", min=1, help=_WHEN + "layers analysed at once."
    ),
    progress: Optional[bool] = options.progress(),  # noqa: UP045
) -> None:
    """Check CI gates on an analysis, optionally against a baseline (docs/gates.md)."""
    if show_config:
        from htsr_cli.gate.run import show_config as show

        show(fail_if, baseline, strict, use_config=not no_config, fmt=fmt, output=output)
        return
    if source is None:
        raise InputError("htsr gate needs SOURCE: an analysis JSON or a checkpoint")
    from htsr_cli.gate.run import run_gate

    report = run_gate(
        source,
        fail_if=fail_if,
        baseline=baseline,
        strict=strict,
        use_config=not no_config,
        fmt=fmt,
        output=output,
        progress=progress,
        fit=fit,
        metrics=metrics,
        device=device,
        layers=layers or None,
        exclude=exclude or None,
        min_evals=min_evals,
        seed=seed,
        trust_pickle=trust_pickle or None,
        jobs=jobs,
    )
    if report.failed:
        raise typer.Exit(EXIT_GATE_FAILED)
