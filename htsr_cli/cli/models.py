"""``htsr models``: parse options, call :func:`htsr_cli.models.listing.run_models`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli.cli import options
from htsr_cli.cli.app import app

_EPILOG = (
    "Examples:\n\n"
    "  htsr models                       # the table\n\n"
    "  htsr models --format json | jq -r '.models[].name'\n\n" + options.exit_codes()
)


@app.command("models", epilog=_EPILOG)
def models_command(
    fmt: Optional[str] = typer.Option(  # noqa: UP045 (typer needs Optional here)
        None,
        "--format",
        "-f",
        help="table | json. Default: a table on a terminal, json in a pipe.",
    ),
    output: Optional[str] = options.output(),  # noqa: UP045
) -> None:
    """List the built-in models of --arch (name, data set, input, parameters)."""
    from htsr_cli.models.listing import run_models

    run_models(fmt, output)
