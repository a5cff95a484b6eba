"""``finetune``: train or finetune a zoo model with per-layer learning rates (docs/finetune.md).

One loop serves a single CPU or GPU and DDP. The learning rate of a parameter group in epoch
``e`` is ``lr_e * multiplier``: ``lr_e`` follows the cosine schedule of thesis eq. 2.12 (after an
optional linear warm-up), and the multipliers come from an LR plan (static), from TempBalance
re-allocation every K epochs, or are all 1 (global LR). The whole data set sits on the device
when it fits; batches are augmented, normalised and resized there, drawing every random number
from one CPU ``torch.Generator`` whose state is saved, so a resumed run on CPU ends with exactly
the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from htsr_cli.engine.distributed import torchrun
from htsr_cli.errors import InputError
from htsr_cli.finetune.config import (
    AUGMENTS,
    OPTIMIZERS,
    RUNTIME_OPTIONS,
    FinetuneConfig,
    check_config,
    positive_int,
    resume_config,
    scheduled_lr,
    stored_config,
)
from htsr_cli.finetune.ddp import dist_env
from htsr_cli.finetune.setup import prepare

# ---------------------------------------------------------------------------------------------
# Entry point


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.arch`` on ``config.data`` for ``config.epochs`` epochs into the run
    directory ``config.output`` (or continue the run there with ``resume=True``).

    Under torchrun (``WORLD_SIZE`` > 1) it trains with DDP: gloo on CPU, NCCL on CUDA; rank 0
    computes every re-allocation and broadcasts it, and only rank 0 writes.

    Args:
        stop_after: end this call after that epoch (1-based), leaving a resumable run, as an
            interrupt would; the schedule still spans ``config.epochs``.
        progress: a live progress bar on stderr; None means when stderr is a terminal.
        on_epoch: called with each epoch's history record (rank 0).

    Returns:
        the ``final.json`` document (``htsr.run/1``); after ``stop_after``, the same summary
        of the epochs so far, without writing final.json.

    Raises:
        InputError: any bad input, before training starts.
        KeyboardInterrupt: Ctrl-C or SIGTERM; every finished epoch is saved and resumable.
    """
    from htsr_cli.finetune.loop import train

    world, rank, local_rank = dist_env()
    config = stored_config(config)
    setup = prepare(config, resume=resume, rank=rank, world=world, local_rank=local_rank)
    if rank == 0:
        setup.run.drop_final()  # a finished run being extended is unfinished again
        setup.run.write_args(config.to_dict())  # with --resume: the new --epochs, --device...
    if world > 1:
        import torch.distributed as dist

        if setup.device.type == "cuda":
            torch.cuda.set_device(setup.device)
        dist.init_process_group("nccl" if setup.device.type == "cuda" else "gloo")
    try:
        doc = train(
            setup,
            world=world,
            rank=rank,
            stop_after=stop_after,
            progress=progress,
            on_epoch=on_epoch,
        )
        if world > 1:
            # Every rank done before any tears gloo down: a rank that exits while a peer is
            # still in a collective can abort in gloo's threads ("terminate called without an
            # active exception", seen once in CI-like runs). Not on error paths: a dead peer
            # would never arrive.
            import torch.distributed as dist

            dist.barrier()
        return doc
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def launch(
    config: FinetuneConfig, nproc: int, *, resume: bool = False, stop_after: int | None = None
) -> int:
    """``--nproc-per-node N``: check everything here (one-line errors before any process
    starts), write the run's args.json, then run ``htsr finetune --resume RUN_DIR`` in N
    processes through ``torch.distributed.run --standalone``
    (:func:`htsr_cli.engine.distributed.torchrun`). Returns its exit status."""
    positive_int(nproc, "--nproc-per-node")
    if "TORCHELASTIC_RUN_ID" in os.environ or dist_env()[0] > 1:
        raise InputError("--nproc-per-node: already running under torchrun")
    if not resume:
        config = stored_config(config)
    setup = prepare(config, resume=resume, world=nproc)
    setup.run.write_args(config.to_dict())  # the workers read their arguments from it
    argv = ["finetune", "--resume", str(setup.run.path)]
    # The consent given here (a user --arch, --trust-pickle) goes to the workers, which resume.
    argv += ["--arch", config.arch] if ":" in config.arch else []
    argv += ["--trust-pickle"] if config.trust_pickle else []
    if stop_after is not None:
        argv += ["--stop-after", str(stop_after)]
    return torchrun(argv, nproc, threads=1)  # the one launcher, shared with htsr analyze


def run_finetune(
    *,
    resume: str | None = None,
    stop_after: int | None = None,
    nproc_per_node: int | None = None,
    progress: bool | None = None,
    **options: Any,
) -> int:
    """``htsr finetune``: build the configuration from the command line (or the run's args.json
    with ``resume``), train here or hand over to torchrun, and print the summary on stdout
    (JSON when stdout is not a terminal). Returns the exit status."""

    from htsr_cli.io.output import dump_json, open_output

    given = {k: v for k, v in options.items() if v is not None}
    if resume is not None:
        config = resume_config(resume, **given)
    else:
        missing = [k for k in ("arch", "data", "epochs", "lr", "output") if k not in given]
        if missing:
            names = ", ".join("-o RUN_DIR" if k == "output" else f"--{k}" for k in missing)
            raise InputError(f"missing {names} (or --resume RUN_DIR to continue a run)")
        config = FinetuneConfig(**given)
    if stop_after is not None:
        positive_int(stop_after, "--stop-after")
    if nproc_per_node is not None:
        return launch(config, nproc_per_node, resume=resume is not None, stop_after=stop_after)
    doc = finetune(config, resume=resume is not None, stop_after=stop_after, progress=progress)
    if dist_env()[1] == 0:
        done, total = doc["epochs"], config.epochs
        if stop_after is not None and done < total:
            sys.stderr.write(
                f"htsr: stopped after epoch {done} of {total} (--stop-after); "
                f"{plural(done, 'finished epoch')} saved in {config.output}; continue with: "
                f"htsr finetune --resume {config.output}\n"
            )
        # open_output turns a closed pipe (| head, | true) into exit 141, as every command.
        with open_output(None) as out:
            if sys.stdout.isatty():
                acc = doc["test_acc"]
                scores = (
                    "no epoch trained"
                    if acc is None
                    else f"test accuracy {acc:.4f} (best {doc['best_test_acc']:.4f})"
                )
                out.write(
                    f"{doc['label']}: {scores} after {plural(done, 'epoch')}, "
                    f"{doc['params']} nonzero parameters; run directory "
                    f"{config.output}\n"
                )
            else:
                dump_json(doc, out)
    return 0


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


__all__ = [
    "AUGMENTS",
    "OPTIMIZERS",
    "RUNTIME_OPTIONS",
    "FinetuneConfig",
    "check_config",
    "finetune",
    "launch",
    "prepare",
    "resume_config",
    "run_finetune",
    "scheduled_lr",
]
