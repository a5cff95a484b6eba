"""Structured (channel) pruning with Torch-Pruning 1.6.1, calibrated to a parameter target.

Torch-Pruning removes output channels group by group: a group is every layer whose channels
must go together (convolutions summed by a residual add, a depthwise convolution and its
producer, the consumers of a concatenation). Given a ratio for one module, it silently applies
it to that module's whole group. Here each group gets one agreed ratio instead: the
parameter-weighted mean of its members' budgets, times a global multiplier found by bisection
so that the model lands on the parameter target (docs/prune.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from htsr_cli.errors import InputError, one_line
from htsr_cli.prune.record import example_input

IMPORTANCES: tuple[str, ...] = ("l2", "l1", "lamp", "bn-scale", "taylor")
#: Bisection stops once the parameter count is this close to the target (relative).
TOLERANCE = 1e-3
MAX_TRIALS = 24
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TAYLOR_BATCHES, _TAYLOR_BATCH = 4, 64


@dataclass
class Group:
    """One pruning group of the traced model: its root layer, the layers whose output
    channels it removes, and its channel count."""

    root: str
    members: list[str]
    channels: int
    #: (layer, True for its outputs / False for its inputs, entries per channel) for every
    #: Conv/Linear the group cuts: what the parameter count is computed from.
    cuts: list[tuple[str, bool, float]] = field(default_factory=list)
    has_norm: bool = False

    def pruned(self, ratio: float) -> int:
        """Channels Torch-Pruning 1.6.1 removes for ``ratio`` (it keeps ``int(C*(1-r))``)."""
        return self.channels - int(self.channels * (1 - ratio))


@dataclass
class Trial:
    """One pruning of a copy of the model (``model`` None: only counted)."""

    model: nn.Module | None
    history: list[Any]
    ratios: dict[str, float]
    params_after: int
    level: float = 0.0  # the multiplier c, or t * step, that produced the ratios
    counted: int | None = None  # the ParamCounter's count for the same ratios


def check_importance(name: str) -> None:
    if name not in IMPORTANCES:
        raise InputError(f"unknown --importance {name!r}; choose from {', '.join(IMPORTANCES)}")


def make_importance(name: str) -> Any:
    """The Torch-Pruning importance criterion behind each ``--importance`` name."""
    import torch_pruning as tp

    check_importance(name)
    return {
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "bn-scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
    }[name]()


def find_groups(model: nn.Module, input_size: Sequence[int], ignored: Sequence[str]) -> list[Group]:
    """The prunable groups of ``model``, as Torch-Pruning forms them (traced in eval mode)."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    skip = [sub for n in ignored for sub in modules[n].modules()]
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input(input_size, model), verbose=False
            )
    except Exception as exc:  # a model Torch-Pruning cannot trace: a user arch
        first = one_line(exc, 160)
        raise InputError(f"Torch-Pruning cannot trace this model: {first}") from None
    finally:
        model.train(training)
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=skip, root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]
    ):
        root = group[0].dep.target.module
        channels = int(graph.get_out_channels(root) or 0)
        members: dict[str, None] = {}
        cuts, has_norm = [], False
        for dep, idxs in group:
            target = dep.target.module
            out = graph.is_out_channel_pruning_fn(dep.handler)
            has_norm |= isinstance(target, nn.modules.batchnorm._BatchNorm)
            if isinstance(target, _PRUNABLE):
                cuts.append((names[target], out, len(idxs) / channels if channels else 0.0))
                if out:
                    members[names[target]] = None
        # Torch-Pruning leaves alone a group holding a layer with a single output channel.
        if channels and all(modules[m].weight.shape[0] > 1 for m in members):
            groups.append(Group(names[root], list(members), channels, cuts, has_norm))
    return groups


class ParamCounter:
    """The prunable parameters left after removing ``n_g`` channels from each group, computed
    from the group cuts without pruning anything: a layer keeps
    ``(out - cut outputs) * (in - cut inputs) * kernel`` (a depthwise convolution
    ``(channels - cut) * kernel``). Exact for plain and depthwise convolutions and Linear
    layers; ``supported`` is False for anything else (then every count is a real trial). The
    final trial checks the count against the pruned model."""

    def __init__(self, model: nn.Module, groups: Sequence[Group], layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        index = {n: i for i, n in enumerate(layers)}
        self.groups = list(groups)
        self.supported = True
        shape = np.zeros((len(layers), 3))  # out, in, kernel
        self.depthwise = np.zeros(len(layers), dtype=bool)
        for i, n in enumerate(layers):
            w = modules[n].weight.shape
            kind = getattr(modules[n], "groups", 1)
            self.depthwise[i] = kind > 1 and kind == w[0] and w[1] == 1
            if kind > 1 and not self.depthwise[i]:
                self.supported = False
            shape[i] = (w[0], w[1], math.prod(w[2:]) if len(w) > 2 else 1)
        self.out0, self.in0, self.kernel = shape.T
        # entries cut from each layer's outputs / inputs per channel removed from each group
        self.out_per = np.zeros((len(layers), len(groups)))
        self.in_per = np.zeros((len(layers), len(groups)))
        for gi, g in enumerate(groups):
            for name, out, per in g.cuts:
                if name in index:
                    (self.out_per if out else self.in_per)[index[name], gi] += per

    def count(self, ratios: dict[str, float]) -> int:
        return self.count_cuts([g.pruned(ratios.get(g.root, 0.0)) for g in self.groups])

    def count_cuts(self, cut: Sequence[int]) -> int:
        """The count for ``cut[g]`` channels removed from group ``g`` (in group order)."""
        c = np.asarray(cut, dtype=float)
        out = np.rint(self.out0 - self.out_per @ c)
        inp = np.rint(self.in0 - self.in_per @ c)
        # depthwise: one input per output channel, so a cut on either side removes both
        kept = np.where(
            self.depthwise, np.minimum(out, np.rint(self.out0 - self.in_per @ c)), out * inp
        )
        return int(np.rint((kept * self.kernel).sum()))


def taylor_gradients(
    model: nn.Module, input_size: Sequence[int], data: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Gradients of the cross-entropy on a few batches, for ``--importance taylor``.

    Without ``data`` (images, labels) the built-in UCI digits are used: 256 8x8 grey images
    resized (bilinear) to ``input_size`` (the trace size) and repeated over its channels;
    labels beyond the model's classes wrap around. The model runs in eval mode (BatchNorm
    statistics stay as trained).
    """
    from htsr_cli.finetune.data import load_digits

    if data is None:
        x, y = load_digits("train")
        c, h, w = (int(v) for v in input_size)
        x = nn.functional.interpolate(
            x[: _TAYLOR_BATCHES * _TAYLOR_BATCH], size=(h, w), mode="bilinear", align_corners=False
        ).repeat(1, c, 1, 1)
        y = y[: _TAYLOR_BATCHES * _TAYLOR_BATCH]
    else:
        x, y = data
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for i in range(0, len(x), _TAYLOR_BATCH):
                logits = model(x[i : i + _TAYLOR_BATCH].to(device))
                target = y[i : i + _TAYLOR_BATCH].to(device) % logits.shape[1]
                nn.functional.cross_entropy(logits, target).backward()
    finally:
        model.train(training)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def run_trial(
    base: nn.Module,
    ratios: dict[str, float],
    *,
    importance: str,
    input_size: Sequence[int],
    ignored: Sequence[str],
    layers: Sequence[str],
    grads: dict[str, torch.Tensor] | None = None,
) -> Trial:
    """Prune a copy of ``base`` with one ratio per group root; ``base`` is left as it was."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    model.eval()  # tracing in train mode would update BatchNorm statistics
    if grads:
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
    modules = dict(model.named_modules())
    pruner = tp.pruner.BasePruner(
        model,
        example_input(input_size, model),
        importance=make_importance(importance),
        pruning_ratio=0.0,
        pruning_ratio_dict={modules[root]: r for root, r in ratios.items() if r > 0},
        ignored_layers=[modules[n] for n in ignored],
    )
    with torch.enable_grad():
        pruner.step()
    model.zero_grad(set_to_none=True)
    history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
    after = sum(modules[n].weight.numel() for n in layers)
    return Trial(model, history, dict(ratios), int(after))


def group_budgets(
    groups: Sequence[Group], budgets: dict[str, float], numel: dict[str, int]
) -> dict[str, float]:
    """One agreed budget per group: the parameter-weighted mean of its members' budgets."""
    out = {}
    for g in groups:
        members = [m for m in g.members if m in budgets]
        weight = sum(numel[m] for m in members)
        out[g.root] = (sum(numel[m] * budgets[m] for m in members) / weight) if weight else 0.0
    return out


class Search:
    """Evaluations keyed by the channel counts they remove, so a bisection step that changes
    no group's count costs nothing. With a :class:`ParamCounter` an evaluation is arithmetic;
    without one it is a real trial. Keeps the best evaluation by ``better``."""

    def __init__(
        self,
        groups: Sequence[Group],
        run: Callable[[dict[str, float]], Trial],
        target_after: int,
        better: Callable[[Trial, Trial], bool],
        counter: ParamCounter | None = None,
        on_trial: Callable[[int], None] | None = None,
    ) -> None:
        self.groups, self.run, self.target = list(groups), run, target_after
        self.better, self.counter, self.on_trial = better, counter, on_trial
        self.cache: dict[tuple[int, ...], int] = {}
        self.best: Trial | None = None
        self.trials = 0

    def _trial(self, ratios: dict[str, float], level: float) -> Trial:
        trial = self.run(ratios)
        trial.level = level
        self.trials += 1
        if self.on_trial:
            self.on_trial(self.trials)
        return trial

    def params_after(self, ratios: dict[str, float], level: float) -> int:
        key = tuple(g.pruned(ratios.get(g.root, 0.0)) for g in self.groups)
        if key not in self.cache:
            if self.counter is not None:
                trial = Trial(None, [], dict(ratios), self.counter.count(ratios), level)
            else:
                trial = self._trial(ratios, level)
            self.cache[key] = trial.params_after
            if self.best is None or self.better(trial, self.best):
                self.best = trial
        return self.cache[key]

    def close_enough(self) -> bool:
        return self.best is not None and abs(
            self.best.params_after - self.target
        ) <= TOLERANCE * max(self.target, 1)

    def result(self) -> Trial:
        """The best evaluation as a real trial (pruned model and history)."""
        assert self.best is not None
        if self.best.model is None:
            counted = self.best.params_after
            self.best = self._trial(self.best.ratios, self.best.level)
            self.best.counted = counted
        return self.best


def calibrate_channels(
    groups: Sequence[Group],
    run: Callable[[dict[str, float]], Trial],
    gbudget: dict[str, float],
    max_ratio: float,
    params_before: int,
    target_after: int,
    counter: ParamCounter | None = None,
    on_trial: Callable[[int], None] | None = None,
) -> Search:
    """Bisection on the global multiplier ``c`` of ``ratio_g = min(max_ratio, c * budget_g)``
    until the prunable parameters are within :data:`TOLERANCE` of the target (or
    :data:`MAX_TRIALS` distinct trials); ``search.best`` is the trial nearest the target."""

    def ratios(c: float) -> dict[str, float]:
        return {root: min(max_ratio, c * b) for root, b in gbudget.items()}

    def closer(a: Trial, b: Trial) -> bool:
        return abs(a.params_after - target_after) < abs(b.params_after - target_after)

    search = Search(groups, run, target_after, closer, counter, on_trial)
    positive = [b for b in gbudget.values() if b > 0]
    if not positive:
        raise InputError("no prunable group has a positive budget")
    lo, hi = 0.0, max_ratio / min(positive)  # at hi every group sits at max_ratio
    most = search.params_after(ratios(hi), hi)
    if most > target_after:
        raise InputError(
            f"structured pruning can remove at most {params_before - most} of "
            f"{params_before} prunable parameters here "
            f"({1 - most / params_before:.1%}) with --max-ratio {max_ratio:g}; "
            "lower the target"
        )
    for _ in range(200):
        if search.close_enough() or search.trials >= MAX_TRIALS or len(search.cache) > 400:
            break
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if search.params_after(ratios(mid), mid) > target_after:
            lo = mid
        else:
            hi = mid
    return search


def stepped_channels(
    groups: Sequence[Group],
    run: Callable[[dict[str, float]], Trial],
    gbudget: dict[str, float],
    step: float,
    target_after: int,
    counter: ParamCounter | None = None,
    on_trial: Callable[[int], None] | None = None,
) -> Search:
    """The thesis's incremental rule on channel ratios: every group's ratio is
    ``min(t * step, budget_g)``; the largest ``t`` whose model keeps at least the target
    (it never over-prunes) is found by bisection on ``t`` (the count is monotone in ``t``).
    ``search.best`` is that trial; its ``level`` is ``t * step``."""
    top = max(gbudget.values(), default=0.0)
    steps = int(math.ceil(top / step - 1e-9)) if top > 0 else 0

    def ratios(t: int) -> dict[str, float]:
        return {root: min(t * step, b) for root, b in gbudget.items()}

    def deeper_but_allowed(a: Trial, b: Trial) -> bool:
        if a.params_after < target_after:
            return False
        return b.params_after < target_after or a.params_after < b.params_after

    search = Search(groups, run, target_after, deeper_but_allowed, counter, on_trial)
    search.params_after(ratios(0), 0.0)  # t = 0 removes nothing: always allowed
    lo, hi = 0, steps
    if search.params_after(ratios(hi), min(hi * step, top)) >= target_after:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if search.params_after(ratios(mid), mid * step) >= target_after:
            lo = mid
        else:
            hi = mid
    return search


def exact_ratio(group: Group, cut: int) -> float:
    """A ratio that makes Torch-Pruning remove exactly ``cut`` channels of ``group`` (it keeps
    ``int(C * (1 - r))``; a hair below ``cut / C`` survives the float truncation)."""
    return cut / group.channels - 1e-9 if cut > 0 else 0.0


def refine(
    counter: ParamCounter, ratios: dict[str, float], target_after: int, max_ratio: float
) -> dict[str, float]:
    """Move single channels when the multiplier alone cannot land within :data:`TOLERANCE`.

    Groups of equal budget and width cross a channel boundary at the same multiplier, so the
    count can jump over the target (uniform budgets on a ResNet). Greedily, the one-channel
    change (one more or one fewer removed, each group at most once, within ``max_ratio``) that
    brings the count nearest the target is applied, until it is within tolerance or no change
    helps. Every group stays within one channel of its multiplier's ratio."""
    groups = counter.groups
    cut = [g.pruned(ratios.get(g.root, 0.0)) for g in groups]
    limit = [min(g.pruned(max_ratio), g.channels - 1) for g in groups]
    err = counter.count_cuts(cut) - target_after
    moved: set[int] = set()
    while abs(err) > TOLERANCE * max(target_after, 1):
        best: tuple[int, int, int] | None = None
        for gi in range(len(groups)):
            if gi in moved:
                continue
            for step in (1, -1):
                n = cut[gi] + step
                if not 0 <= n <= limit[gi]:
                    continue
                trial = cut.copy()
                trial[gi] = n
                e = counter.count_cuts(trial) - target_after
                if abs(e) < abs(err) and (best is None or abs(e) < abs(best[2])):
                    best = (gi, n, e)
        if best is None:
            break
        gi, cut[gi], err = best
        moved.add(gi)
    return {g.root: exact_ratio(g, c) for g, c in zip(groups, cut, strict=True)}


def group_channels(model: nn.Module, groups: Sequence[Group]) -> dict[str, int]:
    """Output channels of each group's root after pruning."""
    modules = dict(model.named_modules())
    return {g.root: int(modules[g.root].weight.shape[0]) for g in groups}


def predicted_ok(
    groups: Sequence[Group], ratios: dict[str, float], after: dict[str, int]
) -> list[str]:
    """Groups whose channel count differs from what the ratio asked (e.g. a criterion that
    cannot score a group, such as bn-scale without a BatchNorm)."""
    return [
        g.root for g in groups if after[g.root] != g.channels - g.pruned(ratios.get(g.root, 0.0))
    ]


__all__ = [
    "IMPORTANCES",
    "TOLERANCE",
    "MAX_TRIALS",
    "Group",
    "Trial",
    "check_importance",
    "make_importance",
    "find_groups",
    "taylor_gradients",
    "run_trial",
    "group_budgets",
    "ParamCounter",
    "exact_ratio",
    "refine",
    "Search",
    "calibrate_channels",
    "stepped_channels",
    "group_channels",
    "predicted_ok",
]
