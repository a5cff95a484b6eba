"""The ``--data`` readers and the on-device batch transforms of ``htsr finetune``.

CIFAR directories are written here, small but in the official formats
(https://www.cs.toronto.edu/~kriz/cifar.html): the python version as Python 2 cPickle
protocol-2 files (byte strings as BINSTRING opcodes, the image array pickled through
``numpy.core.multiarray._reconstruct``), the binary version as fixed-size records
``<label byte(s)><1024 red><1024 green><1024 blue>``, rows in row-major order.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from htsr_cli.errors import InputError
from htsr_cli.finetune.data import (
    augment,
    channel_stats,
    crop_flip,
    crop_padding,
    fit_to_input,
    load_dataset,
    load_digits,
    read_cifar,
)

# ------------------------------------------------------------------------------------------
# Writers of the official formats


def py2_pickle(obj: object) -> bytes:
    """What Python 2's ``cPickle.dump(obj, f, 2)`` writes for the CIFAR batch dicts: dicts,
    lists, small ints, byte strings (Python 2 ``str``) and a uint8 2-D numpy array."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        if len(b) < 256:
            out.extend(b"U" + bytes([len(b)]) + b)  # SHORT_BINSTRING
        else:
            out.extend(b"T" + struct.pack("<I", len(b)) + b)  # BINSTRING

    def integer(v: int) -> None:
        if 0 <= v < 256:
            out.extend(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            out.extend(b"M" + struct.pack("<H", v))
        else:
            out.extend(b"J" + struct.pack("<i", v))

    def emit(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")  # TUPLE1: shape (0,)
            string(b"b")
            out.extend(b"\x87R(")  # TUPLE3, REDUCE, MARK of the state tuple
            integer(1)
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")  # dtype state, BUILD, is_fortran False
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def rows(x: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> the official (N, 3072) rows: R plane, G plane, B plane, row-major."""
    return x.reshape(len(x), 3072)


TRAIN_SIZES = (3, 2, 4, 1, 2)  # five CIFAR-10 training batches, 12 images


def cifar10_python(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, n in enumerate(TRAIN_SIZES, 1):
        x, y = images(n, i), [int(v) for v in np.random.default_rng(i).integers(0, 10, n)]
        doc = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": y,
            b"data": rows(x),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(doc))
        xs.append(x)
        ys += y
    tx, ty = images(5, 99), [9, 0, 3, 3, 7]
    (folder / "test_batch").write_bytes(
        py2_pickle(
            {
                b"batch_label": b"testing batch 1 of 1",
                b"labels": ty,
                b"data": rows(tx),
                b"filenames": [b"t.png"] * 5,
            }
        )
    )
    return np.concatenate(xs), np.array(ys), tx, np.array(ty)


def binary_records(x: np.ndarray, *labels: np.ndarray) -> bytes:
    head = np.stack(labels, 1).astype(np.uint8)
    return np.concatenate([head, rows(x)], 1).tobytes()


def cifar10_binary(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, n in enumerate(TRAIN_SIZES, 1):
        x, y = images(n, 10 + i), np.random.default_rng(i).integers(0, 10, n)
        (folder / f"data_batch_{i}.bin").write_bytes(binary_records(x, y))
        xs.append(x)
        ys.append(y)
    tx, ty = images(4, 98), np.array([1, 2, 3, 9])
    (folder / "test_batch.bin").write_bytes(binary_records(tx, ty))
    return np.concatenate(xs), np.concatenate(ys), tx, ty


# ------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_python_layout(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    x, y, tx, ty = cifar10_python(folder) if nested else cifar10_python(tmp_path / "flat")
    root = tmp_path if nested else tmp_path / "flat"
    d = load_dataset(f"cifar10:{root}")
    assert d.num_classes == 10 and d.train_x.dtype == torch.uint8
    assert torch.equal(d.train_x, torch.from_numpy(x)) and d.train_y.tolist() == y.tolist()
    assert torch.equal(d.test_x, torch.from_numpy(tx)) and d.test_y.tolist() == ty.tolist()
    # the spec, byte by byte: entry 1 of a row is red (0, 1); entry 1024 is green (0, 0);
    # entry 2048 + 32 is blue (1, 0)
    first = rows(x)[0]
    assert d.train_x[0, 0, 0, 1] == first[1]
    assert d.train_x[0, 1, 0, 0] == first[1024]
    assert d.train_x[0, 2, 1, 0] == first[2048 + 32]


def test_cifar10_binary_layout(tmp_path: Path) -> None:
    x, y, tx, ty = cifar10_binary(tmp_path / "cifar-10-batches-bin")
    d = read_cifar("cifar10", tmp_path)
    assert torch.equal(d.train_x, torch.from_numpy(x)) and d.train_y.tolist() == y.tolist()
    assert torch.equal(d.test_x, torch.from_numpy(tx)) and d.test_y.tolist() == ty.tolist()
    raw = (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()
    assert len(raw) == 4 * 3073 and raw[0] == 1 and d.test_x[0, 0, 0, 0] == raw[1]


def test_cifar100_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x, tx = images(6, 1), images(3, 2)
    fine, coarse = rng.integers(0, 100, 6), rng.integers(0, 20, 6)
    tfine, tcoarse = np.array([99, 0, 42]), np.array([19, 0, 7])
    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    for name, xx, f, c in (("train", x, fine, coarse), ("test", tx, tfine, tcoarse)):
        (py / name).write_bytes(
            py2_pickle(
                {
                    b"filenames": [b"a.png"] * len(xx),
                    b"batch_label": name.encode(),
                    b"fine_labels": [int(v) for v in f],
                    b"coarse_labels": [int(v) for v in c],
                    b"data": rows(xx),
                }
            )
        )
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "train.bin").write_bytes(binary_records(x, coarse, fine))
    (binary / "test.bin").write_bytes(binary_records(tx, tcoarse, tfine))
    for root in (tmp_path / "py", binary):
        d = load_dataset(f"cifar100:{root}")
        assert d.num_classes == 100
        assert d.train_y.tolist() == fine.tolist() and d.test_y.tolist() == [99, 0, 42]
        assert torch.equal(d.train_x, torch.from_numpy(x))
        assert torch.equal(d.test_x, torch.from_numpy(tx))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    cifar10_python(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(InputError, match="refused global") as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert "data_batch_3" in str(err.value) and not marker.exists()
    # a Python 3 pickle of bytes under protocol 2 goes through _codecs.encode: also refused
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": b"x"}, protocol=2))
    with pytest.raises(InputError, match="_codecs"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes(b"")
    with pytest.raises(
        InputError,
        match=r"not a cifar10 directory.*data_batch_1 \.\. "
        r"data_batch_5, test_batch",
    ):
        load_dataset(f"cifar10:{partial}")
    with pytest.raises(InputError, match="not a cifar100 directory"):  # CIFAR-10 files
        cifar10_binary(tmp_path / "c10")
        load_dataset(f"cifar100:{tmp_path / 'c10'}")
    (tmp_path / "c10" / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(InputError, match="whole number of 3073-byte records"):
        load_dataset(f"cifar10:{tmp_path / 'c10'}")
    (tmp_path / "c10" / "test_batch.bin").write_bytes(binary_records(images(1, 0), np.array([10])))
    with pytest.raises(InputError, match="out of range"):
        load_dataset(f"cifar10:{tmp_path / 'c10'}")
    with pytest.raises(InputError, match="give the directory"):
        load_dataset("cifar10:")
    with pytest.raises(InputError, match="unknown --data"):
        load_dataset("mnist")


# ------------------------------------------------------------------------------------------
# Tensor files and digits


def test_tensor_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = {
        "train_x": rng.random((7, 12, 12), dtype=np.float32),
        "train_y": np.array([0, 1, 2, 3, 4, 0, 1]),
        "test_x": rng.random((3, 12, 12), dtype=np.float32),
        "test_y": np.array([4, 4, 2]),
    }
    tensors = {k: torch.from_numpy(v) for k, v in d.items()}
    save_file(tensors, tmp_path / "d.safetensors")
    torch.save(tensors, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", **d)
    for name in ("d.safetensors", "d.pt", "d.npz"):
        got = load_dataset(str(tmp_path / name))
        assert got.train_x.shape == (7, 1, 12, 12) and got.num_classes == 5
        assert torch.equal(got.train_x[:, 0], tensors["train_x"])
        assert got.test_y.tolist() == [4, 4, 2]
    np.savez(tmp_path / "c.npz", **d, num_classes=np.array(10))
    assert load_dataset(str(tmp_path / "c.npz")).num_classes == 10
    np.savez(tmp_path / "bad.npz", **{**d, "num_classes": np.array(4)})
    with pytest.raises(InputError, match=r"labels must lie in 0\.\.3"):
        load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "short.npz", train_x=d["train_x"], train_y=d["train_y"])
    with pytest.raises(InputError, match="lacks test_x, test_y"):
        load_dataset(str(tmp_path / "short.npz"))
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.pt"))


def test_digits_spec() -> None:
    d = load_dataset("digits")
    x, y = load_digits("test")
    assert d.num_classes == 10 and d.train_x.shape == (1438, 1, 8, 8)
    assert torch.equal(d.test_x, x) and torch.equal(d.test_y, y)


# ------------------------------------------------------------------------------------------
# Batch transforms


def test_augment_matches_per_image_crop_and_flip() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 32, 32)
    assert crop_padding(32) == 4 and crop_padding(8) == 1
    dy, dx, flips = crop_flip(16, 4, True, torch.Generator().manual_seed(3))
    out = augment(x, gen)
    padded = torch.zeros(16, 3, 40, 40)
    padded[:, :, 4:36, 4:36] = x
    for i in range(16):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        expected = crop.flip(2) if flips[i] else crop
        assert torch.equal(out[i], expected)


def test_augment_draws_every_offset_and_half_flips() -> None:
    dy, dx, flips = crop_flip(4000, 4, True, torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.45 < flips.float().mean() < 0.55
    _, _, none = crop_flip(100, 1, False, torch.Generator().manual_seed(0))
    assert not none.any()


def test_fit_to_input() -> None:
    gray = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = fit_to_input(gray, (3, 4, 4))
    assert out.shape == (1, 3, 4, 4) and torch.equal(out[0, 0], out[0, 2])
    # bilinear, half-pixel centres: [a, b] -> [a, (3a+b)/4, (a+3b)/4, b] along each axis
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(out[0, 0, 0], row)
    assert torch.allclose(out[0, 0, :, 0], 2 * row)
    assert torch.equal(fit_to_input(out, (3, 4, 4)), out)  # already fits: untouched
    assert torch.allclose(fit_to_input(torch.ones(2, 3, 5, 5), (1, 5, 5)), torch.ones(2, 1, 5, 5))
    with pytest.raises(InputError, match="2 channels"):
        fit_to_input(torch.zeros(1, 2, 4, 4), (3, 4, 4))
    assert torch.equal(
        fit_to_input(torch.ones(1, 1, 8, 8), (3, 32, 32)),
        F.interpolate(torch.ones(1, 3, 8, 8), size=(32, 32), mode="bilinear"),
    )


def test_channel_stats() -> None:
    x = torch.from_numpy(images(50, 4))
    mean, std = channel_stats(x, chunk=7)
    ref = x.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.allclose(mean.double(), ref.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), ref.std(1, unbiased=False), atol=1e-6)
