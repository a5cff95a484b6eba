"""The epoch loop of ``htsr finetune``; :func:`htsr_cli.finetune.api.finetune` builds its inputs.

Every random number of a run (the epoch's permutation, crop offsets, flips) comes from one CPU
``torch.Generator`` whose state is saved each epoch with the optimizer, so resuming on CPU
reproduces an uninterrupted run bit for bit. DDP ranks share that generator's stream: each
draws a whole global batch and takes its slice.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from htsr_cli.errors import report_interrupt
from htsr_cli.finetune.config import scheduled_lr
from htsr_cli.finetune.data import (
    augment,
    channel_stats,
    crop_flip,
    crop_padding,
    fit_to_input,
    to_unit,
)
from htsr_cli.finetune.ddp import all_sum, broadcast, replicas_equal
from htsr_cli.finetune.run_dir import PRUNE_META, RUN_META, RUN_SCHEMA
from htsr_cli.finetune.setup import Setup, build_optimizer, initial_allocation
from htsr_cli.io.terminal import ProgressBar

#: The data set stays on the GPU when it takes at most this share of the free memory.
DEVICE_DATA_SHARE = 0.25
_REFRESH_S = 0.25  # progress-bar refresh period: each refresh waits for the device


class _Batches:
    """The data set where training reads it, and the transforms of a batch: to [0, 1],
    augmentation, per-channel standardisation (train-set statistics), fit to the model input."""

    def __init__(self, setup: Setup, world: int, rank: int) -> None:
        cfg, data, dev = setup.config, setup.data, setup.device
        size = sum(t.numel() * t.element_size() for t in data[:4])
        on_device = (
            dev.type == "cuda" and size <= DEVICE_DATA_SHARE * torch.cuda.mem_get_info(dev)[0]
        )
        home = dev if on_device else torch.device("cpu")
        self.train_x, self.train_y, self.test_x, self.test_y = (t.to(home) for t in data[:4])
        mean, std = channel_stats(data.train_x)
        self.mean, self.std = mean.view(1, -1, 1, 1).to(dev), std.view(1, -1, 1, 1).to(dev)
        mode = (
            cfg.augment
            if cfg.augment != "auto"
            else ("crop" if cfg.data == "digits" else "crop-flip")
        )  # a flipped digit is another digit
        self.pad = crop_padding(data.train_x.shape[2]) if mode != "none" else 0
        self.flip = mode == "crop-flip"
        self.device, self.input_size = dev, setup.input_size
        self.world, self.rank, self.batch = world, rank, cfg.batch_size
        self.channels_last = dev.type == "cuda"
        n = self.train_x.shape[0]
        self.usable = n - n % world  # every rank takes the same number of steps

    @property
    def steps(self) -> int:
        return math.ceil(self.usable / self.batch)

    def prepare(self, x: torch.Tensor, params: Any = None) -> torch.Tensor:
        x = to_unit(x.to(self.device, non_blocking=True))
        if params is not None:
            x = augment(x, pad=self.pad, params=params)
        x = fit_to_input((x - self.mean) / self.std, self.input_size)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The epoch's random numbers are drawn up front, in the order batch after batch would
        # draw them, and copied to the device once: a small host-to-device copy per step makes
        # the host wait for the GPU at every step.
        perm = torch.randperm(self.train_x.shape[0], generator=gen)[: self.usable]
        sizes = [min(self.batch, self.usable - s) for s in range(0, self.usable, self.batch)]
        drawn = [crop_flip(k, self.pad, self.flip, gen) for k in sizes] if self.pad else []
        perm = perm.to(self.train_x.device)
        # dy, dx and flips of the whole epoch, one tensor each
        params = [torch.cat(column).to(self.device) for column in zip(*drawn, strict=True)]
        start = 0
        for k in sizes:
            share = k // self.world
            mine = slice(start + self.rank * share, start + (self.rank + 1) * share)
            local = perm[mine]
            sliced = tuple(p[mine] for p in params) if params else None
            yield self.prepare(self.train_x[local], sliced), self.train_y[local].to(self.device)
            start += k

    def test(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(self.rank, self.test_x.shape[0], self.world)
        for part in idx.split(2 * self.batch):
            local = part.to(self.test_x.device)
            yield self.prepare(self.test_x[local]), self.test_y[local].to(self.device)


class _EpochBar:
    """The run's progress (loss, accuracy, LR of the epoch) on the one progress bar, throttled
    because each refresh waits for the device, and the one line per epoch."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.bar = ProgressBar("train", enabled=enabled).__enter__()
        self.epochs, self.epoch, self.steps, self.last, self.lr = epochs, 0, 0, 0.0, 0.0

    def start(self, epoch: int, steps: int, lr: float) -> None:
        self.epoch, self.steps, self.lr = epoch, steps, lr
        self.bar.update(0, steps, f"lr {lr:.4g}", label=f"epoch {epoch}/{self.epochs}")

    def update(self, done: int, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        if not self.bar.enabled or time.monotonic() - self.last < _REFRESH_S:
            return
        self.last = time.monotonic()
        loss, acc = float(loss_sum) / count, float(correct) / count  # waits for the device
        self.bar.update(done, self.steps, f"loss {loss:.4f}  acc {acc:.1%}  lr {self.lr:.4g}")

    def line(self, text: str) -> None:
        self.bar.line(text)

    def close(self) -> None:
        self.bar.close()


def _train_epoch(
    net: nn.Module,
    batches: _Batches,
    optimizer: torch.optim.Optimizer,
    masks: list[tuple[torch.Tensor, torch.Tensor]],
    smoothing: float,
    gen: torch.Generator,
    autocast: Any,
    bar: _EpochBar,
) -> tuple[float, float, float]:
    net.train()
    dev = batches.device
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    count = 0
    for step, (x, y) in enumerate(batches.train(gen)):
        with autocast:
            out = net(x)
            loss = F.cross_entropy(out, y, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if masks:
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)  # pruned weights stay zero (--keep-masks)
        loss_sum += loss.detach().float() * len(y)
        correct += (out.argmax(1) == y).sum()
        count += len(y)
        bar.update(step + 1, loss_sum, correct, count)
    return loss_sum, correct, torch.tensor(float(count), device=dev)


@torch.no_grad()
def _evaluate(model: nn.Module, batches: _Batches, autocast: Any) -> tuple[Any, Any, Any]:
    model.eval()
    dev = batches.device
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    count = 0
    for x, y in batches.test():
        with autocast:
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    return loss_sum, correct, torch.tensor(float(count), device=dev)


def _esd_work(
    setup: Setup, realloc: Any, optimizer: torch.optim.Optimizer, world: int, rank: int
) -> dict[str, float | None]:
    """End of an epoch: step the Reallocator (rank 0; it re-allocates every
    ``--reallocate-every`` epochs) and hand its multipliers to the other ranks, or else measure
    the metric for the history (``--track-metric``, rank 0). Returns layer -> metric value."""
    from htsr_cli.optim import apply_multipliers

    cfg = setup.config
    if cfg.allocate:
        metric, multipliers = {}, None
        if rank == 0 and realloc.step():
            metric = {layer.name: layer.metric_value for layer in realloc.last_plan.layers}
            multipliers = realloc.history[-1]["multipliers"]
        multipliers = broadcast(multipliers, world)  # None: not due this epoch
        if multipliers is not None:
            if rank != 0:
                apply_multipliers(optimizer, multipliers)
            return metric
    if cfg.track_metric and rank == 0:
        from htsr_cli.engine.analysis import analyze

        result = analyze(
            setup.model,
            metrics=[cfg.metric],
            fit=cfg.fit,
            preset=cfg.preset,
            device=str(setup.device),
        )
        return {row["name"]: row.get(cfg.metric) for row in result.layers}
    return {}


def _method(record: dict[str, Any] | None) -> str:
    """How the --init checkpoint was pruned (final.json's "method"): "dense" when it was not."""
    if not record:
        return "dense"
    method = str(record.get("method") or "pruned")
    if method == "metric":
        metric, mapping = record.get("metric") or "metric", record.get("mapping")
        return f"{metric}-{mapping}" if mapping else str(metric)
    return method


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM (torchrun's way to stop workers) into KeyboardInterrupt; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


@dataclass
class _Totals:
    """What a run accumulates over its epochs (saved in state.pt)."""

    history: list[dict[str, Any]]
    method: str
    best: float = 0.0
    seconds: float = 0.0


def _restore(setup: Setup, gen: torch.Generator, cuda: bool) -> tuple[int, _Totals]:
    """The epoch to continue after and the totals so far; restores the random streams."""
    state = setup.state
    if state is None:
        return 0, _Totals([], _method(setup.record))
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if cuda and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    totals = _Totals(
        setup.run.read_history(state["epoch"]),
        state["method"],
        state["best_test_acc"],
        state["seconds"],
    )
    return state["epoch"], totals


def _save(
    setup: Setup,
    totals: _Totals,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    epoch: int,
    world: int,
) -> None:
    cfg, cuda = setup.config, setup.device.type == "cuda"
    meta = {RUN_META: json.dumps({"epoch": epoch, "arch": cfg.arch})}
    if setup.record is not None and (setup.record.get("mode") == "structured" or cfg.keep_masks):
        meta[PRUNE_META] = json.dumps(setup.record)  # the file alone rebuilds the model
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "groups": [g["htsr_layer"] for g in optimizer.param_groups],
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [],
        "best_test_acc": totals.best,
        "seconds": totals.seconds,
        "method": totals.method,
        "masks": dict(setup.masks),
        "world_size": world,
    }
    setup.run.save_epoch(totals.history, model.state_dict(), meta, state)


def _summary(
    setup: Setup, totals: _Totals, model: nn.Module, epochs: int, world: int
) -> dict[str, Any]:
    """The final.json document."""
    from htsr_cli.models import count_params

    cfg = setup.config
    last = totals.history[-1] if totals.history else {}
    doc: dict[str, Any] = {
        "schema": RUN_SCHEMA,
        "arch": cfg.arch,
        "label": cfg.label,
        "method": totals.method,
        "lr_mode": cfg.lr_mode,
        "params": count_params(model, nonzero=True),
        "params_total": count_params(model),
        "test_acc": last.get("test_acc"),
        "best_test_acc": totals.best,
        "train_acc": last.get("train_acc"),
        "test_loss": last.get("test_loss"),
        "epochs": epochs,
        "seconds": totals.seconds,
        "seed": cfg.seed,
        "data": setup.data.label,
        "num_classes": cfg.num_classes or setup.data.num_classes,
        "world_size": world,
        "args": cfg.to_dict(),
    }
    if world > 1:
        doc["replicas_equal"] = replicas_equal(model, world)
    return doc


def train(
    setup: Setup,
    *,
    world: int,
    rank: int,
    stop_after: int | None,
    progress: bool | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Run the epochs of ``setup`` (see :func:`htsr_cli.finetune.api.finetune`)."""
    cfg = setup.config
    state = _TrainingState.build(setup, world, rank)
    batches = _Batches(setup, world, rank)
    bar = _EpochBar(
        rank == 0 and (sys.stderr.isatty() if progress is None else progress), cfg.epochs
    )
    last = max(state.start, min(cfg.epochs, stop_after or cfg.epochs))
    undo = _sigterm_as_interrupt()
    try:
        for epoch in range(state.start + 1, last + 1):
            record = _run_epoch(setup, state, batches, bar, epoch, world, rank)
            if record is not None and on_epoch is not None:
                on_epoch(record)
    except KeyboardInterrupt:
        bar.close()
        report_interrupt(
            f"{len(state.totals.history)} finished epoch(s) saved in {setup.run.path}; "
            f"continue with: htsr finetune --resume {setup.run.path}",
            silent=rank != 0,
        )
        raise
    finally:
        undo()
        bar.close()
    doc = _summary(setup, state.totals, setup.model, last, world)
    if rank == 0 and last >= cfg.epochs:
        setup.run.write_final(doc)
    return doc


@dataclass
class _TrainingState:
    """What the epochs share: the optimizer, the re-allocator (rank 0), the masks kept at
    zero, the random stream, the epochs done and their records, and the network to step."""

    optimizer: torch.optim.Optimizer
    realloc: Any
    masks: list[tuple[torch.Tensor, torch.Tensor]]
    gen: torch.Generator
    start: int
    totals: _Totals
    net: nn.Module
    autocast: Any
    pending_esd: float  # the initial allocation's seconds, counted into the first epoch

    @classmethod
    def build(cls, setup: Setup, world: int, rank: int) -> _TrainingState:
        """Move the model to its device, make the first plan and the optimizer, and restore
        a resumed run's state."""
        from htsr_cli.optim import Reallocator

        cfg, model, dev = setup.config, setup.model, setup.device
        cuda = dev.type == "cuda"
        model.to(dev)
        if cuda:
            model.to(memory_format=torch.channels_last)
        initial_allocation(setup, rank, world)
        optimizer = build_optimizer(setup)
        realloc = None
        if cfg.allocate and rank == 0:
            realloc = Reallocator(
                model, optimizer, every=cfg.reallocate_every, **cfg.allocate_options()
            )
        params = dict(model.named_parameters())
        masks = [(params[n], m.to(dev)) for n, m in setup.masks.items()]
        gen = torch.Generator().manual_seed(cfg.seed)
        start, totals = _restore(setup, gen, cuda)
        if realloc is not None:
            realloc.count = start  # epochs done: a resumed run re-allocates (and seeds) on time
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if cuda else None
            )
        if cfg.compile:
            net = torch.compile(net)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()
        )
        return cls(optimizer, realloc, masks, gen, start, totals, net, autocast, setup.esd_seconds)


def _set_lrs(optimizer: torch.optim.Optimizer, base: float) -> dict[str, float]:
    """Every group's LR for the epoch (base times its multiplier); the LRs by layer."""
    lrs = {"base": base}
    for g in optimizer.param_groups:
        g["lr"] = base * g["htsr_multiplier"]
        if g["htsr_layer"] is not None:
            lrs[g["htsr_layer"]] = g["lr"]
    return lrs


def _run_epoch(
    setup: Setup,
    state: _TrainingState,
    batches: _Batches,
    bar: _EpochBar,
    epoch: int,
    world: int,
    rank: int,
) -> dict[str, Any] | None:
    """Train, evaluate, re-allocate, and (rank 0) save one epoch; its history record on
    rank 0, None on the other ranks."""
    cfg, model = setup.config, setup.model
    t0 = time.perf_counter()
    base = scheduled_lr(cfg.lr, epoch, cfg.epochs, cfg.warmup_epochs)
    lrs = _set_lrs(state.optimizer, base)
    bar.start(epoch, batches.steps, base)
    train_stats = _train_epoch(
        state.net,
        batches,
        state.optimizer,
        state.masks,
        cfg.label_smoothing,
        state.gen,
        state.autocast,
        bar,
    )
    if world > 1:  # evaluate every shard with rank 0's BatchNorm statistics
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)
    test_stats = _evaluate(model, batches, state.autocast)
    t_esd = time.perf_counter()
    metric = _esd_work(setup, state.realloc, state.optimizer, world, rank)
    esd = time.perf_counter() - t_esd + state.pending_esd
    tr_loss, tr_correct, tr_n, te_loss, te_correct, te_n = all_sum(
        [*train_stats, *test_stats], world
    )
    seconds = time.perf_counter() - t0 + state.pending_esd
    state.pending_esd = 0.0
    if rank != 0:
        return None
    record = {
        "epoch": epoch,
        "train_loss": tr_loss / tr_n,
        "train_acc": tr_correct / tr_n,
        "test_loss": te_loss / te_n,
        "test_acc": te_correct / te_n,
        "seconds": seconds,
        "lr": lrs,
        "metric_name": cfg.metric,
        "metric": metric,
        "esd_seconds": esd,
    }
    totals = state.totals
    totals.history.append(record)
    totals.best = max(totals.best, record["test_acc"])
    totals.seconds += seconds
    _save(setup, totals, model, state.optimizer, state.gen, epoch, world)
    bar.line(
        f"epoch {epoch}/{cfg.epochs}  train loss {record['train_loss']:.4f} acc "
        f"{record['train_acc']:.4f}  test loss {record['test_loss']:.4f} acc "
        f"{record['test_acc']:.4f}  lr {base:.4g}  {seconds:.1f} s (esd {esd:.2f} s)"
    )
    return record
