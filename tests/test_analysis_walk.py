"""The layer walk of ``analyze``: layers computed concurrently come back in checkpoint order,
with the same numbers as one at a time, and a failure stops the walk with its own error."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from htsr_cli.engine import analysis
from htsr_cli.engine.analysis import MAX_READ_AHEAD, analyze, parallelism, read_ahead
from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import save_safetensors


def _state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    sd: dict[str, torch.Tensor] = {}
    for i in range(7):  # sizes differ so that concurrent layers finish out of order
        rows, cols = (300 - 35 * i, 40 + 9 * i)
        sd[f"blocks.{i}.fc.weight"] = torch.randn(rows, cols, generator=gen) / (1 + i)
        if i == 2:
            sd["blocks.2.tiny.weight"] = torch.randn(3, 4, generator=gen)  # 3 < min_evals
        if i == 4:
            sd["blocks.4.conv.weight"] = torch.randn(16, 8, 3, 3, generator=gen)
            sd["blocks.4.quant.weight"] = torch.ones(20, 20, dtype=torch.int8)
    return sd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("walk") / "m.safetensors"
    save_safetensors(_state_dict(), path)
    return path


def _run(path: Path, jobs: int) -> tuple[object, list[str], list[tuple[int, int, str]]]:
    streamed: list[str] = []
    progress: list[tuple[int, int, str]] = []
    result = analyze(
        path,
        jobs=jobs,
        keep_spectra=True,
        device="cpu",
        on_layer=lambda r: streamed.append(r["name"]),
        on_progress=lambda d, t, n: progress.append((d, t, n)),
    )
    return result, streamed, progress


def test_concurrent_layers_match_one_at_a_time(ckpt: Path) -> None:
    one, one_stream, _ = _run(ckpt, jobs=1)
    many, many_stream, progress = _run(ckpt, jobs=4)
    order = [k[: -len(".weight")] for k in _state_dict()]
    assert one_stream == many_stream == order  # checkpoint (model) order, skipped ones too
    assert [s["name"] for s in many.skipped] == ["blocks.2.tiny", "blocks.4.quant"]
    assert many.skipped == one.skipped
    assert [d for d, _, _ in progress] == list(range(1, len(order) + 1))
    assert {t for _, t, _ in progress} == {len(order)}
    assert [n for _, _, n in progress] == order
    assert list(many.spectra) == list(one.spectra) == [r["name"] for r in one.layers]
    for a, b in zip(one.layers, many.layers, strict=True):
        assert a.keys() == b.keys()
        for key, va in a.items():
            if isinstance(va, float) and not math.isnan(va):
                assert va == pytest.approx(b[key], rel=1e-10, abs=1e-13), (a["name"], key)
            elif not isinstance(va, float):
                assert va == b[key], (a["name"], key)
        np.testing.assert_allclose(
            many.spectra[a["name"]],
            one.spectra[a["name"]],
            rtol=1e-10,
            atol=1e-13 * float(one.spectra[a["name"]][-1]),
        )


@pytest.mark.parametrize("block_bytes", [None, 4096])  # 4096: the row-block Gram path
def test_a_layer_with_nan_weights_is_skipped_with_its_reason(monkeypatch, block_bytes) -> None:
    from htsr_cli.engine import spectrum

    if block_bytes:
        monkeypatch.setattr(spectrum, "GRAM_BLOCK_BYTES", block_bytes)
    sd = _state_dict()
    sd["blocks.5.fc.weight"][3, 7] = math.nan
    sd["blocks.6.fc.weight"][0, 0] = math.inf
    sd["blocks.4.conv.weight"][1, 2, 0, 1] = -math.inf
    result = analyze(sd, jobs=3, device="cpu")
    skipped = {s["name"]: s["reason"] for s in result.skipped}
    for name in ("blocks.5.fc", "blocks.6.fc", "blocks.4.conv"):
        assert skipped[name] == "weight has NaN or infinite entries"
    assert len(result.layers) == 5 and all(math.isfinite(r["alpha"]) for r in result.layers)


def test_a_callback_that_raises_stops_the_workers_and_restores_the_threads(ckpt: Path) -> None:
    import threading

    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]

    before = (torch.get_num_threads(), blas_threads())

    def reader_gone(record: dict) -> None:
        raise BrokenPipeError("the reader went away")

    with pytest.raises(BrokenPipeError) as info:
        analyze(ckpt, jobs=3, device="cpu", on_layer=reader_gone)
    # `info` holds the traceback, and so analyze's frames, as a caller handling the error does:
    # the workers must be gone already, not when the traceback is dropped.
    assert info.traceback
    assert not [t.name for t in threading.enumerate() if t.name.startswith("htsr-layer")]
    assert (torch.get_num_threads(), blas_threads()) == before


def test_meta_and_sparse_weights_are_skipped_with_their_reason() -> None:
    sd = {
        "a.weight": torch.randn(30, 20),
        "m.weight": torch.empty(30, 20, device="meta"),
        "s.weight": torch.randn(30, 20).to_sparse(),
    }
    result = analyze(sd, device="cpu")
    assert [r["name"] for r in result.layers] == ["a"]
    shape = {"shape": [30, 20], "dtype": "float32"}
    assert result.skipped == [
        {"name": "m", "reason": "meta tensor: it holds no values", **shape},
        {"name": "s", "reason": "sparse_coo tensor: not a dense weight", **shape},
    ]


def test_parallelism_splits_the_threads() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    workers, threads = parallelism(cpu)
    assert 1 <= workers <= 4 and threads is not None and threads >= 1
    assert parallelism(cpu, 1)[0] == 1
    assert parallelism(cuda) == (1, None)  # CUDA leaves the BLAS pool alone
    assert parallelism(cuda, 2) == (2, None)
    if any(p.get("user_api") == "blas" for p in threadpool_info()):  # not Accelerate
        with threadpool_limits(limits=1, user_api="blas"):  # what OMP_NUM_THREADS=1 gives
            assert parallelism(cpu) == (1, 1)
            assert parallelism(cpu, 3) == (3, 1)
    with pytest.raises(InputError, match="--jobs"):
        parallelism(cpu, 0)


# ------------------------------------------------------------------------------------------
# Shuffles run ahead (rand_distance; on by default on a GPU, forced here on the CPU)


def _threads(prefix: str) -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_read_ahead_policy() -> None:
    assert read_ahead(torch.device("cpu")) == 0  # every core already runs a worker
    assert 1 <= read_ahead(torch.device("cuda")) <= MAX_READ_AHEAD
    threads = torch.get_num_threads()
    try:  # what OMP_NUM_THREADS (set per process by --nproc-per-node) gives
        torch.set_num_threads(1)
        assert read_ahead(torch.device("cuda")) == 1
        torch.set_num_threads(5)
        assert read_ahead(torch.device("cuda")) == max(1, min(3, len(os.sched_getaffinity(0)) - 2))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("jobs", [1, 3])
def test_shuffles_run_ahead_give_the_same_document(ckpt: Path, monkeypatch, jobs: int) -> None:
    """The shuffled copies made on threads of their own, ahead of the eigen-solves, are the
    ones each worker makes between its two solves: every value equal, rand_distance
    included; the shuffle threads did run, and are gone afterwards."""
    plain = analyze(ckpt, jobs=jobs, device="cpu").to_dict()
    monkeypatch.setattr(analysis, "read_ahead", lambda device: 3)
    seen: list[str] = []
    ahead = analyze(
        ckpt, jobs=jobs, device="cpu", on_layer=lambda r: seen.extend(_threads("htsr-shuffle"))
    )
    assert seen  # the walk ran shuffles on their own threads
    assert not _threads("htsr-shuffle") and not _threads("htsr-layer")
    doc = ahead.to_dict()
    assert all(math.isfinite(r["rand_distance"]) for r in doc["layers"])
    assert doc == plain


def test_shuffles_run_ahead_skip_what_the_layer_skips(monkeypatch) -> None:
    """Meta, sparse and non-finite weights are skipped with their reasons, as without
    read-ahead (a meta tensor has nothing to shuffle; a NaN layer's shuffle goes unused)."""
    monkeypatch.setattr(analysis, "read_ahead", lambda device: 2)
    nan = torch.randn(30, 20)
    nan[3, 4] = math.nan
    sd = {
        "a.weight": torch.randn(30, 20),
        "m.weight": torch.empty(30, 20, device="meta"),
        "n.weight": nan,
        "s.weight": torch.randn(30, 20).to_sparse(),
    }
    result = analyze(sd, device="cpu")
    assert [r["name"] for r in result.layers] == ["a"]
    assert [(r["name"], r["reason"]) for r in result.skipped] == [
        ("m", "meta tensor: it holds no values"),
        ("n", "weight has NaN or infinite entries"),
        ("s", "sparse_coo tensor: not a dense weight"),
    ]


def test_a_failure_with_shuffles_ahead_stops_every_thread(ckpt: Path, monkeypatch) -> None:
    monkeypatch.setattr(analysis, "read_ahead", lambda device: 3)

    def reader_gone(record: dict) -> None:
        raise BrokenPipeError("the reader went away")

    with pytest.raises(BrokenPipeError):
        analyze(ckpt, jobs=2, device="cpu", on_layer=reader_gone)
    assert not _threads("htsr-shuffle") and not _threads("htsr-layer")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_walk_on_cuda_matches_the_cpu(ckpt: Path) -> None:
    cpu = analyze(ckpt, device="cpu")
    gpu = analyze(ckpt, device="cuda")
    assert gpu.options["device"].startswith("cuda")
    assert [r["name"] for r in gpu.layers] == [r["name"] for r in cpu.layers]
    assert gpu.skipped == cpu.skipped
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        for key in (
            "alpha",
            "rand_distance",
            "stable_rank",
            "entropy",
            "norm",
            "spectral_norm",
            "log_alpha_norm",
            "xmin",
            "D",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (a["name"], key)
        assert b["matrix_rank"] == a["matrix_rank"]


# ------------------------------------------------------------------------------------------
# rand_distance: the cheaper shuffle gives the numbers of the old one (issue 12)


def _old_shuffled(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The shuffle as it was before issue 12 (float32 in, float32 out), kept as the oracle."""
    from htsr_cli.engine.spectrum import slices

    rng = np.random.default_rng(seed)
    mats = np.array(slices(weight.detach().cpu()).numpy(), copy=True)
    for flat in mats.reshape(mats.shape[0], -1):
        rng.shuffle(flat)
    out = torch.from_numpy(mats)
    out = out[0] if weight.ndim == 2 else out.permute(1, 2, 0).reshape(weight.shape)
    return out.to(weight.device)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (16, 8, 3, 3), (12, 6, 5)])
def test_shuffle_is_the_old_permutation(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from htsr_cli.engine import spectrum

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(spectrum, "SHUFFLE_F64_MIN_BYTES", 0)  # these small layers too
    new = spectrum.shuffled(w, 11)
    assert new.dtype == torch.float64 and torch.equal(new, _old_shuffled(w, 11).double())
    monkeypatch.setattr(spectrum, "SHUFFLE_F64_BYTES", 0)  # a layer above the cap
    small = spectrum.shuffled(w, 11)
    assert small.dtype == torch.float32 and torch.equal(small, _old_shuffled(w, 11))


def test_rand_distance_same_as_the_old_code_path(ckpt: Path) -> None:
    """Every layer's rand_distance equals the old path's: eigenvalues of the old float32
    shuffle, seeded (by hand here) from --seed and the layer name, and the JS distance."""
    import zlib

    from htsr_cli.engine import spectrum
    from htsr_cli.engine.metrics import js_distance
    from htsr_cli.io.checkpoint import open_checkpoint

    seed = 7
    result = analyze(str(ckpt), metrics=["rand_distance"], seed=seed, device="cpu")
    sd = open_checkpoint(str(ckpt))
    assert len(result.layers) == 8
    for row in result.layers:
        w = sd.load(row["name"] + ".weight").to(torch.float32)
        layer_seed = (seed * 1_000_003 + zlib.crc32(row["name"].encode())) % (2**63)
        old = js_distance(
            spectrum.eigenvalues(w), spectrum.eigenvalues(_old_shuffled(w, layer_seed))
        )
        assert row["rand_distance"] == pytest.approx(old, rel=1e-12, abs=1e-15), row["name"]
