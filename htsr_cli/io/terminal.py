"""What htsr shows a person on a terminal: the one progress bar of every command, and
strings from files made safe to show.

Progress goes to stderr and only when it is a terminal (or when asked); it is transient, so a
finished command leaves only its output. Text from files (layer names, paths, metadata) is
never interpreted as rich markup, and control characters are escaped so that a crafted name
cannot move the cursor or recolour the terminal.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

#: An ``on_progress(done, total, what)`` callback, as the library's long functions take.
ProgressCallback = Callable[[int, "int | None", str], None]

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_CONTROL.update({i: f"\\x{i:02x}" for i in range(0x80, 0xA0)})  # C1 controls (CSI...)


def printable(text: Any) -> str:
    """``text`` as a plain string with every control character escaped (``\\x1b``, ``\\n``)."""
    return str(text).translate(_CONTROL)


def literal(text: Any) -> str:
    """``text`` ready to embed in rich markup: controls escaped, brackets shown as brackets."""
    return escape(printable(text))


def styled(terminal: bool) -> bool:
    """Whether output to a terminal may use colour (no-color.org: ``NO_COLOR`` set and
    non-empty turns it off)."""
    return terminal and not os.environ.get("NO_COLOR")


def stderr_console() -> Console:
    """The console of progress and notes: stderr, colour only on a terminal without NO_COLOR."""
    color = styled(sys.stderr.isatty())
    return Console(stderr=True, highlight=False, no_color=not color)


_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(value: float, largest: float, width: int = 16) -> str:
    """A unicode bar of ``width * value / largest`` cells, in eighths of a cell (the plan
    tables' multiplier and ratio columns)."""
    if not (largest > 0 and math.isfinite(value) and value > 0):
        return ""
    eighths = round(min(value / largest, 1.0) * width * 8)
    full, part = divmod(max(eighths, 1), 8)  # a positive value always shows
    return "█" * full + (_EIGHTHS[part] if part else "")


def number_cell(value: Any, spec: str = ".4g") -> str:
    """A number in a table cell: ``-`` for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table_console(fh: Any, terminal: bool, width: int) -> Console:
    """The console a command's table is printed on: styled on a terminal without NO_COLOR
    (plain text otherwise), the terminal's width there, ``width`` columns off a terminal
    (where no width limits the table)."""
    color = styled(terminal)
    return Console(
        file=fh,
        force_terminal=color,
        no_color=not color,
        highlight=False,
        width=None if terminal else width,
    )


class ProgressBar:
    """The one transient progress bar: ``label``, a bar, done/total, elapsed time and a
    description; off unless stderr is a terminal (``enabled=None``) or ``enabled=True``.

    Use as a context manager; :attr:`callback` is an ``on_progress`` for the library (None
    when the bar is off, so the library skips the calls)."""

    def __init__(
        self, label: str, *, console: Console | None = None, enabled: bool | None = None
    ) -> None:
        self.console = console or stderr_console()
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.label = label
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.fields[label]}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[what]}", markup=False),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=None, label=literal(self.label), what="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def callback(self) -> ProgressCallback | None:
        return self.update if self.enabled else None

    def update(
        self, done: int, total: int | None = None, what: str = "", *, label: str | None = None
    ) -> None:
        """Move the bar: ``done`` of ``total`` (None: unknown), ``what`` is being done."""
        if self._bar is None:
            return
        fields: dict[str, Any] = {"what": printable(what)}
        if label is not None:
            fields["label"] = literal(label)
        self._bar.update(self._task, completed=done, total=total, **fields)

    def line(self, text: str) -> None:
        """A permanent line on stderr above the bar (plain text, shown literally)."""
        if self._bar is not None:
            self._bar.console.print(printable(text), highlight=False, markup=False)
        else:
            sys.stderr.write(printable(text) + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


__all__ = [
    "ProgressBar",
    "ProgressCallback",
    "bar",
    "number_cell",
    "literal",
    "printable",
    "stderr_console",
    "styled",
    "table_console",
]
