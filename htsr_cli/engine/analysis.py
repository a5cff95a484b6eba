"""``analyze``: the layer walk over a checkpoint and the analysis document it produces.

This is the one layer walk of the project: allocate, prune and plot build on its result.
Tensors are read one at a time, in order, and computed by ``--jobs`` worker threads; each is
dropped after its eigenvalues are taken and at most ``jobs + 1`` are held, so peak memory
follows the largest tensor, not the checkpoint (docs/engine.md, "Scheduling the work").
"""

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
from htsr_cli.engine import spectrum
from htsr_cli.engine.columns import ALPHA_HIGH, ALPHA_LOW
from htsr_cli.engine.fit import FIT_MODES, HTSR, FitConventions, fit_power_law
from htsr_cli.engine.gates import GateResult, evaluate_gates, parse_gate, require_metrics
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
) -> dict[str, Any]:
    """Every column of one layer from its weight tensor (the unit the whole tool is built on).

    When ``spectra`` is given, the layer's eigenvalues are stored there under its name.
    ``conventions``: the fit's (a preset's, see :mod:`htsr_cli.engine.presets`)."""
    geom = spectrum.geometry(tuple(weight.shape))
    if geom is None:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} is not a layer")
    w = (
        weight.to(device=device, dtype=torch.float32)
        if weight.dtype not in (torch.float32, torch.float64)
        else weight.to(device)
    )
    wanted = frozenset(metrics)
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
        rand_evals = spectrum.eigenvalues(spectrum.shuffled(w, _layer_seed(seed, name)), device)
    rank = spectrum.matrix_rank(w, evals, geom)
    n_fit = int((evals > spectrum.EVALS_THRESH).sum())
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
) -> Analysis:
    """Compute the HT-SR metrics of every layer of a checkpoint.

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

    Raises:
        InputError: unreadable source, bad option, or no weight matrix to analyse.
    """
    tool = get_preset(preset, "analyze")
    fit = fit if fit is not None else (tool.fit if tool else "ww")
    if min_evals is None:
        min_evals = tool.analyze_min_evals if tool else DEFAULT_MIN_EVALS
    if fit not in FIT_MODES:
        raise InputError(f"unknown fit mode {fit!r}; choose from {', '.join(FIT_MODES)}")
    if tool:
        check_fit(tool, fit)
    conventions = tool.fit_conventions() if tool else HTSR
    if min_evals < 1:
        raise InputError(f"--min-evals must be a positive integer, got {min_evals}")
    names = parse_metrics(metrics)
    gates = [parse_gate(g) for g in fail_if]  # malformed gates fail before any work
    require_metrics(gates, names)
    dev = resolve_device(device)
    workers, blas_threads = parallelism(dev, jobs)
    t0 = time.perf_counter()
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(source, trust_pickle=trust_pickle)
    )
    # torch's and the BLAS pools' thread counts are process-wide: analyses in several threads
    # take turns, so that each one restores what it found.
    _THREAD_SETTINGS.acquire()
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # The CPU eigen-work runs in numpy's BLAS (spectrum.eigenvalues); torch's own thread
        # pool, spinning between the small fit ops, would slow it (measured ~15%).
        torch.set_num_threads(1)
    try:
        if ckpt.path is not None:
            ckpt.start_hashing()  # overlaps the sha256 of the files with the eigen-solves
        candidates = layer_refs(ckpt)
        if not candidates:
            raise InputError(
                f"{ckpt.path or 'the state dict'} holds no weight matrix "
                "(no '.weight' tensor with 2 or more dimensions)"
            )
        chosen = [r for r in candidates if _selected(r.key[: -len(".weight")], layers, exclude)]
        if not chosen:
            raise InputError(
                f"no layer matches --layers {list(layers)} / --exclude "
                f"{list(exclude)} ({len(candidates)} layers in the checkpoint)"
            )
        options = {
            "fit": fit,
            "metrics": names,
            "device": str(dev),
            "layers": list(layers),
            "exclude": list(exclude),
            "min_evals": min_evals,
            "seed": seed,
            # the fit's eigenvalue filter: 0 where a preset keeps every positive eigenvalue
            "evals_thresh": spectrum.EVALS_THRESH if conventions.filter_evals else 0.0,
            "fail_if": list(fail_if),
            "preset": tool.name if tool else None,
        }
        result = Analysis(source={}, options=options)

        def compute(name: str, weight: torch.Tensor) -> tuple[dict[str, Any], dict | None]:
            if weight.device.type == "meta":
                return {"name": name, "reason": "meta tensor: it holds no values"}, None
            if weight.layout != torch.strided:
                return {
                    "name": name,
                    "reason": f"{str(weight.layout).removeprefix('torch.')} "
                    "tensor: not a dense weight",
                }, None
            if tool and (why := tool.skip_reason(name, tuple(weight.shape))):
                return {"name": name, "reason": why}, None
            spectra: dict[str, torch.Tensor] = {}
            try:
                row = analyze_layer(
                    name,
                    weight,
                    fit=fit,
                    metrics=names,
                    device=dev,
                    seed=seed,
                    spectra=spectra if keep_spectra else None,
                    conventions=conventions,
                )
            except spectrum.NonFiniteWeightError as exc:  # a diverged run: skip, keep going
                # "nonfinite" lets the gates fail a diverged layer (docs/gates.md).
                return {"name": name, "reason": str(exc), "nonfinite": True}, None
            return row, spectra

        # closing(): a callback that raises must also stop the workers before the thread
        # settings are restored and the checkpoint closed.
        with (
            threadpool_limits(limits=blas_threads, user_api="blas"),
            contextlib.closing(_walk(ckpt, chosen, min_evals, compute, workers)) as walk,
        ):
            for done, (record, spectra) in enumerate(walk, start=1):
                if spectra is None:
                    result.skipped.append(record)
                else:
                    result.layers.append(record)
                    result.spectra.update(spectra)
                if on_layer:
                    on_layer(record)
                if on_progress:
                    on_progress(done, len(chosen), record["name"])
        result.gates = evaluate_gates(gates, result.layers, skipped=result.skipped)
        result.source = {"path": ckpt.path, "format": ckpt.format, "files": ckpt.files()}
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        torch.set_num_threads(threads)
        _THREAD_SETTINGS.release()
        if ckpt is not source:
            ckpt.close()


def analyze_metric(
    source: Any, metric: str, *, analysis_seed: int | None = None, **options: Any
) -> Analysis:
    """One metric of every layer of a checkpoint: the on-the-fly analysis of ``allocate`` and
    ``prune``. Options left at None take analyze's defaults; ``analysis_seed`` is analyze's
    ``seed`` (named apart from those commands' own ``--seed``)."""
    opts = {k: v for k, v in options.items() if v is not None}
    if analysis_seed is not None:
        opts["seed"] = analysis_seed
    return analyze(source, metrics=[metric], **opts)


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
    budget = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    pools = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    if pools:
        budget = max(1, min(budget, max(pools)))
    jobs = jobs or min(budget, 4)
    return jobs, max(1, budget // jobs)


def _walk(
    ckpt: Checkpoint,
    chosen: Sequence[TensorRef],
    min_evals: int,
    compute: Callable[[str, torch.Tensor], tuple[dict[str, Any], dict | None]],
    workers: int,
) -> Iterator[tuple[dict[str, Any], dict | None]]:
    """Yield ``compute(name, weight)`` per layer, ``(row, spectra)`` or ``(skipped, None)``, and
    ``({"name", "reason"}, None)`` for a layer skipped from its metadata, in checkpoint order.
    Every skipped record also gets the layer's ``shape`` and ``dtype``, so that a consumer of
    the document (prune) still counts the layer.

    Tensors are read in this thread, in checkpoint order, and computed on ``workers`` threads;
    at most ``workers + 1`` tensors are held at once, so peak memory still follows the largest
    tensor."""
    pending: deque[tuple[TensorRef, Future[Any] | dict[str, Any]]] = deque()

    def finish(
        ref: TensorRef, job: Future[Any] | dict[str, Any]
    ) -> tuple[dict[str, Any], dict | None]:
        record, spectra = job.result() if isinstance(job, Future) else (job, None)
        if spectra is None:
            record.update(shape=list(ref.shape), dtype=ref.dtype)
        return record, spectra

    with ThreadPoolExecutor(workers, thread_name_prefix="htsr-layer") as pool:
        try:
            for ref in chosen:
                name = ref.key[: -len(".weight")]
                reason = _skip_reason(ref, min_evals)
                pending.append(
                    (
                        ref,
                        {"name": name, "reason": reason}
                        if reason
                        else pool.submit(compute, name, ckpt.load(ref.key)),
                    )
                )
                while len(pending) > workers:
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
