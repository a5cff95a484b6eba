"""Tests for htsr_cli.io.checkpoint: every supported layout, bad input, hashing, read-only use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import Checkpoint, TensorRef, open_checkpoint


@dataclasses.dataclass
class Meta:
    """A plain Python object: unpickling it needs code, so weights_only=True refuses it."""

    epoch: int = 3
    note: str = "trained"


def make_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(16, 8, generator=gen),
        "fc.bias": torch.randn(16, generator=gen),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "emb.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "head.weight": torch.randn(6, 3, generator=gen).to(torch.float16),
        "q.weight": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; float8 has no CPU torch.equal, so compare raw bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check(ckpt: Checkpoint, sd: dict[str, torch.Tensor], order: list[str] | None = None) -> None:
    refs = ckpt.tensors()
    assert [r.key for r in refs] == (order or list(sd))
    for ref in refs:
        assert isinstance(ref, TensorRef)
        assert ref.shape == tuple(sd[ref.key].shape)
        assert ref.dtype == str(sd[ref.key].dtype).removeprefix("torch.")
        assert same(ckpt.load(ref.key), sd[ref.key]), ref.key


def disk_order(path: Path) -> list[str]:
    """Tensor names by data offset, parsed from the safetensors header independently."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def write_index(directory: Path, name: str, weight_map: dict[str, str]) -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def sharded_safetensors(directory: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    """Two shards; the index lists keys in reverse order to prove index order is kept."""
    directory.mkdir(exist_ok=True)
    keys = list(sd)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half]}
    parts["model-00002-of-00002.safetensors"] = keys[half:]
    for shard, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(directory / shard))
    order = keys[::-1]
    wm = {k: shard for k in order for shard, ks in parts.items() if k in ks}
    write_index(directory, "model.safetensors.index.json", wm)
    return order


def sharded_bin(directory: Path, sd: dict[str, torch.Tensor]) -> None:
    directory.mkdir(exist_ok=True)
    keys = list(sd)
    parts = {
        "pytorch_model-00001-of-00002.bin": keys[:3],
        "pytorch_model-00002-of-00002.bin": keys[3:],
    }
    for shard, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, directory / shard)
    wm = {k: shard for shard, ks in parts.items() for k in ks}
    write_index(directory, "pytorch_model.bin.index.json", wm)


# ---------------------------------------------------------------- round trips


def test_safetensors_file(tmp_path: Path) -> None:
    sd = make_sd()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert ckpt.path == str(path)
        check(ckpt, sd, disk_order(path))
        assert {r.file for r in ckpt.tensors()} == {str(path)}


def test_safetensors_sharded_dir_keeps_index_order(tmp_path: Path) -> None:
    sd = make_sd()
    order = sharded_safetensors(tmp_path / "hf", sd)
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert ckpt.format == "safetensors-sharded"
        check(ckpt, sd, order)
        assert ckpt.tensors()[0].file.endswith("model-00002-of-00002.safetensors")
    # Pointing at the index file itself opens the same checkpoint.
    index = tmp_path / "hf" / "model.safetensors.index.json"
    with open_checkpoint(index) as ckpt:
        assert ckpt.format == "safetensors-sharded" and ckpt.path == str(index)
        check(ckpt, sd, order)


def test_safetensors_dir_single_and_unindexed(tmp_path: Path) -> None:
    sd = make_sd()
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    (single / "config.json").write_text("{}")
    with open_checkpoint(single) as ckpt:
        assert ckpt.format == "safetensors-dir"
        check(ckpt, sd, disk_order(single / "model.safetensors"))

    multi = tmp_path / "multi"
    multi.mkdir()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[4:]}, str(multi / "a.safetensors"))
    save_file({k: sd[k] for k in keys[:4]}, str(multi / "b.safetensors"))
    with open_checkpoint(multi) as ckpt:
        assert ckpt.format == "safetensors-dir"
        # Files in sorted name order, each in on-disk order.
        check(ckpt, sd, disk_order(multi / "a.safetensors") + disk_order(multi / "b.safetensors"))


@pytest.mark.parametrize("layout", ["top", "state_dict", "model", "module", "ddp"])
@pytest.mark.parametrize("ext", [".pt", ".pth", ".ckpt"])
def test_torch_file_layouts(tmp_path: Path, layout: str, ext: str) -> None:
    sd = make_sd()
    if layout == "top":
        obj: object = sd
    elif layout == "ddp":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 2}
    else:
        # Extra non-tensor and stray tensor entries at top level must not win or break.
        obj = {layout: dict(sd), "epoch": 4, "optimizer": {"lr": 0.1}, "stray": torch.ones(2)}
    path = tmp_path / f"ckpt{ext}"
    torch.save(obj, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch"
        check(ckpt, sd)


def test_torch_legacy_non_zip_file(tmp_path: Path) -> None:
    # torch cannot read float8 back from the legacy format, so leave it out.
    sd = {k: v for k, v in make_sd().items() if v.dtype != torch.float8_e4m3fn}
    path = tmp_path / "old.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        check(ckpt, sd)


def test_hf_dir_with_pytorch_model_bin(tmp_path: Path) -> None:
    sd = make_sd()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "torch-dir"
        check(ckpt, sd)


def test_sharded_bin_with_index(tmp_path: Path) -> None:
    sd = make_sd()
    sharded_bin(tmp_path / "hf", sd)
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert ckpt.format == "torch-sharded"
        check(ckpt, sd)


def test_dir_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    sd = make_sd()
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "safetensors-dir"
        check(ckpt, sd, disk_order(tmp_path / "model.safetensors"))


def test_module_and_dict_sources() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Conv2d(3, 4, 3))
    with open_checkpoint(model) as ckpt:
        assert ckpt.format == "module" and ckpt.path is None
        assert ckpt.files() == []
        check(ckpt, model.state_dict())
        assert all(r.file is None for r in ckpt.tensors())
        assert not ckpt.load("0.weight").requires_grad

    sd = make_sd()
    source = {f"module.{k}": v for k, v in sd.items()} | {"note": "not a tensor"}
    ckpt = open_checkpoint(source)
    assert ckpt.format == "state_dict"
    check(ckpt, sd)
    assert open_checkpoint({}).tensors() == []


def test_ddp_prefix_only_stripped_when_safe() -> None:
    w = torch.zeros(2, 2)
    mostly = open_checkpoint({"module.a": w, "module.b": w, "extra": w})
    assert [r.key for r in mostly.tensors()] == ["a", "b", "extra"]
    clash = open_checkpoint({"module.a": w, "module.b": w, "a": w})
    assert [r.key for r in clash.tensors()] == ["module.a", "module.b", "a"]
    few = open_checkpoint({"module.a": w, "b": w, "c": w})
    assert [r.key for r in few.tensors()] == ["module.a", "b", "c"]


# ---------------------------------------------------------------- pickled Python objects


def test_pickled_objects_need_trust_pickle(tmp_path: Path) -> None:
    sd = make_sd()
    path = tmp_path / "with_meta.pt"
    torch.save({"state_dict": sd, "meta": Meta()}, path)
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert "--trust-pickle" in msg and "with_meta.pt" in msg and "\n" not in msg
    with open_checkpoint(path, trust_pickle=True) as ckpt:
        check(ckpt, sd)


def test_pickled_module_with_trust_pickle(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 16)
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)
    with pytest.raises(InputError, match="--trust-pickle"):
        open_checkpoint(path)
    with open_checkpoint(path, trust_pickle=True) as ckpt:
        check(ckpt, model.state_dict())


# ---------------------------------------------------------------- bad input


def _random_bytes(n: int, first: bytes = b"") -> bytes:
    rng = random.Random(1234)
    body = bytes(rng.randrange(256) for _ in range(n))
    return first + body if first else bytes([body[0] & 0x7F]) + body[1:]


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_missing(tmp: Path) -> Path:
    return tmp / "nope.safetensors"


def bad_empty_dir(tmp: Path) -> Path:
    (tmp / "emptydir").mkdir()
    return tmp / "emptydir"


def bad_junk_dir(tmp: Path) -> Path:
    (tmp / "junkdir").mkdir()
    (tmp / "junkdir" / "README.txt").write_text("hello")
    return tmp / "junkdir"


def bad_truncated_safetensors(tmp: Path) -> Path:
    save_file(make_sd(), str(tmp / "cut.safetensors"))
    _truncated(tmp / "cut.safetensors")
    return tmp / "cut.safetensors"


def bad_random_safetensors(tmp: Path) -> Path:
    (tmp / "noise.safetensors").write_bytes(_random_bytes(4096))
    return tmp / "noise.safetensors"


def bad_empty_safetensors(tmp: Path) -> Path:
    (tmp / "zero.safetensors").write_bytes(b"")
    return tmp / "zero.safetensors"


def bad_truncated_zip_pt(tmp: Path) -> Path:
    torch.save(make_sd(), tmp / "cut.pt")
    _truncated(tmp / "cut.pt")
    return tmp / "cut.pt"


def bad_truncated_legacy_pt(tmp: Path) -> Path:
    torch.save({"w": torch.randn(64, 64)}, tmp / "cutold.pt", _use_new_zipfile_serialization=False)
    _truncated(tmp / "cutold.pt")
    return tmp / "cutold.pt"


def bad_random_pt(tmp: Path) -> Path:
    (tmp / "noise.pt").write_bytes(_random_bytes(4096))
    return tmp / "noise.pt"


def bad_random_pickle_like_pt(tmp: Path) -> Path:
    # Starts like a pickle, so it reaches torch.load; must not be blamed on --trust-pickle.
    (tmp / "fakepickle.pt").write_bytes(_random_bytes(4096, first=b"\x80\x02"))
    return tmp / "fakepickle.pt"


def bad_empty_pt(tmp: Path) -> Path:
    (tmp / "zero.pt").write_bytes(b"")
    return tmp / "zero.pt"


def bad_no_tensors_pt(tmp: Path) -> Path:
    torch.save({"epoch": 3, "config": {"lr": 0.1}, "model": {"depth": 2}}, tmp / "notensors.pt")
    return tmp / "notensors.pt"


def bad_txt(tmp: Path) -> Path:
    (tmp / "weights.txt").write_text("1 2 3")
    return tmp / "weights.txt"


def bad_onnx(tmp: Path) -> Path:
    (tmp / "model.onnx").write_bytes(b"\x08\x07")
    return tmp / "model.onnx"


def bad_index_missing_shard(tmp: Path) -> Path:
    sharded_safetensors(tmp / "hf", make_sd())
    (tmp / "hf" / "model-00002-of-00002.safetensors").unlink()
    return tmp / "hf"


def bad_bin_index_missing_shard(tmp: Path) -> Path:
    sharded_bin(tmp / "hfbin", make_sd())
    (tmp / "hfbin" / "pytorch_model-00001-of-00002.bin").unlink()
    return tmp / "hfbin"


def bad_index_not_json(tmp: Path) -> Path:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "model.safetensors.index.json").write_text("{not json")
    return tmp / "hf"


def bad_index_without_weight_map(tmp: Path) -> Path:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return tmp / "hf"


BAD_AT_OPEN: dict[Callable[[Path], Path], str] = {
    bad_missing: "nope.safetensors",
    bad_empty_dir: "emptydir",
    bad_junk_dir: "junkdir",
    bad_truncated_safetensors: "cut.safetensors",
    bad_random_safetensors: "noise.safetensors",
    bad_empty_safetensors: "zero.safetensors",
    bad_truncated_zip_pt: "cut.pt",
    bad_truncated_legacy_pt: "cutold.pt",
    bad_random_pt: "noise.pt",
    bad_random_pickle_like_pt: "fakepickle.pt",
    bad_empty_pt: "zero.pt",
    bad_no_tensors_pt: "notensors.pt",
    bad_txt: "weights.txt",
    bad_onnx: "model.onnx",
    bad_index_missing_shard: "model-00002-of-00002.safetensors",
    bad_bin_index_missing_shard: "pytorch_model-00001-of-00002.bin",
    bad_index_not_json: "model.safetensors.index.json",
    bad_index_without_weight_map: "model.safetensors.index.json",
}


def assert_one_line(exc: InputError, name: str) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    assert name in msg, msg
    assert exc.__cause__ is None or isinstance(exc.__cause__, Exception)
    return msg


@pytest.mark.parametrize("make", list(BAD_AT_OPEN), ids=lambda f: f.__name__)
def test_bad_input_raises_one_line_input_error(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        open_checkpoint(path).tensors()
    msg = assert_one_line(info.value, BAD_AT_OPEN[make])
    if make in (bad_txt, bad_onnx):
        assert "unknown checkpoint format" in msg and ".safetensors" in msg
    if make is bad_random_pickle_like_pt:
        assert "--trust-pickle" not in msg


def test_single_file_errors_surface_at_open(tmp_path: Path) -> None:
    for make in (bad_truncated_safetensors, bad_random_pt, bad_no_tensors_pt):
        with pytest.raises(InputError):
            open_checkpoint(make(tmp_path))


def test_bad_shard_contents_raise_on_tensors(tmp_path: Path) -> None:
    sd = make_sd()
    sharded_safetensors(tmp_path / "hf", sd)
    _truncated(tmp_path / "hf" / "model-00001-of-00002.safetensors")
    with pytest.raises(InputError) as info:
        open_checkpoint(tmp_path / "hf").tensors()
    assert_one_line(info.value, "model-00001-of-00002.safetensors")

    # The index maps a key to a shard that does not hold it.
    d = tmp_path / "liar"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "s.safetensors"))
    write_index(d, "model.safetensors.index.json", {"a": "s.safetensors", "b": "s.safetensors"})
    with pytest.raises(InputError) as info:
        open_checkpoint(d).tensors()
    assert_one_line(info.value, "s.safetensors")


def test_duplicate_key_across_unindexed_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(InputError) as info:
        open_checkpoint(tmp_path).tensors()
    assert_one_line(info.value, "b.safetensors")


def test_unknown_key_and_source_type(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(InputError) as info:
        open_checkpoint(tmp_path / "m.safetensors").load("missing")
    assert_one_line(info.value, "missing")
    with pytest.raises(InputError) as info:
        open_checkpoint(42)
    assert_one_line(info.value, "int")


# ---------------------------------------------------------------- hashing and read-only use


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_single_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(make_sd(), path)
    ckpt = open_checkpoint(path)
    files = ckpt.files()
    assert files == [{"path": str(path), "bytes": path.stat().st_size, "sha256": sha(path)}]
    files[0]["sha256"] = "tampered"  # callers get copies, not the cache
    assert ckpt.files()[0]["sha256"] == sha(path)


def test_start_hashing_matches_files_for_sharded_dir(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    sharded_safetensors(d, make_sd())
    expected = [
        {"path": str(d / n), "bytes": (d / n).stat().st_size, "sha256": sha(d / n)}
        for n in (
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        )
    ]
    background = open_checkpoint(d)
    background.start_hashing()
    background.start_hashing()  # idempotent
    background.tensors()  # overlap work with hashing
    assert background.files() == expected
    assert open_checkpoint(d).files() == expected


def test_a_file_is_hashed_once_and_again_after_it_changes(tmp_path: Path) -> None:
    from htsr_cli.io import digest

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    digest.prefetch(str(path))  # what the CLI does before importing torch
    digest.prefetch(str(tmp_path))  # a directory: nothing to do, no error
    digest.prefetch(str(tmp_path / "missing.pt"))  # left to the reader's own message
    first = digest.start(str(path))
    assert digest.start(str(path)) is first  # same file, same job
    assert digest.record(str(path))["sha256"] == sha(path)
    save_file({"w": torch.ones(8)}, str(path))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert digest.start(str(path)) is not first
    assert digest.record(str(path)) == {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha(path),
    }


def _hash_in_child(path: str) -> str:
    from htsr_cli.io import digest

    return digest.record(path)["sha256"]


@pytest.mark.skipif(
    "fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork"
)
def test_hashing_in_a_forked_child_after_the_parent_hashed(tmp_path: Path) -> None:
    """A forked child has no copy of the parent's hashing thread: it must start its own."""
    import multiprocessing

    from htsr_cli.io import digest

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(path))
    assert digest.record(str(path))["sha256"] == sha(path)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        result = pool.map_async(_hash_in_child, [str(path)] * 2)
        assert result.get(timeout=60) == [sha(path)] * 2


def test_hashing_a_vanished_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    ckpt = open_checkpoint(path)
    path.unlink()
    with pytest.raises(InputError) as info:
        ckpt.files()
    assert_one_line(info.value, "gone.safetensors")


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "old.pt"])
def test_input_file_is_never_modified(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sd = {"w": torch.randn(32, 32), "b": torch.randn(32)}
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=name != "old.pt")
    before, stat = path.read_bytes(), path.stat()
    entries_before = sorted(os.listdir(tmp_path))
    with open_checkpoint(path) as ckpt:
        for ref in ckpt.tensors():
            ckpt.load(ref.key).add_(1.0)  # in-place writes must not reach the file (mmap)
        ckpt.start_hashing()
        ckpt.files()
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == entries_before
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.load("w"), sd["w"])


def test_save_safetensors_records_the_model_order(tmp_path):
    """safetensors sorts tensors by dtype and name; htsr's writer records the state dict's
    order so that layer order (first/last-layer guards, plots) survives the round trip."""
    from safetensors.torch import save_file

    from htsr_cli.io.checkpoint import save_safetensors

    sd = {
        "stem.weight": torch.ones(4, 3),
        "blocks.10.weight": torch.ones(5, 4),
        "blocks.2.weight": torch.ones(6, 5),
        "head.weight": torch.ones(2, 6),
        "head.bias": torch.zeros(2),
    }
    ours = tmp_path / "ordered.safetensors"
    save_safetensors(sd, ours, metadata={"note": "x"})
    with open_checkpoint(str(ours)) as ckpt:
        assert [r.key for r in ckpt.tensors()] == list(sd)
        assert ckpt.model_order and ckpt.metadata()["note"] == "x"
        assert torch.equal(ckpt.load("blocks.2.weight"), sd["blocks.2.weight"])
    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain))
    with open_checkpoint(str(plain)) as ckpt:
        assert not ckpt.model_order
    assert not list(tmp_path.glob(".*.tmp"))
