"""``htsr prune``: parse options, call :func:`htsr_cli.prune.report.run_prune`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli import defaults
from htsr_cli.cli import options
from htsr_cli.cli.app import app

_EPILOG = (
    "Examples:\n\n"
    "  htsr prune model.safetensors --sparsity 0.5     # plan only (a table; JSON in a pipe)\n\n"
    "  htsr prune model.safetensors --sparsity 0.5 -o pruned.safetensors   # zero weights\n\n"
    "  htsr prune model.pt --structured --arch resnet18 --sparsity 0.4 -o small.safetensors\n\n"
    "  htsr prune model.pt --structured --arch densenet40 --keep-params 500000 "
    "--metric entropy --more-where smaller --mapping proportional --budget-step 0.01\n\n"
    "  htsr analyze m.safetensors --format json | htsr prune - --sparsity 0.5 --format json "
    "> plan.json\n\n"
    "  htsr prune m.safetensors --plan plan.json -o pruned.safetensors\n\n"
    "  htsr prune ./bert-dir --sparsity 0.3 -o ./bert-pruned/    # from_pretrained loads it\n\n"
    "Methods: metric (default; --metric, --more-where, --mapping, --eps), uniform, erk, lamp; "
    "formulas in docs/prune.md. Prunable parameters are the Conv/Linear weights except the "
    "classifier (and embeddings).\n\n" + options.exit_codes()
)


@app.command("prune", epilog=_EPILOG)
def prune_command(
    source: str = typer.Argument(
        ...,
        metavar="SOURCE",
        help="A checkpoint (.safetensors/.pt/HF directory, or a pruned checkpoint), or an "
        "analysis JSON from 'htsr analyze --format json' ('-' reads it from stdin) for a "
        "plan only.",
    ),
    sparsity: Optional[float] = typer.Option(  # noqa: UP045 (typer needs Optional here)
        None, "--sparsity", "-s", help="Fraction of the prunable parameters to remove, [0, 1)."
    ),
    keep_params: Optional[int] = typer.Option(  # noqa: UP045
        None, "--keep-params", help="Instead of --sparsity: prunable parameters to keep."
    ),
    method: Optional[str] = typer.Option(  # noqa: UP045
        None, "--method", help="metric (default) | uniform | erk | lamp."
    ),
    metric: str = options.metric("metric method: "),
    more_where: str = typer.Option(
        "larger",
        "--more-where",
        help="larger: prune layers with a larger metric more (AlphaPruning for alpha; the "
        "thesis's 'directly proportional'); smaller: the inverse.",
    ),
    mapping: str = typer.Option(
        "linear",
        "--mapping",
        help="linear: AlphaPruning's [1-eps, 1+eps] map; proportional: the thesis's ratio "
        "proportional to the metric (or its inverse).",
    ),
    eps: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--eps",
        help=f"Half-width of the linear mapping, [0, 1). Default {defaults.EPS}, or the "
        "--preset's.",
    ),
    block_wise: Optional[bool] = typer.Option(  # noqa: UP045
        None,
        "--block-wise/--layer-wise",
        help="metric method: one ratio per transformer block from the block's mean metric "
        "(AlphaPruning's block_wise; blocks: model.layers.N., encoder.layer.N., h.N., "
        "blocks.N.). Default layer-wise, or the --preset's.",
    ),
    block_pattern: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--block-pattern",
        help="Regular expression naming a layer's block (its first group, else the match), "
        "e.g. 'stage\\d+'; implies --block-wise.",
    ),
    budget_step: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--budget-step",
        help="The thesis's incremental rule: raise every layer's ratio by this step until it "
        "reaches its budget or the model its target (never over-prunes), e.g. 0.01.",
    ),
    max_ratio: float = typer.Option(
        defaults.MAX_RATIO,
        "--max-ratio",
        help="No layer (or coupled group) loses a larger fraction.",
    ),
    min_evals: Optional[int] = typer.Option(  # noqa: UP045
        None,
        "--min-evals",
        help="metric method: layers with fewer eigenvalues get the average budget. Default "
        f"{defaults.PLAN_MIN_EVALS}, or the --preset's.",
    ),
    structured: bool = typer.Option(
        False, "--structured", help="Remove whole channels with Torch-Pruning (needs --arch)."
    ),
    unstructured: bool = typer.Option(
        False,
        "--unstructured",
        help="Zero the smallest weights of each layer (the default; any checkpoint).",
    ),
    arch: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--arch",
        help="Architecture: a built-in (resnet18, vgg19, densenet40, wrn28-10, mobilenetv2, "
        "imagenet-resnet50, ...) or package.module:function.",
    ),
    num_classes: Optional[int] = typer.Option(  # noqa: UP045
        None, "--num-classes", help="Classes of the model (default: from the checkpoint)."
    ),
    width: Optional[float] = typer.Option(  # noqa: UP045
        None, "--width", help="Width multiplier of a CIFAR arch (default 1)."
    ),
    importance: str = typer.Option(
        "l2",
        "--importance",
        help="Channel criterion (structured): l2 | l1 | lamp | bn-scale | taylor (taylor "
        "takes gradients on the built-in digits data).",
    ),
    analysis: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--analysis",
        help="Take the metric from this analysis JSON instead of analysing SOURCE.",
    ),
    plan: Optional[str] = typer.Option(  # noqa: UP045
        None, "--plan", help="Reuse the per-layer budgets of a plan JSON (from --format json)."
    ),
    exclude: list[str] = typer.Option(
        [], "--exclude", help="Never prune layers whose name matches this glob (repeatable)."
    ),
    prune_embeddings: bool = typer.Option(
        False, "--prune-embeddings", help="Also prune embedding tables (unstructured)."
    ),
    fmt: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--format",
        "-f",
        help="The plan on stdout: table | json. Default: a table on a terminal, json in a pipe.",
    ),
    output: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--output",
        "-o",
        help="Write the pruned checkpoint here, atomically: a .safetensors file, or a directory "
        "(ends with /, or no extension) with model.safetensors and the source directory's "
        "config.json and other files, which from_pretrained loads.",
    ),
    fit: Optional[str] = options.fit(None, "On-the-fly analysis: ", "Default ww."),  # noqa: UP045
    device: Optional[str] = options.device(None, "On-the-fly analysis: "),  # noqa: UP045
    trust_pickle: bool = options.trust_pickle(),
    preset: Optional[str] = options.preset(  # noqa: UP045
        "alphapruning: AlphaPruning's LLM defaults (alpha_peak, eps 0.3, block-wise). "
    ),
    key: Optional[str] = options.key(),  # noqa: UP045
    progress: Optional[bool] = options.progress(),  # noqa: UP045
) -> None:
    """Prune a model to a global target with per-layer budgets from an HT-SR metric."""
    from htsr_cli.prune.report import run_prune

    run_prune(
        source,
        fmt=fmt,
        output=output,
        progress=progress,
        sparsity=sparsity,
        keep_params=keep_params,
        method=method,
        metric=metric,
        more_where=more_where,
        mapping=mapping,
        eps=eps,
        budget_step=budget_step,
        max_ratio=max_ratio,
        min_evals=min_evals,
        structured=structured,
        unstructured=unstructured,
        arch=arch,
        num_classes=num_classes,
        width=width,
        importance=importance,
        analysis=analysis,
        plan=plan,
        exclude=exclude,
        prune_embeddings=prune_embeddings,
        trust_pickle=trust_pickle,
        key=key,
        fit=fit,
        device=device,
        block_wise=block_wise,
        block_pattern=block_pattern,
        preset=preset,
    )
