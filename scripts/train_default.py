"""Train the built-in checkpoint ``htsr_cli/assets/digits_cnn.safetensors``.

A small CNN on the UCI 8x8 hand-written digits shipped in ``htsr_cli/assets/digits.npz``; CPU only,
deterministic (bit-identical weights for a given seed, thread count and CPU kernel set), about
10 s on one core::

    python scripts/train_default.py            # writes the checkpoint, prints accuracies
    python scripts/train_default.py --out x.safetensors --epochs 40

Only the state dict is saved (float32 weights, BatchNorm statistics and its int64 batch counter),
with metadata ``dataset``, ``train_accuracy``, ``test_accuracy``, ``epochs``, ``seed``, ``threads``
(safetensors writes metadata keys in no fixed order, so file bytes may differ run to run while
the tensors do not). The model class :class:`DigitsCNN` lives here, not in the package:
``htsr analyze`` reads weights only. Tests import it from this file to re-evaluate the shipped
checkpoint.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "htsr_cli" / "assets" / "digits_cnn.safetensors"
DATASET = "uci-digits-8x8"


class DigitsCNN(nn.Module):
    """CNN for 1x8x8 inputs; state-dict keys read ``features.N.*`` and ``classifier.N.*``.

    features:   0 Conv2d(1, 32, 3, p=1), 1 ReLU,
                2 Conv2d(32, 64, 3, p=1), 3 BatchNorm2d(64), 4 ReLU, 5 MaxPool2d(2)    -> 64x4x4
                6 Conv2d(64, 128, 3, p=1), 7 BatchNorm2d(128), 8 ReLU, 9 MaxPool2d(2)  -> 128x2x2
    classifier: 0 Linear(512, 256), 1 ReLU, 2 Dropout(0.2),
                3 Linear(256, 128), 4 ReLU,
                5 Linear(128, 10)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(128 * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation by -1..1 pixels: zero-pad by 1, then crop back to HxW."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (n, h)
    cols = dx[:, None] + torch.arange(w)  # (n, w)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> DigitsCNN:
    """SGD (momentum 0.9, per-step cosine schedule) with random-shift augmentation."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: the weights depend on the thread count, so fix it)",
    )
    args = parser.parse_args(argv)

    if str(REPO) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(REPO))
    from htsr_cli.finetune.data import load_digits
    from htsr_cli.io.checkpoint import save_safetensors

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")

    t0 = time.perf_counter()
    model = train(x_train, y_train, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - t0
    train_acc = accuracy(model, x_train, y_train)
    test_acc = accuracy(model, x_test, y_test)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "dataset": DATASET,
        "model": "DigitsCNN (scripts/train_default.py)",
        "train_accuracy": f"{train_acc:.4f}",
        "test_accuracy": f"{test_acc:.4f}",
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "threads": str(args.threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, args.out, metadata=metadata)  # records the model's layer order
    print(f"trained {args.epochs} epochs in {seconds:.1f} s on {torch.get_num_threads()} threads")
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
