"""``TempBalanceCallback`` for the Hugging Face ``Trainer`` (``pip install "htsr[transformers]"``).

Usage (docs/training-loop.md)::

    from htsr_cli.integrations import tempbalance_param_groups
    from htsr_cli.integrations.transformers import TempBalanceCallback

    opt = torch.optim.AdamW(tempbalance_param_groups(model, lr=5e-5), lr=5e-5)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[TempBalanceCallback(every=1, unit="epoch")])

The Trainer makes its own scheduler (``args.lr_scheduler_type``) over those groups and wraps the
optimizer with accelerate; the callback rescales each layer's group and the scheduler's
``base_lrs`` entry, so the schedule keeps the multipliers. They are saved with the optimizer and
scheduler in every checkpoint and restored by ``resume_from_checkpoint``.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # the optional dependency: one clear line instead of a traceback
    raise ImportError(
        "htsr_cli.integrations.transformers needs the transformers library, which is not "
        'installed: pip install "htsr[transformers]"'
    ) from None

from htsr_cli.integrations import ReallocationSchedule


class TempBalanceCallback(TrainerCallback):
    """Re-allocate per-layer LRs every ``every`` epochs (``unit="epoch"``, at each epoch's end)
    or optimizer steps (``unit="step"``), TempBalance's loop on the Trainer.

    ``scheme``, ``metric`` and ``allocate_options`` (``fit``, ``preset``, ``s1``, ``s2``, ...)
    go to :class:`htsr_cli.optim.Reallocator`. ``history`` lists each re-allocation
    (``step``: the epoch or global step it happened at, ``multipliers``). On distributed runs
    every process computes the same plan from the same weights.
    """

    def __init__(self, every: int = 1, unit: str = "epoch", **options: Any) -> None:
        self.schedule = ReallocationSchedule(every=every, unit=unit, **options)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.schedule.history

    def _maybe(self, count: int, kwargs: dict[str, Any]) -> None:
        if self.schedule.due(count):
            self.schedule.run(
                kwargs["model"], kwargs["optimizer"], kwargs.get("lr_scheduler"), count
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule.unit == "step":
            self._maybe(int(state.global_step), kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule.unit == "epoch":
            self._maybe(int(round(state.epoch or 0)), kwargs)


__all__ = ["TempBalanceCallback"]
