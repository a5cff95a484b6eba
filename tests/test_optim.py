"""Optimizer parameter groups from LR plans, and the TempBalance re-allocator (htsr_cli.optim).

Real models and real torch optimizers/schedulers throughout; no mocks.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from htsr_cli.allocate.plan import LRPlan, PlanLayer
from htsr_cli.allocate.schemes import allocate
from htsr_cli.errors import InputError
from htsr_cli.optim import Reallocator, apply_multipliers, layer_owners, param_groups

BASE_LR = 0.1

# ---------------------------------------------------------------------------------------------
# Models


class Block(nn.Module):
    """conv-bn-relu twice with a residual add (ResNet BasicBlock shape)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)  # with bias: the bias must follow the conv
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


class DynamicResNet(SmallResNet):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        if x.sum() > 0:
            x = self.blocks(x)
        return self.head(x.mean((2, 3)))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        q, k, v = (
            p(y).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PreLNTransformer(nn.Module):
    def __init__(
        self, vocab: int = 64, d: int = 32, heads: int = 4, depth: int = 2, seq: int = 8
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)  # a bare parameter: no layer
        self.blocks = nn.ModuleList(PreLNBlock(d, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight  # tied: the optimizer must see it once

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class PostNormNet(nn.Module):
    """``LayerNorm(linear(x))`` (through a dropout and a reshape), and a post-LN residual norm."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.ln_res = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.drop(self.proj(x)).reshape(x.shape))
        x = self.ln_res(x + self.fc(F.gelu(y)))  # normalises a sum: no single layer's output
        return self.head(x)


def make_plan(
    mults: dict[str, float],
    *,
    base_lr: float = BASE_LR,
    wd: dict[str, float] | None = None,
    base_wd: float | None = None,
) -> LRPlan:
    layers = [
        PlanLayer(
            name=n,
            metric_value=3.0,
            multiplier=m,
            lr=base_lr * m,
            status="allocated",
            wd_multiplier=(wd or {}).get(n),
        )
        for n, m in mults.items()
    ]
    return LRPlan(
        scheme="tb-linear",
        metric="alpha",
        base_lr=base_lr,
        params={},
        layers=layers,
        base_wd=base_wd,
        wd_scheme="tb-linear" if wd else None,
    )


def group_of(groups: list[dict], model: nn.Module) -> dict[str, dict]:
    """Parameter name -> the group holding it; asserts each parameter is in exactly one group."""
    by_id = {}
    for g in groups:
        assert g["params"], "empty group"
        for p in g["params"]:
            assert id(p) not in by_id, "parameter in two groups"
            by_id[id(p)] = g
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_id) == {id(p) for p in named.values()}
    return {n: by_id[id(p)] for n, p in named.items()}


RESNET_MULTS = {
    "stem": 0.5,
    "blocks.0.conv1": 2.0,
    "blocks.0.conv2": 1.0,
    "blocks.1.conv1": 1.5,
    "blocks.1.conv2": 0.75,
    "head": 0.5,
}


# ---------------------------------------------------------------------------------------------
# Ownership and groups


def test_resnet_norms_and_biases_follow_their_conv() -> None:
    model = SmallResNet()
    owners = layer_owners(model)
    assert owners["stem.bias"] == owners["bn.weight"] == owners["bn.bias"] == "stem"
    for b in (0, 1):
        for i in (1, 2):
            conv = f"blocks.{b}.conv{i}"
            assert owners[f"blocks.{b}.bn{i}.weight"] == owners[f"blocks.{b}.bn{i}.bias"] == conv
    assert owners["blocks.0.conv1.bias"] == "blocks.0.conv1"

    by_name = group_of(param_groups(model, make_plan(RESNET_MULTS)), model)
    for name, g in by_name.items():
        assert g["htsr_layer"] == owners[name]  # every parameter here has an owner
        assert g["lr"] == pytest.approx(BASE_LR * RESNET_MULTS[owners[name]])
        assert g["htsr_multiplier"] == RESNET_MULTS[owners[name]]


def test_pre_ln_transformer_norms_are_in_the_base_group() -> None:
    model = PreLNTransformer()
    names = (
        ["emb"]
        + [f"blocks.{b}.{p}" for b in (0, 1) for p in ("q", "k", "v", "out", "fc1", "fc2")]
        + ["head"]
    )
    mults = {n: 0.5 + 0.1 * i for i, n in enumerate(names)}
    by_name = group_of(param_groups(model, make_plan(mults)), model)
    base = [n for n, g in by_name.items() if g["htsr_layer"] is None]
    assert sorted(base) == sorted(
        ["pos", "ln_f.weight", "ln_f.bias"]
        + [f"blocks.{b}.ln{i}.{w}" for b in (0, 1) for i in (1, 2) for w in ("weight", "bias")]
    )
    assert by_name["pos"]["lr"] == BASE_LR and by_name["pos"]["htsr_multiplier"] == 1.0
    for b in (0, 1):
        for p in ("q", "k", "v", "out", "fc1", "fc2"):
            layer = f"blocks.{b}.{p}"
            assert by_name[f"{layer}.weight"] is by_name[f"{layer}.bias"]
            assert by_name[f"{layer}.bias"]["htsr_layer"] == layer
    # The tied embedding/head weight is one parameter, in the group of its first name.
    assert by_name["emb.weight"]["htsr_layer"] == "emb"
    assert by_name["head.bias"]["htsr_layer"] == "head"
    # Registration order alone would have given ln2 to the attention output (the documented
    # limitation of the fallback): proof that the auto path traced the dataflow.
    assert layer_owners(model, method="order")["blocks.0.ln2.weight"] == "blocks.0.out"


def test_post_norm_layernorm_follows_its_linear() -> None:
    model = PostNormNet()
    owners = layer_owners(model)
    assert owners["norm.weight"] == owners["norm.bias"] == "proj"
    assert "ln_res.weight" not in owners and "ln_res.bias" not in owners
    by_name = group_of(param_groups(model, make_plan({"proj": 2.0, "fc": 0.5, "head": 1.0})), model)
    assert by_name["norm.weight"]["htsr_layer"] == "proj"
    assert by_name["norm.weight"]["lr"] == pytest.approx(2 * BASE_LR)
    assert by_name["ln_res.bias"]["htsr_layer"] is None


class CustomLinear(nn.Module):
    """A layer fx traces through: it appears as F.linear on the module's own weight."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def test_traced_through_custom_layer_owns_its_norm() -> None:
    model = nn.Sequential(
        CustomLinear(16), nn.RMSNorm(16), nn.GELU(), nn.Linear(16, 16), nn.GroupNorm(4, 16)
    )
    owners = layer_owners(model, method="fx")
    assert owners == {
        "0.weight": "0",
        "0.bias": "0",
        "1.weight": "0",
        "3.weight": "3",
        "3.bias": "3",
        "4.weight": "3",
        "4.bias": "3",
    }


def test_untraceable_model_falls_back_to_registration_order() -> None:
    model = DynamicResNet()
    with pytest.raises(InputError, match="torch.fx cannot trace DynamicResNet"):
        layer_owners(model, method="fx")
    owners = layer_owners(model)
    assert owners["bn.weight"] == "stem"
    assert owners["blocks.1.bn2.bias"] == "blocks.1.conv2"
    group_of(param_groups(model, make_plan(RESNET_MULTS)), model)


def test_frozen_parameters_are_left_out_and_no_group_is_empty() -> None:
    model = SmallResNet()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    groups = param_groups(model, make_plan(RESNET_MULTS))
    assert {g["htsr_layer"] for g in groups} == {
        "stem",
        "blocks.1.conv1",
        "blocks.1.conv2",
        "head",
    }  # nothing else trainable: no base
    group_of(groups, model)


def test_missing_layers_are_an_error_listing_them() -> None:
    model = SmallResNet()
    with pytest.raises(InputError, match=r"2 layer\(s\) the model lacks: nope, blocks.9.conv1"):
        param_groups(model, make_plan({"stem": 1.0, "nope": 2.0, "blocks.9.conv1": 0.5}))
    many = {f"ghost.{i}": 1.0 for i in range(12)}
    with pytest.raises(InputError, match="ghost.7 and 4 more"):
        param_groups(model, make_plan(many))
    groups = param_groups(model, make_plan({"stem": 2.0, "nope": 2.0}), strict=False)
    assert [g["htsr_layer"] for g in groups] == ["stem", None]


def test_unmentioned_layer_stays_in_the_base_group() -> None:
    model = SmallResNet()
    by_name = group_of(param_groups(model, make_plan({"blocks.0.conv1": 2.0}), lr=0.3), model)
    assert by_name["blocks.0.bn1.bias"]["lr"] == pytest.approx(0.6)
    for name in ("blocks.0.conv2.weight", "blocks.0.bn2.weight", "stem.bias", "head.weight"):
        assert by_name[name]["htsr_layer"] is None
        assert by_name[name]["lr"] == 0.3


def test_weight_decay_multipliers() -> None:
    model = SmallResNet()
    plan = make_plan(
        {"blocks.0.conv1": 2.0, "blocks.0.conv2": 1.0},
        wd={"blocks.0.conv1": 3.0, "blocks.0.conv2": 0.667},
        base_wd=5e-4,
    )
    by_name = group_of(param_groups(model, plan), model)
    assert by_name["blocks.0.conv1.weight"]["weight_decay"] == pytest.approx(1.5e-3)
    assert by_name["blocks.0.conv2.weight"]["weight_decay"] == pytest.approx(5e-4 * 0.667)
    assert by_name["head.weight"]["weight_decay"] == pytest.approx(5e-4)
    by_name = group_of(param_groups(model, make_plan({"stem": 2.0}), weight_decay=0.01), model)
    assert {g["weight_decay"] for g in by_name.values()} == {0.01}


def test_wrapped_models_match_plan_names() -> None:
    model = SmallResNet()
    plan = make_plan(RESNET_MULTS)
    want = {n: g["htsr_layer"] for n, g in group_of(param_groups(model, plan), model).items()}
    for wrapped, prefix in (
        (nn.DataParallel(model), "module."),
        (torch.compile(model), "_orig_mod."),
    ):
        by_name = group_of(param_groups(wrapped, plan), wrapped)
        got = {n.removeprefix(prefix): g["htsr_layer"] for n, g in by_name.items()}
        assert {n: (x if x is None else x.removeprefix(prefix)) for n, x in got.items()} == want


# ---------------------------------------------------------------------------------------------
# Round trip: plan JSON -> groups -> one optimizer step


def _one_step(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return delta, grads


def test_round_trip_sgd_update_follows_multipliers(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make_plan(RESNET_MULTS).to_dict()))
    groups = param_groups(model, path)
    by_name = group_of(groups, model)
    opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=0.0)
    delta, grads = _one_step(model, opt)
    owners = layer_owners(model)
    for name, d in delta.items():
        m = RESNET_MULTS[owners[name]]
        assert by_name[name]["htsr_multiplier"] == m
        assert torch.allclose(d, -BASE_LR * m * grads[name], rtol=1e-4, atol=1e-7), name


def test_round_trip_adamw_first_step_magnitude_is_lr_times_multiplier(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make_plan(RESNET_MULTS, base_lr=1e-3).to_dict()))
    opt = torch.optim.AdamW(param_groups(model, path))  # weight decay 0 from the plan
    delta, grads = _one_step(model, opt)
    owners = layer_owners(model)
    per_entry = {}
    for name, d in delta.items():
        big = grads[name].abs() > 1e-5  # Adam's first step is lr * g / (|g| + eps)
        if big.any():
            per_entry[name] = float(d[big].abs().mean() / 1e-3)
            assert per_entry[name] == pytest.approx(RESNET_MULTS[owners[name]], rel=1e-3), name
    ratio = per_entry["blocks.0.conv1.weight"] / per_entry["blocks.1.conv2.weight"]
    assert ratio == pytest.approx(2.0 / 0.75, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Schedulers


def _check_ratios(opt: torch.optim.Optimizer) -> None:
    base = next(g for g in opt.param_groups if g["htsr_layer"] is None)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base["lr"] * g["htsr_multiplier"], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.8**e),
    ],
    ids=["cosine", "lambda"],
)
def test_schedulers_keep_multipliers_across_reallocation(make_scheduler) -> None:
    model = SmallResNet()
    mults = {n: m for n, m in RESNET_MULTS.items() if n != "head"}  # head: the base group
    opt = torch.optim.SGD(param_groups(model, make_plan(mults)), lr=BASE_LR)
    opt.param_groups.reverse()  # by name, never by position
    sched = make_scheduler(opt)
    new = {"blocks.0.conv1": 0.6, "blocks.1.conv2": 1.4, "stem": 1.0}
    for step in range(10):  # past cosine's restart at 2 * T_max, which reads base_lrs
        opt.step()
        sched.step()
        _check_ratios(opt)
        if step == 2:
            apply_multipliers(opt, new, sched)
            _check_ratios(opt)
    final = {g["htsr_layer"]: g["htsr_multiplier"] for g in opt.param_groups}
    assert final == {**mults, **new, None: 1.0}
    for g, base_lr in zip(opt.param_groups, sched.base_lrs, strict=True):
        assert base_lr == pytest.approx(BASE_LR * g["htsr_multiplier"])
        assert g["initial_lr"] == pytest.approx(base_lr)


def test_apply_multipliers_refuses_non_positive_values() -> None:
    model = SmallResNet()
    opt = torch.optim.SGD(param_groups(model, make_plan(RESNET_MULTS)), lr=BASE_LR)
    with pytest.raises(InputError, match="multiplier of stem"):
        apply_multipliers(opt, {"stem": 0.0})
    with pytest.raises(InputError):
        apply_multipliers(opt, {"stem": math.nan})


# ---------------------------------------------------------------------------------------------
# Reallocator


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, device: str = "cpu") -> None:
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_reallocator_rewrites_multipliers_by_name(caplog) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(
        param_groups(model, allocate(model, lr=BASE_LR)), lr=BASE_LR, momentum=0.9
    )
    opt.param_groups.reverse()  # by name, never by position
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    realloc = Reallocator(model, opt, every=2, scheduler=sched)
    did = []
    for call in range(1, 5):
        _train(model, opt, 3)
        sched.step()
        before = [(float(g["lr"]), g["htsr_multiplier"]) for g in opt.param_groups]
        with caplog.at_level(logging.INFO, logger="htsr"):
            did.append(realloc.step())
        if call == 4:
            fresh = allocate(model, lr=1.0).multipliers()
            for g, (lr, m) in zip(opt.param_groups, before, strict=True):
                want = fresh.get(g["htsr_layer"], 1.0) if g["htsr_layer"] else 1.0
                assert g["htsr_multiplier"] == pytest.approx(want, rel=1e-12)
                assert g["lr"] == pytest.approx(lr / m * want, rel=1e-12)
            assert len({round(g["htsr_multiplier"], 9) for g in opt.param_groups}) > 2
    assert did == [False, True, False, True]
    for g, base_lr in zip(opt.param_groups, sched.base_lrs, strict=True):
        assert base_lr == pytest.approx(BASE_LR * g["htsr_multiplier"])
    assert realloc.last_seconds > 0
    assert [h["step"] for h in realloc.history] == [2, 4]
    assert realloc.history[-1]["multipliers"] == {
        g["htsr_layer"]: g["htsr_multiplier"] for g in opt.param_groups if g["htsr_layer"]
    }
    assert sum("re-allocated" in r.getMessage() for r in caplog.records) == 2


def test_reallocator_refuses_bad_setup() -> None:
    model = SmallResNet()
    with pytest.raises(InputError, match="param_groups"):
        Reallocator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt = torch.optim.SGD(param_groups(model, make_plan(RESNET_MULTS)), lr=0.1)
    with pytest.raises(InputError, match="every"):
        Reallocator(model, opt, every=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reallocator_on_cuda() -> None:
    torch.manual_seed(0)
    model = SmallResNet().cuda()
    opt = torch.optim.SGD(param_groups(model, allocate(model, lr=BASE_LR)), lr=BASE_LR)
    realloc = Reallocator(model, opt)
    _train(model, opt, 3, device="cuda")
    assert realloc.step()
    plan = realloc.reallocate()
    assert plan.params["analysis_options"]["device"] == "cuda:0"  # the model's device
    assert realloc.last_seconds > 0
    fresh = allocate(model, lr=1.0, device="cuda").multipliers()
    for g in opt.param_groups:
        if g["htsr_layer"]:
            assert g["htsr_multiplier"] == pytest.approx(fresh.get(g["htsr_layer"], 1.0))
