"""``htsr plot``: every figure is written with the right type and size, and the data drawn is
checked against hand computations (the ESD line's slope is -alpha, the histogram is a
density, the plotted values are the documents' values)."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from htsr_cli.allocate.schemes import allocate
from htsr_cli.assets import default_checkpoint
from htsr_cli.engine.analysis import analyze
from htsr_cli.errors import InputError
from htsr_cli.plotting import (
    abbreviate,
    plot_esd,
    plot_history,
    plot_lr_plans,
    plot_metrics,
    plot_prune_plans,
    plot_tradeoff,
    read_history,
)
from htsr_cli.plotting.common import label_step

CKPT = default_checkpoint()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_image(path: Path, kind: str, min_bytes: int = 5_000, max_bytes: int = 2_000_000):
    data = path.read_bytes()
    assert min_bytes < len(data) < max_bytes, f"{path}: {len(data)} bytes"
    if kind == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif kind == "pdf":
        assert data.startswith(b"%PDF-")
        assert b"%%EOF" in data[-64:]
    else:
        assert b"<svg" in data[:1000] and data.rstrip().endswith(b"</svg>")
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(scope="module")
def analysis_doc() -> dict:
    return analyze(CKPT, metrics=["alpha", "stable_rank"]).to_dict()


@pytest.fixture(scope="module")
def docs(tmp_path_factory, analysis_doc) -> dict[str, Path]:
    """Analysis and LR-plan documents of the demo checkpoint, as files."""
    d = tmp_path_factory.mktemp("docs")
    out = {"analysis": d / "before.json"}
    out["analysis"].write_text(json.dumps(analysis_doc))
    for scheme in ("tb-linear", "power:1/2", "log2"):
        plan = allocate(analysis_doc, lr=0.1, scheme=scheme)
        out[scheme] = d / f"plan-{scheme.replace(':', '').replace('/', '')}.json"
        out[scheme].write_text(json.dumps(plan.to_dict()))
    return out


# ---------------------------------------------------------------- esd


def test_esd_line_slope_is_minus_alpha_and_alpha_matches_the_mle(tmp_path):
    out = tmp_path / "esd.png"
    result = plot_esd(CKPT, out, dpi=60)
    assert_image(out, "png")
    tensors = load_file(str(CKPT))
    expected = analyze(CKPT, metrics=["alpha"]).layers
    assert [p.name for p in result.panels] == [r["name"] for r in expected]
    assert [p.alpha for p in result.panels] == [r["alpha"] for r in expected]
    for p in result.panels:
        assert p.line_x.size > 1
        slope, _ = np.polyfit(np.log10(p.line_x), np.log10(p.line_y), 1)
        assert slope == pytest.approx(-p.alpha, rel=1e-9)
        assert p.line_x[0] == pytest.approx(p.xmin) and p.line_x[-1] == pytest.approx(p.xmax)
    # Oracle for a 256x512 Linear: eigenvalues of W W^T by numpy, MLE alpha at the plotted xmin.
    p = next(p for p in result.panels if p.name == "classifier.0")
    w = tensors["classifier.0.weight"].double().numpy()
    evals = np.linalg.svd(w, compute_uv=False) ** 2
    tail = evals[evals >= p.xmin]
    assert p.num_tail == tail.size and p.num_fit == (evals > 1e-5).sum() == 256
    assert p.alpha == pytest.approx(1 + tail.size / np.log(tail / p.xmin).sum(), rel=1e-9)


def test_esd_histogram_is_a_density_and_the_line_carries_the_tail_share(tmp_path):
    result = plot_esd(CKPT, tmp_path / "esd.pdf", layers=["classifier.*", "features.6"])
    assert_image(tmp_path / "esd.pdf", "pdf")
    assert [p.name for p in result.panels] == [
        "features.6",
        "classifier.0",
        "classifier.3",
        "classifier.5",
    ]
    for p in result.panels:
        widths = np.diff(p.bin_edges)
        mass = p.density * widths
        assert mass.sum() == pytest.approx(1.0, rel=1e-12)
        # One bin edge sits on xmin, so the bars from xmin on hold exactly the fitted tail.
        assert np.isclose(p.bin_edges, p.xmin, rtol=1e-12).sum() == 1
        tail_bins = p.bin_edges[:-1] >= p.xmin * (1 - 1e-12)
        assert mass[tail_bins].sum() == pytest.approx(p.num_tail / p.num_fit, rel=1e-12)
        # At xmin the line is the power-law density (alpha-1)/xmin times the tail share.
        assert p.line_y[0] == pytest.approx(
            p.num_tail / p.num_fit * (p.alpha - 1) / p.xmin, rel=1e-12
        )


def test_esd_grid_size_cap_and_linear_mode(tmp_path):
    out = tmp_path / "grid.png"
    result = plot_esd(CKPT, out, layers=["features.*", "classifier.0"], linear=True, dpi=50)
    assert len(result.panels) == 4 and all(p.linear for p in result.panels)
    assert png_size(out) == (int(3.6 * 4 * 50), int((3.0 + 0.6) * 50))  # 1 row of 4 panels
    for p in result.panels:
        assert np.allclose(np.diff(p.bin_edges), np.diff(p.bin_edges)[0])  # linear bins
        assert p.bin_edges[0] == 0.0
        slope, _ = np.polyfit(np.log10(p.line_x), np.log10(p.line_y), 1)
        assert slope == pytest.approx(-p.alpha, rel=1e-9)
    capped = plot_esd(CKPT, tmp_path / "capped.png", max_layers=2, dpi=50)
    assert [p.name for p in capped.panels] == ["features.0", "features.2"]
    assert any("2 of 6" in n for n in capped.notes)
    assert png_size(tmp_path / "capped.png") == (int(3.6 * 2 * 50), int(3.6 * 50))


def test_esd_failed_fit_is_drawn_without_a_line(tmp_path):
    # Rank 1: one eigenvalue above the threshold, nothing to fit (the engine reports failed).
    u = torch.linspace(1, 2, 30)
    sd = {"flat.weight": torch.outer(u, u), "rand.weight": torch.randn(60, 30)}
    result = plot_esd(sd, tmp_path / "flat.svg", dpi=50)
    assert_image(tmp_path / "flat.svg", "svg")
    flat = next(p for p in result.panels if p.name == "flat")
    assert flat.status == "failed" and flat.line_x.size == 0 and math.isnan(flat.alpha)
    assert flat.num_fit == 1 and flat.num_evals == 30
    lam = float((u @ u) ** 2)  # the one nonzero eigenvalue of (u u^T)^T (u u^T)
    assert np.allclose(flat.bin_edges, [lam / 1.25, lam * 1.25], rtol=1e-5)
    assert next(p for p in result.panels if p.name == "rand").line_x.size > 1


def test_esd_bad_inputs(tmp_path, docs):
    with pytest.raises(InputError, match="'nope.*' matches no layer"):
        plot_esd(CKPT, tmp_path / "x.png", layers=["classifier.*", "nope.*"])
    with pytest.raises(InputError, match="analysis JSON holds no eigenvalues"):
        plot_esd(docs["analysis"], tmp_path / "x.png")
    with pytest.raises(InputError, match="extension must be"):
        plot_esd(CKPT, tmp_path / "x.jpeg")
    with pytest.raises(InputError, match="does not exist"):
        plot_esd(CKPT, tmp_path / "missing-dir" / "x.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        plot_esd(CKPT, tmp_path / "d.png")
    assert not list(tmp_path.glob("x.*"))


# ---------------------------------------------------------------- metrics


def test_metrics_overlay_values_and_flags(tmp_path, docs, analysis_doc):
    after = copy.deepcopy(analysis_doc)
    for row in after["layers"]:
        row["alpha"] = row["alpha"] - 0.5
    after["layers"].append(dict(after["layers"][0], name="extra.layer", alpha=7.5))
    after_path = tmp_path / "after.json"
    after_path.write_text(json.dumps(after))
    out = tmp_path / "alpha.png"
    result = plot_metrics([docs["analysis"], after_path], out, dpi=60)
    assert_image(out, "png")
    names = [r["name"] for r in analysis_doc["layers"]]
    assert result.layers == [*names, "extra.layer"]
    before_s, after_s = result.series
    assert (before_s.label, after_s.label) == ("before", "after")
    assert list(after_s.positions) == list(range(len(names) + 1))
    expected = [r["alpha"] for r in analysis_doc["layers"]]
    assert np.allclose(before_s.values, expected)
    assert np.allclose(after_s.values[:-1], np.array(expected) - 0.5)
    for s, rows in ((before_s, analysis_doc["layers"]), (after_s, after["layers"])):
        assert s.info["over_trained"] == [r["name"] for r in rows if r["alpha"] < 2]
        assert s.info["under_trained"] == [r["name"] for r in rows if r["alpha"] > 6]
    assert "extra.layer" in after_s.info["under_trained"]
    assert before_s.info["under_trained"] == ["features.0"]  # alpha 8.4 in the demo model

    other = plot_metrics(
        [docs["analysis"]], tmp_path / "sr.svg", metric="stable_rank", labels=["demo"]
    )
    assert other.series[0].label == "demo"
    assert np.allclose(other.series[0].values, [r["stable_rank"] for r in analysis_doc["layers"]])
    assert "over_trained" not in other.series[0].info


def test_metrics_bad_inputs(tmp_path, docs):
    with pytest.raises(InputError, match="expected 'htsr.analysis/1'"):
        plot_metrics([docs["tb-linear"]], tmp_path / "x.png")
    with pytest.raises(InputError, match="no 'entropy' values"):
        plot_metrics([docs["analysis"]], tmp_path / "x.png", metric="entropy")
    with pytest.raises(InputError, match="unknown metric"):
        plot_metrics([docs["analysis"]], tmp_path / "x.png", metric="alfa")
    with pytest.raises(InputError, match="2 --label for 1"):
        plot_metrics([docs["analysis"]], tmp_path / "x.png", labels=["a", "b"])


# ---------------------------------------------------------------- LR plans


def test_lr_plans_overlay(tmp_path, docs):
    paths = [docs["tb-linear"], docs["power:1/2"], docs["log2"]]
    result = plot_lr_plans(paths, tmp_path / "lr.svg")
    assert_image(tmp_path / "lr.svg", "svg")
    assert [s.label for s in result.series] == ["tb-linear", "power:1/2", "log2"]
    for s, path in zip(result.series, paths, strict=True):
        plan = json.loads(path.read_text())
        assert s.names == [ly["name"] for ly in plan["layers"]]
        assert np.allclose(s.values, [ly["multiplier"] for ly in plan["layers"]])
        assert s.info["base"] == [ly["name"] for ly in plan["layers"] if ly["status"] == "base"]
    # tb-linear maps the allocated alphas onto [0.5, 1.5]: both ends are drawn.
    tb = result.series[0]
    allocated = [v for n, v in zip(tb.names, tb.values, strict=True) if n not in tb.info["base"]]
    assert min(allocated) == pytest.approx(0.5) and max(allocated) == pytest.approx(1.5)
    with pytest.raises(InputError, match="expected 'htsr.lr-plan/1'"):
        plot_lr_plans([docs["analysis"]], tmp_path / "x.png")


# ---------------------------------------------------------------- prune plans

LAYERS = ["conv1", *(f"layer{i}.{b}.conv{c}" for i in (1, 2) for b in (0, 1) for c in (1, 2)), "fc"]


def prune_plan(method: str, metric: str | None, sparsity: float, seed: int) -> dict:
    """A document in the ``htsr.prune-plan/1`` format of docs/prune.md (input fixture)."""
    rng = np.random.default_rng(seed)
    ratios = np.clip(sparsity + rng.normal(0, 0.1, len(LAYERS)), 0, 0.95)
    return {
        "schema": "htsr.prune-plan/1",
        "source": {},
        "method": method,
        "metric": metric,
        "target": {"sparsity": sparsity},
        "achieved": {
            "params_before": 10_000,
            "params_after": int(10_000 * (1 - sparsity)),
            "sparsity": sparsity,
            "macs_before": 0,
            "macs_after": 0,
        },
        "groups": [],
        "layers": [
            {
                "name": n,
                "metric_value": None,
                "ratio": float(r),
                "params_before": 1000,
                "params_after": int(1000 * (1 - r)),
            }
            for n, r in zip(LAYERS, ratios, strict=True)
        ],
    }


def test_prune_plans_overlay_and_panels_per_sparsity(tmp_path):
    docs = {}
    for i, (method, metric, sp) in enumerate(
        [
            ("metric", "alpha", 0.3),
            ("uniform", None, 0.3),
            ("metric", "alpha", 0.7),
            ("uniform", None, 0.7),
        ]
    ):
        docs[i] = tmp_path / f"p{i}.json"
        docs[i].write_text(json.dumps(prune_plan(method, metric, sp, i)))
    single = plot_prune_plans([docs[0], docs[2]], tmp_path / "two.png", dpi=60)
    assert_image(tmp_path / "two.png", "png")
    assert [s.label for s in single.series] == ["alpha, 30% sparsity", "alpha, 70% sparsity"]
    for s, i in zip(single.series, (0, 2), strict=True):
        doc = json.loads(docs[i].read_text())
        assert np.allclose(s.values, [ly["ratio"] for ly in doc["layers"]])
        assert s.info["sparsity"] == doc["achieved"]["sparsity"]
    grid = plot_prune_plans(list(docs.values()), tmp_path / "grid.pdf")
    assert_image(tmp_path / "grid.pdf", "pdf")
    assert [s.label for s in grid.series] == ["alpha", "uniform", "alpha", "uniform"]
    width, height = png_size(tmp_path / "two.png")
    assert (width, height) == (7 * 60, int((1.2 + 3.0 + 0.9) * 60))  # one panel, 10 layers
    bad = prune_plan("uniform", None, 0.5, 0)
    bad["layers"][2]["ratio"] = 1.5
    with pytest.raises(InputError, match=r"layers\[2\].*ratio must be in \[0, 1\]"):
        plot_prune_plans([bad], tmp_path / "x.png")
    wrong = dict(bad, schema="htsr.lr-plan/1")
    with pytest.raises(InputError, match="expected 'htsr.prune-plan/1'"):
        plot_prune_plans([wrong], tmp_path / "x.png")


# ---------------------------------------------------------------- runs


def write_run(
    d: Path,
    *,
    method: str,
    params: int,
    acc: float,
    lr_mode: str = "global",
    epochs: int = 4,
    duplicate: bool = False,
    final: bool = True,
) -> None:
    """A run directory in the format ``htsr finetune`` writes (history.jsonl + final.json)."""
    d.mkdir(parents=True)
    rows = []
    for e in range(1, epochs + 1):
        lr0 = 0.05 * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "train_acc": 1 - 0.5 / e,
                "test_loss": 2.2 / e,
                "test_acc": acc - 0.4 / e,
                "seconds": 1.0,
                "lr": {"base": lr0, **{n: lr0 * (1 + 0.1 * k) for k, n in enumerate(LAYERS)}},
                "metric_name": "alpha",
                "metric": {n: 3.0 + 0.1 * k - 0.05 * e for k, n in enumerate(LAYERS)}
                | {"fc": None},
                "esd_seconds": 0.1,
            }
        )
    if duplicate:  # a resumed run logged epoch 2 again: the later line wins
        rows.insert(2, dict(rows[1], test_acc=0.0))
        rows[1], rows[2] = rows[2], rows[1]
    (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    if final:
        (d / "final.json").write_text(
            json.dumps(
                {
                    "schema": "htsr.run/1",
                    "arch": "resnet18",
                    "label": d.name,
                    "method": method,
                    "lr_mode": lr_mode,
                    "params": params,
                    "params_total": 10_000,
                    "test_acc": acc,
                    "best_test_acc": acc + 0.01,
                    "epochs": epochs,
                    "seconds": 4.0,
                    "seed": 0,
                    "args": {},
                }
            )
        )


def test_history_reads_runs_and_plots_all_panels(tmp_path):
    write_run(tmp_path / "glob", method="uniform", params=5000, acc=0.9, duplicate=True)
    write_run(
        tmp_path / "tb",
        method="uniform",
        params=5000,
        acc=0.92,
        lr_mode="reallocate:tb-linear",
        final=False,
    )
    run = read_history(tmp_path / "glob")
    assert list(run.epochs) == [1, 2, 3, 4]
    assert run.test_acc[1] == pytest.approx(0.9 - 0.4 / 2)  # the later line of epoch 2
    assert np.allclose(run.train_loss, [2.0, 1.0, 2 / 3, 0.5])
    assert run.metric_name == "alpha" and list(run.metric) == LAYERS
    assert np.isnan(run.metric["fc"]).all()
    assert run.metric["conv1"][0] == pytest.approx(2.95)
    assert run.lr["layer1.0.conv1"][0] == pytest.approx(0.05 * 1.1)

    out = tmp_path / "hist.png"
    result = plot_history([tmp_path / "glob", tmp_path / "tb"], out, dpi=50)
    assert_image(out, "png")
    assert png_size(out) == (550, 380)
    assert [r.label for r in result.runs] == ["glob", "tb"]  # tb has no final.json yet
    assert result.layers == LAYERS
    one = plot_history([tmp_path / "glob"], tmp_path / "one.svg", layers=["layer1.*"])
    assert one.layers == LAYERS[1:5]
    grid = plot_history(
        [tmp_path / "glob", tmp_path / "tb"],
        tmp_path / "grid.png",
        per_layer=True,
        max_layers=3,
        dpi=50,
    )
    assert grid.layers == LAYERS[:3] and any("3 of 10" in n for n in grid.notes)
    assert png_size(tmp_path / "grid.png") == (int(3.1 * 3 * 50), int((2.4 + 0.8) * 50))


def test_run_dir_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no history.jsonl"):
        plot_history([tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(InputError, match="does not exist"):
        plot_history([tmp_path / "nowhere"], tmp_path / "x.png")
    write_run(tmp_path / "r", method="uniform", params=10, acc=0.5)
    with pytest.raises(InputError, match="matches no layer"):
        plot_history([tmp_path / "r"], tmp_path / "x.png", layers=["nope"])
    with pytest.raises(InputError, match="--max-layers must be a positive integer"):
        plot_history([tmp_path / "r"], tmp_path / "x.png", per_layer=True, max_layers=0)
    (tmp_path / "r" / "final.json").write_text(json.dumps({"schema": "htsr.analysis/1"}))
    with pytest.raises(InputError, match="expected 'htsr.run/1'"):
        plot_tradeoff([tmp_path / "r"], tmp_path / "x.png")
    (tmp_path / "r" / "final.json").unlink()
    with pytest.raises(InputError, match="no final.json"):
        plot_tradeoff([tmp_path / "r"], tmp_path / "x.png")
    with (tmp_path / "r" / "history.jsonl").open("a") as fh:
        fh.write('{"epoch": 5, "train_loss": 1}\n')
    with pytest.raises(InputError, match="line 6 lacks field"):
        plot_history([tmp_path / "r"], tmp_path / "x.png")
    text = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    for bad, needle in (
        ("{not json", "line 6 is not valid JSON"),
        ("[1, 2]", "line 6 is not a JSON object"),
        (
            '{"epoch": "5", "train_loss": 1, "train_acc": 1, "test_loss": 1, "test_acc": 1}',
            "line 6: epoch must be an integer",
        ),
    ):
        (tmp_path / "r" / "history.jsonl").write_text("\n".join([*text[:5], bad]) + "\n")
        with pytest.raises(InputError, match=needle):
            plot_history([tmp_path / "r"], tmp_path / "x.png")
    assert not list(tmp_path.glob("x.*"))


def test_tradeoff_one_line_per_method_sorted_by_params(tmp_path):
    specs = [
        ("u70", "uniform", 3000, 0.80, "global"),
        ("u30", "uniform", 7000, 0.90, "global"),
        ("a70", "alpha", 3000, 0.85, "global"),
        ("a30", "alpha", 7000, 0.91, "global"),
        ("t70", "uniform", 3000, 0.83, "reallocate:tb-linear"),
        ("dense", "dense", 10_000, 0.95, "global"),
    ]
    for name, method, params, acc, lr_mode in specs:
        write_run(tmp_path / name, method=method, params=params, acc=acc, lr_mode=lr_mode)
    result = plot_tradeoff([tmp_path / s[0] for s in specs], tmp_path / "t.png", dpi=60)
    assert_image(tmp_path / "t.png", "png")
    lines = {line.method: line for line in result.lines}
    assert set(lines) == {
        "uniform, global LR",
        "uniform, reallocate:tb-linear LR",
        "alpha",
        "dense",
    }
    assert list(lines["uniform, global LR"].params) == [3000, 7000]
    assert np.allclose(lines["uniform, global LR"].accuracy, [80.0, 90.0])
    assert np.allclose(lines["alpha"].accuracy, [85.0, 91.0])
    assert result.dense_params == 10_000
    best = plot_tradeoff([tmp_path / "a30"], tmp_path / "b.svg", best=True)
    assert best.lines[0].accuracy[0] == pytest.approx(92.0)


# ---------------------------------------------------------------- labels and the CLI


def test_abbreviated_layer_names_are_unique_short_and_fit():
    names = [
        "conv1",
        *(f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in range(3) for c in (1, 2)),
        *(f"model.decoder.layers.{i}.self_attn.{p}_proj" for i in range(40) for p in "qkvo"),
        "a_really_long_module_name_without_any_dots_at_all",
        "fc",
    ]
    short = abbreviate(names)
    assert len(set(short)) == len(names)
    assert all(len(s) <= 24 for s in short)
    assert short[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert short[-1] == "fc" and short[-2].count("…") == 1
    assert abbreviate(["x.y", "z.y"]) == ["x.y", "z.y"]
    # Every label kept on a 10-inch axis has room for its own line height.
    for n in (5, 60, 300):
        step = label_step(n, 10.0)
        assert math.ceil(n / step) * 7 * 1.5 / 72 <= 10.0


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "htsr_cli", "plot", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_writes_a_plot_and_rejects_bad_input_with_exit_2(tmp_path, docs):
    ok = run_cli(
        "lr-plan",
        str(docs["tb-linear"]),
        str(docs["log2"]),
        "-o",
        "lr.png",
        "--dpi",
        "40",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert_image(tmp_path / "lr.png", "png", min_bytes=2_000)
    assert ok.stdout == "" and "wrote lr.png" in ok.stderr
    wrong = run_cli("metrics", str(docs["tb-linear"]), "-o", "m.png", cwd=tmp_path)
    ext = run_cli("esd", "-o", "esd.gif", cwd=tmp_path)
    for res, msg in ((wrong, "expected 'htsr.analysis/1'"), (ext, "extension must be")):
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("htsr: error: ")
        assert msg in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]
