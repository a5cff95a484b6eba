"""``htsr analyze --nproc-per-node N``: check everything here, then hand over to torchrun.

Every input error is found in this process, before any worker starts (one line, exit 2, no
output); the workers then run ``htsr analyze`` with the same options under
``torch.distributed.run --standalone`` (:func:`htsr_cli.engine.distributed.torchrun`, the one
launcher that ``htsr finetune --nproc-per-node`` uses too), and rank 0 writes the report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from htsr_cli.engine import distributed
from htsr_cli.engine.analysis import check_options, choose_layers, parse_metrics, resolve_device
from htsr_cli.engine.report import choose_format, parse_columns
from htsr_cli.io.checkpoint import open_checkpoint
from htsr_cli.io.output import check_writable

#: analyze's options as command-line flags (``--progress`` and booleans are handled apart).
_FLAGS = {
    "fit": "--fit",
    "metrics": "--metrics",
    "device": "--device",
    "min_evals": "--min-evals",
    "seed": "--seed",
    "key": "--key",
    "jobs": "--jobs",
    "preset": "--preset",
}
_REPEATED = {"layers": "--layers", "exclude": "--exclude", "fail_if": "--fail-if"}


def analyze_argv(
    source: str,
    *,
    fmt: str,
    output: str | None,
    progress: bool | None,
    columns: str | Sequence[str] | None,
    verbose: bool,
    **options: Any,
) -> list[str]:
    """The ``htsr analyze ...`` arguments of the workers: the same analysis, format and
    output as this command's."""
    argv = ["analyze", source, "--format", fmt]
    if output is not None:
        argv += ["--output", output]
    if progress is not None:
        argv.append("--progress" if progress else "--no-progress")
    if columns is not None:
        argv += ["--columns", columns if isinstance(columns, str) else ",".join(columns)]
    if verbose:
        argv.append("--verbose")
    for name, value in options.items():
        if value is None or name in ("keep_spectra",):
            continue
        if name in _REPEATED:
            for v in value:
                argv += [_REPEATED[name], str(v)]
        elif name == "trust_pickle":
            if value:
                argv.append("--trust-pickle")
        elif name == "metrics":
            argv += ["--metrics", value if isinstance(value, str) else ",".join(value)]
        elif name in _FLAGS:
            argv += [_FLAGS[name], str(value)]
        else:
            raise TypeError(f"analyze_argv: unknown option {name!r}")
    return argv


def launch_analysis(
    source: str | None,
    nproc: int,
    *,
    fmt: str | None = None,
    output: str | None = None,
    progress: bool | None = None,
    columns: str | Sequence[str] | None = None,
    verbose: bool = False,
    **options: Any,
) -> int:
    """Analyse ``source`` in ``nproc`` processes on this machine (``--nproc-per-node``) and
    return the exit status: 0, 1 when a ``--fail-if`` gate failed, or a rank's failure
    status. ``options`` are :func:`~htsr_cli.engine.analysis.analyze`'s.

    Raises:
        InputError: any bad input (before a process starts), including ``nproc`` larger than
            the GPUs present for a CUDA analysis.
    """
    if source is None:
        from htsr_cli.assets import default_checkpoint

        source = str(default_checkpoint())
    device = options.get("device") or "auto"
    distributed.check_nproc(nproc, device)
    check_options(
        fit=options.get("fit"),
        metrics=options.get("metrics"),
        min_evals=options.get("min_evals"),
        fail_if=options.get("fail_if") or (),
        preset=options.get("preset"),
        jobs=options.get("jobs"),
    )
    resolve_device(device)
    fmt = choose_format(fmt, output, sys.stdout.isatty())
    parse_columns(columns, parse_metrics(options.get("metrics")))
    check_writable(output, [source])
    with open_checkpoint(
        source, trust_pickle=bool(options.get("trust_pickle")), key=options.get("key")
    ) as ckpt:
        choose_layers(ckpt, options.get("layers") or (), options.get("exclude") or ())
    argv = analyze_argv(
        str(source),
        fmt=fmt,
        output=output,
        progress=progress,
        columns=columns,
        verbose=verbose,
        **options,
    )
    return distributed.torchrun(argv, nproc)


__all__ = ["analyze_argv", "launch_analysis"]
