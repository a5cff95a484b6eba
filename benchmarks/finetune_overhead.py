#!/usr/bin/env python
"""What TempBalance-style re-allocation every epoch costs ``htsr finetune``.

One run of this script trains the same model on the same data three times, in one process, for
``--epochs`` epochs each, and compares the median epoch time (wall clock as ``history.jsonl``
records it; epoch 1 left out: it pays for one-off warm-ups). The three runs advance in turns,
one epoch each (``stop_after`` and resume), so that a change in machine load hits all three
alike:

- ``global``: one global learning rate, no ESD work at all (``--no-track-metric``);
- ``track``: global learning rate with ``--track-metric`` (the default): the metric of every
  layer is measured after each epoch for the history;
- ``realloc``: ``--allocate tb-linear --reallocate-every 1``: every epoch the ESD of every layer
  is re-estimated on the live model and the per-layer learning rates rewritten.

It prints the overhead ``median(realloc) / median(global) - 1`` (the target is at most 5% for
ResNet18 on CIFAR-shaped data on a GPU) and that of ``track``, and the ESD seconds per epoch
that ``history.jsonl`` records. On a shared machine the ratio of medians moves with the load;
the ESD share of an epoch (``esd_seconds / (seconds - esd_seconds)`` of each re-allocating
epoch, median) is measured inside one epoch and does not.

Defaults: on CUDA, ResNet18 (width 1) on random CIFAR-shaped data (50000 + 10000 uint8 images
3x32x32, 100 classes, written once as a tensor file), batch 128; on CPU, ResNet18 at width 0.25
on the built-in digits resized to 32x32. ``--json`` prints the numbers as one JSON object.

    python benchmarks/finetune_overhead.py                       # the defaults of the device
    python benchmarks/finetune_overhead.py --epochs 5 --width 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from htsr_cli.finetune.api import FinetuneConfig, finetune

RUNS = {
    "global": {"track_metric": False},
    "track": {"track_metric": True},
    "realloc": {"allocate": "tb-linear", "reallocate_every": 1, "track_metric": False},
}


def cifar_shaped(folder: Path, train: int, test: int, classes: int) -> str:
    """Random uint8 images of CIFAR's shape and random labels, as an ``.npz`` data file."""
    rng = np.random.default_rng(0)
    path = folder / "cifar-shaped.npz"
    np.savez(
        path,
        train_x=rng.integers(0, 256, (train, 3, 32, 32), dtype=np.uint8),
        train_y=rng.integers(0, classes, train),
        num_classes=np.array(classes),
        test_x=rng.integers(0, 256, (test, 3, 32, 32), dtype=np.uint8),
        test_y=rng.integers(0, classes, test),
    )
    return str(path)


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0 if cuda else 0.25)
    ap.add_argument(
        "--data",
        default=None,
        help="a --data spec; default: CIFAR-shaped random data on CUDA, digits on CPU",
    )
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=50000)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (epoch 1 is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="htsr-ft-bench-") as tmp:
        data = args.data or (
            cifar_shaped(Path(tmp), args.train_size, args.train_size // 5, 100)
            if args.device.startswith("cuda")
            else "digits"
        )
        configs = {
            name: FinetuneConfig(
                arch=args.arch,
                width=args.width,
                data=data,
                image_size=args.image_size,
                epochs=args.epochs,
                lr=0.1,
                batch_size=args.batch_size,
                device=args.device,
                compile=args.compile,
                output=str(Path(tmp) / name),
                **options,
            )
            for name, options in RUNS.items()
        }
        for epoch in range(1, args.epochs + 1):
            for cfg in configs.values():
                finetune(cfg, resume=epoch > 1, stop_after=epoch, progress=False)
        for name in RUNS:
            lines = (Path(tmp) / name / "history.jsonl").read_text().splitlines()
            hist = [json.loads(line) for line in lines][1:]
            results[name] = {
                "epoch_s": statistics.median(r["seconds"] for r in hist),
                "esd_s": statistics.median(r["esd_seconds"] for r in hist),
                "esd_share": statistics.median(
                    r["esd_seconds"] / (r["seconds"] - r["esd_seconds"]) for r in hist
                ),
                "epochs_timed": len(hist),
            }
    base = results["global"]["epoch_s"]
    summary = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "width": args.width,
        "data": args.data or ("cifar-shaped" if args.device.startswith("cuda") else "digits"),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "runs": results,
        "realloc_overhead": results["realloc"]["epoch_s"] / base - 1,
        "track_overhead": results["track"]["epoch_s"] / base - 1,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{args.device} ({summary['threads']} threads), {args.arch} width {args.width:g}, "
        f"{summary['data']} at {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"median of epochs 2..{args.epochs}"
    )
    print(f"{'run':<34}{'epoch s':>10}{'ESD s':>10}")
    labels = {
        "global": "global LR, no ESD work",
        "track": "global LR + --track-metric",
        "realloc": "re-allocate every epoch",
    }
    for name, r in results.items():
        print(f"{labels[name]:<34}{r['epoch_s']:>10.3f}{r['esd_s']:>10.3f}")
    print(
        f"overhead of per-epoch re-allocation: {summary['realloc_overhead']:+.1%} "
        "(target <= 5% for ResNet18 on CIFAR-shaped data on a GPU)"
    )
    print(f"overhead of --track-metric:          {summary['track_overhead']:+.1%}")
    print(
        f"ESD time / rest of the epoch:        {results['realloc']['esd_share']:.1%} "
        "(re-allocation, median over epochs)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
