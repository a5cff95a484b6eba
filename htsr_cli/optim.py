"""Per-layer learning rates in a live training run: optimizer parameter groups from an LR plan,
and TempBalance-style re-allocation while the model trains.

Ownership rule (which parameters share a layer's multiplier)
-------------------------------------------------------------
A *layer* is a module with a ``weight`` of 2 or more dimensions, named as
:func:`~htsr_cli.engine.analysis.analyze` names it: the state-dict key without ``.weight`` (a DDP
``module.`` prefix is dropped the same way). The layer owns its ``weight`` and ``bias``.

A norm module (BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm) is owned by
the layer whose *output* it normalises. That is read from the model's dataflow when
``torch.fx.symbolic_trace`` can trace it: the norm's input is followed back through ops that only
reshape or pass a tensor through (view, reshape, flatten, permute, transpose, squeeze,
indexing, dtype casts, Identity, Dropout) to the op that made it; if that op is a layer's call,
the layer owns the norm. Anything else in between (an activation, a residual add) means the norm
normalises something that is no single layer's output, so it has no owner. This puts the
LayerNorms of a pre-LN transformer, which normalise the residual stream, in the base group, and a
post-norm ``LayerNorm(linear(x))`` with its Linear.

When tracing fails (data-dependent control flow, unsupported Python), registration order stands
in: a norm is owned by the nearest weight layer before it in ``named_modules()`` order when that
layer is its sibling or sits under the same parent. That is right for conv-bn stacks and wrong
for pre-LN blocks that register a LayerNorm after the sub-layer it feeds; pass
``method="fx"`` to :func:`layer_owners` to insist on tracing.

Parameters with no owner (embeddings' norms, pre-LN norms, positional tables, ...) go to one base
group at the base LR.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from htsr_cli.allocate.plan import LRPlan, load_plan
from htsr_cli.allocate.schemes import allocate
from htsr_cli.errors import InputError, one_line
from htsr_cli.io.checkpoint import strip_ddp_prefix

log = logging.getLogger("htsr")

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)

# Ops that move or cast a tensor without mixing its features: a norm after them still normalises
# the producing layer's output features.
_PASS_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "to",
        "float",
        "half",
        "bfloat16",
        "type_as",
        "clone",
    }
)
_PASS_FUNCTIONS = frozenset(
    {
        torch.reshape,
        torch.flatten,
        torch.permute,
        torch.transpose,
        torch.t,
        torch.squeeze,
        torch.unsqueeze,
        torch.clone,
        operator.getitem,
        F.dropout,
    }
)
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)
# Wrappers that add a name prefix to every parameter but leave the model's dataflow alone.
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
# Group keys and scheduler lists holding learning rates that a multiplier scales
# (OneCycleLR keeps initial/max/min_lr per group; CyclicLR max_lrs; ReduceLROnPlateau min_lrs).
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_LISTS = ("base_lrs", "max_lrs", "min_lrs")


# ---------------------------------------------------------------------------------------------
# Ownership


def _layer_names(model: nn.Module) -> dict[str, str]:
    """Module path -> layer name (analyze's naming) for every module with a >=2-D weight."""
    keys = list(model.state_dict(keep_vars=True))
    analysed = dict(zip(keys, strip_ddp_prefix(keys), strict=True))
    layers = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if path and isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            key = analysed.get(f"{path}.weight", f"{path}.weight")
            layers[path] = key[: -len(".weight")]
    return layers


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The traceable model inside DDP/DataParallel/torch.compile wrappers, and its name prefix."""
    prefix = ""
    while True:
        if isinstance(model, _WRAPPERS):
            model, prefix = model.module, prefix + "module."
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _norm_owners_fx(model: nn.Module, layers: Mapping[str, str]) -> dict[str, str]:
    """Norm module path -> owning layer's module path, from the traced dataflow."""
    inner, prefix = _unwrap(model)
    graph = fx.symbolic_trace(inner).graph  # raises on dynamic control flow
    modules = dict(model.named_modules())

    def producer(node: Any) -> str | None:
        for _ in range(64):  # a chain of pass-through ops is short; this bounds odd graphs
            if not isinstance(node, fx.Node):
                return None
            if node.op == "call_module":
                path = prefix + str(node.target)
                if path in layers:
                    return path
                if not isinstance(modules.get(path), _PASS_MODULES):
                    return None
            elif node.op in ("call_function", "call_method"):
                # A traced-through custom layer shows up as F.linear(x, <get_attr ...weight>).
                for arg in node.all_input_nodes:
                    if arg.op == "get_attr":
                        owner, _, attr = (prefix + str(arg.target)).rpartition(".")
                        if attr == "weight" and owner in layers:
                            return owner
                passes = (
                    node.target in _PASS_METHODS
                    if node.op == "call_method"
                    else node.target in _PASS_FUNCTIONS
                )
                if not passes:
                    return None
            else:  # placeholder, get_attr: a model input or a raw tensor
                return None
            node = node.args[0] if node.args else None
        return None

    seen: dict[str, set[str | None]] = {}
    for node in graph.nodes:
        path = prefix + str(node.target)
        if node.op == "call_module" and isinstance(modules.get(path), NORM_TYPES):
            seen.setdefault(path, set()).add(producer(node.args[0] if node.args else None))
    # A norm module called on the outputs of different layers has no single owner.
    return {path: next(iter(p)) for path, p in seen.items() if len(p) == 1 and None not in p}


def _norm_owners_by_order(model: nn.Module, layers: Mapping[str, str]) -> dict[str, str]:
    """Norm module path -> the nearest preceding weight layer that is a sibling or under the
    same parent (the fallback for models fx cannot trace)."""
    owners, last = {}, None
    for path, module in model.named_modules():
        if path in layers:
            last = path
        elif isinstance(module, NORM_TYPES) and last is not None:
            parent = path.rpartition(".")[0]
            if not parent or last.startswith(parent + "."):
                owners[path] = last
    return owners


def layer_owners(model: nn.Module, *, method: str = "auto") -> dict[str, str]:
    """Parameter name (as ``model.named_parameters()`` gives it) -> owning layer name.

    ``method``: ``auto`` traces with torch.fx and falls back to registration order when tracing
    fails; ``fx`` raises :class:`InputError` instead of falling back; ``order`` skips tracing.
    Parameters with no owner are absent. See the module docstring for the rule.
    """
    if method not in ("auto", "fx", "order"):
        raise InputError(f"unknown ownership method {method!r}; choose auto, fx or order")
    layers = _layer_names(model)
    norms: dict[str, str]
    if method == "order":
        norms = _norm_owners_by_order(model, layers)
    else:
        try:
            norms = _norm_owners_fx(model, layers)
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
            if method == "fx":
                raise InputError(
                    f"torch.fx cannot trace {type(model).__name__}: {one_line(exc)}"
                ) from None
            log.debug(
                "fx tracing of %s failed (%s); norms follow registration order",
                type(model).__name__,
                exc,
            )
            norms = _norm_owners_by_order(model, layers)
    owners = {}
    for name, _ in model.named_parameters():
        path, _, attr = name.rpartition(".")
        if path in layers and attr in ("weight", "bias"):
            owners[name] = layers[path]
        elif path in norms:
            owners[name] = layers[norms[path]]
    return owners


# ---------------------------------------------------------------------------------------------
# Parameter groups


def _canonical(name: str) -> str:
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _match(names: Iterable[str], layers: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map plan names to model layer names: exactly, else uniquely once DDP/compile prefixes are
    dropped on both sides (a plan from a plain checkpoint applied to a compiled model).
    Returns (plan name -> layer name, unmatched plan names)."""
    layers = set(layers)
    by_canonical: dict[str, list[str]] = {}
    for layer in layers:
        by_canonical.setdefault(_canonical(layer), []).append(layer)
    matched, missing = {}, []
    for name in names:
        if name in layers:
            matched[name] = name
        elif len(candidates := by_canonical.get(_canonical(name), [])) == 1:
            matched[name] = candidates[0]
        else:
            missing.append(name)
    return matched, missing


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _positive(value: float, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > 0)
    ):
        raise InputError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def param_groups(
    model: nn.Module,
    plan: LRPlan | str | Path | Mapping[str, Any],
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups that give each plan layer ``lr * multiplier``.

    One group per plan layer present in the model, holding its weight, bias and owned norm
    parameters (see :func:`layer_owners`), with ``lr = lr * multiplier`` and the extra keys
    ``htsr_layer`` and ``htsr_multiplier``; every other trainable parameter (including layers
    the plan does not mention) goes to one base group with ``htsr_layer=None`` and multiplier 1.
    Only parameters with ``requires_grad``; each in exactly one group; no empty groups.

    Args:
        plan: an :class:`LRPlan`, a path to an ``htsr.lr-plan/1`` file, or its parsed dict.
        lr: the base learning rate; defaults to the plan's ``base_lr``.
        weight_decay: the base weight decay; defaults to the plan's ``base_wd`` or 0. When the
            plan has weight-decay multipliers (AlphaDecay) each group gets
            ``weight_decay * wd_multiplier`` and an ``htsr_wd_multiplier`` key.
        strict: raise when the plan names layers the model lacks (else they are ignored).

    Raises:
        InputError: bad plan, bad lr/weight decay, or (strict) plan layers missing in the model.
    """
    plan = load_plan(plan)
    base_lr = _positive(plan.base_lr if lr is None else lr, "lr")
    base_wd = weight_decay if weight_decay is not None else (plan.base_wd or 0.0)
    if not (isinstance(base_wd, int | float) and math.isfinite(base_wd) and base_wd >= 0):
        raise InputError(f"weight_decay must be a non-negative number, got {base_wd!r}")
    mults, wd_mults = plan.multipliers(), plan.wd_multipliers()
    matched, missing = _match(mults, _layer_names(model).values())
    if missing and strict:
        raise InputError(
            f"the plan names {len(missing)} layer(s) the model lacks: {_listing(missing)}"
        )
    by_layer = {layer: name for name, layer in matched.items()}  # model layer -> plan name

    def new_group(layer: str | None) -> dict[str, Any]:
        name = by_layer.get(layer) if layer is not None else None
        m = mults[name] if name is not None else 1.0
        group: dict[str, Any] = {
            "params": [],
            "lr": base_lr * m,
            "htsr_layer": layer,
            "htsr_multiplier": m,
        }
        if wd_mults:
            w = wd_mults.get(name, 1.0) if name is not None else 1.0
            group.update(weight_decay=base_wd * w, htsr_wd_multiplier=w)
        else:
            group["weight_decay"] = float(base_wd)
        return group

    owners = layer_owners(model)
    groups: dict[str | None, dict[str, Any]] = {}
    for name, param in model.named_parameters():  # deduplicated: tied weights appear once
        if not param.requires_grad:
            continue
        layer = owners.get(name)
        key = layer if layer in by_layer else None
        if key not in groups:
            groups[key] = new_group(key)
        groups[key]["params"].append(param)
    base = groups.pop(None, None)
    return list(groups.values()) + ([base] if base is not None else [])


# ---------------------------------------------------------------------------------------------
# Re-allocation


def _rescale(group: dict[str, Any], keys: tuple[str, ...], factor: float) -> None:
    for key in keys:
        value = group.get(key)
        if isinstance(value, torch.Tensor):  # tensor LRs (capturable/fused): keep the storage
            value.mul_(factor)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            group[key] = value * factor


def apply_multipliers(
    optimizer: torch.optim.Optimizer,
    multipliers: Mapping[str, float],
    scheduler: Any = None,
    *,
    wd_multipliers: Mapping[str, float] | None = None,
) -> None:
    """Set the multiplier of the groups named in ``multipliers`` (matched by ``htsr_layer``,
    never by position), rescaling their current LR by ``new / old``.

    The scale also reaches ``initial_lr``/``max_lr``/``min_lr`` when a scheduler stored them in
    the group, and the scheduler's ``base_lrs``/``max_lrs``/``min_lrs`` entry of that group, so
    schedulers that compute from those stay consistent. Groups not named keep their multiplier;
    names without a group are ignored. ``wd_multipliers`` does the same for ``weight_decay``
    (groups built from a plan with weight-decay multipliers).
    """
    layers = [g.get("htsr_layer") for g in optimizer.param_groups]
    present = [x for x in layers if x is not None]

    def resolve(values: Mapping[str, float], what: str) -> dict[str, float]:
        matched, _ = _match(values, present)
        return {
            layer: _positive(values[name], f"{what} of {name}") for name, layer in matched.items()
        }

    lr_new = resolve(multipliers, "multiplier")
    wd_new = resolve(wd_multipliers or {}, "wd multiplier")
    for i, (group, layer) in enumerate(zip(optimizer.param_groups, layers, strict=True)):
        if layer in lr_new:
            factor = lr_new[layer] / group["htsr_multiplier"]
            _rescale(group, _LR_KEYS, factor)
            for attr in _SCHEDULER_LISTS:
                values = getattr(scheduler, attr, None)
                if isinstance(values, list) and len(values) == len(layers):
                    values[i] *= factor
            group["htsr_multiplier"] = lr_new[layer]
        if layer in wd_new and "htsr_wd_multiplier" in group:
            _rescale(group, ("weight_decay",), wd_new[layer] / group["htsr_wd_multiplier"])
            group["htsr_wd_multiplier"] = wd_new[layer]


def _analysis_device(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    if param is None or param.device.type not in ("cpu", "cuda"):
        return "cpu"  # the engine runs on CPU or CUDA only
    return str(param.device)


class Reallocator:
    """TempBalance's loop: every ``every`` calls of :meth:`step` (epochs or steps, the caller's
    choice), re-estimate the metric on the live model, on the model's device, and rewrite the
    optimizer's group multipliers by layer name.

    ``allocate_options`` go to :func:`~htsr_cli.allocate.schemes.allocate` (``s1``, ``s2``,
    ``seed``, ``min_evals``, ``all_layers``, ``wd``/``wd_scheme``, ``preset``, analyze options
    such as ``fit`` (default ``median``, :data:`htsr_cli.defaults.PLAN_FIT`, as ``htsr allocate``
    and ``htsr finetune``) or ``device``). Groups whose layer the new plan omits return to
    multiplier 1 (base LR).

    In DDP, run it on rank 0 only and broadcast ``reallocate().multipliers()`` to the other
    ranks, which call :func:`apply_multipliers` (see docs/training-loop.md).

    Attributes:
        count: calls of :meth:`step` so far (set it to the epochs done when resuming).
        last_seconds: wall time of the last re-allocation (0 before the first).
        last_plan: the plan of the last re-allocation (None before the first).
        history: one ``{"step", "seconds", "multipliers"}`` record per re-allocation.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheme: str = "tb-linear",
        metric: str = "alpha",
        every: int = 1,
        scheduler: Any = None,
        **allocate_options: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        if not any(g.get("htsr_layer") is not None for g in optimizer.param_groups):
            raise InputError(
                "the optimizer has no per-layer group; build its groups with "
                "htsr_cli.optim.param_groups(model, plan)"
            )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scheme, self.metric, self.every = scheme, metric, every
        self.allocate_options = allocate_options
        self.count = 0
        self.last_seconds = 0.0
        self.last_plan: LRPlan | None = None
        self.history: list[dict[str, Any]] = []

    def step(self) -> bool:
        """Count one epoch/step; re-allocate on every ``every``-th call. True when it did."""
        self.count += 1
        if self.count % self.every:
            return False
        self.reallocate()
        return True

    def reallocate(self) -> LRPlan:
        """Re-allocate now; returns the plan (multipliers relative to the base LR)."""
        t0 = time.perf_counter()
        layered = [g for g in self.optimizer.param_groups if g.get("htsr_layer") is not None]
        groups = [g["htsr_layer"] for g in layered]
        # The scheduled base LR: only sample-rank uses it (it draws N(lr, 1)); it also makes
        # the plan's per-layer "lr" the LR the layer now trains with.
        base_lr = float(layered[0]["lr"]) / layered[0]["htsr_multiplier"]
        if not (math.isfinite(base_lr) and base_lr > 0):  # a schedule may reach 0
            base_lr = 1.0
        options = {"device": _analysis_device(self.model), **self.allocate_options}
        # Sampled schemes draw fresh noise at every re-allocation, reproducibly.
        options["seed"] = int(self.allocate_options.get("seed", 0)) + self.count
        with torch.no_grad():
            plan = allocate(
                self.model, lr=base_lr, scheme=self.scheme, metric=self.metric, **options
            )

        def full(values: Mapping[str, float]) -> dict[str, float]:
            # Every group gets a value: a layer the plan omits goes back to the base LR.
            matched, _ = _match(values, groups)
            new = {layer: values[name] for name, layer in matched.items()}
            return {layer: new.get(layer, 1.0) for layer in groups}

        multipliers = full(plan.multipliers())
        wd = plan.wd_multipliers()
        apply_multipliers(
            self.optimizer, multipliers, self.scheduler, wd_multipliers=full(wd) if wd else None
        )
        self.last_seconds = time.perf_counter() - t0
        self.last_plan = plan
        self.history.append(
            {"step": self.count, "seconds": self.last_seconds, "multipliers": multipliers}
        )
        log.info(
            "re-allocated %d layer LRs (%s on %s) in %.3f s",
            len(multipliers),
            self.scheme,
            options["device"],
            self.last_seconds,
        )
        return plan
