"""Building a ``finetune`` run before its first step: the model (fresh, loaded or rebuilt
from a pruning record), the data, the device, the first LR plan and the optimizer, with every
bad input refused in one line before any training."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from htsr_cli.allocate.plan import LRPlan, PlanLayer
from htsr_cli.errors import InputError
from htsr_cli.finetune.config import FinetuneConfig, check_config
from htsr_cli.finetune.data import Dataset
from htsr_cli.finetune.ddp import broadcast
from htsr_cli.finetune.run_dir import RunDir

# ---------------------------------------------------------------------------------------------
# Building the run


@dataclass
class Setup:
    """Everything one training run needs, built by :func:`prepare`."""

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
    from htsr_cli.engine.analysis import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    return device


def _prune_record(source: str | None) -> dict[str, Any] | None:
    if not source or not str(source).lower().endswith(".safetensors"):
        return None
    from htsr_cli.prune import read_prune_record

    return read_prune_record(source)


def _load_model(
    config: FinetuneConfig, source: str | None, num_classes: int
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model from ``source`` (None: freshly initialised): a structurally pruned checkpoint
    is rebuilt with its pruned shapes, anything else loaded strictly into the architecture."""
    from htsr_cli.models import build_model, load_state, resolve_arch

    if source is not None and not Path(source).exists():
        raise InputError(f"--init {source} does not exist")
    record = _prune_record(source)
    if record and record.get("mode") == "structured":
        from htsr_cli.prune import load_pruned_model

        return load_pruned_model(source, config.arch, num_classes, width=config.width), record
    spec = resolve_arch(config.arch)
    width = config.width or (record or {}).get("width") or 1.0
    model = build_model(config.arch, num_classes, width=width, in_channels=spec.input_size[0])
    if source is not None:
        load_state(model, source, trust_pickle=config.trust_pickle)
    return model, record


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the weights of every layer are zero now (what --keep-masks keeps at zero)."""
    return {
        name: p.detach() != 0
        for name, p in model.named_parameters()
        if p.ndim >= 2 and bool((p == 0).any())
    }


def prepare(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    local_rank: int = 0,
) -> Setup:
    """Check everything and build the model: bad arguments, a missing or malformed data set, a
    checkpoint that does not fit the architecture and a plan for another model all fail here,
    with one line, before any training. (``--allocate``'s first plan is made by
    :func:`initial_allocation`, once the model is on its device.)"""
    from htsr_cli.allocate.plan import load_plan
    from htsr_cli.models import count_macs, resolve_arch
    from htsr_cli.optim import param_groups

    check_config(config)
    run = RunDir(config.output)
    state = None
    if resume:
        run.check_resumable()
        if rank == 0:
            run.remove_stale_temps()
        state = run.read_state()
        if state is not None and state["epoch"] >= config.epochs:
            raise InputError(
                f"{run.path} has finished {state['epoch']} epochs; pass --epochs N "
                f"with N > {state['epoch']} to continue it"
            )
    elif rank == 0:
        run.check_new()
    if world > 1 and config.batch_size % world:
        raise InputError(
            f"--batch-size {config.batch_size} (the global batch) must be "
            f"divisible by the {world} processes"
        )
    device = _device(config.device, local_rank, world)
    from htsr_cli.finetune.data import load_dataset

    data = load_dataset(config.data)
    num_classes = config.num_classes or data.num_classes
    if data.num_classes > num_classes:
        raise InputError(
            f"--num-classes {num_classes} is fewer than the {data.num_classes} "
            f"classes of {data.label}"
        )
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
    setup = Setup(config, run, data, model, input_size, device, record, state)
    if config.keep_masks:
        setup.masks = dict(state["masks"]) if state is not None else _masks(model)
    if config.lr_plan and state is None:
        setup.plan = load_plan(config.lr_plan)
        param_groups(model, setup.plan, lr=config.lr)  # a plan for another model fails here
    return setup


def initial_allocation(setup: Setup, rank: int, world: int) -> None:
    """``--allocate`` on a new run: the first plan, from the initial weights. Rank 0 computes
    it on the training device (the model must be there already) and every rank takes its
    plan, so DDP replicas start with identical learning rates."""
    cfg = setup.config
    if not cfg.allocate or setup.state is not None:
        return
    doc = None
    if rank == 0:
        from htsr_cli.allocate.schemes import allocate

        t0 = time.perf_counter()
        with torch.no_grad():
            doc = allocate(
                setup.model, lr=cfg.lr, device=str(setup.device), **cfg.allocate_options()
            ).to_dict()
        setup.esd_seconds = time.perf_counter() - t0
    setup.plan = LRPlan.from_dict(broadcast(doc, world))


def _uniform_plan(names: list[str], lr: float) -> Any:

    return LRPlan(
        scheme="resume",
        metric="alpha",
        base_lr=lr,
        params={},
        layers=[
            PlanLayer(name=n, metric_value=math.nan, multiplier=1.0, lr=lr, status="allocated")
            for n in names
        ],
    )


def build_optimizer(setup: Setup) -> torch.optim.Optimizer:
    """Parameter groups (one per planned layer plus a base group, or one global group) and the
    optimizer; on resume, the groups of the saved run with its optimizer state."""
    from htsr_cli.optim import param_groups

    cfg, model = setup.config, setup.model
    saved = setup.state["groups"] if setup.state is not None else None
    if saved is not None and any(name is not None for name in saved):
        plan = _uniform_plan([n for n in saved if n is not None], cfg.lr)
    else:
        plan = setup.plan
    if plan is None:
        groups = [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "htsr_layer": None,
                "htsr_multiplier": 1.0,
            }
        ]
    else:
        groups = param_groups(model, plan, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        if [g["htsr_layer"] for g in opt.param_groups] != saved:
            raise InputError(f"{setup.run.path}: the saved optimizer groups do not fit the model")
        opt.load_state_dict(setup.state["optimizer"])
    return opt
