"""``htsr finetune`` on CPU: the thesis pipeline of sections 3.3/3.4 (train, prune, finetune
with and without layerwise learning rates: VGG19, and DenseNet40 in four settings) on the
built-in digits, exact resume, Ctrl-C, DDP with gloo, and the one-line errors for bad input.

Models are real zoo models at a small width (VGG19 at 1/8 width, 316k parameters; DenseNet40
at 1/2) on the real digits, resized to 32x32 (VGG19 pools five times) or 8x8, so every run takes
seconds. Resume, Ctrl-C and DDP use ResNet18 at 1/8 width on 8x8 images.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from htsr_cli.allocate.schemes import allocate
from htsr_cli.cli import main
from htsr_cli.engine.analysis import analyze
from htsr_cli.finetune.api import FinetuneConfig, finetune, scheduled_lr
from htsr_cli.finetune.data import default_checkpoint, load_digits
from htsr_cli.models import count_params
from htsr_cli.prune import load_pruned_model, read_prune_record
from htsr_cli.prune.api import prune

VGG = {"arch": "vgg19", "width": 0.125, "data": "digits", "batch_size": 32}
VGG_PARAMS = 315_698  # VGG19-BN at 1/8 width, 10 classes
CHANCE = 0.1  # ten balanced classes
TIMEOUT = 240


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def final(run: Path) -> dict[str, Any]:
    return json.loads((run / "final.json").read_text())


def multipliers(record: dict[str, Any]) -> dict[str, float]:
    """A history record's per-layer LR over the epoch's base LR."""
    return {k: v / record["lr"]["base"] for k, v in record["lr"].items() if k != "base"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): small models gain
    nothing from more, and spinning threads crawl when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["finetune", *map(str, args)])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


# ------------------------------------------------------------------------------------------
# The pipeline: a dense model trained here, pruned, finetuned


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def dense(work: Path) -> Path:
    """VGG19 trained from scratch: the dense model of thesis section 3.3."""
    run = work / "dense"
    finetune(FinetuneConfig(**VGG, epochs=3, lr=0.05, output=str(run)))
    return run


@pytest.fixture(scope="module")
def pruned(work: Path, dense: Path) -> dict[str, Path]:
    """The dense VGG19 with half its prunable parameters removed: uniformly by channels
    (structured), and uniformly by magnitude (unstructured)."""
    out = {}
    for name, structured in (("uniform", True), ("magnitude", False)):
        out[name] = work / f"{name}.safetensors"
        prune(
            str(dense / "model.safetensors"),
            sparsity=0.5,
            method="uniform",
            structured=structured,
            unstructured=not structured,
            arch="vgg19",
            width=0.125,
            output=str(out[name]),
        )
    return out


def test_training_from_scratch(dense: Path) -> None:
    doc, hist = final(dense), history(dense)
    assert doc["schema"] == "htsr.run/1" and doc["method"] == "dense"
    assert doc["lr_mode"] == "global" and doc["epochs"] == 3 and doc["label"] == "dense"
    assert doc["test_acc"] > 8 * CHANCE  # 10 classes: chance is 0.1
    assert doc["best_test_acc"] == max(r["test_acc"] for r in hist)
    assert doc["params"] == doc["params_total"] == VGG_PARAMS
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for r in hist:  # thesis eq. 2.12, epoch e at lr/2 (1 + cos(pi (e-1)/T))
        lr = 0.05 / 2 * (1 + math.cos(math.pi * (r["epoch"] - 1) / 3))
        assert r["lr"] == {"base": pytest.approx(lr)}
        assert 0 <= r["train_acc"] <= 1 and r["seconds"] > 0 and r["esd_seconds"] > 0
    # --track-metric (default): alpha of every layer after the epoch, as analyze measures it
    # on the saved weights with the same fit
    ref = analyze(str(dense / "model.safetensors"), metrics=["alpha"], fit="median")
    assert hist[-1]["metric_name"] == "alpha"
    assert hist[-1]["metric"] == pytest.approx(
        {r["name"]: r["alpha"] for r in ref.layers}, rel=1e-9
    )
    # model.safetensors records the model's key order: analyze lists its layers as the model does
    assert [r["name"] for r in ref.layers] == list(hist[-1]["metric"])
    assert [r["name"] for r in ref.layers][:2] == ["features.0", "features.3"]


def test_plan_multipliers_reach_the_optimizer(work: Path, pruned: dict[str, Path]) -> None:
    plan = allocate(str(pruned["uniform"]), lr=0.1)  # --lr below overrides the plan's 0.1
    mult = plan.multipliers()
    assert len(set(mult.values())) > 3  # a plan worth testing
    (work / "plan.json").write_text(json.dumps(plan.to_dict()))
    run = work / "uniform-plan"
    doc = finetune(
        FinetuneConfig(
            **VGG,
            epochs=2,
            lr=0.02,
            output=str(run),
            init=str(pruned["uniform"]),
            lr_plan=str(work / "plan.json"),
        )
    )
    hist = history(run)
    for r in hist:
        base = scheduled_lr(0.02, r["epoch"], 2)
        assert r["lr"]["base"] == pytest.approx(base, rel=1e-12)
        assert set(r["lr"]) == {"base", *mult}
        for layer, m in mult.items():
            assert r["lr"][layer] == pytest.approx(base * m, rel=1e-12)
    # what the optimizer itself holds after the last epoch
    state = torch.load(run / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert {g["htsr_layer"]: g["lr"] for g in groups if g["htsr_layer"]} == {
        k: v for k, v in hist[-1]["lr"].items() if k != "base"
    }
    pruned_model = load_pruned_model(pruned["uniform"])
    assert doc["method"] == "uniform" and doc["lr_mode"] == "plan"
    assert doc["params_total"] == count_params(pruned_model) < VGG_PARAMS / 1.8
    assert doc["test_acc"] > 5 * CHANCE
    # the run's checkpoint carries the pruning record: it alone rebuilds the pruned model
    assert read_prune_record(run / "model.safetensors")["mode"] == "structured"
    assert count_params(load_pruned_model(run / "model.safetensors")) == doc["params_total"]


def test_reallocation_changes_multipliers(work: Path, pruned: dict[str, Path]) -> None:
    run = work / "uniform-realloc"
    doc = finetune(
        FinetuneConfig(
            **VGG,
            epochs=3,
            lr=0.02,
            output=str(run),
            init=str(pruned["uniform"]),
            allocate="tb-linear",
        )
    )
    hist = history(run)
    assert doc["method"] == "uniform" and doc["lr_mode"] == "reallocate:tb-linear"
    assert doc["test_acc"] > 5 * CHANCE
    shapes = analyze(load_pruned_model(pruned["uniform"]), metrics=["alpha"], fit="median")
    evals = {r["name"]: r["num_evals"] for r in shapes.layers}
    order = list(evals)
    changed = 0
    for before, after in zip(hist, hist[1:], strict=False):
        m, new = before["metric"], multipliers(after)
        # TempBalance's tb-linear over the allocated layers (not first/last, >= 50 eigenvalues)
        chosen = [n for n in order[1:-1] if evals[n] >= 50 and m[n] is not None]
        lo, hi = min(m[n] for n in chosen), max(m[n] for n in chosen)
        for name in order:
            want = 0.5 + (m[name] - lo) / (hi - lo) if name in chosen else 1.0
            assert new[name] == pytest.approx(want, rel=1e-9), name
        changed += any(abs(new[n] - multipliers(before)[n]) > 1e-3 for n in chosen)
    assert changed == 2  # the multipliers move every epoch


def test_global_lr_from_the_command_line(work: Path, pruned: dict[str, Path]) -> None:
    run = work / "uniform-global"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "htsr_cli",
            "finetune",
            "--arch",
            "vgg19",
            "--data",
            "digits",
            "--init",
            pruned["uniform"],
            "--epochs",
            "1",
            "--lr",
            "0.02",
            "--batch-size",
            "32",
            "--no-track-metric",
            "--label",
            "baseline",
            "-o",
            run,
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is a pipe: the summary as JSON
    assert doc == final(run)
    assert doc["label"] == "baseline" and doc["lr_mode"] == "global"
    assert doc["args"]["width"] is None  # taken from the pruning record
    assert history(run)[0]["metric"] == {} and history(run)[0]["lr"] == {"base": 0.02}
    assert "epoch 1/1" in proc.stderr and doc["test_acc"] > 5 * CHANCE


@pytest.mark.slow
def test_densenet40_four_settings(tmp_path: Path) -> None:
    """Thesis section 3.4: uniform or alpha pruning, global or layerwise LR."""
    dense = tmp_path / "dense"
    cfg = {"arch": "densenet40", "data": "digits", "image_size": 8, "batch_size": 32}
    finetune(FinetuneConfig(**cfg, width=0.5, epochs=2, lr=0.1, output=str(dense)))
    docs = {}
    for method in ("uniform", "metric"):
        ckpt = tmp_path / f"{method}.safetensors"
        prune(
            str(dense / "model.safetensors"),
            sparsity=0.5,
            method=method,
            structured=True,
            arch="densenet40",
            width=0.5,
            output=str(ckpt),
        )
        for lr_mode, extra in (("global", {}), ("layerwise", {"allocate": "tb-linear"})):
            run = tmp_path / f"{method}-{lr_mode}"
            docs[method, lr_mode] = finetune(
                FinetuneConfig(**cfg, init=str(ckpt), epochs=1, lr=0.05, output=str(run), **extra)
            )
            first = history(run)[0]
            if lr_mode == "global":
                assert list(first["lr"]) == ["base"]
            else:  # the initial allocation from the pruned weights reaches the optimizer
                assert min(multipliers(first).values()) == pytest.approx(0.5)
                assert max(multipliers(first).values()) == pytest.approx(1.5)
    assert {(d["method"], d["lr_mode"]) for d in docs.values()} == {
        ("uniform", "global"),
        ("uniform", "reallocate:tb-linear"),
        ("alpha", "global"),
        ("alpha", "reallocate:tb-linear"),
    }
    dense_params = final(dense)["params_total"]
    for d in docs.values():
        assert 0.4 * dense_params < d["params_total"] < 0.6 * dense_params
        assert d["test_acc"] > 5 * CHANCE


# ------------------------------------------------------------------------------------------
# Resume


def masked_run(output: Path, init: Path, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(
        **VGG,
        epochs=3,
        lr=0.03,
        output=str(output),
        init=str(init),
        keep_masks=True,
        allocate="tb-linear",
        **kw,
    )


@pytest.mark.slow
def test_exact_resume(work: Path, pruned: dict[str, Path]) -> None:
    init = pruned["magnitude"]
    masks = {k: v == 0 for k, v in load_file(init).items() if v.ndim >= 2 and (v == 0).any()}
    straight, resumed = work / "straight", work / "resumed"
    finetune(masked_run(straight, init))
    part = finetune(masked_run(resumed, init), stop_after=1)
    assert part["epochs"] == 1 and not (resumed / "final.json").exists()
    assert len(history(resumed)) == 1
    finetune(FinetuneConfig.from_dict(json.loads((resumed / "args.json").read_text())), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(r / "state.pt", weights_only=True) for r in (straight, resumed))
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], sb["optimizer"]["state"][k]["momentum_buffer"])
    strip = ("seconds", "esd_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in history(straight)] == [
        {k: v for k, v in r.items() if k not in strip} for r in history(resumed)
    ]
    # --keep-masks: the pruned weights are still exactly zero, and counted as removed
    assert all(not b[k][m].any() for k, m in masks.items()) and len(masks) > 5
    achieved = read_prune_record(init)["achieved"]
    assert final(resumed)["params"] == achieved["params_after"] + (
        VGG_PARAMS - achieved["params_before"]
    )


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_run(work: Path, pruned: dict[str, Path]) -> None:
    run = work / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "htsr_cli",
        "finetune",
        "--arch",
        "resnet18",
        "--width",
        "0.125",
        "--data",
        "digits",
        "--image-size",
        "8",
        "--epochs",
        "60",
        "--lr",
        "0.03",
        "--batch-size",
        "32",
        "-o",
        str(run),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    deadline = time.monotonic() + TIMEOUT
    while not ((run / "history.jsonl").exists() and (run / "history.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130 and out == ""
    assert err.splitlines()[-1].startswith("htsr: interrupted;")
    assert f"htsr finetune --resume {run}" in err
    done = len(history(run))
    assert 1 <= done < 60 and not (run / "final.json").exists()
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["epoch"] == done
    doc = finetune(
        FinetuneConfig.from_dict(json.loads((run / "args.json").read_text())),
        resume=True,
        stop_after=done + 1,
    )
    assert doc["epochs"] == done + 1 and [r["epoch"] for r in history(run)] == list(
        range(1, done + 2)
    )


# ------------------------------------------------------------------------------------------
# DDP


@pytest.mark.slow
def test_ddp_two_processes_gloo(work: Path) -> None:
    run = work / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "htsr_cli",
            "finetune",
            "--nproc-per-node",
            "2",
            "--arch",
            "resnet18",
            "--width",
            "0.125",
            "--data",
            "digits",
            "--image-size",
            "8",
            "--epochs",
            "2",
            "--lr",
            "0.05",
            "--batch-size",
            "32",
            "--allocate",
            "tb-linear",
            "-o",
            str(run),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[:4000] + " ... " + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # one summary: only rank 0 prints
    assert doc == final(run) and doc["world_size"] == 2
    # the ranks applied rank 0's re-allocations: DDP replicas are still bit-identical, which
    # different per-layer learning rates on the two ranks would have broken
    assert final(run)["replicas_equal"] is True
    hist = history(run)
    assert [r["epoch"] for r in hist] == [1, 2]
    assert any(abs(m - 1) > 0.05 for m in multipliers(hist[1]).values())
    assert sorted(p.name for p in run.iterdir()) == [
        "args.json",
        "final.json",
        "history.jsonl",
        "model.safetensors",
        "state.pt",
    ]
    assert proc.stderr.count("epoch 2/2 ") == 1  # rank 0 logs alone
    assert final(run)["test_acc"] > 3 * CHANCE


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def test_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other_plan = tmp_path / "other-plan.json"
    other_plan.write_text(json.dumps(allocate(str(default_checkpoint()), lr=0.1).to_dict()))
    (tmp_path / "empty").mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 8, 8), dtype=np.uint8)
    np.savez(
        tmp_path / "no-test.npz",
        train_x=images,
        train_y=np.arange(8) % 2,
        test_x=images[:0],
        test_y=np.arange(0),
    )
    np.savez(
        tmp_path / "two-counts.npz",
        train_x=images,
        train_y=np.arange(8) % 2,
        test_x=images,
        test_y=np.arange(8) % 2,
        num_classes=np.array([2, 3]),
    )
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 not a whole zip")
    base = ["--arch", "resnet18", "--width", "0.125", "--data", "digits", "--lr", "0.1"]
    cases = [
        (
            [
                "--arch",
                "vgg19",
                "--width",
                "0.125",
                "--data",
                "digits",
                "--image-size",
                "8",
                "--epochs",
                "1",
                "--lr",
                "0.1",
            ],
            "cannot run on an input of size (3, 8, 8)",
        ),
        (
            [*base[:4], "--data", tmp_path / "no-test.npz", "--epochs", "1", "--lr", "0.1"],
            "must be non-empty images",
        ),
        (
            [*base[:4], "--data", tmp_path / "two-counts.npz", "--epochs", "1", "--lr", "0.1"],
            "num_classes must be one integer",
        ),
        (
            [*base[:4], "--data", tmp_path / "truncated.npz", "--epochs", "1", "--lr", "0.1"],
            "cannot read",
        ),
        (
            [
                "--arch",
                "resnet18",
                "--data",
                f"cifar10:{tmp_path / 'missing'}",
                "--epochs",
                "1",
                "--lr",
                "0.1",
            ],
            "does not exist",
        ),
        (
            [
                "--arch",
                "resnet18",
                "--data",
                f"cifar100:{tmp_path / 'empty'}",
                "--epochs",
                "1",
                "--lr",
                "0.1",
            ],
            "is not a cifar100 directory",
        ),
        ([*base, "--epochs", "2", "--init", default_checkpoint()], "does not fit arch resnet18"),
        (
            [*base, "--epochs", "2", "--lr-plan", other_plan],
            "the plan names 6 layer(s) the model lacks",
        ),
        ([*base, "--epochs", "0"], "--epochs must be a positive integer, got 0"),
        ([*base, "--epochs", "-3"], "--epochs must be a positive integer, got -3"),
        ([*base, "--epochs", "two"], "Invalid value for '--epochs'"),
        (
            [*base, "--epochs", "2", "--allocate", "tb-linear", "--lr-plan", other_plan],
            "exclude each other",
        ),
        ([*base, "--epochs", "2", "--keep-masks"], "give --init"),
        ([*base, "--epochs", "2", "--allocate", "cubic"], "unknown scheme 'cubic'"),
        (["--data", "digits"], "missing --arch, --epochs, --lr (or --resume RUN_DIR"),
    ]
    for args, message in cases:
        out_dir = tmp_path / "run"
        code, out, err = run_cli(capsys, *args, *([] if "-o" in args else ["-o", out_dir]))
        assert code == 2 and out == "", (args, err)
        assert err.count("\n") == 1 and err.startswith("htsr: error: ") and message in err, err
        assert not out_dir.exists()


def test_bad_resume(capsys: pytest.CaptureFixture[str], dense: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "--arch",
        "resnet18",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--lr",
        "0.1",
        "-o",
        dense,
    )
    assert code == 2 and f"{dense} already holds a run" in err and "--resume" in err
    code, _, err = run_cli(capsys, "--resume", dense)
    assert code == 2 and "has finished 3 epochs; pass --epochs N with N > 3" in err
    code, _, err = run_cli(capsys, "--resume", dense, "--lr", "0.5")
    assert code == 2 and "--lr cannot change when resuming" in err
    code, _, err = run_cli(capsys, "--resume", tmp_path)
    assert code == 2 and "not an htsr finetune run directory" in err
    assert len(history(dense)) == 3 and (dense / "final.json").exists()


# ------------------------------------------------------------------------------------------
# Schedule, optimizer options, other data and architectures


def test_scheduled_lr() -> None:
    # thesis eq. 2.12 with T = 4: epochs 1..4 train at lr, lr(1+cos(pi/4))/2, lr/2, ...
    assert [scheduled_lr(0.1, e, 4) for e in (1, 2, 3, 4)] == pytest.approx(
        [0.1, 0.05 * (1 + math.sqrt(0.5)), 0.05, 0.05 * (1 - math.sqrt(0.5))]
    )
    # two warm-up epochs, then the cosine over the remaining three
    assert [scheduled_lr(0.1, e, 5, 2) for e in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.05, 0.1, 0.1, 0.075, 0.025]
    )


def test_adamw_tensor_file_imagenet_arch(tmp_path: Path) -> None:
    """A tensor file of 8x8 gray digits (uint8) trains torchvision's ImageNet ResNet18 layout:
    channels replicated, images resized (here to 32x32 with --image-size)."""
    x, y = load_digits("all")
    pick = np.random.default_rng(0).permutation(len(y))
    data = tmp_path / "digits.npz"
    images = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(
        data,
        train_x=images[pick[:256]],
        train_y=y.numpy()[pick[:256]],
        test_x=images[pick[256:320]],
        test_y=y.numpy()[pick[256:320]],
    )
    run = tmp_path / "run"
    doc = finetune(
        FinetuneConfig(
            arch="imagenet-resnet18",
            data=str(data),
            image_size=32,
            epochs=3,
            lr=1e-3,
            batch_size=64,
            optimizer="adamw",
            weight_decay=0.01,
            warmup_epochs=2,
            label_smoothing=0.1,
            track_metric=False,
            output=str(run),
        )
    )
    hist = history(run)
    assert [r["lr"]["base"] for r in hist] == pytest.approx([5e-4, 1e-3, 1e-3])
    state = torch.load(run / "state.pt", weights_only=True)
    assert "exp_avg_sq" in next(iter(state["optimizer"]["state"].values()))  # AdamW's state
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    assert doc["num_classes"] == 10 and doc["params_total"] == 11_181_642  # 10-class head
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
