"""``TempBalanceCallback`` for PyTorch Lightning (``pip install "htsr[lightning]"``).

Usage (docs/training-loop.md)::

    class Model(pl.LightningModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(tempbalance_param_groups(self, lr=0.1), lr=0.1, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": CosineAnnealingLR(opt, T_max=200)}

    trainer = pl.Trainer(callbacks=[TempBalanceCallback(every=1, unit="epoch")])

Works with the ``pytorch_lightning`` and the ``lightning`` packages (whichever is installed).
The multipliers are saved with the optimizer and scheduler states in Lightning checkpoints and
restored by ``trainer.fit(..., ckpt_path=...)``.
"""

from __future__ import annotations

from typing import Any

try:
    from pytorch_lightning import Callback
except ImportError:
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the optional dependency: one clear line instead of a traceback
        raise ImportError(
            "htsr_cli.integrations.lightning needs PyTorch Lightning, which is not installed: "
            'pip install "htsr[lightning]"'
        ) from None

from htsr_cli.integrations import ReallocationSchedule


class TempBalanceCallback(Callback):
    """Re-allocate per-layer LRs every ``every`` epochs (``unit="epoch"``, at each training
    epoch's end) or optimizer steps (``unit="step"``, after the batch that made the step).

    Acts on the first optimizer of the module and its first LR scheduler; ``scheme``,
    ``metric`` and ``allocate_options`` go to :class:`htsr_cli.optim.Reallocator`.
    """

    def __init__(self, every: int = 1, unit: str = "epoch", **options: Any) -> None:
        self.schedule = ReallocationSchedule(every=every, unit=unit, **options)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.schedule.history

    def _run(self, trainer: Any, pl_module: Any, count: int) -> None:
        if not self.schedule.due(count):
            return
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        self.schedule.run(pl_module, trainer.optimizers[0], scheduler, count)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if self.schedule.unit == "step":
            self._run(trainer, pl_module, int(trainer.global_step))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.unit == "epoch":
            self._run(trainer, pl_module, int(trainer.current_epoch) + 1)


__all__ = ["TempBalanceCallback"]
