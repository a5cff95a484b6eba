"""Errors that the CLI turns into one line on stderr and a documented exit code.

Exit codes: 0 ok, 1 a ``--fail-if`` gate failed, 2 usage or input error, 3 internal error (a
bug in htsr, never a gate), 130 interrupted (Ctrl-C), 141 the reader of stdout closed the pipe
(as for any Unix filter).
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # an unexpected exception: a bug, reported in one line
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, as a shell reports it


class HtsrError(Exception):
    """Base class: a user-facing error whose message is one line."""

    exit_code: int = EXIT_USAGE


class InputError(HtsrError):
    """Bad input: missing/corrupt/unknown checkpoint, malformed option or document."""

    exit_code = EXIT_USAGE


class PipeClosed(HtsrError):
    """The reader of stdout went away (``| head``): stop quietly, like any Unix filter."""

    exit_code = 141  # 128 + SIGPIPE, what a shell reports for a filter killed by the pipe


def one_line(exc: BaseException, limit: int = 200, *, join: bool = False) -> str:
    """An error message on one line (or the error's type): its first line, where libraries
    such as torch put the point and then long advice, or, with ``join``, all its lines joined
    (user code, whose every line may matter)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if join and lines:
        lines = [" ".join(lines)]
    text = lines[0] if lines else type(exc).__name__
    if len(text) > 120 and ". " in text:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


_interrupt_reported = False


def report_interrupt(detail: str = "", *, silent: bool = False) -> None:
    """Write the one ``htsr: interrupted`` line of a Ctrl-C (once per process): the code that
    knows what was kept adds it as ``detail``; the CLI's entry point writes the bare line when
    nobody did. ``silent`` marks it written without writing (DDP ranks other than 0, so that a
    torchrun job prints one line, not one per rank)."""
    global _interrupt_reported
    if not _interrupt_reported:
        _interrupt_reported = True
        if not silent:
            sys.stderr.write("htsr: interrupted" + (f"; {detail}" if detail else "") + "\n")
