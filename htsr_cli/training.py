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

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Dataset
from .distributed import broadcast, dist_env, launch
from .errors import InputError
from .plans import LRPlan
from .run_dir import RunDir

OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("auto", "crop-flip", "crop", "none")
#: Arguments that ``--resume`` may change; every other one is fixed by the run's args.json.
RUNTIME_OPTIONS = ("epochs", "device", "compile", "amp")


@dataclass
class FinetuneConfig:
    """The arguments of one run (saved as its args.json). Defaults: TempBalance's CIFAR recipe
    (SGD momentum 0.9, weight decay 5e-4, batch 128, cosine, crop + flip)."""

    arch: str
    data: str
    epochs: int
    lr: float
    output: str
    init: str | None = None
    width: float | None = None  # None: the pruned checkpoint's width, else 1
    num_classes: int | None = None  # None: the data set's
    image_size: int | None = None  # None: the architecture's input size
    lr_plan: str | None = None
    allocate: str | None = None  # a scheme of htsr_cli.allocation.SCHEMES
    reallocate_every: int = 1
    metric: str = "alpha"
    s1: float = 0.5
    s2: float = 1.5
    fit: str = "median"  # TempBalance's xmin_mid
    track_metric: bool = True
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_epochs: int = 0
    batch_size: int = 128
    label_smoothing: float = 0.0
    seed: int = 0
    keep_masks: bool = False
    augment: str = "auto"
    label: str | None = None
    trust_pickle: bool = False
    device: str = "auto"
    compile: bool = False
    amp: bool = True

    @property
    def lr_mode(self) -> str:
        if self.allocate:
            return f"reallocate:{self.allocate}"
        return "plan" if self.lr_plan else "global"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def scheduled_lr(lr: float, epoch: int, epochs: int, warmup: int = 0) -> float:
    """The base LR of 1-based ``epoch``: ``lr * epoch / warmup`` during the warm-up, then thesis
    eq. 2.12, ``lr_t = lr/2 * (1 + cos(pi (t+1) / T))`` over the ``T = epochs - warmup``
    remaining epochs, where ``lr_t`` is set at the end of epoch ``t`` (0-based) for the next:
    the first cosine epoch trains at ``lr``, and epoch ``e`` at ``lr/2 (1 + cos(pi (e-1-warmup)
    / T))`` (PyTorch's CosineAnnealingLR, eta_min 0, stepped per epoch)."""
    if epoch <= warmup:
        return lr * epoch / warmup
    return lr / 2 * (1 + math.cos(math.pi * (epoch - 1 - warmup) / (epochs - warmup)))


# ---------------------------------------------------------------------------------------------
# Checking the arguments

def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")


def _finite(value: Any, what: str, low: float, high: float = math.inf, *,
            low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value >= high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise InputError(f"{what} must be a number in {interval}, got {value!r}")


def check_config(config: FinetuneConfig) -> None:
    """Refuse bad arguments with one line, before anything is read."""
    from .allocation import parse_scheme
    from .fit import FIT_MODES
    from .metrics import METRICS

    _positive_int(config.epochs, "--epochs")
    _positive_int(config.batch_size, "--batch-size")
    _positive_int(config.reallocate_every, "--reallocate-every")
    _finite(config.lr, "--lr", 0, low_open=True)
    _finite(config.weight_decay, "--weight-decay", 0)
    _finite(config.momentum, "--momentum", 0, 1)
    _finite(config.label_smoothing, "--label-smoothing", 0, 1)
    if isinstance(config.warmup_epochs, bool) or not isinstance(config.warmup_epochs, int) \
            or not 0 <= config.warmup_epochs < config.epochs:
        raise InputError(f"--warmup-epochs must be an integer in [0, epochs), got "
                         f"{config.warmup_epochs!r}")
    if config.width is not None:
        _finite(config.width, "--width", 0, low_open=True)
    if config.image_size is not None:
        _positive_int(config.image_size, "--image-size")
    if config.num_classes is not None:
        _positive_int(config.num_classes, "--num-classes")
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown --optimizer {config.optimizer!r}; choose sgd or adamw")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum == 0):
        raise InputError("--nesterov needs --optimizer sgd and a positive --momentum")
    if config.augment not in AUGMENTS:
        raise InputError(f"unknown --augment {config.augment!r}; choose {', '.join(AUGMENTS)}")
    if config.lr_plan and config.allocate:
        raise InputError("--lr-plan and --allocate exclude each other (a static plan, or "
                         "re-allocation)")
    if config.allocate:
        parse_scheme(config.allocate)
    if config.metric not in METRICS:
        raise InputError(f"unknown --metric {config.metric!r}; choose from {', '.join(METRICS)}")
    if config.fit not in FIT_MODES:
        raise InputError(f"unknown --fit {config.fit!r}; choose from {', '.join(FIT_MODES)}")
    if config.keep_masks and not config.init:
        raise InputError("--keep-masks keeps the zeros of an --init checkpoint; give --init")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {config.seed!r}")


def _absolute_data(spec: str) -> str:
    """The ``--data`` spec with its path made absolute, so that ``--resume`` works from any
    directory."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "cifar100") and rest:
        return f"{kind}:{Path(rest).resolve()}"
    if spec != "digits" and not sep:
        return str(Path(spec).resolve())
    return spec


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> FinetuneConfig:
    """The configuration of the run in ``run_dir`` (its args.json), with ``overrides`` of the
    :data:`RUNTIME_OPTIONS` (None values are ignored)."""
    run = RunDir(run_dir)
    doc = run.read_args()
    given = {k: v for k, v in overrides.items() if v is not None}
    fixed = sorted(set(given) - set(RUNTIME_OPTIONS))
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise InputError(f"{names} cannot change when resuming (the run keeps the arguments in "
                         f"{run.path / 'args.json'}); only --epochs, --device, --compile and "
                         "--amp may")
    doc.update(given, output=str(run.path))
    try:
        return FinetuneConfig.from_dict(doc)
    except TypeError as exc:
        raise InputError(f"{run.path / 'args.json'} is incomplete: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Building the run

@dataclass
class _Setup:
    config: FinetuneConfig
    run: RunDir
    data: Dataset
    model: nn.Module
    input_size: tuple[int, int, int]
    device: torch.device
    record: dict[str, Any] | None  # the htsr.prune record of the model's source
    state: dict[str, Any] | None  # state.pt of the run being resumed
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: Any = None  # the initial LRPlan (plan and reallocate modes)
    esd_seconds: float = 0.0  # ESD work before the first epoch (the initial allocation)


def _device(name: str, local_rank: int, world: int) -> torch.device:
    from .analysis import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    return device


def _prune_record(source: str | None) -> dict[str, Any] | None:
    if not source or not str(source).lower().endswith(".safetensors"):
        return None
    from .pruning import read_prune_record

    return read_prune_record(source)


def _load_model(config: FinetuneConfig, source: str | None, num_classes: int
                ) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model from ``source`` (None: freshly initialised): a structurally pruned checkpoint
    is rebuilt with its pruned shapes, anything else loaded strictly into the architecture."""
    from .models import build_model, load_state, resolve_arch

    if source is not None and not Path(source).exists():
        raise InputError(f"--init {source} does not exist")
    record = _prune_record(source)
    if record and record.get("mode") == "structured":
        from .pruning import load_pruned_model

        return load_pruned_model(source, config.arch, num_classes, width=config.width), record
    spec = resolve_arch(config.arch)
    width = config.width or (record or {}).get("width") or 1.0
    model = build_model(config.arch, num_classes, width=width, in_channels=spec.input_size[0])
    if source is not None:
        load_state(model, source, trust_pickle=config.trust_pickle)
    return model, record


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the weights of every layer are zero now (what --keep-masks keeps at zero)."""
    return {name: p.detach() != 0 for name, p in model.named_parameters()
            if p.ndim >= 2 and bool((p == 0).any())}


def prepare(config: FinetuneConfig, *, resume: bool = False, rank: int = 0, world: int = 1,
            local_rank: int = 0) -> _Setup:
    """Check everything and build the model: bad arguments, a missing or malformed data set, a
    checkpoint that does not fit the architecture and a plan for another model all fail here,
    with one line, before any training. (``--allocate``'s first plan is made by
    :func:`initial_allocation`, once the model is on its device.)"""
    from .models import count_macs, resolve_arch
    from .optim import param_groups
    from .plans import load_plan

    check_config(config)
    run = RunDir(config.output)
    state = None
    if resume:
        run.check_resumable()
        state = run.read_state()
        if state is not None and state["epoch"] >= config.epochs:
            raise InputError(f"{run.path} has finished {state['epoch']} epochs; pass --epochs N "
                             f"with N > {state['epoch']} to continue it")
    elif rank == 0:
        run.check_new()
    if world > 1 and config.batch_size % world:
        raise InputError(f"--batch-size {config.batch_size} (the global batch) must be "
                         f"divisible by the {world} processes")
    device = _device(config.device, local_rank, world)
    from .data import load_dataset

    data = load_dataset(config.data)
    num_classes = config.num_classes or data.num_classes
    if data.num_classes > num_classes:
        raise InputError(f"--num-classes {num_classes} is fewer than the {data.num_classes} "
                         f"classes of {data.label}")
    spec = resolve_arch(config.arch)
    c, h, w = spec.input_size
    input_size = (c, config.image_size or h, config.image_size or w)
    source = str(run.file("model.safetensors")) if state is not None else config.init
    torch.manual_seed(config.seed)  # the initial weights of a model trained from scratch
    model, record = _load_model(config, source, num_classes)
    # One forward pass (eval mode, no statistics change): an input size the architecture
    # cannot take fails here with one line, before the run directory exists.
    count_macs(model, input_size)
    if state is None and config.init:
        record = _prune_record(config.init)
    setup = _Setup(config, run, data, model, input_size, device, record, state)
    if config.keep_masks:
        setup.masks = dict(state["masks"]) if state is not None else _masks(model)
    if config.lr_plan and state is None:
        setup.plan = load_plan(config.lr_plan)
        param_groups(model, setup.plan, lr=config.lr)  # a plan for another model fails here
    return setup


def initial_allocation(setup: _Setup, rank: int, world: int) -> None:
    """``--allocate`` on a new run: the first plan, from the initial weights. Rank 0 computes
    it on the training device (the model must be there already) and every rank takes its
    plan, so DDP replicas start with identical learning rates."""
    cfg = setup.config
    if not cfg.allocate or setup.state is not None:
        return
    doc = None
    if rank == 0:
        from .allocation import allocate

        t0 = time.perf_counter()
        with torch.no_grad():
            doc = allocate(setup.model, lr=cfg.lr, scheme=cfg.allocate, metric=cfg.metric,
                           s1=cfg.s1, s2=cfg.s2, seed=cfg.seed, fit=cfg.fit,
                           device=str(setup.device)).to_dict()
        setup.esd_seconds = time.perf_counter() - t0
    setup.plan = LRPlan.from_dict(broadcast(doc, world))


def _uniform_plan(names: list[str], lr: float) -> Any:
    from .plans import LRPlan, PlanLayer

    return LRPlan(scheme="resume", metric="alpha", base_lr=lr, params={}, layers=[
        PlanLayer(name=n, metric_value=math.nan, multiplier=1.0, lr=lr, status="allocated")
        for n in names])


def _optimizer(setup: _Setup) -> torch.optim.Optimizer:
    """Parameter groups (one per planned layer plus a base group, or one global group) and the
    optimizer; on resume, the groups of the saved run with its optimizer state."""
    from .optim import param_groups

    cfg, model = setup.config, setup.model
    saved = setup.state["groups"] if setup.state is not None else None
    if saved is not None and any(name is not None for name in saved):
        plan = _uniform_plan([n for n in saved if n is not None], cfg.lr)
    else:
        plan = setup.plan
    if plan is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay, "htsr_layer": None,
                   "htsr_multiplier": 1.0}]
    else:
        groups = param_groups(model, plan, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        if [g["htsr_layer"] for g in opt.param_groups] != saved:
            raise InputError(f"{setup.run.path}: the saved optimizer groups do not fit the model")
        opt.load_state_dict(setup.state["optimizer"])
    return opt


def _stored(config: FinetuneConfig) -> FinetuneConfig:
    """The configuration as args.json keeps it: paths absolute."""
    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p

    return replace(config, data=_absolute_data(config.data), init=absolute(config.init),
                   lr_plan=absolute(config.lr_plan), output=str(Path(config.output).resolve()),
                   label=config.label or Path(config.output).resolve().name)


# ---------------------------------------------------------------------------------------------
# Entry point

def finetune(config: FinetuneConfig, *, resume: bool = False, stop_after: int | None = None,
             progress: bool | None = None,
             on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
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
    from .training_loop import train

    world, rank, local_rank = dist_env()
    config = _stored(config)
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
        doc = train(setup, world=world, rank=rank, stop_after=stop_after, progress=progress,
                    on_epoch=on_epoch)
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


def run_finetune(*, resume: str | None = None, stop_after: int | None = None,
                 nproc_per_node: int | None = None, progress: bool | None = None,
                 **options: Any) -> int:
    """``htsr finetune``: build the configuration from the command line (or the run's args.json
    with ``resume``), train here or hand over to torchrun, and print the summary on stdout
    (JSON when stdout is not a terminal). Returns the exit status."""

    from .output import dump_json

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
        _positive_int(stop_after, "--stop-after")
    if nproc_per_node is not None:
        return launch(config, nproc_per_node, resume=resume is not None, stop_after=stop_after)
    doc = finetune(config, resume=resume is not None, stop_after=stop_after, progress=progress)
    if dist_env()[1] == 0:
        if sys.stdout.isatty():
            acc = doc["test_acc"]
            sys.stdout.write(f"{doc['label']}: test accuracy {acc if acc is None else f'{acc:.4f}'}"
                             f" (best {doc['best_test_acc']:.4f}) after {doc['epochs']} epochs, "
                             f"{doc['params']} nonzero parameters; run directory "
                             f"{config.output}\n")
        else:
            dump_json(doc, sys.stdout)
    return 0


__all__ = ["AUGMENTS", "OPTIMIZERS", "RUNTIME_OPTIONS", "FinetuneConfig", "check_config",
           "finetune", "prepare", "resume_config", "run_finetune", "scheduled_lr"]
