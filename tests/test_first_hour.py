"""The first hour of a new user (issue 14): the table fits the terminal, checkpoints load as
people save them (training dicts, Lightning, the Hugging Face cache), the zoo and the exit codes
are discoverable, the Python API reads like the documents, pipes work everywhere, pruned
Hugging Face directories stay loadable, and the wording is right.

Real files, real subprocesses where the process matters (a terminal, a pipe), the CLI in
process otherwise (tests/clirunner.py). Oracles: hand computations, the plain state dict the
checkpoint was made from, WeightWatcher's own column names, published parameter counts.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import clirunner
import pytest
import torch
from rich.cells import cell_len
from safetensors.torch import save_file
from torch import nn

from htsr_cli import analyze
from htsr_cli.assets import default_checkpoint
from htsr_cli.io.checkpoint import open_checkpoint

TIMEOUT = 300
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEMO = str(default_checkpoint())
DEMO_LAYERS = (
    "features.0",
    "features.2",
    "features.6",
    "classifier.0",
    "classifier.3",
    "classifier.5",
)
# The table's headers of the ten metrics (short where the name is long).
METRIC_HEADERS = {
    "alpha": "alpha",
    "rand_distance": "rand_dist",
    "stable_rank": "srank",
    "entropy": "entropy",
    "norm": "norm",
    "log_norm": "log_norm",
    "spectral_norm": "spec_norm",
    "log_spectral_norm": "log_spec_norm",
    "alpha_weighted": "alpha_w",
    "log_alpha_norm": "log_alpha_norm",
}
EXIT_CODES = ("0 ok", "1 ", "2 usage", "3 internal error", "130 ", "141 ")


def _env(**extra: str) -> dict[str, str]:
    drop = ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "HF_HOME", "HF_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def run_in_pty(args: list[str], columns: int, env: dict[str, str]) -> tuple[int, str, str]:
    """Run with stdout on a pseudo-terminal ``columns`` wide (stderr a pipe)."""
    rc, out, err = clirunner.run_in_pty(args, env, columns=columns, timeout=TIMEOUT)
    return rc, out.replace("\r\n", "\n"), err


def htsr_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "htsr_cli", *map(str, args)]


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsr: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. A table that fits the terminal


@pytest.fixture(scope="module")
def demo() -> Any:
    """The demo checkpoint's analysis, computed in process: the oracle of the table's cells."""
    return analyze(DEMO, device="cpu")


@pytest.fixture(scope="module")
def tables() -> dict[str, tuple[int, str, str]]:
    env = _env(NO_COLOR="1", TERM="xterm-256color")
    runs = {
        "80": (htsr_cmd("analyze"), 80),
        "120": (htsr_cmd("analyze"), 120),
        "200": (htsr_cmd("analyze"), 200),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(run_in_pty, cmd, cols, env) for k, (cmd, cols) in runs.items()}
        return {k: f.result() for k, f in futures.items()}


def _header(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.split()[:2] == ["layer", "shape"])
    return line.split()


def _row(out: str, name: str) -> list[str]:
    return next(ln for ln in out.splitlines() if ln.split()[:1] == [name]).split()


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_table_fits_the_terminal_without_a_cut_cell(tables, demo, columns: int) -> None:
    rc, out, err = tables[str(columns)]
    assert rc == 0, err
    assert "Traceback" not in err
    assert "…" not in out and "..." not in out, out  # no cell cut short
    title, *lines = out.splitlines()
    assert title.startswith(DEMO)  # the source's path: text that may wrap, not a cell
    for line in lines:
        assert cell_len(ANSI.sub("", line)) <= columns, (columns, line)
    header = _header(out)
    assert header[:3] == ["layer", "shape", "alpha"], header
    shown = [m for m, h in METRIC_HEADERS.items() if h in header]
    assert "alpha" in shown and len(shown) >= 3, header  # alpha and 2-3 headline metrics
    for row in demo.layers:
        cells = _row(out, row["name"])
        assert cells[1] == f"{row['N']}×{row['M']}" + (f"·{row['rf']}" if row["rf"] > 1 else "")
        for m in shown:  # every metric cell is the analysis's value, rounded (not cut)
            got = float(cells[header.index(METRIC_HEADERS[m])])
            assert got == pytest.approx(row[m], abs=5e-4), (row["name"], m)


@pytest.mark.slow
def test_bert_names_still_leave_two_headline_metrics_at_80(tmp_path: Path) -> None:
    # BERT-base's longest layer names (39 characters) and 4-digit shapes.
    gen = torch.Generator().manual_seed(0)
    names = [f"encoder.layer.{i}.attention.output.dense" for i in range(12)]
    path = tmp_path / "bert.safetensors"
    save_file({f"{n}.weight": torch.randn(1000, 100, generator=gen) for n in names}, str(path))
    rc, out, err = run_in_pty(htsr_cmd("analyze", path), 80, _env(NO_COLOR="1"))
    assert rc == 0, err
    assert "…" not in out
    header = _header(out)
    assert header[:3] == ["layer", "shape", "alpha"]
    assert sum(h in header for h in METRIC_HEADERS.values()) >= 3, header
    assert all(n in out for n in names)
    assert all(cell_len(line) <= 80 for line in out.splitlines()[1:])


def test_wider_terminals_show_more_columns(tables) -> None:
    widths = [len(_header(tables[c][1])) for c in ("80", "120", "200")]
    assert widths[0] < widths[1] < widths[2], widths
    header = _header(tables["200"][1])
    assert all(h in header for h in METRIC_HEADERS.values()), header  # all ten at 200


def test_warnings_are_flags_explained_below_the_table(tables, demo) -> None:
    rc, out, _ = tables["80"]
    assert rc == 0
    assert _header(out)[-1] == "!"
    for row in demo.layers:
        cells = _row(out, row["name"])
        flags = cells[-1] if re.fullmatch(r"[UOSF]+", cells[-1]) else ""
        # Hand rule (docs/analysis-schema.md): U alpha > 6, O alpha < 2 after a good fit,
        # S fewer than 50 eigenvalues (the demo's small layers have 9 and 10).
        assert ("U" in flags) == (row["status"] == "success" and row["alpha"] > 6), row
        assert ("O" in flags) == (row["status"] == "success" and row["alpha"] < 2), row
        assert ("S" in flags) == (row["num_evals"] < 50), row
    assert "U  under-trained (alpha > 6): 1 layer" in out
    assert "S  small sample" in out and ": 2 layers" in out
    assert "small sample (9 eigenvalues)" not in out  # the full text only with --verbose


def test_verbose_prints_every_warning_in_full(demo) -> None:
    proc = clirunner.run(["analyze", "-f", "table", "--verbose"], env=_env())
    rc, out = proc.returncode, proc.stdout
    assert rc == 0, proc.stderr
    warned = [r for r in demo.layers if r["warning"]]
    assert warned
    for row in warned:
        assert f"{row['name']}: {row['warning']}" in out, row["name"]


def test_columns_picks_the_columns(demo) -> None:
    proc = clirunner.run(
        ["analyze", "--format", "table", "--columns", "alpha,D,num_evals"], env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    header = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["layer"]).split()
    assert header == ["layer", "alpha", "D", "num_evals", "!"], header
    for row in demo.layers:
        cells = _row(proc.stdout, row["name"])
        assert int(cells[3]) == row["num_evals"]
        assert float(cells[2]) == pytest.approx(row["D"], abs=5e-4)
    everything = clirunner.run(["analyze", "-f", "table", "--columns", "all"], env=_env())
    assert everything.returncode == 0
    assert "warning" in everything.stdout and "matrix_rank" in everything.stdout


def test_unknown_column_is_one_line_error_before_any_work() -> None:
    proc = clirunner.run(["analyze", "-f", "table", "--columns", "alpha,bogus"], env=_env())
    one_line_error(proc, "bogus", "alpha_weighted")
    assert proc.stdout == ""


def test_names_from_the_file_are_shown_literally(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    names = ["[bold]x[/bold]", "evil\x1b[31mred", "[link=http://x]y"]
    path = tmp_path / "odd.safetensors"
    save_file({f"{n}.weight": torch.randn(80, 60, generator=gen) for n in names}, str(path))
    proc = clirunner.run(["analyze", path, "-f", "table", "--verbose"], env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "[bold]x[/bold]" in proc.stdout
    assert "[link=http://x]y" in proc.stdout
    assert "\x1b" not in proc.stdout and "evil\\x1b[31mred" in proc.stdout


# --------------------------------------------------------------------------------------------
# 2. Checkpoints as people save them


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.Linear(96, 10))
    return {k: v.clone() for k, v in model.state_dict().items()}


LAYOUTS = {
    "tutorial": lambda sd: {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {}},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 1},
    "model": lambda sd: {"model": sd, "args": {"lr": 0.1}},
    "module": lambda sd: {"module": sd},
    "net": lambda sd: {"net": sd, "acc": 0.9},
    "ema": lambda sd: {"ema": sd, "step": 100},
    "nested-ema-module": lambda sd: {"ema": {"module": sd}, "step": 100},
    "nested-any": lambda sd: {"checkpoint": {"model": sd}, "epoch": 2},
    "lightning": lambda sd: {
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "pytorch-lightning_version": "2.4.0",
        "epoch": 5,
        "optimizer_states": [],
    },
    "one-entry": lambda sd: {"epoch": 3, "weights": sd},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_state_dict_found_where_people_keep_it(tmp_path: Path, layout: str) -> None:
    sd = _state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(LAYOUTS[layout](sd), path)
    with open_checkpoint(str(path)) as ckpt:
        assert [r.key for r in ckpt.tensors()] == list(sd)  # Lightning's model. prefix gone
        for k, v in sd.items():
            assert torch.equal(ckpt.load(k), v)


def test_cli_reads_the_tutorial_layout_like_the_plain_state_dict(tmp_path: Path) -> None:
    sd = _state_dict()
    path = tmp_path / "tutorial.pt"
    torch.save(LAYOUTS["tutorial"](sd), path)
    proc = clirunner.run(["analyze", path, "-f", "json", "--metrics", "alpha"], env=_env())
    assert proc.returncode == 0, proc.stderr
    oracle = analyze(sd, metrics=["alpha"], device="cpu")  # the plain state dict
    got = {r["name"]: r["alpha"] for r in json.loads(proc.stdout)["layers"]}
    assert got == pytest.approx({r["name"]: r["alpha"] for r in oracle.layers}, rel=1e-9)


def test_key_picks_the_state_dict_explicitly(tmp_path: Path) -> None:
    sd = _state_dict()
    ema = {k: v * 0.5 for k, v in sd.items()}
    path = tmp_path / "both.pt"
    torch.save({"model": sd, "ema": ema, "deep": {"inner": ema}}, path)
    with open_checkpoint(str(path)) as ckpt:  # the model's own weights by default
        assert torch.equal(ckpt.load("0.weight"), sd["0.weight"])
    for key in ("ema", "deep/inner", "deep.inner"):
        with open_checkpoint(str(path), key=key) as ckpt:
            assert torch.equal(ckpt.load("0.weight"), ema["0.weight"]), key
    proc = clirunner.run(
        ["analyze", path, "--key", "ema", "-f", "json", "--metrics", "norm"], env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["source"]["key"] == "ema"
    # norm is the squared Frobenius norm: halving the weights quarters it (hand computation).
    for row in doc["layers"]:
        w = sd[f"{row['name']}.weight"].double()
        assert row["norm"] == pytest.approx(float((w * 0.5).pow(2).sum()), rel=1e-5)
    for argv in (
        ["allocate", path, "--key", "ema", "--lr", "0.1", "-f", "json"],
        ["plot", "esd", path, "--key", "ema", "-o", tmp_path / "esd.png"],
        ["prune", path, "--key", "ema", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors"],
    ):
        run = clirunner.run(argv, env=_env())
        assert run.returncode == 0, (argv, run.stderr)
    from safetensors.torch import load_file

    pruned = load_file(str(tmp_path / "p.safetensors"))  # the EMA weights, some zeroed
    kept = pruned["0.weight"] != 0
    assert torch.equal(pruned["0.weight"][kept], ema["0.weight"][kept]) and not kept.all()
    bad = clirunner.run(["analyze", path, "--key", "nope"], env=_env())
    one_line_error(bad, "--key 'nope'", "model, ema, deep")


def test_no_state_dict_lists_the_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "config": "x"}, path)
    proc = clirunner.run(["analyze", path], env=_env())
    one_line_error(proc, "top-level keys: epoch, optimizer, config", "--key")
    two = tmp_path / "two.pt"
    torch.save({"a": _state_dict(), "b": _state_dict()}, two)
    one_line_error(clirunner.run(["analyze", two], env=_env()), "several state dicts (a, b)")
    st = tmp_path / "m.safetensors"
    save_file(_state_dict(), str(st))
    one_line_error(clirunner.run(["analyze", st, "--key", "ema"], env=_env()), "safetensors")


def _hub_layout(cache: Path, repo: str, files: dict[str, bytes], commit: str) -> Path:
    """Lay files out as huggingface_hub does: blobs by content, snapshot symlinks, refs/main."""
    import hashlib

    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


def _tiny_hf_files(tmp: Path) -> dict[str, bytes]:
    """config.json and model.safetensors of a tiny random BERT (transformers), else a plain
    safetensors file."""
    out = tmp / "saved"
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        out.mkdir()
        save_file(_state_dict(), str(out / "model.safetensors"))
        (out / "config.json").write_text("{}")
    else:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        BertModel(config).save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.slow
def test_hugging_face_ids_resolve_from_the_local_cache(tmp_path: Path) -> None:
    files = _tiny_hf_files(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _hub_layout(tmp_path / "home" / "hub", "tiny-org/tiny-bert", files, commit)
    oracle = analyze(str(snap), metrics=["alpha"], device="cpu")
    expected = {r["name"]: r["alpha"] for r in oracle.layers}
    for env in (
        _env(HF_HOME=str(tmp_path / "home")),
        _env(HF_HUB_CACHE=str(tmp_path / "home" / "hub")),
    ):
        proc = clirunner.run(
            ["analyze", "tiny-org/tiny-bert", "-f", "json", "--metrics", "alpha"],
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert Path(doc["source"]["path"]) == snap
        assert {r["name"]: r["alpha"] for r in doc["layers"]} == pytest.approx(expected)
    missing = clirunner.run(
        ["analyze", "tiny-org/absent"], env=_env(HF_HOME=str(tmp_path / "home")), cwd=tmp_path
    )
    one_line_error(missing, str(tmp_path / "home" / "hub" / "models--tiny-org--absent"), "HF_HOME")


# --------------------------------------------------------------------------------------------
# 3. Discoverable


def test_models_lists_the_zoo_with_exact_parameter_counts() -> None:
    proc = clirunner.run(["models"], env=_env())  # not a terminal: JSON
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "htsr.models/1"
    rows = {r["name"]: r for r in doc["models"]}
    # Published counts: torchvision's resnet50 / mobilenet_v2 (1000 classes), and the CIFAR
    # ResNet-18 at 10 classes (11,173,962, the usual figure for this layout).
    assert rows["imagenet-resnet50"]["params"] == 25_557_032
    assert rows["imagenet-mobilenet_v2"]["params"] == 3_504_872
    assert rows["resnet18"]["params"] == 11_173_962
    assert rows["resnet18"]["input"] == "3x32x32" and rows["resnet18"]["dataset"]
    assert rows["imagenet-resnet18"]["input"] == "3x224x224"
    assert rows["imagenet-resnet18"]["dataset"] == "ImageNet"


@pytest.mark.slow
def test_models_table_fits_80_columns() -> None:
    rc, out, err = run_in_pty(htsr_cmd("models"), 80, _env(NO_COLOR="1"))
    assert rc == 0, err
    assert "…" not in out
    assert all(cell_len(line) <= 80 for line in out.splitlines() if "--arch" not in line)
    assert "imagenet-mobilenet_v2" in out and "3,504,872" in out


def test_shell_completion() -> None:
    shown = clirunner.run(["--show-completion", "bash"], env=_env())
    assert shown.returncode == 0 and "_HTSR_COMPLETE" in shown.stdout
    # The completion script's own protocol, answered by a real process.
    env = _env(_HTSR_COMPLETE="complete_bash", COMP_WORDS="htsr anal", COMP_CWORD="1")
    proc = subprocess.run(
        htsr_cmd(), env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["analyze"]
    help_text = clirunner.run(["--help"], env=_env(COLUMNS="200")).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


COMMANDS = [
    [],
    ["analyze"],
    ["allocate"],
    ["prune"],
    ["finetune"],
    ["models"],
    ["plot"],
    ["plot", "esd"],
    ["plot", "metrics"],
    ["plot", "lr-plan"],
    ["plot", "prune-plan"],
    ["plot", "history"],
    ["plot", "tradeoff"],
    ["gate"],
    ["diff"],
    ["plot", "diff"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "htsr")
def test_every_help_lists_every_exit_code(command: list[str]) -> None:
    proc = clirunner.run([*command, "--help"], env=_env(COLUMNS="400"))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())
    tail = text[text.index("Exit codes:") :]
    for code in EXIT_CODES:
        assert code in tail, (command, code, tail)


def test_layers_matching_nothing_names_some_layers() -> None:
    proc = clirunner.run(["analyze", "--layers", "encoder.*"], env=_env())
    one_line_error(proc, "features.0", "features.2")


# --------------------------------------------------------------------------------------------
# 4. Python like the CLI


def test_summary_is_data_like_the_document(demo) -> None:
    s = demo.summary
    assert isinstance(s, dict)
    alphas = [r["alpha"] for r in demo.layers if math.isfinite(r["alpha"])]
    assert s["alpha"] == pytest.approx(sum(alphas) / len(alphas))  # hand mean
    assert demo.summary() == s  # code written for the old method keeps working
    assert demo.to_dict()["summary"] == pytest.approx(dict(s))
    json.dumps(s)


def test_gate_results_are_plain_dicts_like_layers() -> None:
    result = analyze(DEMO, metrics=["alpha"], fail_if=["alpha > 6"], device="cpu")
    assert result.gates and all(type(g) is dict for g in result.gates)
    gate = result.gates[0]
    assert gate["passed"] is False and [o["name"] for o in gate["offending"]] == ["features.0"]
    assert result.failed_gates == [gate]
    assert result.to_dict()["gates"] == result.gates
    json.dumps(result.gates)


@pytest.mark.slow
def test_to_pandas_uses_weightwatchers_column_names() -> None:
    ww = pytest.importorskip("weightwatcher")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 80), nn.ReLU(), nn.Linear(80, 60), nn.Conv2d(3, 16, 3))
    theirs = ww.WeightWatcher(model=model).analyze(randomize=True)
    ours = analyze(model, device="cpu").to_pandas()
    shared = set(theirs.columns) & set(ours.columns)
    # Every column both tools compute, under WeightWatcher's name.
    for col in (
        "layer_id", "name", "longname", "layer_type", "N", "M", "Q", "rf", "num_evals",
        "alpha", "alpha_weighted", "stable_rank", "entropy", "norm", "log_norm",
        "spectral_norm", "log_spectral_norm", "log_alpha_norm", "rand_distance", "xmin",
        "xmax", "D", "sigma", "num_pl_spikes", "matrix_rank", "status", "warning",
    ):  # fmt: skip
        assert col in shared, col
    assert list(ours["layer_type"]) == list(theirs["layer_type"])
    assert list(ours["N"]) == list(theirs["N"]) and list(ours["M"]) == list(theirs["M"])


def test_to_pandas_without_pandas_says_what_to_install(demo, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        demo.to_pandas()


# --------------------------------------------------------------------------------------------
# 5. Pipes everywhere


def test_prune_prints_json_off_a_terminal() -> None:
    proc = clirunner.run(["prune", DEMO, "--sparsity", "0.5"], env=_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema"] == "htsr.prune-plan/1"


def test_prune_prints_a_table_on_a_terminal() -> None:
    rc, out, err = run_in_pty(htsr_cmd("prune", DEMO, "--sparsity", "0.5"), 120, _env())
    assert rc == 0, err
    assert "requested: remove" in out and not out.lstrip().startswith("{")


FINETUNE = (
    "finetune --arch resnet18 --width 0.125 --data digits --image-size 8 --lr 0.05 "
    "--batch-size 256 --no-track-metric --device cpu"
)


@pytest.mark.slow
def test_finetune_into_a_closed_pipe_exits_141(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = (
        f"{sys.executable} -m htsr_cli {FINETUNE} --epochs 1 -o {run_dir} | true; "
        'echo "rc=${PIPESTATUS[0]}" >&2'
    )
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    assert "rc=141" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "htsr: error" not in proc.stderr
    assert (run_dir / "final.json").is_file()  # the run itself is complete


# --------------------------------------------------------------------------------------------
# 6. Pruned Hugging Face checkpoints stay loadable


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT saved by transformers, plus tokenizer-like side files and a stale
    weight file that must not be copied."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf") / "tiny-bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(root)
    (root / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (root / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    return root


def test_prune_into_a_directory_that_from_pretrained_loads(hf_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import BertModel

    out = tmp_path / "pruned"
    single = tmp_path / "pruned.safetensors"
    base = ["prune", hf_dir, "--sparsity", "0.5", "--method", "uniform", "-f", "json"]
    proc = clirunner.run([*base, "-o", out], env=_env())
    assert proc.returncode == 0, proc.stderr
    assert clirunner.run([*base, "-o", single], env=_env()).returncode == 0  # today's form
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    # The directory's weights are the single file's (same plan, same zeroed weights).
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(single))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    model, info = BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = BertModel.from_pretrained(hf_dir)
    plan = json.loads(proc.stdout)
    state = model.state_dict()
    for layer in plan["layers"]:
        w = state[f"{layer['name']}.weight"]
        zeros = int((w == 0).sum())
        # uniform: every prunable layer loses the same share; the zeros are the plan's.
        assert zeros == layer["params_before"] - layer["params_after"], layer["name"]
        assert zeros > 0
    assert torch.equal(
        state["embeddings.word_embeddings.weight"],
        original.state_dict()["embeddings.word_embeddings.weight"],
    )  # embeddings are not pruned


def test_directory_output_refusals(hf_dir: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    base = ["prune", hf_dir, "--sparsity", "0.5"]
    one_line_error(clirunner.run([*base, "-o", busy], env=_env()), "not empty")
    assert (busy / "keep.txt").read_text() == "mine"
    one_line_error(clirunner.run([*base, "-o", hf_dir], env=_env()), "input")
    structured = [*base, "--structured", "--arch", "resnet18", "-o", tmp_path / "s"]
    one_line_error(clirunner.run(structured, env=_env()), "unstructured")
    assert not (tmp_path / "s").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary left


# --------------------------------------------------------------------------------------------
# 7. Wording


@pytest.mark.slow
def test_finetune_says_1_epoch_and_prints_the_resume_hint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*FINETUNE.split(), "--epochs", "2", "--stop-after", "1", "-o", run_dir]
    rc, out, err = run_in_pty(htsr_cmd(*args), 200, _env(NO_COLOR="1"))
    assert rc == 0, err
    assert "after 1 epoch," in out, out
    assert (
        f"htsr: stopped after epoch 1 of 2 (--stop-after); 1 finished epoch saved in {run_dir}; "
        f"continue with: htsr finetune --resume {run_dir}\n"
    ) in err, err


def test_the_classifier_note_reads_well() -> None:
    proc = clirunner.run(["prune", DEMO, "--sparsity", "0.5", "-f", "json"], env=_env())
    notes = json.loads(proc.stdout)["notes"]
    assert "layer 'classifier.5' is the classifier: never pruned" in notes, notes


def test_finetune_one_line_help_is_one_sentence() -> None:
    proc = clirunner.run(["--help"], env=_env(COLUMNS="200"))
    lines = proc.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip("│ ").startswith("finetune "))
    assert lines[i].rstrip(" │").endswith("."), lines[i]  # the sentence ends on its line
    from htsr_cli.cli import app

    commands = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert lines[i + 1].strip("│ ").split()[0] in commands, lines[i + 1]  # not a continuation


def test_plot_metrics_y_label_fits_its_axis(tmp_path: Path) -> None:
    from htsr_cli.plotting import plot_metrics

    gen = torch.Generator().manual_seed(0)
    # Long names, as in a BERT: the rotated tick labels shrink the axis.
    names = [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(12)]
    path = tmp_path / "bert.safetensors"
    save_file({f"{n}.weight": torch.randn(96, 64, generator=gen) for n in names}, str(path))
    doc = tmp_path / "a.json"
    assert clirunner.run(["analyze", path, "-o", doc, "--metrics", "alpha"]).returncode == 0
    plot = plot_metrics([str(doc)], tmp_path / "alpha.png")
    fig = plot.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the saved layout, drawn again
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    label = ax.yaxis.label.get_window_extent(renderer)
    box = ax.get_window_extent(renderer)
    assert label.height <= box.height, (label.height, box.height)
    assert fig.bbox.x0 <= label.x0 and label.y0 >= fig.bbox.y0 and label.y1 <= fig.bbox.y1
