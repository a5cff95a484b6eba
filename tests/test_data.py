"""The built-in digits data set and the built-in checkpoint trained on it (real data, no mocks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from htsr_cli.errors import InputError
from htsr_cli.finetune.data import DEFAULT_CHECKPOINT, default_checkpoint, load_digits

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_default.py"

EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "features.0.weight": (32, 1, 3, 3),
    "features.0.bias": (32,),
    "features.2.weight": (64, 32, 3, 3),
    "features.2.bias": (64,),
    "features.3.weight": (64,),
    "features.3.bias": (64,),
    "features.3.running_mean": (64,),
    "features.3.running_var": (64,),
    "features.3.num_batches_tracked": (),
    "features.6.weight": (128, 64, 3, 3),
    "features.6.bias": (128,),
    "features.7.weight": (128,),
    "features.7.bias": (128,),
    "features.7.running_mean": (128,),
    "features.7.running_var": (128,),
    "features.7.num_batches_tracked": (),
    "classifier.0.weight": (256, 512),
    "classifier.0.bias": (256,),
    "classifier.3.weight": (128, 256),
    "classifier.3.bias": (128,),
    "classifier.5.weight": (10, 128),
    "classifier.5.bias": (10,),
}


def _train_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("htsr_train_default", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """Sorted (pixels 0..16, label) rows as bytes: a multiset fingerprint of a split."""
    arr = np.concatenate([(x.reshape(len(x), -1) * 16).numpy(), y[:, None].numpy()], axis=1)
    return sorted(r.astype(np.uint8).tobytes() for r in arr)


@pytest.mark.parametrize(("split", "n"), [("train", 1438), ("test", 359), ("all", 1797)])
def test_load_digits_shapes_dtypes_ranges(split: str, n: int) -> None:
    x, y = load_digits(split)
    assert x.shape == (n, 1, 8, 8)
    assert x.dtype == torch.float32
    assert y.shape == (n,)
    assert y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # pixels were counts 0..16, so scaled values are multiples of 1/16
    assert torch.equal(x * 16, torch.round(x * 16))
    assert set(y.tolist()) == set(range(10))


def test_load_digits_default_split_is_train() -> None:
    x, y = load_digits()
    xt, yt = load_digits("train")
    assert torch.equal(x, xt) and torch.equal(y, yt)


def test_train_and_test_partition_all() -> None:
    xa, ya = load_digits("all")
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape[0] + xte.shape[0] == xa.shape[0]
    # same multiset of (image, label) rows: train + test is a permutation of all
    assert _rows(torch.cat([xtr, xte]), torch.cat([ytr, yte])) == _rows(xa, ya)
    # disjoint by construction: the split is a boolean mask over the 1797 indices
    from htsr_cli.assets import digits_npz

    with np.load(digits_npz()) as npz:
        mask = npz["test_mask"]
    assert mask.dtype == bool and mask.shape == (1797,)
    assert mask.sum() == xte.shape[0] and (~mask).sum() == xtr.shape[0]
    # stratified: every class holds about 20% of its samples in the test split
    counts_all = torch.bincount(ya, minlength=10).double()
    frac = torch.bincount(yte, minlength=10).double() / counts_all
    assert torch.all((frac > 0.17) & (frac < 0.23))


def test_load_digits_rejects_unknown_split() -> None:
    with pytest.raises(InputError, match="split"):
        load_digits("validation")


def test_default_checkpoint_keys_shapes_metadata() -> None:
    path = default_checkpoint()
    assert path == DEFAULT_CHECKPOINT
    assert path.is_file()
    assert path.stat().st_size < 1_100_000
    state = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_SHAPES
    for key, tensor in state.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert tensor.dtype == expected, key
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dataset"] == "uci-digits-8x8"
    assert float(meta["test_accuracy"]) >= 0.97


def test_default_checkpoint_reaches_97_percent_on_test_split() -> None:
    module = _train_module()
    model = module.DigitsCNN()
    model.load_state_dict(load_file(str(default_checkpoint())), strict=True)
    x, y = load_digits("test")
    acc = module.accuracy(model, x, y)
    assert acc >= 0.97
