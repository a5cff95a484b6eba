"""``htsr finetune``: parse options, call :func:`htsr_cli.finetune.api.run_finetune`."""

from __future__ import annotations

from typing import Optional

import typer

from htsr_cli import defaults
from htsr_cli.cli import options
from htsr_cli.cli.app import app

_EPILOG = (
    "Examples:\n\n"
    "  htsr finetune --arch resnet18 --data cifar100:./data --epochs 200 --lr 0.1 "
    "--allocate tb-linear -o runs/tb\n\n"
    "  htsr finetune --arch vgg19 --init pruned.safetensors --data cifar100:./data --epochs 30 "
    "--lr 0.05 --lr-plan plan.json -o runs/vgg-plan\n\n"
    "  htsr finetune --arch resnet18 --width 0.25 --data digits --image-size 16 --epochs 5 "
    "--lr 0.05 -o runs/demo\n\n"
    "  htsr finetune --resume runs/tb --epochs 250       # continue (and extend) a run\n\n"
    "  htsr finetune --nproc-per-node 4 --arch resnet18 --data cifar100:./data --epochs 200 "
    "--lr 0.1 -o runs/ddp\n\n"
    "--data: digits | cifar10:DIR | cifar100:DIR | FILE.safetensors/.pt/.npz (train_x, train_y, "
    "test_x, test_y). The run directory gets args.json, history.jsonl, model.safetensors, "
    "state.pt and, when done, final.json; docs/finetune.md.\n\n"
    + options.exit_codes(
        usage="usage or input error (one line, before training)",
        interrupted="interrupted (the finished epochs are saved: continue with --resume)",
    )
)

# typer needs Optional (not X | None) for options; None means "not given", so that --resume can
# tell which arguments the command line changes.
# ruff: noqa: UP045


@app.command("finetune", epilog=_EPILOG)
def finetune_command(
    arch: Optional[str] = typer.Option(
        None, "--arch", help="A built-in model (docs/models.md) or package.module:function."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="digits | cifar10:DIR | cifar100:DIR | a tensor file."
    ),
    epochs: Optional[int] = typer.Option(
        None,
        "--epochs",
        help="Epochs in all (the cosine schedule spans them); with --resume, "
        "a larger number extends the run.",
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help="Initial base learning rate lr_0."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The run directory."),
    init: Optional[str] = typer.Option(
        None,
        "--init",
        help="Start from this checkpoint: plain, or pruned by 'htsr prune' "
        "(structured ones are rebuilt with their pruned shapes).",
    ),
    width: Optional[float] = typer.Option(
        None,
        "--width",
        help="Width multiplier of the architecture (default 1, or the pruned checkpoint's).",
    ),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", help="Classifier outputs (default: the data set's classes)."
    ),
    image_size: Optional[int] = typer.Option(
        None,
        "--image-size",
        help="Resize inputs to this square size instead of the "
        "architecture's (e.g. 16 for quick CPU runs).",
    ),
    lr_plan: Optional[str] = typer.Option(
        None, "--lr-plan", help="Static per-layer multipliers from 'htsr allocate' (JSON)."
    ),
    allocate: Optional[str] = typer.Option(
        None,
        "--allocate",
        help="Re-allocate per-layer LRs with this scheme (tb-linear, rank, "
        "power:P, ...) from the live model, as TempBalance.",
    ),
    reallocate_every: Optional[int] = typer.Option(
        None, "--reallocate-every", help="With --allocate: every K epochs (default 1)."
    ),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Metric of the re-allocation and of the history (default alpha)."
    ),
    s1: Optional[float] = typer.Option(
        None, "--s1", help=f"Smallest multiplier (default {defaults.S1:g})."
    ),
    s2: Optional[float] = typer.Option(
        None, "--s2", help=f"Largest multiplier (default {defaults.S2:g})."
    ),
    fit: Optional[str] = typer.Option(
        None,
        "--fit",
        help=f"Power-law fit of the ESD work (default {defaults.PLAN_FIT}, the one default fit "
        "of every LR plan; ww, median, peak, clip-xmax).",
    ),
    preset: Optional[str] = options.preset("--allocate's analysis: "),  # noqa: UP045
    track_metric: Optional[bool] = typer.Option(
        None,
        "--track-metric/--no-track-metric",
        help="Measure the metric of every layer each epoch for the history (default on).",
    ),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (default) | adamw."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (0.9)."),
    weight_decay: Optional[float] = typer.Option(
        None, "--weight-decay", help="Weight decay (default 5e-4; decoupled for adamw)."
    ),
    nesterov: Optional[bool] = typer.Option(
        None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD)."
    ),
    warmup_epochs: Optional[int] = typer.Option(
        None, "--warmup-epochs", help="Linear warm-up epochs before the cosine (default 0)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Global batch size (default 128), split over processes."
    ),
    label_smoothing: Optional[float] = typer.Option(
        None, "--label-smoothing", help="Label smoothing of the loss (default 0)."
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", help=f"Seed of everything (default {defaults.SEED})."
    ),
    keep_masks: Optional[bool] = typer.Option(
        None,
        "--keep-masks/--no-keep-masks",
        help="Weights that are zero in --init stay zero (unstructured pruning).",
    ),
    augment: Optional[str] = typer.Option(
        None,
        "--augment",
        help="auto (default: crop-flip, crop only for digits) | crop-flip | crop | none.",
    ),
    label: Optional[str] = typer.Option(
        None, "--label", help="Name of the run in plots (default: the directory name)."
    ),
    trust_pickle: Optional[bool] = typer.Option(
        None,
        "--trust-pickle/--no-trust-pickle",
        help="Allow an --init torch file that needs code to unpickle.",
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto (default) | cpu | cuda | cuda:N."
    ),
    compile_: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model."
    ),
    amp: Optional[bool] = typer.Option(
        None, "--amp/--no-amp", help="bf16 autocast on CUDA (default on)."
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR with its arguments (--epochs, --device, --compile "
        "and --amp may change).",
    ),
    stop_after: Optional[int] = typer.Option(
        None,
        "--stop-after",
        metavar="EPOCH",
        help="End after this epoch, leaving a resumable run (e.g. to fit a job time limit).",
    ),
    nproc_per_node: Optional[int] = typer.Option(
        None,
        "--nproc-per-node",
        metavar="N",
        help="Train with DDP on N processes via torch.distributed.run.",
    ),
    progress: Optional[bool] = options.progress(),  # noqa: UP045
) -> None:
    """Train or finetune a model with per-layer learning rates.

    The rates come from a plan (--lr-plan) or from TempBalance re-allocation every K epochs
    (--allocate)."""
    from htsr_cli.finetune.api import run_finetune

    code = run_finetune(
        resume=resume,
        stop_after=stop_after,
        nproc_per_node=nproc_per_node,
        progress=progress,
        arch=arch,
        data=data,
        epochs=epochs,
        lr=lr,
        output=output,
        init=init,
        width=width,
        num_classes=num_classes,
        image_size=image_size,
        lr_plan=lr_plan,
        allocate=allocate,
        reallocate_every=reallocate_every,
        metric=metric,
        s1=s1,
        s2=s2,
        fit=fit,
        preset=preset,
        track_metric=track_metric,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        label_smoothing=label_smoothing,
        seed=seed,
        keep_masks=keep_masks,
        augment=augment,
        label=label,
        trust_pickle=trust_pickle,
        device=device,
        compile=compile_,
        amp=amp,
    )
    if code:
        raise typer.Exit(code)
