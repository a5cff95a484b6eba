"""Applying a plan: the source behind ``prune()``, and its unstructured and structured runs."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from htsr_cli.errors import InputError, one_line
from htsr_cli.io.checkpoint import KEY_ORDER_META, Checkpoint, open_checkpoint, save_safetensors
from htsr_cli.io.documents import read_analysis
from htsr_cli.prune import budgets as B
from htsr_cli.prune.hf_dir import directory_output, is_directory_output
from htsr_cli.prune.layers import Layer, checkpoint_layers, guess_classifier
from htsr_cli.prune.plan import GroupPlan, PrunePlan
from htsr_cli.prune.record import (
    build_for,
    input_size,
    read_prune_record,
    record_metadata,
    replay_history,
    trace_size,
)
from htsr_cli.prune.structured import (
    ParamCounter,
    Trial,
    calibrate_channels,
    find_groups,
    group_budgets,
    group_channels,
    predicted_ok,
    refine,
    run_trial,
    stepped_channels,
    taylor_gradients,
)
from htsr_cli.prune.unstructured import write_pruned

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _classes(model: nn.Module) -> int:
    from htsr_cli.models import classifier_name

    return int(dict(model.named_modules())[classifier_name(model)].weight.shape[0])


@dataclass
class Context:
    """The opened source of a ``prune()`` call: a checkpoint (and its pruning record, if any)
    or an analysis document, and for structured pruning the model built from it."""

    source: Any
    document: bool
    arch: str | None
    num_classes: int | None
    width: float | None
    in_channels: int
    trust_pickle: bool
    on_progress: Callable[[int, int | None, str], None] | None
    #: Where the state dict is inside a torch file (``--key``); None finds it.
    key: str | None = None
    ckpt: Checkpoint | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    record: dict[str, Any] | None = None
    model: nn.Module | None = None

    def open(self) -> None:
        if self.document:
            self.doc, label = read_analysis(self.source)
            self.label = label or "analysis"
            return
        self.ckpt = open_checkpoint(self.source, trust_pickle=self.trust_pickle, key=self.key)
        self.ckpt.start_hashing()
        self.record = read_prune_record(self.ckpt)
        self.label = str(self.ckpt.path or "checkpoint")

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def input_files(self) -> list[str]:
        if self.ckpt is None:
            return []
        return sorted({r.file for r in self.ckpt.tensors() if r.file})

    @property
    def structured_source(self) -> bool:
        return self.record is not None and self.record["mode"] == "structured"

    def mode_needs_arch(self, structured: bool) -> bool:
        return structured and self.arch is None and not self.structured_source

    # -- the model (structured) -----------------------------------------------------------

    @property
    def input_size(self) -> tuple[int, ...]:
        return input_size(self.arch_name, self.in_channels)

    @property
    def trace_size(self) -> tuple[int, ...]:
        return trace_size(self.arch_name, self.in_channels)

    @property
    def arch_name(self) -> str:
        if self.structured_source:
            assert self.record is not None
            return str(self.record["arch"])
        assert self.arch is not None
        return self.arch

    def base_model(self) -> nn.Module:
        """The model to prune: the checkpoint in its architecture (a structurally pruned one
        rebuilt from its record), or a seeded random model for a plan from an analysis."""
        from htsr_cli.models import build_model, load_state
        from htsr_cli.prune.record import load_pruned_model

        if self.model is not None:
            return self.model
        if self.structured_source:
            assert self.ckpt is not None and self.record is not None
            self.model = load_pruned_model(
                self.ckpt.path, self.arch, self.num_classes, width=self.width
            )
            self.num_classes = self.record.get("num_classes")
            self.width = float(self.record.get("width") or 1.0)
            self.in_channels = int(self.record.get("in_channels") or 3)
        elif self.document:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # weights only pick channels: the plan's counts stay
                self.model = build_model(
                    self.arch,
                    self.num_classes,
                    width=self.width or 1.0,
                    in_channels=self.in_channels,
                )
            self.num_classes = _classes(self.model)
        else:
            assert self.ckpt is not None and self.arch is not None
            self.model = build_for(
                self.arch,
                self.ckpt,
                self.num_classes,
                width=self.width or 1.0,
                in_channels=self.in_channels,
            )
            self.num_classes = _classes(self.model)
            load_state(self.model, self.ckpt)
        self.model.eval()
        return self.model

    # -- layers -----------------------------------------------------------------------------

    def layers(self, structured: bool) -> list[Layer]:
        from htsr_cli.prune.layers import analysis_layers

        if structured:
            return [
                Layer(n, tuple(m.weight.shape))
                for n, m in self.base_model().named_modules()
                if isinstance(m, _CONV_LINEAR)
            ]
        if self.document:
            return analysis_layers(self.doc)
        from htsr_cli.engine.analysis import layer_refs

        assert self.ckpt is not None
        return checkpoint_layers(layer_refs(self.ckpt))

    def classifier(self, structured: bool, layers: Sequence[Layer]) -> str | None:
        from htsr_cli.models import build_model, classifier_name

        if structured:
            return classifier_name(self.base_model())
        arch = self.arch or (self.record or {}).get("arch")
        if arch:
            model = (
                build_for(
                    arch,
                    self.ckpt,
                    self.num_classes,
                    width=self.width or 1.0,
                    in_channels=self.in_channels,
                )
                if self.ckpt is not None
                else build_model(
                    arch, self.num_classes, width=self.width or 1.0, in_channels=self.in_channels
                )
            )
            self.num_classes = _classes(model)
            head = classifier_name(model)
            if head is not None and head not in {x.name for x in layers}:
                raise InputError(
                    f"--arch {arch}: its classifier {head!r} is not a layer of "
                    f"{self.label or self.source}; is --arch the right "
                    "architecture?"
                )
            return head
        return guess_classifier(layers, oriented=not self.document)

    def weight_loader(self, structured: bool) -> Callable[[str], torch.Tensor] | None:
        if structured:
            modules = dict(self.base_model().named_modules())
            return lambda name: modules[name].weight.detach()
        if self.ckpt is not None:
            ckpt = self.ckpt
            return lambda name: ckpt.load(name + ".weight")
        return None

    def checkpoint_source(self) -> Checkpoint:
        assert self.ckpt is not None
        return self.ckpt

    def source_record(self) -> dict[str, Any]:
        if self.document:
            rec = dict(self.doc.get("source") or {})
            rec["analysis"] = self.label
            return rec
        assert self.ckpt is not None
        return {"path": self.ckpt.path, "format": self.ckpt.format, "files": self.ckpt.files()}

    def progress(self, done: int, total: int | None, what: str) -> None:
        if self.on_progress:
            self.on_progress(done, total, what)


def _record(result: PrunePlan, **rebuild: Any) -> dict[str, Any]:
    """The pruning record stored in the checkpoint: how to rebuild it, and what was done."""
    return {
        **rebuild,
        "method": result.method,
        "metric": result.metric,
        "sparsity_target": result.target["sparsity"],
        "achieved": result.achieved,
        "source": result.source.get("path"),
    }


def run_unstructured(
    ctx: Context,
    result: PrunePlan,
    prunable: Sequence[Layer],
    *,
    budget_step: float | None,
    max_ratio: float,
    output: str | None,
) -> None:
    """Whole numbers of weights per layer (exact total, or the thesis's steps), then the
    checkpoint with those weights zeroed."""
    numel = np.array([x.numel for x in prunable], dtype=np.int64)
    ratios = np.array([lp.budget for lp in result.layers])
    removed = int(result.target["removed"])
    if budget_step is not None:
        steps = B.step_budgets(ratios, max_ratio)
        counts, level = B.stepped_counts(steps, numel, removed, budget_step)
        for lp, k in zip(result.layers, steps, strict=True):
            lp.budget = float(k)
        result.achieved["level"] = level
    else:
        counts = B.integer_counts(ratios, numel, removed)
    for lp, c in zip(result.layers, counts, strict=True):
        lp.params_after = lp.params_before - int(c)
    after = sum(lp.params_after for lp in result.layers)
    total = int(numel.sum())
    result.achieved.update(
        params_before=total,
        params_after=after,
        sparsity=1 - after / total if total else 0.0,
        removed=total - after,
        macs_before=None,
        macs_after=None,
    )
    if after > result.target["params_after"]:
        result.notes.append(
            f"the per-layer budgets stop short of the target: removed "
            f"{total - after} of {removed} parameters (never over-pruned)"
        )
    if output is None:
        return
    assert ctx.ckpt is not None
    prior = ctx.record or {}
    arch = ctx.arch or prior.get("arch")
    if ctx.structured_source:  # the shapes still need the structured history to rebuild
        rebuild = {
            k: prior[k]
            for k in (
                "mode",
                "arch",
                "num_classes",
                "width",
                "in_channels",
                "input_size",
                "trace_size",
                "history",
                "shapes",
            )
            if k in prior
        }
    else:
        rebuild = {
            "mode": "unstructured",
            "arch": arch,
            "num_classes": ctx.num_classes or prior.get("num_classes"),
            "width": ctx.width or prior.get("width"),
        }
    record = _record(result, **rebuild)
    if prior:
        record["previous"] = {k: v for k, v in prior.items() if k not in ("history", "shapes")}
    base = {k: v for k, v in ctx.ckpt.metadata().items() if k not in ("format", KEY_ORDER_META)}
    if ctx.ckpt.model_order:  # the file keeps the model's order: say so, as htsr's writers do
        base[KEY_ORDER_META] = json.dumps([r.key for r in ctx.ckpt.tensors()])
    counts = {lp.name: lp.params_before - lp.params_after for lp in result.layers}

    def on_tensor(done: int, total: int | None, name: str) -> None:
        ctx.progress(done, total, f"write {name}")

    metadata = record_metadata(record, base)
    if is_directory_output(output):
        # A model directory: the weights plus config.json and the other files beside them.
        src = ctx.ckpt.path if ctx.ckpt.path and os.path.isdir(ctx.ckpt.path) else None
        with directory_output(output, src) as weights:
            write_pruned(ctx.ckpt, weights, counts, metadata, on_tensor=on_tensor)
    else:
        write_pruned(ctx.ckpt, output, counts, metadata, on_tensor=on_tensor)


def _verify_reload(ctx: Context, model: nn.Module, history: list[Any]) -> None:
    """Rebuild the pruned model as a reader will (fresh arch, replayed history) and check that
    every tensor has the pruned shape, before anything is written."""
    from htsr_cli.models import build_model

    fresh = build_model(
        ctx.arch_name, ctx.num_classes, width=ctx.width or 1.0, in_channels=ctx.in_channels
    )
    replay_history(fresh, history, ctx.trace_size)
    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        # A bug, not bad input: the CLI reports it as an internal error (exit 3).
        raise RuntimeError(
            f"the pruning history does not rebuild the pruned shapes ({one_line(exc, 160)})"
        ) from None


def run_structured(
    ctx: Context,
    result: PrunePlan,
    prunable: Sequence[Layer],
    classifier: str | None,
    exclude: Sequence[str],
    *,
    importance: str,
    data: Any,
    budget_step: float | None,
    max_ratio: float,
    output: str | None,
) -> None:
    """Channel pruning: one ratio per coupled group, calibrated by real trials."""
    model = ctx.base_model()
    traced = ctx.trace_size
    convs = [n for n, m in model.named_modules() if isinstance(m, _CONV_LINEAR)]
    ignored = [
        n for n in convs if n == classifier or any(fnmatch.fnmatchcase(n, g) for g in exclude)
    ]
    groups = find_groups(model, traced, ignored)
    gbudget = _group_budgets(result, groups, prunable, importance, budget_step, max_ratio)
    grads = taylor_gradients(model, traced, data) if importance == "taylor" else None
    names = [x.name for x in prunable]

    def run(ratios: dict[str, float]) -> Trial:
        return run_trial(
            model,
            ratios,
            importance=importance,
            input_size=traced,
            ignored=ignored,
            layers=names,
            grads=grads,
        )

    trial, trials = _search(ctx, result, model, groups, names, gbudget, run, budget_step, max_ratio)
    assert trial.model is not None
    _record_layers(result, model, trial, groups, gbudget, importance)
    _record_achieved(ctx, result, model, trial, trials, budget_step)
    result.params.update(
        importance=importance,
        arch=ctx.arch_name,
        width=ctx.width or 1.0,
        num_classes=ctx.num_classes,
    )
    result.model = trial.model
    if output is not None:
        _save_structured(ctx, result, trial, importance, output)


def _group_budgets(
    result: PrunePlan,
    groups: Sequence[Any],
    prunable: Sequence[Layer],
    importance: str,
    budget_step: float | None,
    max_ratio: float,
) -> dict[str, float]:
    """Each coupled group's budget from its layers' budgets (stepped with ``budget_step``)."""
    numel = {x.name: x.numel for x in prunable}
    gbudget = group_budgets(groups, {lp.name: lp.budget for lp in result.layers}, numel)
    if importance == "bn-scale":  # Torch-Pruning cannot score a group without a BatchNorm
        unscored = [g.root for g in groups if not g.has_norm]
        for root in unscored:
            gbudget[root] = 0.0
        if unscored:
            result.notes.append(
                f"{len(unscored)} group(s) without a BatchNorm are not pruned "
                f"by bn-scale ({', '.join(unscored[:3])})"
            )
    if budget_step is not None:
        steps = B.step_budgets(np.array(list(gbudget.values())), max_ratio)
        gbudget = dict(zip(gbudget, (float(v) for v in steps), strict=True))
    return gbudget


def _search(
    ctx: Context,
    result: PrunePlan,
    model: nn.Module,
    groups: Sequence[Any],
    names: list[str],
    gbudget: dict[str, float],
    run: Callable[[dict[str, float]], Trial],
    budget_step: float | None,
    max_ratio: float,
) -> tuple[Trial, int]:
    """The pruned model nearest the target, and the number of trials it took: by parameter
    arithmetic where it agrees with Torch-Pruning on this model, else by trials."""
    total, removed = int(result.target["params_before"]), int(result.target["removed"])
    if removed == 0:
        return Trial(copy.deepcopy(model), [], {}, total), 0

    def on_trial(n: int) -> None:
        ctx.progress(n, None, f"structured trial {n}")

    def search(counting: ParamCounter | None) -> Any:
        if budget_step is not None:
            return stepped_channels(
                groups, run, gbudget, budget_step, total - removed, counting, on_trial
            )
        return calibrate_channels(
            groups, run, gbudget, max_ratio, total, total - removed, counting, on_trial
        )

    counter = ParamCounter(model, groups, names)
    found = search(counter if counter.supported else None)
    if counter.supported and budget_step is None and not found.close_enough():
        assert found.best is not None
        found.best.ratios = refine(counter, found.best.ratios, total - removed, max_ratio)
        found.best.params_after = counter.count(found.best.ratios)
    trial, trials = found.result(), found.trials
    if trial.counted is not None and trial.counted != trial.params_after:
        # The arithmetic disagrees with Torch-Pruning on this model: search by trials.
        found = search(None)
        trial = found.result()
        trials += found.trials
    return trial, trials


def _record_layers(
    result: PrunePlan,
    model: nn.Module,
    trial: Trial,
    groups: Sequence[Any],
    gbudget: dict[str, float],
    importance: str,
) -> None:
    """Each planned layer's and group's size after pruning, into the plan."""
    pruned = dict(trial.model.named_modules())
    before = dict(model.named_modules())
    owner = {m: g.root for g in groups for m in g.members}
    for lp in result.layers:
        w = pruned[lp.name].weight
        lp.params_after = int(w.numel())
        lp.channels_before = int(before[lp.name].weight.shape[0])
        lp.channels_after = int(w.shape[0])
        lp.group = owner.get(lp.name)
        if lp.group is None and not lp.note:
            lp.note = "in no prunable group: only its inputs shrink"
    after_ch = group_channels(trial.model, groups)
    result.groups = [
        GroupPlan(
            g.root,
            g.members,
            budget=gbudget[g.root],
            channel_ratio=1 - after_ch[g.root] / g.channels,
            channels_before=g.channels,
            channels_after=after_ch[g.root],
        )
        for g in groups
    ]
    off = predicted_ok(groups, trial.ratios, after_ch)
    if off:
        result.notes.append(
            f"{len(off)} group(s) kept other channel counts than asked (the "
            f"criterion {importance} cannot score them): {', '.join(off[:3])}"
        )


def _record_achieved(
    ctx: Context,
    result: PrunePlan,
    model: nn.Module,
    trial: Trial,
    trials: int,
    budget_step: float | None,
) -> None:
    """What the pruning achieved (parameters, MACs, trials) into the plan."""
    from htsr_cli.models import count_macs, count_params

    total, removed = int(result.target["params_before"]), int(result.target["removed"])
    after = sum(lp.params_after for lp in result.layers)
    result.achieved.update(
        params_before=total,
        params_after=after,
        sparsity=1 - after / total if total else 0.0,
        removed=total - after,
        macs_before=count_macs(model, ctx.input_size),
        macs_after=count_macs(trial.model, ctx.input_size),
        total_params_before=count_params(model),
        total_params_after=count_params(trial.model),
        trials=trials,
        level=trial.level,
    )
    if budget_step is not None and after > total - removed:
        result.notes.append(
            f"the per-group budgets stop short of the target: removed "
            f"{total - after} of {removed} parameters (never over-pruned)"
        )


def _save_structured(
    ctx: Context, result: PrunePlan, trial: Trial, importance: str, output: str
) -> None:
    """Write the pruned model with its pruning record, after checking that it reloads."""
    history = list((ctx.record or {}).get("history") or []) + trial.history
    _verify_reload(ctx, trial.model, history)
    state = trial.model.state_dict()
    record = _record(
        result,
        mode="structured",
        arch=ctx.arch_name,
        num_classes=ctx.num_classes,
        width=ctx.width or 1.0,
        in_channels=ctx.in_channels,
        input_size=list(ctx.input_size),
        trace_size=list(ctx.trace_size),
        history=history,
        shapes={k: list(v.shape) for k, v in state.items()},
        importance=importance,
    )
    if ctx.record:
        record["previous"] = {k: v for k, v in ctx.record.items() if k not in ("history", "shapes")}
    save_safetensors(state, output, record_metadata(record))


__all__ = ["Context", "run_unstructured", "run_structured"]
