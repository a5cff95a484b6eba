"""End-to-end tests of ``htsr analyze``: real subprocesses, real files, no mocks.

Every run is ``python -m htsr_cli analyze ...`` in a fresh interpreter, so each costs about a
second and a half of torch import. To stay fast, runs that do not depend on each other are
started together (``run_many``) in module-scoped fixtures, and the tests assert on the results.

Contract checked throughout (docs/gates.md, htsr_cli/cli/app.py):

- exit 0 ok, 1 a ``--fail-if`` gate failed, 2 usage or input error;
- an error is exactly one line on stderr, ``htsr: error: ...``, never a traceback;
- ``-o FILE`` is written atomically: a failed run leaves no output, no temp file, and an
  existing file untouched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clirunner
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from htsr_cli.assets import default_checkpoint

METRICS = (
    "alpha",
    "rand_distance",
    "stable_rank",
    "entropy",
    "norm",
    "log_norm",
    "spectral_norm",
    "log_spectral_norm",
    "alpha_weighted",
    "log_alpha_norm",
)
LAYER_KEYS = (
    "N",
    "M",
    "Q",
    "rf",
    "num_evals",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "num_pl_spikes",
    "matrix_rank",
    "status",
    "warning",
)
DEMO_LAYERS = {
    "features.0",
    "features.2",
    "features.6",
    "classifier.0",
    "classifier.3",
    "classifier.5",
}
# The test checkpoint (see ``_state_dict``): four weight matrices, 27/48/10/20 eigenvalues.
MODEL_LAYERS = {"features.0", "classifier.0", "classifier.2", "dead"}
ALIVE_LAYERS = MODEL_LAYERS - {"dead"}  # "dead" is all zeros: its power-law fit fails
OLD = "OLD CONTENT, must survive a failed run\n"
ANSI = re.compile(r"\x1b\[")
TIMEOUT = 180


# --------------------------------------------------------------------------------------------
# Running the CLI


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "NO_COLOR",
            "FORCE_COLOR",
            "CLICOLOR_FORCE",
            "TTY_COMPATIBLE",
            "TTY_INTERACTIVE",
            "COLUMNS",
            "LINES",
        )
    }
    # One BLAS/OpenMP thread per process: runs go in parallel, and on small machines threaded
    # LAPACK (eigvalsh) on these tiny matrices is far slower than a single thread.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(extra)
    return env


def htsr(
    *args: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    sub: str = "analyze",
) -> subprocess.CompletedProcess[str]:
    """``htsr SUB ARGS`` through the real CLI entry point, in process (clirunner); stdin
    empty, stdout/stderr captured (not a TTY). ``htsr_process`` runs a real subprocess, and
    so does a run whose environment puts a module on PYTHONPATH (the pickle payload must be
    importable for a refusal to mean anything)."""
    if env is not None and "PYTHONPATH" in env:
        return htsr_process(*args, env=env, cwd=cwd, sub=sub)
    return clirunner.run([*([sub] if sub else []), *args], env=env or _env(), cwd=cwd)


def htsr_process(
    *args: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    sub: str = "analyze",
) -> subprocess.CompletedProcess[str]:
    """``python -m htsr_cli SUB ARGS`` in a new process: for what only a process shows."""
    cmd = [sys.executable, "-m", "htsr_cli", *([sub] if sub else []), *map(str, args)]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env or _env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )


def run_many(
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run ``htsr(*args, **kwargs)`` for every entry concurrently; results by key."""
    workers = max(2, min(len(calls), os.cpu_count() or 2, 12))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(htsr, *args, **kwargs) for key, (args, kwargs) in calls.items()}
        return {key: fut.result() for key, fut in futures.items()}


def call(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def run_in_pty(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run with stdout on a pseudo-terminal (stderr a pipe); (rc, stdout, stderr)."""
    return clirunner.run_in_pty(args, env, timeout=TIMEOUT)


def assert_ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "htsr: error" not in proc.stderr, proc.stderr


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one ``htsr: error:`` line on stderr naming every needle."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stderr.endswith("\n"), proc.stderr
    line = lines[0]
    assert line.startswith("htsr: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity (not JSON, though Python writes them)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON constant {token!r} in the output")

    return json.loads(text, parse_constant=refuse)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def layer_names(doc: dict[str, Any]) -> list[str]:
    return [row["name"] for row in doc["layers"]]


# --------------------------------------------------------------------------------------------
# Checkpoints


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3))
        self.classifier = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _state_dict() -> dict[str, torch.Tensor]:
    """features.0 conv (27 eigenvalues), classifier.0 (48), classifier.2 (10), a zero matrix
    ``dead`` (20; its fit fails, so several metrics are NaN) and a 1-D ``norm.weight``."""
    torch.manual_seed(1234)
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in _Net().state_dict().items())
    sd["dead.weight"] = torch.zeros(20, 30)
    sd["norm.weight"] = torch.ones(5)
    return sd


_PAYLOAD_MODULE = "htsr_test_payload"
_PAYLOAD_SOURCE = '''
class Payload:
    """Something torch.load(weights_only=True) refuses to build."""

    def __init__(self, value):
        self.value = value
'''


@dataclass
class Files:
    root: Path
    st: Path  # model.safetensors
    pt: Path  # model.pt, same tensors
    sha: dict[str, str] = field(default_factory=dict)  # file name -> sha256 at creation
    mtime: dict[str, int] = field(default_factory=dict)  # file name -> st_mtime_ns
    pickle_pt: Path | None = None  # needs code to unpickle
    pythonpath: str = ""  # where the payload class lives

    def pickle_env(self, **extra: str) -> dict[str, str]:
        paths = [self.pythonpath, os.environ.get("PYTHONPATH", "")]
        return _env(PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("ckpt")
    sd = _state_dict()
    st, pt = root / "model.safetensors", root / "model.pt"
    save_file(sd, str(st))
    torch.save(sd, pt)
    f = Files(root=root, st=st, pt=pt)

    # Broken and odd inputs.
    data = st.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    data = pt.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.safetensors").write_bytes(bytes(range(256)) * 16)
    (root / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    (root / "empty_dir").mkdir()
    save_file(
        {"norm.weight": torch.ones(8), "head.bias": torch.zeros(3)},
        str(root / "vectors.safetensors"),
    )

    # A torch file that pickles an instance of a user class (importable via PYTHONPATH).
    code_dir = root / "code"
    code_dir.mkdir()
    (code_dir / f"{_PAYLOAD_MODULE}.py").write_text(_PAYLOAD_SOURCE)
    sys.path.insert(0, str(code_dir))
    try:
        module = __import__(_PAYLOAD_MODULE)
        obj = {"state_dict": sd, "extra": module.Payload(42)}
        f.pickle_pt = root / "pickled.pt"
        torch.save(obj, f.pickle_pt)
    finally:
        sys.path.remove(str(code_dir))
        sys.modules.pop(_PAYLOAD_MODULE, None)
    f.pythonpath = str(code_dir)

    for p in (st, pt, f.pickle_pt):
        f.sha[p.name] = sha256(p)
        f.mtime[p.name] = p.stat().st_mtime_ns
    return f


def test_checkpoint_fixture_is_what_the_tests_assume(files: Files) -> None:
    sd = _state_dict()
    matrices = {
        k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2
    }
    assert matrices == MODEL_LAYERS


# --------------------------------------------------------------------------------------------
# 1. No argument: the built-in demo checkpoint


@pytest.fixture(scope="module")
def demo_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    return run_many(
        {
            "json": call("--format", "json"),  # no CKPT argument: the demo checkpoint
            "table": call("--format", "table"),
            "min_evals": call("--format", "json", "--metrics", "alpha", "--min-evals", "100"),
            "glob_gate": call("--metrics", "alpha", "--fail-if", "alpha > 0 on 'classifier.*'"),
        }
    )


def test_demo_checkpoint_json_document(demo_runs: dict) -> None:
    proc = demo_runs["json"]
    assert_ok(proc)
    assert proc.stderr == ""
    doc = strict_json(proc.stdout)
    assert doc["schema"] == "htsr.analysis/1"
    assert sorted(layer_names(doc)) == sorted(DEMO_LAYERS)
    assert doc["skipped"] == []
    for row in doc["layers"]:
        missing = [k for k in (*METRICS, *LAYER_KEYS) if k not in row]
        assert not missing, (row["name"], missing)
    by_name = {row["name"]: row for row in doc["layers"]}
    conv0 = by_name["features.0"]
    assert conv0["num_evals"] == 9
    assert "small sample" in conv0["warning"]
    demo = default_checkpoint()
    (entry,) = doc["source"]["files"]
    assert Path(entry["path"]).resolve() == demo.resolve()
    assert entry["sha256"] == sha256(demo)
    assert entry["bytes"] == demo.stat().st_size
    assert doc["source"]["format"] == "safetensors"


def test_min_evals_skips_small_layers_and_lists_them(demo_runs: dict) -> None:
    proc = demo_runs["min_evals"]
    assert_ok(proc)
    doc = strict_json(proc.stdout)
    skipped = {rec["name"]: rec["reason"] for rec in doc["skipped"]}
    # features.0 has 9 eigenvalues, classifier.5 has 10; the others have 128 or more.
    assert set(skipped) == {"features.0", "classifier.5"}
    assert all("min-evals" in reason for reason in skipped.values()), skipped
    assert set(layer_names(doc)) == DEMO_LAYERS - set(skipped)
    assert doc["options"]["min_evals"] == 100


def test_gate_restricted_by_glob_lists_only_matching_layers(demo_runs: dict) -> None:
    proc = demo_runs["glob_gate"]
    assert_ok(proc, code=1)
    (line,) = proc.stderr.splitlines()
    assert line.startswith("FAIL"), line
    named = set(re.findall(r"(?:features|classifier)\.\d+", line))
    assert named == {"classifier.0", "classifier.3", "classifier.5"}, line


def test_demo_table_with_all_metrics_keeps_layer_names_whole(demo_runs: dict) -> None:
    # Off a terminal, with all ten metric columns, names must not be folded ("classifier"/".0").
    proc = demo_runs["table"]
    assert_ok(proc)
    for name in DEMO_LAYERS:
        assert name in proc.stdout, name
    assert not ANSI.search(proc.stdout)


# --------------------------------------------------------------------------------------------
# 2. Output formats (+ 8. the input is never modified)


@pytest.fixture(scope="module")
def format_runs(files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("formats")
    existing = out / "existing.csv"
    existing.write_text(OLD)
    existing.chmod(0o640)
    runs: dict[str, Any] = run_many(
        {
            "json_st": call(files.st, "--format", "json"),
            "json_pt": call(files.pt, "--format", "json"),
            "csv": call(files.st, "--format", "csv", "--min-evals", "25"),
            "ndjson": call(files.pt, "--format", "ndjson", "--min-evals", "25"),
            "table": call(
                files.st, "--format", "table", "--metrics", "alpha", env=_env(NO_COLOR="1")
            ),
            "ext_csv": call(files.st, "--metrics", "alpha", "-o", existing),
            "ext_txt": call(files.st, "--metrics", "alpha", "-o", out / "r.txt"),
            "dev_null": call(files.st, "--metrics", "alpha", "-o", "/dev/null"),
        }
    )
    runs["dir"] = out
    runs["existing"] = existing
    return runs


def test_json_safetensors_and_torch_give_the_same_layers(format_runs: dict, files: Files) -> None:
    docs = {}
    for key, path, fmt in (("json_st", files.st, "safetensors"), ("json_pt", files.pt, "torch")):
        proc = format_runs[key]
        assert_ok(proc)
        assert proc.stderr == ""
        doc = strict_json(proc.stdout)  # NaN never appears as a token
        assert doc["schema"] == "htsr.analysis/1"
        assert doc["source"]["format"] == fmt
        (entry,) = doc["source"]["files"]
        assert entry["sha256"] == files.sha[path.name]
        assert set(layer_names(doc)) == MODEL_LAYERS
        docs[fmt] = {row["name"]: row for row in doc["layers"]}
    for name in MODEL_LAYERS:
        st_row, pt_row = docs["safetensors"][name], docs["torch"][name]
        for key in (*METRICS, "N", "M", "rf", "num_evals", "status"):
            assert st_row[key] == pytest.approx(pt_row[key], nan_ok=True), (name, key)


def test_json_failed_fit_is_null_not_nan(format_runs: dict) -> None:
    doc = strict_json(format_runs["json_st"].stdout)
    dead = next(row for row in doc["layers"] if row["name"] == "dead")
    assert dead["status"] == "failed"
    assert dead["alpha"] is None
    assert dead["norm"] == 0.0
    assert dead["log_norm"] is None  # log10(0) = -inf: not JSON either
    assert dead["num_evals"] == 20
    alive = [row for row in doc["layers"] if row["name"] != "dead"]
    assert all(isinstance(row["alpha"], float) for row in alive)
    # The summary ignores the failed layer rather than becoming null.
    assert isinstance(doc["summary"]["alpha"], float)


def test_csv(format_runs: dict) -> None:
    proc = format_runs["csv"]
    assert_ok(proc)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    header = proc.stdout.splitlines()[0].split(",")
    assert header[0] == "name"
    assert set(METRICS) <= set(header)
    # min-evals 25: classifier.2 (10) and dead (20) are skipped rows; nothing is dropped.
    assert len(rows) == len(MODEL_LAYERS)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == MODEL_LAYERS
    assert by_name["classifier.2"]["status"] == "skipped"
    assert "min-evals" in by_name["classifier.2"]["warning"]
    assert by_name["dead"]["status"] == "skipped"
    for name in ("features.0", "classifier.0"):
        assert by_name[name]["status"] == "success"
        assert float(by_name[name]["alpha"]) > 0
    assert "nan" not in proc.stdout.lower()


def test_ndjson(format_runs: dict) -> None:
    proc = format_runs["ndjson"]
    assert_ok(proc)
    assert proc.stdout.endswith("\n")
    records = [strict_json(line) for line in proc.stdout.splitlines()]
    *body, summary = records
    assert summary["record"] == "summary"
    assert summary["schema"] == "htsr.analysis/1"
    assert "layers" not in summary and "skipped" not in summary
    kinds = {rec["name"]: rec["record"] for rec in body}
    assert all(rec["record"] in ("layer", "skipped") for rec in body)
    assert len(body) == len(MODEL_LAYERS) and set(kinds) == MODEL_LAYERS
    assert kinds == {
        "features.0": "layer",
        "classifier.0": "layer",
        "classifier.2": "skipped",
        "dead": "skipped",
    }
    # torch files keep state-dict order.
    assert [rec["name"] for rec in body] == ["features.0", "classifier.0", "classifier.2", "dead"]


def test_table_in_a_pipe_when_asked_with_no_color(format_runs: dict) -> None:
    proc = format_runs["table"]  # run with NO_COLOR=1
    assert_ok(proc)
    for name in MODEL_LAYERS:
        assert name in proc.stdout, name
    assert "alpha" in proc.stdout
    assert not ANSI.search(proc.stdout), repr(proc.stdout[:200])
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


def test_output_extension_chooses_the_format_and_replaces_atomically(format_runs: dict) -> None:
    out, existing = format_runs["dir"], format_runs["existing"]
    assert_ok(format_runs["ext_csv"])
    assert format_runs["ext_csv"].stdout == ""
    text = existing.read_text()
    assert OLD not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {row["name"] for row in rows} == MODEL_LAYERS
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # replaced, mode kept

    assert_ok(format_runs["ext_txt"])
    assert "classifier.0" in (out / "r.txt").read_text()

    assert temp_files(out) == []


def test_output_to_dev_null(format_runs: dict) -> None:
    proc = format_runs["dev_null"]
    assert_ok(proc)
    assert proc.stdout == ""
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_input_files_are_never_modified(format_runs: dict, files: Files) -> None:
    # format_runs analysed both files (all ten metrics) several times, in parallel.
    assert format_runs["json_st"].returncode == format_runs["json_pt"].returncode == 0
    for p in (files.st, files.pt):
        assert sha256(p) == files.sha[p.name]
        assert p.stat().st_mtime_ns == files.mtime[p.name]


# --------------------------------------------------------------------------------------------
# 3. Pipes


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs /bin/bash for pipefail")
def test_json_through_a_shell_pipe(files: Files, tmp_path: Path) -> None:
    py = shlex.quote(sys.executable)
    reader = "import json,sys; d=json.load(sys.stdin); print(d['schema'], len(d['layers']))"
    script = (
        f"set -o pipefail; {py} -m htsr_cli analyze {shlex.quote(str(files.st))} "
        f"--format json --metrics alpha 2>err.txt | tee out.json "
        f"| {py} -c {shlex.quote(reader)}"
    )
    proc = subprocess.run(
        script,
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["htsr.analysis/1", str(len(MODEL_LAYERS))]
    assert (tmp_path / "err.txt").read_text() == ""  # no progress bar or notes in a pipe
    # stdout carried exactly one JSON document and nothing else.
    doc = strict_json((tmp_path / "out.json").read_text())
    assert set(layer_names(doc)) == MODEL_LAYERS


def test_ctrl_c_gives_exit_130_and_one_line(tmp_path: Path) -> None:
    """SIGINT while layers are being computed (two at once): exit 130, the one line
    'htsr: interrupted' on stderr, only whole NDJSON lines on stdout, no -o file left behind."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "many.safetensors"
    save_file({f"l{i}.weight": torch.randn(700, 600, generator=gen) for i in range(40)}, str(path))
    for target in (None, tmp_path / "report.json"):
        out_args = ["-o", str(target)] if target else []
        cmd = [
            sys.executable,
            "-m",
            "htsr_cli",
            "analyze",
            str(path),
            "--format",
            "ndjson",
            "--jobs",
            "2",
            "--no-progress",
            *out_args,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )
        assert proc.stdout is not None
        if target is None:
            first = proc.stdout.readline()  # a layer is done: the walk is under way
            assert json.loads(first)["record"] == "layer"
        else:  # -o streams NDJSON into a temporary file beside the target: wait for a line
            deadline = time.monotonic() + TIMEOUT
            while not any(p.name != path.name and p.stat().st_size > 0 for p in tmp_path.iterdir()):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 130, (proc.returncode, err)
        assert err == "htsr: interrupted\n", err
        assert all(json.loads(line)["record"] == "layer" for line in out.splitlines())
        if target is not None:
            assert sorted(p.name for p in tmp_path.iterdir()) == ["many.safetensors"]


def test_reader_that_goes_away_is_not_a_gate_failure(files: Files) -> None:
    # typer turns EPIPE into exit 1 (the gate-failed code) unless htsr handles it first;
    # htsr_cli/errors.py documents 141 (128 + SIGPIPE), quietly, like any Unix filter.
    cmd = [
        sys.executable,
        "-m",
        "htsr_cli",
        "analyze",
        str(files.st),
        "--format",
        "ndjson",
        "--metrics",
        "alpha",
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=TIMEOUT)
    assert "Traceback" not in err, err
    assert err == ""
    assert rc == 141, (rc, err)


# --------------------------------------------------------------------------------------------
# 4 + 5. Bad input: exit 2, one line, and -o left alone


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # "{root}" is replaced by the checkpoint directory
    needles: tuple[str, ...]
    existing_output: bool = False  # -o points at a file with old content (else a fresh path)
    pickle_env: bool = False


BAD: dict[str, Bad] = {
    "missing-path": Bad(("{root}/nope.safetensors",), ("nope.safetensors", "does not exist")),
    "empty-directory": Bad(("{root}/empty_dir",), ("empty_dir", "empty directory")),
    "truncated-safetensors": Bad(
        ("{root}/truncated.safetensors",), ("truncated.safetensors",), existing_output=True
    ),
    "random-bytes-safetensors": Bad(("{root}/random.safetensors",), ("random.safetensors",)),
    "truncated-pt": Bad(("{root}/truncated.pt",), ("truncated.pt",), existing_output=True),
    "unknown-extension": Bad(("{root}/model.onnx",), ("model.onnx",)),
    "no-weight-matrix": Bad(
        ("{root}/vectors.safetensors",), ("vectors.safetensors", "no weight matrix")
    ),
    "needs-trust-pickle": Bad(
        ("{root}/pickled.pt",), ("pickled.pt", "--trust-pickle"), pickle_env=True
    ),
    "unknown-metric": Bad(("{root}/model.safetensors", "--metrics", "alpha,foo"), ("foo",)),
    "unknown-fit": Bad(
        ("{root}/model.safetensors", "--fit", "bar"), ("bar",), existing_output=True
    ),
    "device-cuda-absent": Bad(("{root}/model.safetensors", "--device", "cuda"), ("cuda",)),
    "unknown-option": Bad(
        ("{root}/model.safetensors", "--bogus"), ("--bogus",), existing_output=True
    ),
    "bad-int-option": Bad(("{root}/model.safetensors", "--min-evals", "many"), ("--min-evals",)),
    "jobs-zero": Bad(("{root}/model.safetensors", "--jobs", "0"), ("--jobs",)),
    "layers-match-nothing": Bad(
        ("{root}/model.safetensors", "--layers", "nomatch*"), ("no layer matches", "nomatch*")
    ),
    "malformed-gate": Bad(
        ("{root}/model.safetensors", "--fail-if", "alpha >> 6"),
        ("alpha >> 6", "malformed"),
        existing_output=True,
    ),
    "gate-metric-not-computed": Bad(
        ("{root}/model.safetensors", "--metrics", "alpha", "--fail-if", "stable_rank > 1"),
        ("stable_rank", "--metrics"),
    ),
}


@pytest.fixture(scope="module")
def bad_runs(files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    outdirs = tmp_path_factory.mktemp("bad_outputs")
    calls = {}
    for key, case in BAD.items():
        outdir = outdirs / key
        outdir.mkdir()
        target = outdir / "report.json"
        if case.existing_output:
            target.write_text(OLD)
        args = [a.replace("{root}", str(files.root)) for a in case.args]
        env = files.pickle_env() if case.pickle_env else None
        calls[key] = call(*args, "-o", target, env=env)
    nodir = outdirs / "no-such-dir" / "r.json"
    calls["output-directory-missing"] = call(files.st, "-o", nodir)
    runs: dict[str, Any] = run_many(calls)
    runs["outdirs"] = outdirs
    return runs


@pytest.mark.parametrize("key", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(key: str, bad_runs: dict) -> None:
    if key == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    case = BAD[key]
    proc = bad_runs[key]
    assert_one_line_error(proc, *case.needles)
    assert proc.stdout == ""
    outdir = bad_runs["outdirs"] / key
    if case.existing_output:
        # Untouched, and no stray temporary file beside it.
        assert sorted(p.name for p in outdir.iterdir()) == ["report.json"]
        assert (outdir / "report.json").read_text() == OLD
    else:
        assert list(outdir.iterdir()) == []


def test_output_onto_the_input_is_refused(files: Files, tmp_path: Path) -> None:
    """-o naming the checkpoint itself, or a checkpoint file of an input directory: exit 2,
    one line, the input untouched (htsr never modifies its input)."""
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(files.st.read_bytes())
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(files.st.read_bytes())
    before = ckpt.read_bytes()
    procs = run_many(
        {
            "file": call(ckpt, "-o", ckpt),
            "dir": call(hf, "--format", "json", "-o", hf / "model.safetensors"),
        }
    )
    for proc in procs.values():
        assert_one_line_error(proc, "is an input file")
    assert ckpt.read_bytes() == before == (hf / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.safetensors"]
    assert [p.name for p in hf.iterdir()] == ["model.safetensors"]


def test_output_into_a_missing_directory(bad_runs: dict) -> None:
    proc = bad_runs["output-directory-missing"]
    assert_one_line_error(proc, "no-such-dir", "does not exist")
    assert not (bad_runs["outdirs"] / "no-such-dir").exists()


def test_trust_pickle_loads_a_file_that_needs_code(files: Files) -> None:
    proc = htsr(
        files.pickle_pt,
        "--trust-pickle",
        "--format",
        "json",
        "--metrics",
        "alpha",
        env=files.pickle_env(),
    )
    assert_ok(proc)
    doc = strict_json(proc.stdout)
    assert set(layer_names(doc)) == MODEL_LAYERS
    assert sha256(files.pickle_pt) == files.sha["pickled.pt"]


# --------------------------------------------------------------------------------------------
# 6. Gates


@pytest.fixture(scope="module")
def gate_runs(files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gates")
    runs: dict[str, Any] = run_many(
        {
            "pass": call(
                files.st,
                "--metrics",
                "alpha",
                "--fail-if",
                "alpha > 100",
                "--fail-if",
                "count(alpha > 0) > 100",
            ),
            "per_layer": call(
                files.st,
                "--metrics",
                "alpha",
                "--fail-if",
                "alpha > 0",
                "--format",
                "json",
                "-o",
                out / "r.json",
            ),
            "mean": call(files.st, "--metrics", "alpha", "--fail-if", "mean(alpha) > 0"),
        }
    )
    runs["dir"] = out
    return runs


def test_passing_gates_exit_0(gate_runs: dict) -> None:
    proc = gate_runs["pass"]
    assert_ok(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("ok") for line in lines), lines
    assert strict_json(proc.stdout)["schema"] == "htsr.analysis/1"


def test_failing_per_layer_gate_exit_1_lists_offenders_and_still_writes_report(
    gate_runs: dict,
) -> None:
    proc = gate_runs["per_layer"]
    assert_ok(proc, code=1)
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("FAIL alpha > 0"), line
    for name in ALIVE_LAYERS:
        assert name in line, (name, line)
    assert "dead" not in line  # a failed fit (NaN) never trips a per-layer condition
    doc = strict_json((gate_runs["dir"] / "r.json").read_text())
    (gate,) = doc["gates"]
    assert gate["gate"] == "alpha > 0"
    assert gate["passed"] is False
    assert {o["name"] for o in gate["offending"]} == ALIVE_LAYERS
    assert temp_files(gate_runs["dir"]) == []


def test_failing_aggregate_gate_exit_1(gate_runs: dict) -> None:
    proc = gate_runs["mean"]
    assert_ok(proc, code=1)
    (line,) = proc.stderr.splitlines()
    assert line.startswith("FAIL mean(alpha) > 0"), line
    assert strict_json(proc.stdout)["gates"][0]["passed"] is False


# --------------------------------------------------------------------------------------------
# 7. Selecting metrics and layers


@pytest.fixture(scope="module")
def select_runs(files: Files) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_many(
        {
            "metrics": call(files.st, "--format", "json", "--metrics", "stable_rank, alpha"),
            "layers": call(
                files.st,
                "--format",
                "json",
                "--metrics",
                "alpha",
                "--layers",
                "classifier.*",
                "--exclude",
                "*.2",
            ),
            "repeat": call(
                files.pt,
                "--format",
                "json",
                "--metrics",
                "alpha",
                "--layers",
                "features.*",
                "--layers",
                "dead",
            ),
        }
    )


def test_metrics_subset(select_runs: dict) -> None:
    proc = select_runs["metrics"]
    assert_ok(proc)
    doc = strict_json(proc.stdout)
    assert doc["options"]["metrics"] == ["alpha", "stable_rank"]
    assert set(doc["summary"]) == {"alpha", "stable_rank"}
    for row in doc["layers"]:
        assert "alpha" in row and "stable_rank" in row
        assert not set(row) & (set(METRICS) - {"alpha", "stable_rank"}), sorted(row)
        assert "rand_distance" not in row


def test_layers_and_exclude_globs(select_runs: dict) -> None:
    for key, expected in (("layers", ["classifier.0"]), ("repeat", ["features.0", "dead"])):
        proc = select_runs[key]
        assert_ok(proc)
        doc = strict_json(proc.stdout)
        assert layer_names(doc) == expected, key
        assert doc["skipped"] == []


# --------------------------------------------------------------------------------------------
# 9. --seed


def test_seed_makes_rand_distance_reproducible(files: Files) -> None:
    procs = run_many(
        {
            key: call(files.st, "--format", "json", "--metrics", "rand_distance", "--seed", seed)
            for key, seed in (("a", "7"), ("b", "7"), ("c", "8"))
        }
    )
    values = {}
    for key, proc in procs.items():
        assert_ok(proc)
        doc = strict_json(proc.stdout)
        assert doc["options"]["seed"] == (7 if key in "ab" else 8)
        values[key] = {row["name"]: row["rand_distance"] for row in doc["layers"]}
    assert values["a"] == values["b"]
    assert any(values["a"][name] != values["c"][name] for name in ALIVE_LAYERS), values


def test_jobs_change_nothing_but_speed(files: Files) -> None:
    """Layers analysed one at a time or three at once: same document, same streaming order."""
    procs = run_many(
        {jobs: call(files.st, "--format", "ndjson", "--jobs", jobs) for jobs in ("1", "3")}
    )
    lines = {}
    for jobs, proc in procs.items():
        assert_ok(proc)
        lines[jobs] = [json.loads(line) for line in proc.stdout.splitlines()]
    one, three = lines["1"], lines["3"]
    assert [r.get("name") for r in one] == [r.get("name") for r in three]
    for a, b in zip(one, three, strict=True):
        a.pop("source", None), b.pop("source", None)
        _assert_close(a, b, where=str(a.get("name")))


def _assert_close(a: Any, b: Any, where: str) -> None:
    """Equal documents up to float rounding (BLAS thread counts may change the last bits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------
# 10. Help


def test_help_mentions_gates_and_exit_codes() -> None:
    env = _env(COLUMNS="200")
    procs = run_many({"root": call("--help", env=env, sub=""), "analyze": call("--help", env=env)})
    for key, proc in procs.items():
        assert_ok(proc)
        text = " ".join(proc.stdout.split())
        assert "Exit codes: 0 ok, 1 a --fail-if gate failed, 2 usage or input error" in text, key
        if key == "root":
            assert "analyze" in text
        else:
            assert "--fail-if" in text and "--trust-pickle" in text


# --------------------------------------------------------------------------------------------
# 11. Colour


@pytest.fixture(scope="module")
def tty_runs(files: Files) -> dict[str, tuple[int, str, str]]:
    cmd = [sys.executable, "-m", "htsr_cli", "analyze", str(files.st), "--metrics", "alpha"]
    envs = {
        "color": _env(TERM="xterm-256color"),
        "no_color": _env(TERM="xterm-256color", NO_COLOR="1"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run_in_pty, cmd, env) for key, env in envs.items()}
        return {key: fut.result() for key, fut in futures.items()}


def test_terminal_gets_a_coloured_table_by_default(tty_runs: dict) -> None:
    rc, out, err = tty_runs["color"]
    assert rc == 0, err
    assert "Traceback" not in err
    assert ANSI.search(out)  # the harness really gives the CLI a terminal
    assert "classifier.0" in out


def test_no_color_on_a_terminal_has_no_escape_sequences(tty_runs: dict) -> None:
    rc, out, err = tty_runs["no_color"]
    assert rc == 0, err
    assert "classifier.0" in out
    assert not ANSI.search(out), repr(out[:200])
