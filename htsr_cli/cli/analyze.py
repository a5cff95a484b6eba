"""``htsr analyze``: parse options, call :func:`htsr_cli.engine.report.run_analysis`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli.cli import options
from htsr_cli.cli.app import app
from htsr_cli.defaults import ANALYZE_MIN_EVALS as DEFAULT_MIN_EVALS
from htsr_cli.defaults import SEED as DEFAULT_SEED
from htsr_cli.engine.columns import METRICS
from htsr_cli.errors import EXIT_GATE_FAILED

_EPILOG = (
    "Examples:\n\n"
    "  htsr analyze                                   # the built-in demo checkpoint\n\n"
    "  htsr analyze model.safetensors --format json -o report.json\n\n"
    "  htsr analyze ./hf-model-dir --layers 'model.layers.*' --metrics alpha,stable_rank\n\n"
    "  htsr analyze google-bert/bert-base-uncased    # from the local Hugging Face cache\n\n"
    "  htsr analyze checkpoint.pt --key ema           # the EMA copy in a training checkpoint\n\n"
    "  htsr analyze model.pt --fail-if 'alpha > 6' --fail-if 'mean(alpha) > 4.5'\n\n"
    "  htsr analyze m.safetensors --format json | htsr allocate - --lr 0.1\n\n"
    "  htsr analyze model.pt --columns alpha,stable_rank,D --verbose\n\n"
    + options.exit_codes("a --fail-if gate failed")
)


@app.command("analyze", epilog=_EPILOG)
def analyze_command(
    checkpoint: Optional[str] = typer.Argument(  # noqa: UP045 (typer needs Optional here)
        None,
        metavar="[CKPT]",
        help="A .safetensors/.pt/.pth/.bin file or a Hugging Face model directory "
        "(sharded or not). Default: the built-in digits CNN shipped with htsr.",
    ),
    fmt: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--format",
        "-f",
        help="table | json | csv | ndjson. Default: from the -o extension, else a table on a "
        "terminal and json in a pipe. ndjson streams one layer per line.",
    ),
    output: Optional[str] = options.output(),  # noqa: UP045
    fit: Optional[str] = options.fit(None, note="Default ww, or the --preset's."),  # noqa: UP045
    metrics: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--metrics",
        "-m",
        help=f"Comma-separated subset of {', '.join(METRICS)}. Default: all ten. Leaving "
        "out rand_distance halves the work.",
    ),
    device: str = options.device(),
    layers: list[str] = options.layers(),
    exclude: list[str] = options.exclude(),
    min_evals: Optional[int] = typer.Option(  # noqa: UP045
        None,
        "--min-evals",
        help=f"Skip (and list) layers with fewer pooled eigenvalues. Default {DEFAULT_MIN_EVALS}, "
        "or the --preset's.",
    ),
    seed: int = typer.Option(
        DEFAULT_SEED, "--seed", help="Seed of the shuffles behind rand_distance."
    ),
    fail_if: list[str] = typer.Option(
        [],
        "--fail-if",
        help="CI gate (repeatable): 'alpha > 6', 'mean(alpha) > 4.5', 'count(alpha < 2) > 3', "
        "\"alpha > 6 on 'encoder.*'\". Exit 1 when any holds. See docs/gates.md.",
    ),
    trust_pickle: bool = options.trust_pickle(),
    key: Optional[str] = options.key(),  # noqa: UP045
    preset: Optional[str] = options.preset(),  # noqa: UP045
    jobs: Optional[int] = typer.Option(  # noqa: UP045
        None,
        "--jobs",
        "-j",
        min=1,
        help="Layers analysed at once. Default: up to 4 on the CPU (the cores are split "
        "between them), 1 on CUDA. Results do not depend on it.",
    ),
    progress: Optional[bool] = options.progress(),  # noqa: UP045
    nproc_per_node: Optional[int] = typer.Option(  # noqa: UP045
        None,
        "--nproc-per-node",
        help="Split the layers across N processes on this machine through torchrun (one per "
        "GPU on CUDA; on the CPU they share the cores). Same report. See docs/distributed.md.",
    ),
    columns: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--columns",
        "-c",
        help="Table only: the columns after the layer name, comma-separated (shape, any "
        "metric, N, M, Q, rf, num_evals, xmin, xmax, D, sigma, num_pl_spikes, matrix_rank, "
        "status, warning) or 'all'. Default: name, shape, alpha and as many headline metrics "
        "as the terminal's width shows without cutting a cell.",
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Table only: every layer's full warning under the table (the '!' column "
        "shows short flags: U under-trained, O over-trained, S small sample, F fit problem).",
    ),
) -> None:
    """Compute the ten HT-SR metrics of every layer of a checkpoint."""
    options = dict(
        fmt=fmt,
        output=output,
        progress=progress,
        columns=columns,
        verbose=verbose,
        fit=fit,
        metrics=metrics,
        device=device,
        layers=layers,
        exclude=exclude,
        min_evals=min_evals,
        seed=seed,
        fail_if=fail_if,
        trust_pickle=trust_pickle,
        key=key,
        jobs=jobs,
        preset=preset,
    )
    if nproc_per_node is not None:
        from htsr_cli.engine.launch import launch_analysis

        raise typer.Exit(launch_analysis(checkpoint, nproc_per_node, **options))
    from htsr_cli.io import digest

    digest.prefetch(checkpoint)  # the file's sha256 runs beside the torch import that follows
    from htsr_cli.engine.report import run_analysis

    result = run_analysis(checkpoint, **options)
    if result.failed_gates:
        raise typer.Exit(EXIT_GATE_FAILED)
