"""Which layers are prunable, and the per-layer budgets of each method.

Prunable parameters are the weights of the Conv/Linear layers (state-dict keys ``*.weight``
with 2 to 4 dimensions and a floating-point dtype), except the classifier, the embeddings
(unless asked) and layers matching ``--exclude``. Biases, norms and every other tensor are
never pruned and do not count toward the target.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from htsr_cli import defaults
from htsr_cli.engine.presets import EMBEDDING_NAME, block_of
from htsr_cli.errors import InputError
from htsr_cli.io.documents import finite
from htsr_cli.prune import budgets as B

_FLOAT = {"float64", "float32", "float16", "bfloat16"}
#: Names (last dotted component) of embedding tables in common checkpoints: GPT-2's wte/wpe,
#: BERT's *_embeddings, Llama's embed_tokens, T5's shared (one definition, with the presets).
_EMBEDDING = EMBEDDING_NAME


@dataclass(frozen=True)
class Layer:
    """A prunable weight: its name (key without ``.weight``) and dimensions."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Budgets:
    """Per-layer outcome of a budget method, in the order of the layers given."""

    ratios: np.ndarray  # k_i: fraction of each layer's parameters to remove
    values: list[float]  # the metric value of each layer (NaN for the baselines)
    layer_notes: list[str]
    notes: list[str] = field(default_factory=list)


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING.search(name))


def checkpoint_layers(refs: Sequence[Any]) -> list[Layer]:
    """Every weight that could be pruned, from analyze's layer list
    (:func:`htsr_cli.engine.analysis.layer_refs`, in layer order): Conv/Linear shapes of a dtype
    that can hold zeros exactly (not float8)."""
    return [
        Layer(r.key[: -len(".weight")], tuple(r.shape))
        for r in refs
        if len(r.shape) <= 4 and r.dtype in _FLOAT
    ]


def analysis_layers(doc: Mapping[str, Any]) -> list[Layer]:
    """Layers of an analysis document with dimensions from N, M, rf and type.

    The document does not say which of N, M is the output, nor a kernel's height and width:
    a conv2d kernel is taken as square when rf is a square (3x3 for rf 9), else as rf x 1.
    Only ERK reads the individual dimensions; the parameter count N*M*rf is exact.
    """
    out = []
    for row in doc["layers"]:
        n, m, rf = (
            int(finite(row.get(k))) if math.isfinite(finite(row.get(k))) else 0
            for k in ("N", "M", "rf")
        )
        if n < 1 or m < 1 or rf < 1:
            raise InputError(
                f"analysis layer {row.get('name')!r} lacks N, M or rf: it cannot be counted"
            )
        kind = row.get("type", "linear" if rf == 1 else "conv2d")
        side = math.isqrt(rf)
        if kind == "linear":
            kernel: tuple[int, ...] = ()
        elif kind == "conv1d":
            kernel = (rf,)
        else:
            kernel = (side, side) if side * side == rf else (rf, 1)
        out.append(Layer(str(row["name"]), (n, m, *kernel)))
    # Layers analyze skipped (too few eigenvalues: often a small classifier) still count and
    # may still be the classifier; their records carry the real shape. They come last: the
    # document keeps them apart from the analysed layers.
    out += checkpoint_layers(
        [
            _SkippedRef(str(r["name"]), tuple(r["shape"]), str(r["dtype"]))
            for r in doc.get("skipped", [])
            if isinstance(r, Mapping) and isinstance(r.get("shape"), list) and "dtype" in r
        ]
    )
    return out


@dataclass(frozen=True)
class _SkippedRef:
    """A skipped record of an analysis document, read like a checkpoint's TensorRef."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def key(self) -> str:
        return self.name + ".weight"


#: Output heads of Hugging Face models: causal LMs, BERT-style and sequence-classification heads.
_HEADS = ("lm_head", "classifier", "score")


def guess_classifier(layers: Sequence[Layer], oriented: bool = True) -> str | None:
    """The output layer, when no architecture says which.

    In order: a 2-D layer named ``lm_head``, ``classifier`` or ``score`` (a Hugging Face head);
    none when the model has an embedding table but no such head (its head is tied to the
    embedding, which is not pruned); the one 2-D layer whose outputs feed no other layer (its
    first dimension is no other layer's input dimension), when ``oriented`` shapes allow the
    test; else the last 2-D layer."""
    flat = [x for x in layers if len(x.shape) == 2 and not is_embedding(x.name)]
    heads = [x for x in flat if x.name.rsplit(".", 1)[-1] in _HEADS]
    if heads:
        return heads[-1].name
    if any(is_embedding(x.name) for x in layers):
        return None
    if oriented:
        inputs = {x.shape[1] for x in layers}
        sinks = [x for x in flat if x.shape[0] not in inputs]
        if len(sinks) == 1:
            return sinks[0].name
    return flat[-1].name if flat else None


def select(
    layers: Sequence[Layer], classifier: str | None, exclude: Sequence[str], prune_embeddings: bool
) -> tuple[list[Layer], list[str]]:
    """The prunable layers and one note per rule that left layers out."""
    kept, notes = [], []
    embeds = [x.name for x in layers if is_embedding(x.name)]
    excluded = [x.name for x in layers if any(fnmatch.fnmatchcase(x.name, g) for g in exclude)]
    for x in layers:
        if x.name == classifier or x.name in excluded:
            continue
        if not prune_embeddings and x.name in embeds:
            continue
        kept.append(x)
    if classifier:
        notes.append(f"layer '{classifier}' is the classifier: never pruned")
    if embeds and not prune_embeddings:
        notes.append(
            f"{len(embeds)} embedding table(s) not pruned ({embeds[0]}"
            f"{', ...' if len(embeds) > 1 else ''}); --prune-embeddings includes them"
        )
    if excluded:
        notes.append(f"--exclude leaves out {len(excluded)} layer(s)")
    if not kept:
        raise InputError(
            "no prunable layer left (every Conv/Linear weight is the classifier, an "
            "embedding or excluded)"
        )
    return kept, notes


def metric_values(
    layers: Sequence[Layer], rows: Mapping[str, Mapping[str, Any]], metric: str, min_evals: int
) -> tuple[list[float], list[bool], list[str]]:
    """Each layer's metric, whether it may drive the plan, and why not."""
    values, usable, notes = [], [], []
    for x in layers:
        row = rows.get(x.name)
        value = finite(row.get(metric)) if row is not None else math.nan
        evals = finite(row.get("num_evals")) if row is not None else math.nan
        why = ""
        if row is None:
            why = "not in the analysis"
        elif not math.isfinite(value):
            why = f"{metric} {'missing' if metric not in row else 'not finite'}"
        elif not evals >= min_evals:
            why = f"{row.get('num_evals')} eigenvalues < {min_evals}"
        values.append(value)
        usable.append(not why)
        notes.append(f"{why}: average budget" if why else "")
    return values, usable, notes


def block_means(
    layers: Sequence[Layer],
    values: Sequence[float],
    usable: Sequence[bool],
    pattern: str | None = None,
) -> tuple[list[float], list[str], list[str]]:
    """AlphaPruning's ``block_wise`` mapping: each layer's metric replaced by the mean over the
    usable layers of its block (blocks from the layer names, see
    :func:`htsr_cli.engine.presets.block_of`, or the regular expression ``pattern``). Layers in
    no block keep their own value. Returns the values, one note per layer and the plan's notes.
    """
    blocks = [block_of(x.name, pattern) for x in layers]
    members: dict[str, list[float]] = {}
    for b, v, ok in zip(blocks, values, usable, strict=True):
        if b is not None and ok:
            members.setdefault(b, []).append(float(v))
    out, layer_notes = [], []
    for b, v in zip(blocks, values, strict=True):
        if b is not None and b in members:
            out.append(float(np.mean(members[b])))
            layer_notes.append(f"block {b}: mean of {len(members[b])}")
        else:
            out.append(v)
            layer_notes.append("")
    if not members:
        what = f"--block-pattern {pattern!r}" if pattern else "a transformer block name"
        return out, layer_notes, [f"no layer name matches {what}: one ratio per layer"]
    outside = sum(b is None for b in blocks)
    notes = [f"block-wise: one ratio per block ({len(members)} blocks)"]
    if outside:
        notes.append(f"{outside} layer(s) in no block keep a ratio of their own")
    return out, layer_notes, notes


def method_budgets(
    method: str,
    layers: Sequence[Layer],
    removed: float,
    *,
    max_ratio: float,
    rows: Mapping[str, Mapping[str, Any]] | None = None,
    metric: str = "alpha",
    more_where: str = "larger",
    mapping: str = "linear",
    eps: float = defaults.EPS,
    min_evals: int = defaults.PLAN_MIN_EVALS,
    plan: Mapping[str, float] | None = None,
    weights: Callable[[str], Any] | None = None,
    block_wise: bool = False,
    block_pattern: str | None = None,
) -> Budgets:
    """Per-layer ratios ``k_i`` of ``method``, calibrated so that ``sum numel_i * k_i`` equals
    ``removed`` (LAMP: the exact count of its global threshold).

    Args:
        method: ``metric``, ``uniform``, ``erk``, ``lamp`` or ``plan`` (reuse ``plan``'s
            budgets as scores).
        rows: analysis rows by layer name (``metric`` only).
        weights: loads a layer's weight tensor by name (``lamp`` only).
        block_wise, block_pattern: one ratio per block from the block's mean metric
            (AlphaPruning's ``block_wise``; ``metric`` only), see :func:`block_means`.
    """
    n = len(layers)
    numel = np.array([x.numel for x in layers], dtype=float)
    nan = [math.nan] * n
    if method == "erk":
        return Budgets(
            B.erk_ratios([x.shape for x in layers], removed, max_ratio=max_ratio), nan, [""] * n
        )
    if method == "lamp":
        if weights is None:
            raise InputError(
                "--method lamp needs the weights: give a checkpoint, not an analysis document"
            )
        scores = [B.lamp_scores(np.asarray(weights(x.name).float().numpy())) for x in layers]
        counts = B.lamp_counts(scores, int(round(removed)))
        return Budgets(counts / numel, nan, [""] * n)
    notes: list[str] = []
    layer_notes = [""] * n
    values = nan
    if method == "uniform":
        scores = np.ones(n)
    elif method == "plan":
        assert plan is not None
        scores = np.array([plan.get(x.name, 0.0) for x in layers])
        missing = [x.name for x in layers if x.name not in plan]
        layer_notes = ["not in the plan: not pruned" if x.name not in plan else "" for x in layers]
        if missing:
            notes.append(
                f"{len(missing)} prunable layer(s) are not in the plan and are not "
                f"pruned ({missing[0]}{', ...' if len(missing) > 1 else ''})"
            )
        if not scores.any():
            raise InputError("the plan prunes none of this model's layers")
    else:
        assert rows is not None
        values, usable, layer_notes = metric_values(layers, rows, metric, min_evals)
        if block_wise or block_pattern:
            values, block_notes, more = block_means(layers, values, usable, block_pattern)
            layer_notes = [a or b for a, b in zip(layer_notes, block_notes, strict=True)]
            notes += more
        ok = np.array(usable)
        scores = np.ones(n)
        if ok.any():
            scores[ok] = B.metric_scores(
                np.array(values)[ok], more_where=more_where, mapping=mapping, eps=eps
            )
            scores[~ok] = float(scores[ok].mean())  # neutral: neither spared nor singled out
        else:
            notes.append(f"no layer has a usable {metric}: every layer gets the same budget")
        if (~ok).any() and ok.any():
            notes.append(
                f"{int((~ok).sum())} layer(s) without a usable {metric} get the average budget"
            )
    return Budgets(
        B.calibrate(scores, numel, removed, max_ratio=max_ratio), values, layer_notes, notes
    )


__all__ = [
    "Layer",
    "Budgets",
    "is_embedding",
    "checkpoint_layers",
    "analysis_layers",
    "guess_classifier",
    "select",
    "metric_values",
    "block_means",
    "method_budgets",
]
