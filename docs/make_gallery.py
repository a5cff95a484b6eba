"""Build docs/gallery/*.png: every ``htsr plot`` figure from the project's own demo run.

    python docs/make_gallery.py                 # about 3-4 minutes on 2 CPU cores
    python docs/make_gallery.py --work /tmp/g   # keep the intermediate files there

The pipeline runs the real CLI, step by step, on the built-in data:

1. ``htsr analyze`` of the built-in digits CNN; ``htsr plot esd`` of it.
2. ``htsr allocate`` with three schemes; ``htsr plot lr-plan``.
3. ``htsr finetune``: a small CIFAR ResNet18 (width 0.125) trained on the built-in digits, then
   finetuned from there with a global LR and with TempBalance re-allocation;
   ``htsr plot history`` and ``htsr plot metrics`` (alpha before and after finetuning).
4. ``htsr prune`` of the trained model at two sparsities with two methods, each pruned model
   finetuned with its zeros kept; ``htsr plot prune-plan`` and ``htsr plot tradeoff``.

A step whose command is not available (or fails) is skipped with the reason printed, and so
are the figures that need it. Images are written at a modest resolution (``--dpi``, 80) to
stay around 150 KB each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCH = ["--arch", "resnet18", "--width", "0.125", "--data", "digits", "--image-size", "16"]
MAX_KB = 150


class Gallery:
    def __init__(self, out: Path, work: Path, dpi: int) -> None:
        self.out, self.work, self.dpi = out, work, dpi
        self.skipped: list[str] = []
        self.written: list[Path] = []
        self.env = dict(os.environ, NO_COLOR="1")
        self.env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))

    def htsr(self, *args: str, stdout: Path | None = None) -> bool:
        """Run ``htsr ARGS`` in the work directory; False (and a note) when it fails."""
        cmd = [sys.executable, "-m", "htsr_cli", *args]
        shown = "htsr " + " ".join(args) + (f" > {stdout.name}" if stdout else "")
        print(f"$ {shown}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
            print(f"  failed ({res.returncode}): {last}", flush=True)
            return False
        if stdout is not None:
            stdout.write_text(res.stdout)
        print(f"  ok ({time.perf_counter() - t0:.1f} s)", flush=True)
        return True

    def available(self, command: str) -> bool:
        res = subprocess.run(
            [sys.executable, "-m", "htsr_cli", command, "--help"],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
        )
        return res.returncode == 0

    def plot(self, kind: str, name: str, *args: str) -> None:
        target = self.out / f"{name}.png"
        if self.htsr("plot", kind, *args, "-o", str(target), "--dpi", str(self.dpi)):
            self.written.append(target)
        else:
            self.skipped.append(f"{name}.png: 'htsr plot {kind}' failed")

    def skip(self, what: str, why: str) -> None:
        print(f"  skipped {what}: {why}", flush=True)
        self.skipped.append(f"{what}: {why}")


def metrics_without_runs(g: Gallery) -> None:
    """The metrics figure from the built-in checkpoint alone: two fit modes overlaid."""
    g.htsr(
        "analyze",
        "--metrics",
        "alpha",
        "--fit",
        "median",
        "--format",
        "json",
        "-o",
        "analysis-median.json",
    )
    g.plot(
        "metrics",
        "metrics",
        "analysis.json",
        "analysis-median.json",
        "--label",
        "fit ww",
        "--label",
        "fit median",
    )


def build(g: Gallery, epochs: int, finetune_epochs: int) -> None:
    # 1. The built-in checkpoint: ESD and an analysis.
    g.htsr("analyze", "--metrics", "alpha", "--format", "json", "-o", "analysis.json")
    g.plot("esd", "esd")
    g.plot("esd", "esd-linear", "--layer", "features.*", "--linear")

    # 2. Learning-rate plans from that analysis.
    plans = []
    for scheme in ("tb-linear", "power:1/2", "softmax"):
        name = "plan-" + scheme.replace(":", "").replace("/", "")
        if g.htsr(
            "allocate",
            "analysis.json",
            "--lr",
            "0.1",
            "--scheme",
            scheme,
            "--format",
            "json",
            "-o",
            f"{name}.json",
        ):
            plans.append(f"{name}.json")
    if plans:
        g.plot("lr-plan", "lr-plan", *plans)

    # 3. Training and finetuning runs.
    if not g.available("finetune"):
        g.skip("history.png, history-per-layer.png, tradeoff.png", "no 'htsr finetune' yet")
        metrics_without_runs(g)
        return
    common = [*ARCH, "--lr", "0.05", "--no-progress"]
    if not g.htsr("finetune", *common, "--epochs", str(epochs), "-o", "runs/dense"):
        g.skip("history, prune-plan, tradeoff figures", "the training run failed")
        metrics_without_runs(g)
        return
    init = ["--init", "runs/dense/model.safetensors", "--epochs", str(finetune_epochs)]
    g.htsr("finetune", *common, *init, "--label", "global LR", "-o", "runs/global")
    g.htsr(
        "finetune",
        *common,
        *init,
        "--label",
        "TempBalance LR",
        "--allocate",
        "tb-linear",
        "-o",
        "runs/tempbalance",
    )
    runs = [r for r in ("runs/global", "runs/tempbalance") if (g.work / r / "final.json").exists()]
    if runs:
        g.plot("history", "history", *runs)
        g.plot("history", "history-per-layer", *runs, "--per-layer", "--max-layers", "8")
    else:
        g.skip("history.png, history-per-layer.png", "no finetuning run finished")
    if runs:
        after = runs[-1]  # TempBalance when it ran
        g.htsr(
            "analyze",
            "runs/dense/model.safetensors",
            "--metrics",
            "alpha",
            "--format",
            "json",
            "-o",
            "before.json",
        )
        g.htsr(
            "analyze",
            f"{after}/model.safetensors",
            "--metrics",
            "alpha",
            "--format",
            "json",
            "-o",
            "after.json",
        )
        g.plot(
            "metrics",
            "metrics",
            "before.json",
            "after.json",
            "--label",
            "before finetuning",
            "--label",
            f"after finetuning ({Path(after).name} run)",
        )
    else:
        metrics_without_runs(g)

    # 4. Pruning budgets, pruned finetuning, accuracy against parameters.
    if not g.available("prune"):
        g.skip("prune-plan.png, tradeoff.png", "no 'htsr prune' yet")
        return
    prune_plans, pruned_runs = [], ["runs/dense"]
    for method in ("metric", "uniform"):
        for sparsity in ("0.5", "0.8"):
            tag = f"{method}-{sparsity}"
            plan = g.work / f"prune-{tag}.json"
            if not g.htsr(
                "prune",
                "runs/dense/model.safetensors",
                "--sparsity",
                sparsity,
                "--method",
                method,
                "--unstructured",
                "--format",
                "json",
                "-o",
                f"pruned-{tag}.safetensors",
                stdout=plan,
            ):
                continue
            prune_plans.append(plan.name)
            if g.htsr(
                "finetune",
                *common,
                "--init",
                f"pruned-{tag}.safetensors",
                "--keep-masks",
                "--epochs",
                str(finetune_epochs),
                "--label",
                tag,
                "-o",
                f"runs/{tag}",
            ):
                pruned_runs.append(f"runs/{tag}")
    if prune_plans:
        g.plot("prune-plan", "prune-plan", *prune_plans)
    else:
        g.skip("prune-plan.png", "every 'htsr prune' call failed")
    if len(pruned_runs) > 1:
        g.plot("tradeoff", "tradeoff", *pruned_runs)
    else:
        g.skip("tradeoff.png", "no pruned run finished")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "gallery", help="image folder")
    ap.add_argument("--work", type=Path, help="keep intermediate files here (default: temp)")
    ap.add_argument("--dpi", type=int, default=80)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the training run")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="htsr-gallery-") as tmp:
        work = args.work or Path(tmp)
        (work / "runs").mkdir(parents=True, exist_ok=True)
        g = Gallery(args.out.resolve(), work.resolve(), args.dpi)
        build(g, args.epochs, args.finetune_epochs)
    print("\nwritten:")
    for p in g.written:
        kb = p.stat().st_size / 1024
        print(
            f"  {p.relative_to(HERE.parent) if p.is_relative_to(HERE.parent) else p}"
            f"  {kb:.0f} KB" + ("  (over the size budget)" if kb > MAX_KB else "")
        )
    if g.skipped:
        print("skipped:")
        for s in g.skipped:
            print(f"  {s}")


if __name__ == "__main__":
    main()
