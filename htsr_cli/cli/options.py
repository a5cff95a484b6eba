"""Options that several commands share, defined once so that their names, defaults and help
read the same everywhere. Each function returns a fresh typer option description; ``when``
prefixes the help where an option applies only in some cases ("Checkpoint SOURCE only: ")."""

from __future__ import annotations

from typing import Any

import typer

from htsr_cli.engine.columns import METRICS

FIT_HELP = (
    "Power-law fit: ww (WeightWatcher: xmin = argmin KS distance), median (TempBalance: "
    "xmin = median eigenvalue), peak (xmin near the ESD peak), clip-xmax (refit without "
    "finger eigenvalues)."
)
METRIC_NAMES = ", ".join(METRICS[:-1]) + " or " + METRICS[-1]


def exit_codes(
    gate: str = "never (no gates here)",
    usage: str = "usage or input error (one line on stderr, nothing written)",
    interrupted: str = "interrupted (Ctrl-C)",
) -> str:
    """The exit-code paragraph of a command's ``--help``: every code htsr uses, with what
    code 1 (a gate failed), 2 and 130 mean for that command."""
    return (
        f"Exit codes: 0 ok, 1 {gate}, 2 {usage}, 3 internal error (a bug; HTSR_DEBUG=1 "
        f"shows the traceback), 130 {interrupted}, 141 the reader of stdout closed the pipe "
        "(| head)."
    )


def fit(default: str | None = "ww", when: str = "", note: str = "") -> Any:
    return typer.Option(default, "--fit", help=when + FIT_HELP + (" " + note if note else ""))


PRESET_HELP = (
    "Reproduce a reference tool's numbers: tempbalance | alphapruning | weightwatcher. Sets "
    "every convention of that tool, quirks included (eigenvalue filter, estimator, peak "
    "window, layer set, ...); options given explicitly win. Table in docs/presets.md."
)


def preset(when: str = "") -> Any:
    return typer.Option(None, "--preset", help=when + PRESET_HELP)


def device(default: str | None = "auto", when: str = "") -> Any:
    return typer.Option(default, "--device", help=when + "auto | cpu | cuda | cuda:N.")


def trust_pickle(when: str = "") -> Any:
    return typer.Option(
        False,
        "--trust-pickle",
        help=when + "Allow torch files that need arbitrary code to unpickle. "
        "Only for files you trust.",
    )


def key(when: str = "") -> Any:
    return typer.Option(
        None,
        "--key",
        metavar="PATH",
        help=when + "Torch files: where the state dict is inside the checkpoint, e.g. ema or "
        "model/state_dict. Default: found under state_dict, model_state_dict, model, module, "
        "net, ema (one level down too).",
    )


def metric(when: str = "") -> Any:
    return typer.Option("alpha", "--metric", help=when + METRIC_NAMES + ".")


def layers(when: str = "") -> Any:
    return typer.Option(
        [], "--layers", help=when + "Only layers whose name matches this glob (repeatable)."
    )


def exclude(text: str = "Leave out layers whose name matches this glob (repeatable).") -> Any:
    return typer.Option([], "--exclude", help=text)


def output(text: str = "Write here (atomically) instead of stdout.") -> Any:
    return typer.Option(None, "--output", "-o", help=text)


def progress() -> Any:
    return typer.Option(
        None, "--progress/--no-progress", help="Progress bar on stderr (default: on a terminal)."
    )
