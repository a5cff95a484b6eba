"""The shipped callbacks against the real libraries: Hugging Face ``Trainer`` (with its own
scheduler and accelerate's wrapped optimizer) and PyTorch Lightning, on tiny random models for a
few CPU steps. Checked: the per-layer LRs reach the optimizer, change on schedule, and survive a
checkpoint save and resume."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from htsr_cli.errors import InputError
from htsr_cli.integrations import ReallocationSchedule, inner_scheduler, tempbalance_param_groups


def _layer_groups(optimizer) -> dict[str, dict]:
    return {g["htsr_layer"]: g for g in optimizer.param_groups if g.get("htsr_layer")}


def _assert_lrs_follow_multipliers(optimizer, scheduled: float) -> None:
    """Every group trains at the scheduled base LR times its multiplier."""
    for g in optimizer.param_groups:
        m = g.get("htsr_multiplier", 1.0)
        assert g["lr"] == pytest.approx(scheduled * m, rel=1e-9), g.get("htsr_layer")


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, vocab: int = 100, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,  # 64 eigenvalues per layer: above TempBalance's 50
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(cfg)


class _Probe(transformers.TrainerCallback):
    """Records each group's multiplier and LR at the start of training and after each step."""

    def __init__(self) -> None:
        self.begin: dict[str, float] | None = None
        self.steps: list[tuple[int, dict[str, float], float]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.begin = {k: g["htsr_multiplier"] for k, g in _layer_groups(kw["optimizer"]).items()}

    def on_step_end(self, args, state, control, **kw):
        opt, sched = kw["optimizer"], kw["lr_scheduler"]
        mults = {k: g["htsr_multiplier"] for k, g in _layer_groups(opt).items()}
        lrs = [g["lr"] for g in opt.param_groups]
        self.steps.append((state.global_step, mults, lrs, inner_scheduler(sched).get_last_lr()))


def _trainer(model, out, callbacks, max_steps=6, **kw):
    opt = torch.optim.AdamW(tempbalance_param_groups(model, lr=1e-2), lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="linear",
        seed=0,
        **kw,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(),
        optimizers=(opt, None),
        callbacks=callbacks,
    )


@pytest.mark.slow
def test_hf_trainer_reallocates_on_schedule_and_resumes(tmp_path):
    from htsr_cli.integrations.transformers import TempBalanceCallback

    cb, probe = TempBalanceCallback(every=2, unit="step"), _Probe()
    trainer = _trainer(_bert(), tmp_path, [cb, probe])
    trainer.train()
    # accelerate wraps the optimizer; the callback worked through the wrapper
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert [h["step"] for h in cb.history] == [2, 4, 6]
    layers = _layer_groups(trainer.optimizer)
    assert len(layers) >= 10
    mults = [g["htsr_multiplier"] for g in layers.values()]
    assert min(mults) == pytest.approx(0.5) and max(mults) == pytest.approx(1.5)
    # the LRs really reach the optimizer: each group = the Trainer's scheduled LR x multiplier
    groups = [g.get("htsr_layer") for g in trainer.optimizer.param_groups]
    assert groups[-1] is None  # the base group (multiplier 1)
    for step, m, lrs, sched_lrs in probe.steps[:-1]:  # the linear schedule ends at LR 0
        for lr, layer in zip(lrs, groups, strict=True):
            assert lr / lrs[-1] == pytest.approx(m.get(layer, 1.0), rel=1e-9), (step, layer)
        if step % 2:  # the scheduler's own step kept the multipliers set one step earlier
            for lr, layer in zip(sched_lrs, groups, strict=True):
                assert lr / sched_lrs[-1] == pytest.approx(m.get(layer, 1.0), rel=1e-9)
    assert inner_scheduler(trainer.lr_scheduler).base_lrs[-1] == pytest.approx(1e-2)
    # multipliers change only at re-allocations (steps 2, 4, 6), and do change there
    by_step = {s: m for s, m, _, _ in probe.steps}
    assert by_step[1] == probe.begin and by_step[3] == by_step[2] and by_step[5] == by_step[4]
    assert by_step[2] != probe.begin and by_step[4] != by_step[2]
    # resume from step 2: the step-2 multipliers come back with the optimizer and scheduler
    cb2, probe2 = TempBalanceCallback(every=2, unit="step"), _Probe()
    resumed = _trainer(_bert(), tmp_path / "again", [cb2, probe2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert probe2.begin == pytest.approx(by_step[2])
    assert [h["step"] for h in cb2.history] == [4, 6]
    for _, m, lrs, _ in probe2.steps[:-1]:
        assert lrs[0] / lrs[-1] == pytest.approx(next(iter(m.values())), rel=1e-9)
    assert probe2.steps[0][0] == 3 and probe2.steps[0][1] == pytest.approx(by_step[2])


def test_hf_epoch_unit_counts_epochs(tmp_path):
    from htsr_cli.integrations.transformers import TempBalanceCallback

    cb = TempBalanceCallback(every=1, unit="epoch")
    opt = torch.optim.AdamW(tempbalance_param_groups(_bert(), lr=1e-2), lr=1e-2)
    assert opt.param_groups  # groups exist before the Trainer makes its scheduler
    trainer = _trainer(_bert(), tmp_path, [cb], max_steps=-1, num_train_epochs=2)
    trainer.train()
    assert [h["step"] for h in cb.history] == [1, 2]


# ------------------------------------------------------------------------------------------
# PyTorch Lightning

pl = pytest.importorskip("pytorch_lightning")


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
            nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(tempbalance_param_groups(self, lr=0.05), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.randn(64, 16, generator=g), torch.randint(0, 2, (64,))
    )
    return torch.utils.data.DataLoader(ds, batch_size=16)


def _pl_trainer(tmp_path, callbacks, epochs):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


@pytest.mark.slow
def test_lightning_reallocates_and_resumes(tmp_path):
    from htsr_cli.integrations.lightning import TempBalanceCallback

    cb = TempBalanceCallback(every=1, unit="epoch", min_evals=16, all_layers=True)
    model = _Net()
    trainer = _pl_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(model, _loader())
    assert [h["step"] for h in cb.history] == [1, 2]
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    # StepLR halved the base LR twice; the groups keep their multipliers through it
    _assert_lrs_follow_multipliers(opt, 0.05 * 0.25)
    mults = [g["htsr_multiplier"] for g in _layer_groups(opt).values()]
    assert min(mults) == pytest.approx(0.5) and max(mults) == pytest.approx(1.5)
    assert [b / 0.05 for b in sched.base_lrs] == pytest.approx(
        [g.get("htsr_multiplier", 1.0) for g in opt.param_groups]
    )
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(str(ckpt))
    saved = {k: g["htsr_multiplier"] for k, g in _layer_groups(opt).items()}

    class Probe(pl.Callback):
        begin: dict | None = None

        def on_train_epoch_start(self, trainer, pl_module):
            if self.begin is None:
                g = _layer_groups(trainer.optimizers[0])
                self.begin = {k: v["htsr_multiplier"] for k, v in g.items()}

    cb2, probe = TempBalanceCallback(every=1, unit="epoch", min_evals=16, all_layers=True), Probe()
    trainer2 = _pl_trainer(tmp_path, [cb2, probe], epochs=3)
    trainer2.fit(_Net(), _loader(), ckpt_path=str(ckpt))
    assert probe.begin == pytest.approx(saved)
    assert [h["step"] for h in cb2.history] == [3]
    _assert_lrs_follow_multipliers(trainer2.optimizers[0], 0.05 * 0.125)


# ------------------------------------------------------------------------------------------


def test_schedule_validation_and_missing_groups():
    with pytest.raises(InputError):
        ReallocationSchedule(every=0)
    with pytest.raises(InputError):
        ReallocationSchedule(unit="batch")
    s = ReallocationSchedule(every=3)
    assert [c for c in range(10) if s.due(c)] == [3, 6, 9]
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InputError, match="param_groups"):
        s.run(model, plain, None, 3)


@pytest.mark.slow
def test_a_missing_library_is_one_clear_error():
    """Import with the library hidden: an ImportError that says what to install."""
    code = (
        "import sys; sys.modules['{mod}'] = None\n"
        "try:\n    import htsr_cli.integrations.{ours}\n"
        "except ImportError as e:\n    print(e)\n"
    )
    for mod, ours, extra in (
        ("transformers", "transformers", "htsr[transformers]"),
        ("pytorch_lightning", "lightning", "htsr[lightning]"),
    ):
        prog = code.format(mod=mod, ours=ours)
        if ours == "lightning":
            prog = "import sys; sys.modules['lightning'] = None\n" + prog
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
        assert f'pip install "{extra}"' in out.stdout, out.stdout + out.stderr
