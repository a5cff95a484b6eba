"""``analyze``: the layer walk over a checkpoint and the analysis document it produces.

This is the one layer walk of the project: allocate, prune and plot build on its result.
Tensors are read one at a time, in order, and computed by ``--jobs`` worker threads; each is
dropped after its eigenvalues are taken and at most ``jobs + 1`` are held (more on a GPU,
where ``rand_distance``'s shuffles run ahead: :func:`read_ahead`), so peak memory follows
the largest tensor, not the checkpoint (docs/engine.md, "Scheduling the work")."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from threadpoolctl import threadpool_info, threadpool_limits

from htsr_cli.defaults import ANALYZE_MIN_EVALS as DEFAULT_MIN_EVALS
from htsr_cli.defaults import SEED as DEFAULT_SEED
from htsr_cli.engine import distributed, spectrum
from htsr_cli.engine.columns import ALPHA_HIGH, ALPHA_LOW
from htsr_cli.engine.fit import FIT_MODES, HTSR, FitConventions, fit_cut, fit_power_law
from htsr_cli.engine.gates import evaluate_gates, parse_gate, require_metrics
from htsr_cli.engine.metrics import FIT_METRICS, METRICS, layer_metrics
from htsr_cli.engine.presets import check_fit, get_preset
from htsr_cli.errors import InputError
from htsr_cli.io import schemas
from htsr_cli.io.checkpoint import Checkpoint, TensorRef, open_checkpoint
from htsr_cli.io.output import jsonable

SCHEMA = schemas.ANALYSIS
#: Below this many fitted eigenvalues alpha is a small-sample estimate: flagged.
SMALL_SAMPLE = 50
#: alpha outside [2, 6]: WeightWatcher's over-/under-trained warnings.
#: Held while an analysis has changed the process-wide torch/BLAS thread settings.
_THREAD_SETTINGS = threading.RLock()

_FLOAT_DTYPES = {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
}

#: Per-layer columns in document order (metrics are inserted after ``num_evals``).
GEOMETRY_COLUMNS = ("type", "N", "M", "Q", "rf", "num_evals")
FIT_COLUMNS = ("xmin", "xmax", "D", "sigma", "num_pl_spikes", "matrix_rank", "status", "warning")


class Summary(dict):
    """``Analysis.summary``: a plain dict of metric means, also callable (``summary()``
    returns itself) so that code written when it was a method keeps working."""

    def __call__(self) -> Summary:
        return self


#: htsr column -> WeightWatcher's name for it, where the two differ (``to_pandas``); the
#: metrics and N, M, Q, rf, num_evals, xmin, xmax, D, sigma, ... already share its names.
WW_COLUMNS = {"type": "layer_type"}
#: htsr's layer kinds as WeightWatcher's ``layer_type`` values.
WW_LAYER_TYPES = {"linear": "dense", "conv1d": "conv1d", "conv2d": "conv2d"}


@dataclass
class Analysis:
    """The result of :func:`analyze`; ``to_dict()`` is the ``htsr.analysis/1`` document."""

    source: dict[str, Any]
    options: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: ``--fail-if`` results as plain dicts, like ``layers`` (``GateResult.to_dict()``:
    #: gate, passed, value, offending, message, ...).
    gates: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: layer name -> ascending eigenvalues (CPU, float64), only with ``keep_spectra=True``.
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.gates if not g["passed"]]

    @property
    def metrics(self) -> list[str]:
        return list(self.options["metrics"])

    @property
    def summary(self) -> Summary:
        """Mean of each computed metric over the layers where it is finite (None when none):
        the document's ``summary``. Data, like ``layers``; ``summary()`` still works."""
        out = Summary()
        for m in self.metrics:
            vals = [
                v
                for v in (layer.get(m) for layer in self.layers)
                if v is not None and math.isfinite(v)
            ]
            out[m] = sum(vals) / len(vals) if vals else None
        return out

    def to_pandas(self) -> Any:
        """The layers as a ``pandas.DataFrame``, one row per layer, with WeightWatcher's
        column names where one exists (``layer_id``, ``name``, ``alpha``, ``stable_rank``,
        ... as ``ww.WeightWatcher().analyze()`` returns them) so that notebooks written for
        WeightWatcher keep working; every other column keeps its htsr name.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Analysis.to_pandas() needs pandas, which is not installed: pip install pandas"
            ) from None
        rows = []
        for i, row in enumerate(self.layers):
            out = {"layer_id": i, "name": row["name"], "longname": row["name"]}
            out.update({WW_COLUMNS.get(k, k): v for k, v in row.items() if k != "name"})
            if "layer_type" in out:
                out["layer_type"] = WW_LAYER_TYPES.get(out["layer_type"], out["layer_type"])
            rows.append(out)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA,
            "source": self.source,
            "options": self.options,
            "summary": dict(self.summary),
            "layers": self.layers,
            "skipped": self.skipped,
        }
        if self.gates:
            doc["gates"] = self.gates
        return jsonable(doc)


def resolve_device(device: str) -> torch.device:
    """``auto`` takes CUDA when present; ``cuda``/``cuda:N`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def parse_metrics(metrics: str | Sequence[str] | None) -> list[str]:
    """Validate a metric subset (comma-separated string or list); None means all ten."""
    if metrics is None:
        return list(METRICS)
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise InputError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(METRICS)}"
        )
    return [m for m in METRICS if m in names]  # canonical order, no duplicates


def _layer_seed(seed: int, name: str) -> int:
    # Per-layer stream: a layer's rand_distance does not depend on which other layers ran.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _selected(name: str, layers: Sequence[str], exclude: Sequence[str]) -> bool:
    if layers and not any(fnmatch.fnmatchcase(name, g) for g in layers):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in exclude)


def exact_glob(name: str) -> str:
    """A ``--layers`` pattern that matches exactly the layer ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_refs(ckpt: Checkpoint) -> list[TensorRef]:
    """Weight tensors that could be layers, in layer order: ``*.weight`` keys of 2 or more
    dimensions. The one list of layers that analyze, prune and plot walk.

    Torch files keep the state dict's (model) order, and so do safetensors files written by
    htsr (they record it). Other safetensors files store tensors sorted by dtype and name, so
    there layers are put in natural order (``blocks.2`` before ``blocks.10``), the closest to
    model order a name gives.
    """
    refs = [r for r in ckpt.tensors() if r.key.endswith(".weight") and len(r.shape) >= 2]
    if not ckpt.model_order:
        refs.sort(key=lambda r: _natural_key(r.key))
    return refs


def _warning(fit_status: str, alpha: float, n_fit: int) -> str:
    notes = []
    if fit_status == "success":
        if alpha < ALPHA_LOW:
            notes.append("over-trained")
        elif alpha > ALPHA_HIGH:
            notes.append("under-trained")
    if n_fit < SMALL_SAMPLE:
        notes.append(f"small sample ({n_fit} eigenvalues)")
    return "; ".join(notes)


def analyze_layer(
    name: str,
    weight: torch.Tensor,
    *,
    fit: str = "ww",
    metrics: Sequence[str] = METRICS,
    device: torch.device | str = "cpu",
    seed: int = DEFAULT_SEED,
    spectra: dict[str, torch.Tensor] | None = None,
    conventions: FitConventions = HTSR,
    shuffle: Future[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Every column of one layer from its weight tensor (the unit the whole tool is built on).

    When ``spectra`` is given, the layer's eigenvalues are stored there under its name.
    ``conventions``: the fit's (a preset's, see :mod:`htsr_cli.engine.presets`).
    ``shuffle``: the future of :func:`shuffled_weight` for this layer, started earlier by the
    caller (the walk's read-ahead); None shuffles here (beside the eigen-solve on a GPU)."""
    geom = spectrum.geometry(tuple(weight.shape))
    if geom is None:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} is not a layer")
    w = (
        weight.to(device=device, dtype=torch.float32)
        if weight.dtype not in (torch.float32, torch.float64)
        else weight.to(device)
    )
    wanted = frozenset(metrics)
    if shuffle is None and "rand_distance" in wanted and w.device.type != "cpu":
        # On a GPU the CPU shuffle runs beside the eigen-solve of the weight itself.
        shuffle = _in_background(shuffled_weight, name, weight, seed)
    evals = spectrum.eigenvalues(w, device)
    if spectra is not None:
        spectra[name] = evals.cpu()
    if wanted & FIT_METRICS:
        pl = fit_power_law(evals, fit, spectrum.EVALS_THRESH, conventions)
    else:
        pl = None
    alpha = pl.alpha if pl is not None else math.nan
    rand_evals = None
    if "rand_distance" in wanted:
        if shuffle is None:
            rand_w = shuffled_weight(name, w, seed)
        elif w.device.type == "cpu":
            rand_w = shuffle.result()  # float64 for mid-sized layers: the Gram's own dtype
        else:
            rand_w = shuffle.result().to(device=w.device, dtype=w.dtype)
        rand_evals = spectrum.eigenvalues(rand_w, device)
    rank = spectrum.matrix_rank(w, evals, geom)
    n_fit = int((evals > fit_cut(spectrum.EVALS_THRESH, conventions)).sum())
    row: dict[str, Any] = {
        "name": name,
        "type": geom.kind,
        "N": geom.N,
        "M": geom.M,
        "Q": geom.Q,
        "rf": geom.rf,
        "num_evals": int(evals.numel()),
    }
    row.update(layer_metrics(evals, alpha, rank, rand_evals, wanted))
    if pl is None:
        status, reason = "not-fitted", "no fit metric requested"
        row.update(
            xmin=math.nan, xmax=float(evals[-1]), D=math.nan, sigma=math.nan, num_pl_spikes=0
        )
    else:
        status, reason = pl.status, pl.reason
        row.update(
            xmin=pl.xmin, xmax=pl.xmax, D=pl.D, sigma=pl.sigma, num_pl_spikes=pl.num_pl_spikes
        )
        row.update(pl.extra)
    row["matrix_rank"] = rank
    row["status"] = status
    warning = _warning(status, alpha, n_fit)
    row["warning"] = "; ".join(s for s in (reason, warning) if s)
    return row


def shuffled_weight(name: str, weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The shuffled copy behind ``rand_distance``: the layer's entries (as float32 unless
    float64) permuted on the CPU with the seed derived from ``seed`` and the layer's name,
    so the same on every device, in every walk order and on every rank."""
    cpu_w = weight.detach()
    if cpu_w.dtype not in (torch.float32, torch.float64):
        cpu_w = cpu_w.to(torch.float32)
    return spectrum.shuffled(cpu_w.cpu(), _layer_seed(seed, name))


def _in_background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` on a new thread; its result (or exception) in the returned future."""
    fut: Future[Any] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller's thread by fut.result()
            fut.set_exception(exc)

    threading.Thread(target=run, name="htsr-shuffle", daemon=True).start()
    return fut


def analyze(
    source: Any,
    *,
    fit: str | None = None,
    metrics: str | Sequence[str] | None = None,
    device: str = "auto",
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    min_evals: int | None = None,
    seed: int = DEFAULT_SEED,
    trust_pickle: bool = False,
    key: str | None = None,
    fail_if: Sequence[str] = (),
    keep_spectra: bool = False,
    jobs: int | None = None,
    on_layer: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    preset: str | None = None,
    shard: bool | None = None,
) -> Analysis:
    """Compute the HT-SR metrics of every layer of a checkpoint.

    Under torchrun (``WORLD_SIZE`` > 1) the layers are split across the ranks by estimated
    cost, each rank reads and analyses its own, and every rank returns the whole analysis
    (rows gathered in checkpoint order, gates evaluated by rank 0); ``on_layer`` and
    ``on_progress`` are called on rank 0 only. Any rank failing stops them all: rank 0
    raises :class:`~htsr_cli.engine.distributed.RankFailed` (its message names the rank and
    layer), the others :class:`~htsr_cli.engine.distributed.PeerFailed` (docs/distributed.md).

    Args:
        source: a checkpoint path (file or Hugging Face directory), a state dict, an
            ``nn.Module``, or an already open :class:`~htsr_cli.io.checkpoint.Checkpoint`.
        fit: power-law fit mode, one of ``ww`` (the default), ``median``, ``peak``,
            ``clip-xmax``.
        metrics: a subset of the ten metrics (list or comma-separated); None for all.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` and ``cuda`` mean the GPU
            of ``LOCAL_RANK`` under torchrun).
        layers, exclude: fnmatch globs on layer names (state-dict key without ``.weight``).
        min_evals: layers with fewer pooled eigenvalues are skipped (listed in ``skipped``);
            default 8.
        seed: seed of the shuffles behind ``rand_distance``.
        trust_pickle: allow torch files that need code to unpickle.
        key: where the state dict lives inside a torch file (``--key``; by default it is
            found under ``state_dict``, ``model_state_dict``, ``model``, ``ema``, ...).
        fail_if: gate expressions (docs/gates.md), evaluated into ``Analysis.gates``.
        keep_spectra: keep every layer's eigenvalues in ``Analysis.spectra`` (for plots).
        jobs: layers analysed at once (default: up to 4 on the CPU, 1 on CUDA; see
            :func:`parallelism`). Results do not depend on it beyond float rounding.
        on_layer: called with each layer row (or skipped record) in checkpoint order, as soon
            as it and every layer before it are done.
        on_progress: called as ``(done, total, layer_name)`` after each layer.
        preset: ``tempbalance``, ``alphapruning`` or ``weightwatcher``: that tool's fit
            conventions, default fit, layer set and ``min_evals`` (docs/presets.md); ``fit``
            and ``min_evals`` given explicitly still win.
        shard: split the layers across torchrun's ranks (every rank must call); None (the
            default) does when ``WORLD_SIZE`` > 1 and no process group is set up yet
            (:func:`~htsr_cli.engine.distributed.should_shard`).

    Raises:
        InputError: unreadable source, bad option, or no weight matrix to analyse.
    """
    settings = check_options(
        fit=fit, metrics=metrics, min_evals=min_evals, fail_if=fail_if, preset=preset, jobs=jobs
    )
    t0 = time.perf_counter()
    with distributed.Group.from_env(shard) as group:
        plan = distributed.agree(
            group,
            lambda: _plan(
                source,
                settings,
                group,
                device=device,
                layers=layers,
                exclude=exclude,
                seed=seed,
                trust_pickle=trust_pickle,
                key=key,
            ),
            lambda p: p.fingerprint,
        )
        try:
            with _thread_settings(plan.device, settings.jobs) as (workers, ahead):
                done = _walk_share(
                    plan,
                    settings,
                    group,
                    seed=seed,
                    keep_spectra=keep_spectra,
                    workers=workers,
                    ahead=ahead,
                    on_layer=on_layer,
                    on_progress=on_progress,
                )
            records = _gather(group, done)
            return _assemble(
                plan,
                settings,
                group,
                records,
                key=key,
                t0=t0,
                on_layer=on_layer,
                on_progress=on_progress,
            )
        finally:
            plan.close()


@dataclass(frozen=True)
class Settings:
    """The options of an analysis, checked before any work (:func:`check_options`)."""

    fit: str
    min_evals: int
    metrics: list[str]
    gates: list[Any]
    fail_if: list[str]
    tool: Any  # the preset, or None
    conventions: FitConventions
    jobs: int | None


def check_options(
    *,
    fit: str | None = None,
    metrics: str | Sequence[str] | None = None,
    min_evals: int | None = None,
    fail_if: Sequence[str] = (),
    preset: str | None = None,
    jobs: int | None = None,
) -> Settings:
    """Step 1: every option checked and resolved (preset defaults), before a file is opened.

    Raises:
        InputError: a bad fit mode, metric, gate, ``min_evals`` or ``jobs``.
    """
    tool = get_preset(preset, "analyze")
    fit = fit if fit is not None else (tool.fit if tool else "ww")
    if min_evals is None:
        min_evals = tool.analyze_min_evals if tool else DEFAULT_MIN_EVALS
    if fit not in FIT_MODES:
        raise InputError(f"unknown fit mode {fit!r}; choose from {', '.join(FIT_MODES)}")
    if tool:
        check_fit(tool, fit)
    if min_evals < 1:
        raise InputError(f"--min-evals must be a positive integer, got {min_evals}")
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be a positive integer, got {jobs}")
    names = parse_metrics(metrics)
    gates = [parse_gate(g) for g in fail_if]  # malformed gates fail before any work
    require_metrics(gates, names)
    return Settings(
        fit=fit,
        min_evals=min_evals,
        metrics=names,
        gates=gates,
        fail_if=list(fail_if),
        tool=tool,
        conventions=tool.fit_conventions() if tool else HTSR,
        jobs=jobs,
    )


@dataclass
class Plan:
    """Step 2: what this process analyses: the open checkpoint, its device and the chosen
    layers, with the document's options and the fingerprint every rank must share."""

    ckpt: Checkpoint
    owned: bool  # opened here, so closed here
    device: torch.device
    chosen: list[TensorRef]
    options: dict[str, Any]
    fingerprint: str

    def close(self) -> None:
        if self.owned:
            self.ckpt.close()


def _plan(
    source: Any,
    settings: Settings,
    group: distributed.Group,
    *,
    device: str,
    layers: Sequence[str],
    exclude: Sequence[str],
    seed: int,
    trust_pickle: bool,
    key: str | None,
) -> Plan:
    dev = _rank_device(device, group)
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(source, trust_pickle=trust_pickle, key=key)
    )
    try:
        if ckpt.path is not None and group.rank == 0:
            ckpt.start_hashing()  # overlaps the sha256 of the files with the eigen-solves
        chosen = choose_layers(ckpt, layers, exclude)
        options = {
            "fit": settings.fit,
            "metrics": settings.metrics,
            "device": str(dev),
            "layers": list(layers),
            "exclude": list(exclude),
            "min_evals": settings.min_evals,
            "seed": seed,
            # the fit's eigenvalue filter: 0 where a preset keeps every positive eigenvalue
            "evals_thresh": spectrum.EVALS_THRESH if settings.conventions.filter_evals else 0.0,
            "fail_if": settings.fail_if,
            "preset": settings.tool.name if settings.tool else None,
        }
        shared = {k: v for k, v in options.items() if k != "device"}  # cuda:LOCAL_RANK differs
        files = sorted({r.file for r in layer_refs(ckpt) if r.file is not None})
        stamp = distributed.fingerprint(files, chosen, shared) if group.sharded else ""
    except BaseException:
        if ckpt is not source:
            ckpt.close()
        raise
    return Plan(ckpt, ckpt is not source, dev, chosen, options, stamp)


def _rank_device(device: str, group: distributed.Group) -> torch.device:
    """:func:`resolve_device`, where ``auto`` and ``cuda`` mean the GPU of ``LOCAL_RANK`` in
    a sharded run."""
    if group.sharded:
        distributed.check_shard_device(device)
    dev = resolve_device(device)
    if group.sharded and dev.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {group.local_rank} has no GPU: only "
                f"{torch.cuda.device_count()} CUDA device(s) present"
            )
        dev = torch.device("cuda", group.local_rank)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def choose_layers(
    ckpt: Checkpoint, layers: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[TensorRef]:
    """The layers to analyse: :func:`layer_refs` filtered by the ``--layers``/``--exclude``
    globs.

    Raises:
        InputError: the checkpoint holds no weight matrix, or no layer matches the globs.
    """
    candidates = layer_refs(ckpt)
    if not candidates:
        raise InputError(
            f"{ckpt.path or 'the state dict'} holds no weight matrix "
            "(no '.weight' tensor with 2 or more dimensions)"
        )
    chosen = [r for r in candidates if _selected(r.key[: -len(".weight")], layers, exclude)]
    if not chosen:
        names_ = [r.key[: -len(".weight")] for r in candidates]
        some = ", ".join(names_[:5]) + (", ..." if len(names_) > 5 else "")
        raise InputError(
            f"no layer matches --layers {list(layers)} / --exclude "
            f"{list(exclude)} ({len(candidates)} layers in the checkpoint: {some})"
        )
    return chosen


@contextlib.contextmanager
def _thread_settings(dev: torch.device, jobs: int | None) -> Iterator[tuple[int, int]]:
    """Step 3: the process-wide thread settings of the walk; yields the number of workers
    and of shuffles run ahead (:func:`read_ahead`).

    torch's and the BLAS pools' thread counts are process-wide: analyses in several threads
    take turns, so that each one restores what it found."""
    workers, blas_threads = parallelism(dev, jobs)
    with _THREAD_SETTINGS:
        threads = torch.get_num_threads()
        if dev.type == "cpu":
            # The CPU eigen-work runs in numpy's BLAS (spectrum.eigenvalues); torch's own
            # thread pool, spinning between the small fit ops, would slow it (measured ~15%).
            torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=blas_threads, user_api="blas"):
                yield workers, read_ahead(dev)
        finally:
            torch.set_num_threads(threads)


class LayerJob:
    """The work of one layer on a worker thread: ``job(name, weight)`` is ``(row, spectra)``,
    or ``(skipped record, None)`` for a weight that holds no values, that the preset leaves
    out, or that is not finite."""

    def __init__(
        self, settings: Settings, device: torch.device, seed: int, keep_spectra: bool
    ) -> None:
        self.settings, self.device, self.seed, self.keep_spectra = (
            settings,
            device,
            seed,
            keep_spectra,
        )

    def skip_reason(self, name: str, weight: torch.Tensor) -> str:
        """Why this weight is skipped once read ("" when it is analysed)."""
        if weight.device.type == "meta":
            return "meta tensor: it holds no values"
        if weight.layout != torch.strided:
            return f"{str(weight.layout).removeprefix('torch.')} tensor: not a dense weight"
        tool = self.settings.tool
        return (tool.skip_reason(name, tuple(weight.shape)) or "") if tool else ""

    def shuffle(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The layer's shuffled copy for ``rand_distance`` (None for a skipped weight), run
        ahead of the layer's eigen-solves by the walk."""
        return None if self.skip_reason(name, weight) else shuffled_weight(name, weight, self.seed)

    def __call__(
        self, name: str, weight: torch.Tensor, shuffle: Future[torch.Tensor] | None = None
    ) -> tuple[dict[str, Any], dict | None]:
        s = self.settings
        if why := self.skip_reason(name, weight):
            return {"name": name, "reason": why}, None
        spectra: dict[str, torch.Tensor] = {}
        try:
            row = analyze_layer(
                name,
                weight,
                fit=s.fit,
                metrics=s.metrics,
                device=self.device,
                seed=self.seed,
                spectra=spectra if self.keep_spectra else None,
                conventions=s.conventions,
                shuffle=shuffle,
            )
        except spectrum.NonFiniteWeightError as exc:  # a diverged run: skip, keep going
            # "nonfinite" lets the gates fail a diverged layer (docs/gates.md).
            return {"name": name, "reason": str(exc), "nonfinite": True}, None
        return row, spectra


#: One walked layer: ``(index in the chosen list, row or skipped record, spectra or None)``.
Walked = tuple[int, dict[str, Any], "dict | None"]


def _walk_share(
    plan: Plan,
    settings: Settings,
    group: distributed.Group,
    *,
    seed: int,
    keep_spectra: bool,
    workers: int,
    ahead: int,
    on_layer: Callable[[dict[str, Any]], None] | None,
    on_progress: Callable[[int, int, str], None] | None,
) -> Any:
    """Step 4: walk this rank's share of the layers (all of them in a local run, where
    ``on_layer``/``on_progress`` are called as layers finish). Returns the walked layers; in
    a sharded run, this rank's payload for :func:`_gather` (its layers, its failure, or
    "stopped" when a peer failed first)."""
    total = len(plan.chosen)
    if group.sharded:
        wants_rand = "rand_distance" in settings.metrics
        costs = [distributed.layer_cost(r.shape, rand_distance=wants_rand) for r in plan.chosen]
        owners = distributed.assign(costs, group.world)
        mine = [i for i in range(total) if owners[i] == group.rank]
        group.begin_share([plan.chosen[i].key[: -len(".weight")] for i in mine])
    else:
        mine = list(range(total))
    job = LayerJob(settings, plan.device, seed, keep_spectra)
    out: list[Walked] = []
    try:
        with (
            group.progress(total, on_progress) as progress,
            contextlib.closing(
                _walk(
                    plan.ckpt,
                    [plan.chosen[i] for i in mine],
                    settings.min_evals,
                    job,
                    workers,
                    stop=group.stopping if group.sharded else None,
                    shuffle=job.shuffle if "rand_distance" in settings.metrics else None,
                    ahead=ahead,
                )
            ) as walk,
        ):
            # closing(): a callback that raises must also stop the workers before the thread
            # settings are restored and the checkpoint closed.
            for done, (record, spectra) in enumerate(walk, start=1):
                out.append((mine[done - 1], record, spectra))
                group.layer_done(record["name"])
                if on_layer and not group.sharded:
                    on_layer(record)
                if progress:
                    progress(done, total, record["name"])
    except distributed.Stopped:
        return ("stopped",)
    except Exception as exc:
        if not group.sharded:
            raise
        message, code = distributed.describe(exc)
        layer = getattr(exc, "htsr_layer", None)
        return ("failed", distributed.Failure(group.rank, layer, message, code, group.failed()))
    return ("ok", out) if group.sharded else out


def _gather(group: distributed.Group, done: Any) -> list[Walked]:
    """Step 5: every rank's walked layers in checkpoint order (a local run's as they are);
    the first failure of any rank is raised on every rank."""
    if not group.sharded:
        return done
    got = group.exchange(done)
    failures = [p[1] for p in got if p[0] == "failed"]
    if failures:
        group.raise_failure(failures)
    return sorted((item for p in got for item in p[1]), key=lambda item: item[0])


def _assemble(
    plan: Plan,
    settings: Settings,
    group: distributed.Group,
    records: list[Walked],
    *,
    key: str | None,
    t0: float,
    on_layer: Callable[[dict[str, Any]], None] | None,
    on_progress: Callable[[int, int, str], None] | None,
) -> Analysis:
    """Step 6: the document: rows and skipped records in checkpoint order, the gates and the
    source (evaluated and hashed once, by rank 0, in a sharded run)."""
    result = Analysis(source={}, options=plan.options)
    for _, record, spectra in records:
        if spectra is None:
            result.skipped.append(record)
        else:
            result.layers.append(record)
            result.spectra.update(spectra)
        if on_layer and group.sharded and group.rank == 0:
            on_layer(record)  # a local run streamed them as they finished
    if on_progress and group.sharded and group.rank == 0 and records:
        on_progress(len(records), len(records), records[-1][1]["name"])
    head = None
    if group.rank == 0:
        gates = evaluate_gates(settings.gates, result.layers, skipped=result.skipped)
        source = {"path": plan.ckpt.path, "format": plan.ckpt.format, "files": plan.ckpt.files()}
        if key is not None:
            source["key"] = key
        head = ([g.to_dict() for g in gates], source, plan.options)
    result.gates, result.source, result.options = group.broadcast(head)
    result.seconds = time.perf_counter() - t0
    return result


def analyze_metric(
    source: Any, metric: str, *, analysis_seed: int | None = None, **options: Any
) -> Analysis:
    """One metric of every layer of a checkpoint: the on-the-fly analysis of ``allocate`` and
    ``prune``. Options left at None take analyze's defaults; ``analysis_seed`` is analyze's
    ``seed`` (named apart from those commands' own ``--seed``).

    Under torchrun the analysis is sharded like :func:`analyze`'s; then the ranks other than
    0, whose part is done, exit with status 0 (:class:`~htsr_cli.engine.distributed.PeerDone`)
    and rank 0 alone goes on to plan, prune and write."""
    opts = {k: v for k, v in options.items() if v is not None}
    if analysis_seed is not None:
        opts["seed"] = analysis_seed
    sharded = distributed.should_shard(opts.get("shard"))
    result = analyze(source, metrics=[metric], **opts)
    if sharded and distributed.dist_env()[1] != 0:
        raise distributed.PeerDone(0)
    return result


def parallelism(device: torch.device, jobs: int | None = None) -> tuple[int, int | None]:
    """``(layers analysed at once, BLAS threads each)`` for a device and a ``--jobs`` value;
    BLAS threads None means "leave the BLAS thread pool as it is".

    On the CPU, LAPACK's ``eigvalsh`` of a 1024x1024 Gram gains only ~1.3x from a second thread
    while two single-threaded solves side by side gain ~2x, so layers run concurrently, up to
    4 at once, and the threads are split between them. The thread budget is the CPUs this
    process may run on, capped by the BLAS pool's current size, so ``OMP_NUM_THREADS=1`` (or
    ``OPENBLAS_NUM_THREADS``, ...) still means one thread. On CUDA one layer at a time: the
    kernels share one device; the worker thread still overlaps reading the next tensor.
    """
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be a positive integer, got {jobs}")
    if device.type != "cpu":
        return jobs or 1, None
    budget = _cpu_budget()
    pools = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    if pools:
        budget = max(1, min(budget, max(pools)))
    jobs = jobs or min(budget, 4)
    return jobs, max(1, budget // jobs)


#: Most shuffles a walk runs ahead of the eigen-solves (each holds its tensor and a copy).
MAX_READ_AHEAD = 8


def read_ahead(device: torch.device) -> int:
    """How many layers' ``rand_distance`` shuffles run ahead, on threads of their own, while
    the eigen-solves run (0: each worker shuffles its layer between its two solves).

    The shuffle is one CPU thread's work per layer (numpy's Fisher-Yates, which keeps a
    seed's permutation): ~40 ns an entry once the layer outgrows the caches, 1.8 s for an
    11008x4096 matrix, far longer than a GPU's eigen-solve of it. On a GPU the CPU is
    otherwise idle, so every core but two (the reader's and the GPU feeder's) shuffles ahead,
    at most :data:`MAX_READ_AHEAD`; the cores are torch's thread count where that is lower
    (``OMP_NUM_THREADS``, which ``--nproc-per-node`` sets to each process's share). On the
    CPU every core already runs a worker's BLAS threads, and a shuffle thread beside them
    measured slower, not faster (2 cores, ``--jobs 1``: 31.4-35.4 s against 29.8-31.4 s for
    GPT-2-medium's shape): none there."""
    if device.type != "cpu":
        cores = min(_cpu_budget(), torch.get_num_threads())
        return max(1, min(MAX_READ_AHEAD, cores - 2))
    return 0


def _cpu_budget() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _walk(
    ckpt: Checkpoint,
    chosen: Sequence[TensorRef],
    min_evals: int,
    compute: Callable[[str, torch.Tensor], tuple[dict[str, Any], dict | None]],
    workers: int,
    stop: Callable[[], bool] | None = None,
    shuffle: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    ahead: int = 0,
) -> Iterator[tuple[dict[str, Any], dict | None]]:
    """Yield ``compute(name, weight)`` per layer, ``(row, spectra)`` or ``(skipped, None)``, and
    ``({"name", "reason"}, None)`` for a layer skipped from its metadata, in checkpoint order.
    Every skipped record also gets the layer's ``shape`` and ``dtype``, so that a consumer of
    the document (prune) still counts the layer.

    Tensors are read in this thread, in checkpoint order, and computed on ``workers`` threads;
    at most ``workers + 1`` tensors are held at once, so peak memory still follows the largest
    tensor. With ``shuffle`` and ``ahead`` > 0 (``rand_distance`` with cores to spare, see
    :func:`read_ahead`), ``ahead`` more tensors are read ahead and ``shuffle(name, weight)``
    of each runs on ``ahead`` threads of its own as soon as it is read; ``compute`` then gets
    its future as a third argument. An exception is marked with the layer it came from
    (:func:`~htsr_cli.engine.distributed.mark_layer`); ``stop()``, asked before each tensor is
    read, ends the walk with :class:`~htsr_cli.engine.distributed.Stopped` (a peer failed)."""
    pending: deque[tuple[TensorRef, Future[Any] | dict[str, Any]]] = deque()

    def finish(
        ref: TensorRef, job: Future[Any] | dict[str, Any]
    ) -> tuple[dict[str, Any], dict | None]:
        try:
            record, spectra = job.result() if isinstance(job, Future) else (job, None)
        except Exception as exc:
            distributed.mark_layer(exc, ref.key[: -len(".weight")])
            raise
        if spectra is None:
            record.update(shape=list(ref.shape), dtype=ref.dtype)
        return record, spectra

    def start(ref: TensorRef) -> Future[Any] | dict[str, Any]:
        name = ref.key[: -len(".weight")]
        reason = _skip_reason(ref, min_evals)
        if reason:
            return {"name": name, "reason": reason}
        try:
            weight = ckpt.load(ref.key)
        except Exception as exc:
            distributed.mark_layer(exc, name)
            raise
        if shuffler is None:
            return pool.submit(compute, name, weight)
        return pool.submit(compute, name, weight, shuffler.submit(shuffle, name, weight))

    ahead = ahead if shuffle is not None else 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="htsr-layer"))
        shuffler = None
        if ahead:
            shuffler = ThreadPoolExecutor(ahead, thread_name_prefix="htsr-shuffle")
            # Closed first (exit order): nothing new starts once the walk ends or fails.
            stack.callback(shuffler.shutdown, wait=True, cancel_futures=True)
        try:
            for ref in chosen:
                if stop is not None and stop():
                    raise distributed.Stopped()
                pending.append((ref, start(ref)))
                while len(pending) > workers + ahead:
                    yield finish(*pending.popleft())
            while pending:
                yield finish(*pending.popleft())
        finally:
            for _, job in pending:  # an error or an abandoned walk: start nothing more
                if isinstance(job, Future):
                    job.cancel()


def _skip_reason(ref: TensorRef, min_evals: int) -> str:
    geom = spectrum.geometry(ref.shape)
    if geom is None:
        return f"{len(ref.shape)}-D weight {tuple(ref.shape)} is not a Linear/Conv1d/Conv2d"
    if ref.dtype not in _FLOAT_DTYPES:
        return f"dtype {ref.dtype} is not a floating-point weight (quantized?)"
    if geom.num_evals < min_evals:
        return f"{geom.num_evals} eigenvalues < --min-evals {min_evals}"
    return ""
