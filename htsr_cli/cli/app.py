"""The typer application and the entry point that maps errors to exit codes.

Exit codes: 0 ok, 1 a ``--fail-if`` gate failed, 2 usage or input error (one line on stderr),
3 internal error (a bug, one line), 130 interrupted, 141 the reader of stdout closed the pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import typer

from htsr_cli import __version__
from htsr_cli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    HtsrError,
    PipeClosed,
    one_line,
    report_interrupt,
)
from htsr_cli.io.terminal import printable

app = typer.Typer(
    name="htsr",
    help="Heavy-Tailed Self-Regularization metrics for neural-network checkpoints.\n\n"
    "Exit codes: 0 ok, 1 a --fail-if gate failed, 2 usage or input error, 3 internal error "
    "(a bug; HTSR_DEBUG=1 shows the traceback), 130 interrupted, 141 the reader of stdout "
    "closed the pipe (| head).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"htsr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Heavy-Tailed Self-Regularization metrics for neural-network checkpoints."""


def error(message: str) -> None:
    """The one-line error format of every command. Messages quote file names and keys, so
    control characters are escaped: a crafted name cannot break the line or drive the
    terminal."""
    sys.stderr.write(f"htsr: error: {printable(message)}\n")


def _command_path(argv: list[str] | None) -> str:
    """``htsr SUBCOMMAND`` from the arguments, for the help hint of an error raised before
    click built a context."""
    args = sys.argv[1:] if argv is None else argv
    sub = next((a for a in args if not a.startswith("-")), None)
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    return f"htsr {sub}" if sub in names else "htsr"


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _terminations_as_interrupt() -> Callable[[], None]:
    """SIGTERM and SIGHUP (a ``kill``, a closed terminal) end htsr as Ctrl-C does: the one
    ``htsr: interrupted`` line, exit 130, temporary files removed (the atomic writers clean
    up on KeyboardInterrupt). Returns the undo; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # never take over a handler someone set
            old[sig] = signal.signal(sig, _interrupt)

    def undo() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return undo


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Library warnings (torch, numpy) are not shown, so that stderr holds progress, notes and
    at most one error line; ``HTSR_DEBUG=1`` shows them (and the traceback of a bug)."""
    undo = _terminations_as_interrupt()
    try:
        with warnings.catch_warnings():
            if not os.environ.get("HTSR_DEBUG"):
                warnings.simplefilter("ignore")
            code = _run(argv)
    finally:
        undo()
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130)
        report_interrupt()
    sys.exit(code if isinstance(code, int) else 0)


def _run(argv: list[str] | None) -> Any:
    """Run the app; returns the exit code, every exception mapped to one line."""
    try:
        code = app(args=argv, prog_name="htsr", standalone_mode=False)
    except (PipeClosed, BrokenPipeError):
        # Silence the interpreter's final flush of a stdout nobody reads.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = PipeClosed.exit_code
    except HtsrError as exc:
        error(str(exc))
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    except OSError as exc:
        # The environment, not htsr: a full disk, a vanished directory, an I/O error.
        where = f": {exc.filename}" if exc.filename else ""
        error(f"{exc.strerror or one_line(exc)}{where}")
        code = EXIT_USAGE
    except typer.TyperException as exc:
        # typer's (vendored) click usage errors: one line, exit 2, or help when no arguments.
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            code = 0  # typer has already printed the help
        else:
            cmd = ctx.command_path if ctx is not None else _command_path(argv)
            error(f"{exc.format_message()} (see '{cmd} --help')")
            code = getattr(exc, "exit_code", EXIT_USAGE)
    except Exception as exc:  # a bug: never exit 1, which means "a gate failed"
        if os.environ.get("HTSR_DEBUG"):
            raise
        sys.stderr.write(
            f"htsr: internal error: {type(exc).__name__}: {printable(one_line(exc))} (a bug; "
            "HTSR_DEBUG=1 shows the traceback)\n"
        )
        code = EXIT_INTERNAL
    return code
