"""Training-framework integrations of TempBalance-style re-allocation (docs/training-loop.md).

``htsr_cli.integrations.transformers.TempBalanceCallback`` (``pip install "htsr[transformers]"``)
and ``htsr_cli.integrations.lightning.TempBalanceCallback`` (``pip install "htsr[lightning]"``)
drive one :class:`ReallocationSchedule` over :class:`htsr_cli.optim.Reallocator`. The optimizer
must hold per-layer groups built with :func:`htsr_cli.optim.param_groups` (or
:func:`tempbalance_param_groups`), created before the framework makes its LR scheduler.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from htsr_cli.allocate.plan import LRPlan
from htsr_cli.allocate.schemes import allocate
from htsr_cli.errors import InputError
from htsr_cli.optim import Reallocator, param_groups

#: When a callback re-allocates: every ``every`` epochs or optimizer steps.
UNITS = ("epoch", "step")


def tempbalance_param_groups(
    model: nn.Module, lr: float, *, weight_decay: float = 0.0, **allocate_options: Any
) -> list[dict[str, Any]]:
    """Per-layer optimizer groups from a plan of the live model (``allocate(model, lr=lr)``
    with ``allocate_options``: ``scheme``, ``metric``, ``fit``, ``preset``, ...), ready for
    ``torch.optim.AdamW(groups)`` and the callbacks."""
    plan = allocate(model, lr=lr, **allocate_options)
    return param_groups(model, plan, lr=lr, weight_decay=weight_decay)


def inner_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler inside wrappers (accelerate's ``AcceleratedScheduler``), whose
    ``base_lrs`` a re-allocation must rescale so that the next scheduler step keeps it."""
    for _ in range(4):
        if scheduler is None or hasattr(scheduler, "base_lrs"):
            break
        scheduler = getattr(scheduler, "scheduler", None)
    return scheduler


class ReallocationSchedule:
    """Every ``every`` epochs or steps (``unit``), re-allocate the per-layer LRs of the live
    model with :class:`~htsr_cli.optim.Reallocator` (``scheme``, ``metric`` and
    ``allocate_options`` as there: ``fit``, ``preset``, ``s1``, ``s2``, ``min_evals``, ...).

    The count comes from the framework's own state (global step, epochs done), never from a
    counter of this object, so a run resumed from a checkpoint re-allocates on the same
    schedule; the multipliers themselves travel in the optimizer's state dict (its groups'
    ``lr`` and ``htsr_multiplier``) and the scheduler's ``base_lrs``.
    """

    def __init__(
        self,
        *,
        every: int = 1,
        unit: str = "epoch",
        scheme: str = "tb-linear",
        metric: str = "alpha",
        **allocate_options: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        if unit not in UNITS:
            raise InputError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.every, self.unit = every, unit
        self.scheme, self.metric = scheme, metric
        self.allocate_options = allocate_options
        self.history: list[dict[str, Any]] = []
        self._realloc: Reallocator | None = None

    def due(self, count: int) -> bool:
        """Whether ``count`` epochs/steps done is a re-allocation point."""
        return count > 0 and count % self.every == 0

    def run(self, model: nn.Module, optimizer: Any, scheduler: Any, count: int) -> LRPlan:
        """Re-allocate now on ``optimizer`` (a torch optimizer or a wrapper exposing its
        ``param_groups``, as accelerate's), ``count`` epochs/steps into training."""
        sched = inner_scheduler(scheduler)
        if self._realloc is None or self._realloc.optimizer is not optimizer:
            self._realloc = Reallocator(
                model,
                optimizer,
                scheme=self.scheme,
                metric=self.metric,
                scheduler=sched,
                **self.allocate_options,
            )
        self._realloc.scheduler = sched
        self._realloc.count = count  # seeds sampled schemes; recorded in the history
        plan = self._realloc.reallocate()
        self.history.append(self._realloc.history[-1])
        return plan


__all__ = ["UNITS", "tempbalance_param_groups", "inner_scheduler", "ReallocationSchedule"]
