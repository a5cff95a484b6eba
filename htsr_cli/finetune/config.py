"""The arguments of a ``finetune`` run: :class:`FinetuneConfig` (saved as the run's
args.json), their checks, the stored (absolute-path) form, ``--resume``'s reading of them, and
the learning-rate schedule they define."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from htsr_cli import defaults
from htsr_cli.errors import InputError
from htsr_cli.finetune.run_dir import RunDir

OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("auto", "crop-flip", "crop", "none")
#: Arguments that ``--resume`` may change; every other one is fixed by the run's args.json.
RUNTIME_OPTIONS = ("epochs", "device", "compile", "amp")
#: Arguments that ``--resume`` takes again, unchanged, as consent that a run directory alone
#: must not grant: importing the user module of an ``--arch package.module:function`` (its code
#: runs) and unpickling code with ``--trust-pickle``.
CONSENT_OPTIONS = ("arch", "trust_pickle")


@dataclass
class FinetuneConfig:
    """The arguments of one run (saved as its args.json). Defaults: TempBalance's CIFAR recipe
    (SGD momentum 0.9, weight decay 5e-4, batch 128, cosine, crop + flip)."""

    arch: str
    data: str
    epochs: int
    lr: float
    output: str
    init: str | None = None
    width: float | None = None  # None: the pruned checkpoint's width, else 1
    num_classes: int | None = None  # None: the data set's
    image_size: int | None = None  # None: the architecture's input size
    lr_plan: str | None = None
    allocate: str | None = None  # a scheme of htsr_cli.allocate.schemes.SCHEMES
    reallocate_every: int = 1
    metric: str = "alpha"
    s1: float = defaults.S1
    s2: float = defaults.S2
    fit: str = defaults.PLAN_FIT  # as allocate and Reallocator: TempBalance's xmin_mid
    preset: str | None = None  # tempbalance: its analysis conventions (docs/presets.md)
    track_metric: bool = True
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_epochs: int = 0
    batch_size: int = 128
    label_smoothing: float = 0.0
    seed: int = defaults.SEED
    keep_masks: bool = False
    augment: str = "auto"
    label: str | None = None
    trust_pickle: bool = False
    device: str = "auto"
    compile: bool = False
    amp: bool = True

    @property
    def lr_mode(self) -> str:
        if self.allocate:
            return f"reallocate:{self.allocate}"
        return "plan" if self.lr_plan else "global"

    def allocate_options(self) -> dict[str, Any]:
        """The keyword arguments of the run's allocations (the first plan and every
        re-allocation) for :func:`htsr_cli.allocate.schemes.allocate` / ``Reallocator``."""
        return {
            "scheme": self.allocate,
            "metric": self.metric,
            "s1": self.s1,
            "s2": self.s2,
            "seed": self.seed,
            "fit": self.fit,
            "preset": self.preset,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def scheduled_lr(lr: float, epoch: int, epochs: int, warmup: int = 0) -> float:
    """The base LR of 1-based ``epoch``: ``lr * epoch / warmup`` during the warm-up, then thesis
    eq. 2.12, ``lr_t = lr/2 * (1 + cos(pi (t+1) / T))`` over the ``T = epochs - warmup``
    remaining epochs, where ``lr_t`` is set at the end of epoch ``t`` (0-based) for the next:
    the first cosine epoch trains at ``lr``, and epoch ``e`` at ``lr/2 (1 + cos(pi (e-1-warmup)
    / T))`` (PyTorch's CosineAnnealingLR, eta_min 0, stepped per epoch)."""
    if epoch <= warmup:
        return lr * epoch / warmup
    return lr / 2 * (1 + math.cos(math.pi * (epoch - 1 - warmup) / (epochs - warmup)))


# ---------------------------------------------------------------------------------------------
# Checking the arguments


def positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")


def _finite(
    value: Any, what: str, low: float, high: float = math.inf, *, low_open: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value >= high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise InputError(f"{what} must be a number in {interval}, got {value!r}")


def check_config(config: FinetuneConfig) -> None:
    """Refuse bad arguments with one line, before anything is read."""
    from htsr_cli.allocate.schemes import parse_scheme
    from htsr_cli.engine.fit import FIT_MODES
    from htsr_cli.engine.metrics import METRICS
    from htsr_cli.engine.presets import check_fit, get_preset

    positive_int(config.epochs, "--epochs")
    positive_int(config.batch_size, "--batch-size")
    positive_int(config.reallocate_every, "--reallocate-every")
    _finite(config.lr, "--lr", 0, low_open=True)
    _finite(config.weight_decay, "--weight-decay", 0)
    _finite(config.momentum, "--momentum", 0, 1)
    _finite(config.label_smoothing, "--label-smoothing", 0, 1)
    if (
        isinstance(config.warmup_epochs, bool)
        or not isinstance(config.warmup_epochs, int)
        or not 0 <= config.warmup_epochs < config.epochs
    ):
        raise InputError(
            f"--warmup-epochs must be an integer in [0, epochs), got {config.warmup_epochs!r}"
        )
    if config.width is not None:
        _finite(config.width, "--width", 0, low_open=True)
    if config.image_size is not None:
        positive_int(config.image_size, "--image-size")
    if config.num_classes is not None:
        positive_int(config.num_classes, "--num-classes")
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown --optimizer {config.optimizer!r}; choose sgd or adamw")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum == 0):
        raise InputError("--nesterov needs --optimizer sgd and a positive --momentum")
    if config.augment not in AUGMENTS:
        raise InputError(f"unknown --augment {config.augment!r}; choose {', '.join(AUGMENTS)}")
    if config.lr_plan and config.allocate:
        raise InputError(
            "--lr-plan and --allocate exclude each other (a static plan, or re-allocation)"
        )
    if config.allocate:
        parse_scheme(config.allocate)
    if config.metric not in METRICS:
        raise InputError(f"unknown --metric {config.metric!r}; choose from {', '.join(METRICS)}")
    if config.fit not in FIT_MODES:
        raise InputError(f"unknown --fit {config.fit!r}; choose from {', '.join(FIT_MODES)}")
    if config.preset is not None:
        tool = get_preset(config.preset, "finetune")
        check_fit(tool, config.fit)
        if not config.allocate:
            raise InputError(
                f"--preset {config.preset} sets the conventions of --allocate's re-allocation; "
                "give --allocate SCHEME (e.g. tb-linear)"
            )
    if config.keep_masks and not config.init:
        raise InputError("--keep-masks keeps the zeros of an --init checkpoint; give --init")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {config.seed!r}")


def _absolute_data(spec: str) -> str:
    """The ``--data`` spec with its path made absolute, so that ``--resume`` works from any
    directory."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "cifar100") and rest:
        return f"{kind}:{Path(rest).resolve()}"
    if spec != "digits" and not sep:
        return str(Path(spec).resolve())
    return spec


def is_user_arch(arch: Any) -> bool:
    """Whether ``--arch`` names a user factory (``package.module:function``), whose module is
    imported, i.e. whose code runs."""
    return isinstance(arch, str) and ":" in arch


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> FinetuneConfig:
    """The configuration of the run in ``run_dir`` (its args.json), with ``overrides`` of the
    :data:`RUNTIME_OPTIONS` (None values are ignored).

    A run directory may come from someone else, so what would run code needs the same
    consent as on the first run (:data:`CONSENT_OPTIONS`): a user ``--arch`` is imported only
    when ``--arch`` is given again, unchanged, and a stored ``--trust-pickle`` holds only when
    ``--trust-pickle`` is given again."""
    run = RunDir(run_dir)
    doc = run.read_args()
    given = {k: v for k, v in overrides.items() if v is not None}
    consent = {k: given.pop(k) for k in CONSENT_OPTIONS if k in given}
    args_file = run.path / "args.json"
    if "arch" in consent and consent["arch"] != doc.get("arch"):
        raise InputError(
            f"--arch cannot change when resuming: the run's is {doc.get('arch')!r} ({args_file})"
        )
    if is_user_arch(doc.get("arch")) and "arch" not in consent:
        raise InputError(
            f"{args_file} names the user architecture {doc['arch']!r}: resuming imports "
            f"and runs its code; pass --arch {doc['arch']} again to allow it"
        )
    doc["trust_pickle"] = bool(consent.get("trust_pickle", False))
    fixed = sorted(set(given) - set(RUNTIME_OPTIONS))
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise InputError(
            f"{names} cannot change when resuming (the run keeps the arguments in "
            f"{run.path / 'args.json'}); only --epochs, --device, --compile and "
            "--amp may"
        )
    doc.update(given, output=str(run.path))
    try:
        return FinetuneConfig.from_dict(doc)
    except TypeError as exc:
        raise InputError(f"{run.path / 'args.json'} is incomplete: {exc}") from None


def stored_config(config: FinetuneConfig) -> FinetuneConfig:
    """The configuration as args.json keeps it: paths absolute."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p

    return replace(
        config,
        data=_absolute_data(config.data),
        init=absolute(config.init),
        lr_plan=absolute(config.lr_plan),
        output=str(Path(config.output).resolve()),
        label=config.label or Path(config.output).resolve().name,
    )
