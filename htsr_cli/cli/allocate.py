"""``htsr allocate``: parse options, call :func:`htsr_cli.allocate.report.run_allocate`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli import defaults
from htsr_cli.cli import options
from htsr_cli.cli.app import app

_ON_THE_FLY = "Checkpoint SOURCE only: "

_EPILOG = (
    "Examples:\n\n"
    "  htsr analyze m.safetensors --format json | htsr allocate - --lr 0.1\n\n"
    "  htsr allocate report.json --lr 0.1 --scheme power:1/2 --format csv -o plan.csv\n\n"
    "  htsr allocate m.safetensors --lr 0.05 --fit median     # analyse on the fly\n\n"
    "  htsr allocate report.json --lr 0.1 --wd 5e-4           # + AlphaDecay weight decay\n\n"
    "  htsr allocate report.json --lr 0.1 --scheme sample-normal --seed 7 --all-layers\n\n"
    "Schemes: tb-linear (default), rank, proportional, power:P, log2, softmax, negpow2, "
    "sample-normal, sample-rank, sample-emg; formulas in docs/allocate.md.\n\n"
    + options.exit_codes()
)


@app.command("allocate", epilog=_EPILOG)
def allocate_command(
    source: str = typer.Argument(
        ...,
        metavar="SOURCE",
        help="An analysis JSON from 'htsr analyze --format json' ('-' reads it from stdin), "
        "or a checkpoint (.safetensors/.pt/HF directory), analysed on the fly.",
    ),
    lr: float = typer.Option(..., "--lr", help="Base learning rate (> 0)."),
    scheme: str = typer.Option(
        "tb-linear",
        "--scheme",
        help="tb-linear | rank | proportional | power:P (e.g. power:2, power:1/2) | log2 | "
        "softmax | negpow2 | sample-normal | sample-rank | sample-emg.",
    ),
    metric: str = options.metric(),
    s1: float = typer.Option(defaults.S1, "--s1", help="Smallest multiplier (tb-linear, rank)."),
    s2: float = typer.Option(defaults.S2, "--s2", help="Largest multiplier (tb-linear, rank)."),
    seed: int = typer.Option(defaults.SEED, "--seed", help="Seed of the sample-* schemes."),
    invert: bool = typer.Option(
        False, "--invert", help="Larger metric gets a smaller LR (default: a larger one)."
    ),
    min_evals: int = typer.Option(
        defaults.PLAN_MIN_EVALS,
        "--min-evals",
        help="Layers with fewer eigenvalues keep the base LR.",
    ),
    all_layers: bool = typer.Option(
        False,
        "--all-layers",
        help="Also allocate the first and last layer (kept at the base LR by default).",
    ),
    wd: Optional[float] = typer.Option(  # noqa: UP045 (typer needs Optional here)
        None, "--wd", help="Base weight decay: adds AlphaDecay weight-decay multipliers."
    ),
    wd_scheme: Optional[str] = typer.Option(  # noqa: UP045
        None, "--wd-scheme", help="Weight-decay map: tb-linear (the default with --wd)."
    ),
    wd_min_ratio: float = typer.Option(
        defaults.WD_MIN_RATIO, "--wd-min-ratio", help="Smallest weight-decay multiplier."
    ),
    wd_max_ratio: float = typer.Option(
        defaults.WD_MAX_RATIO, "--wd-max-ratio", help="Largest weight-decay multiplier."
    ),
    fmt: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--format",
        "-f",
        help="table | json | csv. Default: from the -o extension, else a table on a terminal "
        "and json in a pipe.",
    ),
    output: Optional[str] = options.output(),  # noqa: UP045
    fit: Optional[str] = options.fit(  # noqa: UP045
        None, _ON_THE_FLY, "Default median (TempBalance's; as finetune), or the --preset's."
    ),
    device: Optional[str] = options.device(None, _ON_THE_FLY),  # noqa: UP045
    layers: list[str] = options.layers(_ON_THE_FLY),
    exclude: list[str] = options.exclude(
        _ON_THE_FLY + "leave out layers whose name matches this glob (repeatable)."
    ),
    trust_pickle: bool = options.trust_pickle(_ON_THE_FLY),
    key: Optional[str] = options.key(_ON_THE_FLY),  # noqa: UP045
    preset: Optional[str] = options.preset(  # noqa: UP045
        "tempbalance: TempBalance's analysis and allocation; an analysis SOURCE must have been "
        "made with it. "
    ),
) -> None:
    """Per-layer learning rates (and weight decay) from an HT-SR metric."""
    from htsr_cli.allocate.report import run_allocate

    run_allocate(
        source,
        fmt=fmt,
        output=output,
        lr=lr,
        scheme=scheme,
        metric=metric,
        s1=s1,
        s2=s2,
        seed=seed,
        invert=invert,
        min_evals=min_evals,
        all_layers=all_layers,
        wd=wd,
        wd_scheme=wd_scheme,
        wd_min_ratio=wd_min_ratio,
        wd_max_ratio=wd_max_ratio,
        fit=fit,
        device=device,
        layers=layers,
        exclude=exclude,
        trust_pickle=trust_pickle,
        key=key,
        preset=preset,
    )
