"""Fuzzers (issue 15, "keep the fuzzers"): mutated safetensors headers through ``analyze``, and
mutated documents (analysis, LR plan, prune plan) through ``allocate``, ``prune`` and ``plot``.

Every case runs the real CLI in process and must end with exit 0, 1 or 2; an error is exactly
one ``htsr: error:`` line on stderr with nothing on stdout, no output file and no temporary
file; and a case ends within :data:`CASE_SECONDS` (a generous bound: a hang or a quadratic
blow-up, not a benchmark). The fast runs are seeded and part of the normal suite; the long
runs (``-m slow``) use more seeds. ``HTSR_FUZZ_REPORT=1`` prints the counts by exit code.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clirunner
import pytest
import torch
from safetensors.torch import save_file

ERROR_LINE = re.compile(r"^htsr: error: [^\n]+\n$")
CASE_SECONDS = 30.0
FAST_CASES = 40
SLOW_CASES = 600
#: The long runs' seed (``HTSR_FUZZ_SEED`` explores others).
SLOW_SEED = int(os.environ.get("HTSR_FUZZ_SEED", "1000"))


def run_case(argv: list[Any], workdir: Path, output: Path | None, stdin: str | None = None) -> int:
    """One fuzz case: the contract every input must keep; returns the exit code."""
    start = time.monotonic()
    proc = clirunner.run(argv, stdin=stdin, cwd=workdir)
    took = time.monotonic() - start
    where = f"{argv} -> {proc.returncode}: {proc.stderr[-500:]!r}"
    assert took < CASE_SECONDS, f"{took:.1f} s: {where}"
    assert proc.returncode in (0, 1, 2), where
    if proc.returncode == 2:
        assert ERROR_LINE.match(proc.stderr), where
        assert proc.stdout == "", where
        assert output is None or not output.exists(), where
    temps = [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")]
    assert not temps, f"{temps}: {where}"
    if output is not None and output.exists():
        output.unlink()
    return proc.returncode


def report(name: str, counts: collections.Counter[int]) -> None:
    if os.environ.get("HTSR_FUZZ_REPORT"):
        by_code = dict(sorted(counts.items()))
        print(f"\nfuzz {name}: {sum(counts.values())} cases, by exit code {by_code}")


# ------------------------------------------------------------------------------------------
# Values a mutation puts in place of a field

NAMES = ["", " ", "x[/]", "[link=http://e]a[/link]", "\x1b[2J", "a\nb", "__metadata__", "é" * 3]
NUMBERS = [0, -1, 1, 2, 0.5, -0.5, 1e-300, 1e308, -1e308, 2**53 + 1, 2**63, 10**19]
SPECIAL = [float("nan"), float("inf"), -float("inf")]


def random_value(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return rng.choice(SPECIAL)
    if kind == 3:
        return rng.choice(NAMES)
    if kind == 4:
        return rng.choice([[], [1, 2], ["a"], [None], [[[]]]])
    if kind == 5:
        return rng.choice([{}, {"a": 1}, {"name": "x"}])
    return "9" * rng.choice([25, 400])  # a long numeral as a string


def _paths(doc: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        out.append(path)
        if isinstance(value, dict):
            stack.extend((v, (*path, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
    return out


def mutate_document(doc: dict[str, Any], rng: random.Random) -> str:
    """1 to 3 structural mutations (replace, delete, add, duplicate), or a raw text one."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(doc)[1:])
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = rng.randrange(5)
        if op <= 1:
            parent[key] = random_value(rng)
        elif op == 2 and isinstance(parent, dict):
            del parent[key]
        elif op == 2:
            parent.pop(key)
        elif op == 3 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))  # a duplicate (same layer name)
        else:
            target = parent[key]
            if isinstance(target, dict):
                target[rng.choice(["name", "N", "alpha", "multiplier", "x"])] = random_value(rng)
            else:
                parent[key] = [target, random_value(rng)]
    text = json.dumps(doc, allow_nan=True)
    raw = rng.randrange(10)
    if raw == 0:
        cut = rng.randrange(len(text))
        text = text[:cut]
    elif raw == 1:
        text = text[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}"
    elif raw == 2:
        text = text.replace('"N": ', '"N": ' + "9" * 5000 + ' , "n2": ', 1)
    return text


# ------------------------------------------------------------------------------------------
# safetensors headers


def _safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


DTYPES = ["F32", "F64", "BF16", "F16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", "", 1, None]
SHAPES = [[], [0], [-1, 2], [1000], [2**40, 2**40], ["a"], [10, 16, 1, 1, 1], [16, 3, 9], 7]


def mutate_safetensors(header: dict[str, Any], data: bytes, rng: random.Random) -> bytes:
    """A header mutation: a field of a tensor entry, its name, the metadata, the length
    prefix, a byte flip, a truncation or trailing junk."""
    header = copy.deepcopy(header)
    keys = [k for k in header if k != "__metadata__"]
    op = rng.randrange(9)
    if op == 0:
        header[rng.choice(keys)]["dtype"] = rng.choice(DTYPES)
    elif op == 1:
        header[rng.choice(keys)]["shape"] = rng.choice(SHAPES)
    elif op == 2:
        entry = header[rng.choice(keys)]
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[end, start], [0, 2**62], [-1, end], [start, len(data) + 8], [0, 0], [start], "x"]
        )
    elif op == 3:
        key = rng.choice(keys)
        header[rng.choice(NAMES) + rng.choice(["", ".weight"])] = header.pop(key)
    elif op == 4:
        header["__metadata__"] = rng.choice(
            [{"a": 1}, {"htsr.key_order": "[1, 2"}, {"htsr.prune": "{}"}, [], "x", {"a": {}}]
        )
    elif op == 5:
        blob = json.dumps(header).encode()
        length = rng.choice([0, 1, len(blob) - 1, len(blob) + 1, 2**63, len(blob) + len(data)])
        return _pack(blob, data, length)
    elif op == 6:
        blob = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return _pack(bytes(blob), data)
    elif op == 7:
        whole = _pack(header, data)
        return whole[: rng.randrange(len(whole))]
    else:
        blob = json.dumps(header).encode() + rng.choice([b"junk", b"\x00" * 7, b"}{"])
        return _pack(blob, data)
    return _pack(header, data)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small checkpoint, its analysis, an LR plan and a prune plan: what is mutated."""
    d = tmp_path_factory.mktemp("fuzz-base")
    g = torch.Generator().manual_seed(0)
    ckpt = d / "model.safetensors"
    tensors = {
        "features.0.weight": torch.randn(16, 3, 3, 3, generator=g),
        "features.1.weight": torch.randn(32, 16, 3, 3, generator=g),
        "fc1.weight": torch.randn(64, 128, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "classifier.weight": torch.randn(10, 64, generator=g),
    }
    save_file(tensors, ckpt, metadata={"note": "fuzz"})
    docs = {}
    for name, argv in {
        "analysis": ["analyze", ckpt, "--format", "json"],
        "lr_plan": ["allocate", ckpt, "--lr", "0.1", "--format", "json"],
        "prune_plan": ["prune", ckpt, "--sparsity", "0.4", "--format", "json"],
    }.items():
        proc = clirunner.run(argv)
        assert proc.returncode == 0, proc.stderr
        docs[name] = json.loads(proc.stdout)
    header, data = _safetensors_parts(ckpt)
    return {"ckpt": ckpt, "header": header, "data": data, **docs}


def fuzz_safetensors(base: dict[str, Any], workdir: Path, seed: int, cases: int) -> Counter:
    rng = random.Random(seed)
    counts: collections.Counter[int] = collections.Counter()
    src, out = workdir / "fuzzed.safetensors", workdir / "report.json"
    for _ in range(cases):
        src.write_bytes(mutate_safetensors(base["header"], base["data"], rng))
        counts[run_case(["analyze", src, "--format", "json", "-o", out], workdir, out)] += 1
    return counts


Counter = collections.Counter


def _document_commands(
    base: dict[str, Any], workdir: Path
) -> list[tuple[str, Callable[[Path], list[Any]], Path | None, bool]]:
    """(document, argv builder, output, via stdin) for every consumer of every document."""
    png, js = workdir / "fig.png", workdir / "out.json"
    ckpt = base["ckpt"]
    return [
        (
            "analysis",
            lambda f: ["allocate", "-", "--lr", "0.1", "--format", "json", "-o", js],
            js,
            True,
        ),
        ("analysis", lambda f: ["prune", "-", "--sparsity", "0.3", "--format", "json"], None, True),
        ("analysis", lambda f: ["plot", "metrics", f, "-o", png], png, False),
        ("lr_plan", lambda f: ["plot", "lr-plan", f, "-o", png], png, False),
        ("prune_plan", lambda f: ["plot", "prune-plan", f, "-o", png], png, False),
        ("prune_plan", lambda f: ["prune", ckpt, "--plan", f, "--format", "json"], None, False),
    ]


def fuzz_documents(base: dict[str, Any], workdir: Path, seed: int, cases: int) -> Counter:
    rng = random.Random(seed)
    counts: collections.Counter[int] = collections.Counter()
    commands = _document_commands(base, workdir)
    src = workdir / "doc.json"
    for i in range(cases):
        kind, argv, out, stdin = commands[i % len(commands)]
        text = mutate_document(base[kind], rng)
        src.write_text(text)
        counts[run_case(argv(src), workdir, out, stdin=text if stdin else None)] += 1
    return counts


# ------------------------------------------------------------------------------------------
# The runs


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_safetensors_headers(base: dict[str, Any], tmp_path: Path, seed: int) -> None:
    counts = fuzz_safetensors(base, tmp_path, seed, FAST_CASES)
    report(f"safetensors seed {seed}", counts)
    assert counts[2] > 0  # the mutations do reach the error paths


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_documents(base: dict[str, Any], tmp_path: Path, seed: int) -> None:
    counts = fuzz_documents(base, tmp_path, seed, FAST_CASES)
    report(f"documents seed {seed}", counts)
    assert counts[2] > 0


@pytest.mark.slow
def test_fuzz_safetensors_headers_long(base: dict[str, Any], tmp_path: Path) -> None:
    counts = fuzz_safetensors(base, tmp_path, SLOW_SEED, SLOW_CASES)
    report("safetensors long", counts)


@pytest.mark.slow
def test_fuzz_documents_long(base: dict[str, Any], tmp_path: Path) -> None:
    counts = fuzz_documents(base, tmp_path, SLOW_SEED, SLOW_CASES)
    report("documents long", counts)
