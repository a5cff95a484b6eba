"""``prune()``: a pruning plan from a checkpoint or an analysis, optionally applied and saved."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from htsr_cli import defaults
from htsr_cli.engine.columns import METRICS
from htsr_cli.engine.presets import check_fit, get_preset
from htsr_cli.errors import InputError
from htsr_cli.io.documents import is_analysis_document, read_analysis
from htsr_cli.io.output import check_writable
from htsr_cli.prune import budgets as B
from htsr_cli.prune.hf_dir import check_directory_output, is_directory_output
from htsr_cli.prune.layers import (
    Layer,
    method_budgets,
    select,
)
from htsr_cli.prune.plan import LayerPlan, PrunePlan, plan_budgets, read_plan
from htsr_cli.prune.structured import check_importance

Progress = Callable[[int, int | None, str], None]
#: analyze() options prune passes on when it analyses a checkpoint for the metric method.
ANALYZE_OPTIONS = frozenset({"fit", "device", "analysis_seed", "preset"})


def _check_target(sparsity: float | None, keep_params: int | None) -> None:
    """The checks that need no model: exactly one of the two, sparsity in [0, 1)."""
    if (sparsity is None) == (keep_params is None):
        raise InputError("give exactly one of --sparsity (fraction to remove) and --keep-params")
    if sparsity is not None and (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, int | float)
        or not (math.isfinite(sparsity) and 0 <= sparsity < 1)
    ):
        raise InputError(f"--sparsity must be in [0, 1), got {sparsity}")


def _target(total: int, sparsity: float | None, keep_params: int | None) -> tuple[int, float]:
    """Parameters to remove and the requested sparsity, from exactly one of the two."""
    _check_target(sparsity, keep_params)
    if sparsity is not None:
        return int(round(sparsity * total)), float(sparsity)
    if (
        isinstance(keep_params, bool)
        or not isinstance(keep_params, int | np.integer)
        or not 0 < keep_params <= total
    ):
        raise InputError(
            f"--keep-params must be an integer in [1, {total}] (the prunable "
            f"parameters), got {keep_params}"
        )
    return total - int(keep_params), 1 - int(keep_params) / total


def _check_options(
    method: str,
    metric: str,
    more_where: str,
    mapping: str,
    eps: float,
    max_ratio: float,
    budget_step: float | None,
    min_evals: int,
    importance: str,
    analyze_options: Mapping[str, Any],
) -> None:
    B.check_method(
        "uniform" if method == "plan" else method, mapping, more_where, eps, max_ratio, budget_step
    )
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if isinstance(min_evals, bool) or not isinstance(min_evals, int) or min_evals < 0:
        raise InputError(f"--min-evals must be a non-negative integer, got {min_evals!r}")
    check_importance(importance)
    unknown = set(analyze_options) - ANALYZE_OPTIONS
    if unknown:
        raise TypeError(f"prune() got unexpected keyword argument(s) {sorted(unknown)}")


def _check_output(output: str | None, source: Any, document: bool, structured: bool) -> None:
    """Refuse a bad ``-o`` (an analysis SOURCE, the input, a missing or unwritable directory,
    not ``.safetensors``) from the path alone, before the source is opened or read."""
    if output is None:
        return
    if document:
        raise InputError(
            "-o writes a pruned checkpoint, which needs a checkpoint SOURCE, not an "
            "analysis document (the plan itself goes to stdout)"
        )
    if is_directory_output(output):  # a model directory (htsr_cli.prune.hf_dir)
        check_directory_output(output, source, structured=structured)
        return
    if not str(output).endswith(".safetensors"):
        raise InputError(f"-o {output}: a pruned checkpoint is a .safetensors file")
    check_writable(output, [source])


def _analysis_rows(
    doc: Mapping[str, Any], names: set[str], label: str
) -> dict[str, dict[str, Any]]:
    rows = {str(r["name"]): r for r in doc["layers"]}
    missing = [n for n in rows if n not in names]
    if missing:
        raise InputError(
            f"{label} layer {missing[0]!r} is not a layer of the model"
            f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            "was it made from another checkpoint?"
        )
    return rows


def _analyze(
    source: Any,
    metric: str,
    layers: Sequence[Layer],
    trust_pickle: bool,
    options: Mapping[str, Any],
    on_progress: Progress | None,
) -> dict[str, Any]:
    """The metric of the prunable ``layers`` only: the classifier, embeddings and excluded
    layers (often the largest matrices) get no eigen-solve."""
    from htsr_cli.engine.analysis import analyze_metric, exact_glob

    cb = (lambda d, t, n: on_progress(d, t, f"analyze {n}")) if on_progress else None
    return analyze_metric(
        source,
        metric,
        layers=[exact_glob(x.name) for x in layers],
        trust_pickle=trust_pickle,
        on_progress=cb,
        **options,
    ).to_dict()


def prune(
    source: Any,
    *,
    sparsity: float | None = None,
    keep_params: int | None = None,
    method: str | None = None,
    metric: str = "alpha",
    more_where: str = "larger",
    mapping: str = "linear",
    eps: float | None = None,
    budget_step: float | None = None,
    max_ratio: float = defaults.MAX_RATIO,
    min_evals: int | None = None,
    structured: bool = False,
    unstructured: bool = False,
    arch: str | None = None,
    num_classes: int | None = None,
    width: float | None = None,
    in_channels: int = 3,
    importance: str = "l2",
    data: Any = None,
    analysis: Any = None,
    plan: Any = None,
    exclude: Sequence[str] = (),
    prune_embeddings: bool = False,
    output: str | None = None,
    trust_pickle: bool = False,
    key: str | None = None,
    on_progress: Progress | None = None,
    block_wise: bool | None = None,
    block_pattern: str | None = None,
    preset: str | None = None,
    **analyze_options: Any,
) -> PrunePlan:
    """Plan (and with ``output``, apply and save) the pruning of a model to a global target.

    Args:
        source: a checkpoint path (any layout ``htsr analyze`` reads, a pruned checkpoint
            included), or an ``htsr.analysis/1`` document (path, ``-`` or dict) for a plan only.
        sparsity: fraction of the prunable parameters to remove, in [0, 1).
        keep_params: alternatively, how many prunable parameters to keep.
        method: ``metric`` (default), ``uniform``, ``erk`` or ``lamp``; ``plan`` is implied by
            ``plan``.
        metric: one of the ten metrics (``metric`` method).
        more_where: ``larger`` prunes layers with a larger metric more (AlphaPruning's
            direction for alpha), ``smaller`` the reverse.
        mapping: ``linear`` (AlphaPruning, ratios in [1-eps, 1+eps] before calibration) or
            ``proportional`` (the thesis: ratio proportional to the metric or its inverse).
        budget_step: apply the thesis's incremental rule with this step instead of an exact
            calibration (never over-prunes).
        max_ratio: no layer (no group, structured) loses a larger fraction.
        min_evals: layers with fewer eigenvalues get the average budget (``metric``).
        structured, unstructured: channel pruning (needs ``arch``) or magnitude pruning (the
            default).
        arch, num_classes, width, in_channels: the architecture (see ``htsr_cli.models``);
            ``num_classes`` defaults to the checkpoint's classifier size.
        importance: channel criterion of Torch-Pruning: ``l2``, ``l1``, ``lamp``, ``bn-scale``,
            ``taylor`` (which takes ``data`` = (images, labels), default the built-in digits).
        analysis: an analysis document to take the metric from instead of analysing ``source``.
        plan: a prune-plan document whose per-layer budgets are reused (method ``plan``).
        exclude: globs of layer names never to prune.
        prune_embeddings: also prune embedding tables (unstructured).
        output: path of the pruned ``.safetensors`` checkpoint (written atomically), or of a
            model directory (ends with ``/``, exists, or has no extension; unstructured
            only): ``model.safetensors`` plus the source directory's config.json and other
            non-weight files, loadable by ``from_pretrained`` (:mod:`htsr_cli.prune.hf_dir`).
        trust_pickle: allow torch files that need code to unpickle.
        key: where the state dict is inside a torch file (``--key``); None finds it.
        on_progress: called as ``(done, total or None, description)``.
        block_wise: one ratio per transformer block from the block's mean metric
            (AlphaPruning's ``block_wise``); ``block_pattern``, a regular expression whose
            first group (else match) names a layer's block, implies it (docs/prune.md).
        preset: ``alphapruning``: AlphaPruning's LLM defaults (alpha from its ``xmin_peak``
            conventions, eps 0.3, block-wise, no eigenvalue threshold; docs/presets.md).
            ``eps`` defaults to 0.2 and ``min_evals`` to 50 without it.
        **analyze_options: ``fit``, ``device``, ``analysis_seed`` for the on-the-fly analysis.

    Raises:
        InputError: any bad option or input (one line).
    """
    from htsr_cli.prune.apply import Context, run_structured, run_unstructured

    method, plan_doc, plan_label = _method_and_plan(method, plan, structured, unstructured)
    tool = get_preset(preset, "prune")
    if tool is not None:  # the tool's defaults; options given explicitly win
        eps = tool.prune["eps"] if eps is None else eps
        min_evals = tool.prune["min_evals"] if min_evals is None else min_evals
        block_wise = tool.prune["block_wise"] if block_wise is None else block_wise
        analyze_options = {**analyze_options, "preset": tool.name}
        check_fit(tool, analyze_options.setdefault("fit", tool.fit) or tool.fit)
    eps = defaults.EPS if eps is None else eps
    min_evals = defaults.PLAN_MIN_EVALS if min_evals is None else min_evals
    _check_options(
        method,
        metric,
        more_where,
        mapping,
        eps,
        max_ratio,
        budget_step,
        min_evals,
        importance,
        analyze_options,
    )
    if plan_doc is not None and sparsity is None and keep_params is None:
        sparsity = float(plan_doc["target"]["sparsity"])  # read_plan checked it
    _check_target(sparsity, keep_params)
    document = is_analysis_document(source)
    if document and analysis is not None:
        raise InputError(
            "SOURCE is already an analysis document; --analysis is for a checkpoint SOURCE"
        )
    # -o is checked before the source is opened, as analyze does: a bad path costs no read.
    _check_output(output, source, document, structured)
    ctx = Context(
        source=source,
        document=document,
        arch=arch,
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        trust_pickle=trust_pickle,
        on_progress=on_progress,
        key=key,
    )
    try:
        ctx.open()
        if output is not None and not document and not is_directory_output(output):
            # the files the opened source reads (an index's shards, a Hub id's cache files)
            check_writable(output, ctx.input_files())
        if ctx.mode_needs_arch(structured):
            raise InputError("--structured needs --arch (the architecture to rebuild and prune)")
        # 1. Which layers: every layer, the classifier, the prunable ones and the target.
        all_layers = ctx.layers(structured)
        names = {x.name for x in all_layers}
        classifier = ctx.classifier(structured, all_layers)
        prunable, notes = select(all_layers, classifier, exclude, prune_embeddings)
        total = sum(x.numel for x in prunable)
        removed, requested = _target(total, sparsity, keep_params)
        # 2. The metric of each layer (metric method), then each layer's budget.
        rows = None
        if method == "metric":
            rows = _metric_rows(
                ctx, analysis, metric, prunable, names, trust_pickle, analyze_options, on_progress
            )
        budgets = method_budgets(
            method,
            prunable,
            removed,
            max_ratio=max_ratio,
            rows=rows,
            metric=metric,
            more_where=more_where,
            mapping=mapping,
            eps=eps,
            min_evals=min_evals,
            plan=None if plan_doc is None else _reused_budgets(plan_doc, plan_label, names),
            weights=ctx.weight_loader(structured),
            block_wise=bool(block_wise),
            block_pattern=block_pattern,
        )
        # 3. The plan document, then (with an output) the pruning that fills in "achieved".
        params = _plan_params(
            method, max_ratio, budget_step, classifier, exclude, prune_embeddings,
            more_where, mapping, min_evals, eps, plan_label if plan_doc is not None else None,
        )  # fmt: skip
        if method == "metric":
            params.update(
                block_wise=bool(block_wise or block_pattern),
                block_pattern=block_pattern,
                preset=tool.name if tool else None,
            )
        result = PrunePlan(
            source=ctx.source_record(),
            mode="structured" if structured else "unstructured",
            method=method,
            metric=metric if method == "metric" else None,
            params=params,
            target={
                "sparsity": requested,
                "keep_params": keep_params,
                "params_before": total,
                "params_after": total - removed,
                "removed": removed,
            },
            achieved={},
            layers=_layer_plans(prunable, budgets),
            notes=notes + budgets.notes,
            output=None if output is None else str(output),
        )
        if structured:
            run_structured(
                ctx,
                result,
                prunable,
                classifier,
                exclude,
                importance=importance,
                data=data,
                budget_step=budget_step,
                max_ratio=max_ratio,
                output=output,
            )
        else:
            run_unstructured(
                ctx, result, prunable, budget_step=budget_step, max_ratio=max_ratio, output=output
            )
        return result
    finally:
        ctx.close()


def _method_and_plan(
    method: str | None, plan: Any, structured: bool, unstructured: bool
) -> tuple[str, dict[str, Any] | None, str]:
    """The method (``plan`` when a plan is reused) and the reused plan document with its label."""
    if structured and unstructured:
        raise InputError("choose one of --structured and --unstructured")
    if plan is None:
        return method or "metric", None, ""
    if method not in (None, "plan"):
        raise InputError("--plan reuses a plan's budgets; it cannot be combined with --method")
    doc, label = read_plan(plan)
    return "plan", doc, label


def _metric_rows(
    ctx: Any,
    analysis: Any,
    metric: str,
    prunable: Sequence[Layer],
    names: set[str],
    trust_pickle: bool,
    analyze_options: Mapping[str, Any],
    on_progress: Progress | None,
) -> dict[str, Mapping[str, Any]]:
    """The analysis row of each layer: from SOURCE when it is an analysis, else from
    ``--analysis``, else from an on-the-fly analysis of the prunable layers only."""
    if ctx.document:
        return _analysis_rows(ctx.doc, names, ctx.label)
    if analysis is not None:
        adoc, alabel = read_analysis(analysis)
        return _analysis_rows(adoc, names, alabel or "analysis")
    if not prunable:
        return {}
    doc = _analyze(
        ctx.checkpoint_source(), metric, prunable, trust_pickle, analyze_options, on_progress
    )
    return _analysis_rows(doc, names, "analysis")


def _reused_budgets(plan_doc: Mapping[str, Any], label: str, names: set[str]) -> dict[str, float]:
    """``--plan``'s per-layer budgets, every one of them a layer of this model."""
    budgets = plan_budgets(plan_doc)
    unknown = [n for n in budgets if n not in names]
    if unknown:
        raise InputError(
            f"{label} layer {unknown[0]!r} is not a layer of the model"
            f"{f' (+{len(unknown) - 1} more)' if len(unknown) > 1 else ''}"
        )
    return budgets


def _plan_params(
    method: str,
    max_ratio: float,
    budget_step: float | None,
    classifier: str | None,
    exclude: Sequence[str],
    prune_embeddings: bool,
    more_where: str,
    mapping: str,
    min_evals: int,
    eps: float,
    plan_label: str | None,
) -> dict[str, Any]:
    """The plan's ``params``: the options that shaped its budgets."""
    params: dict[str, Any] = {
        "max_ratio": max_ratio,
        "budget_step": budget_step,
        "classifier": classifier,
        "exclude": list(exclude),
        "prune_embeddings": bool(prune_embeddings),
    }
    if method == "metric":
        params.update(
            more_where=more_where,
            mapping=mapping,
            min_evals=min_evals,
            eps=eps if mapping == "linear" else None,
        )
    if plan_label is not None:
        params["plan"] = plan_label
    return params


def _layer_plans(prunable: Sequence[Layer], budgets: Any) -> list[LayerPlan]:
    """One planned layer per prunable layer (``params_after`` is set when pruning runs)."""
    return [
        LayerPlan(
            name=x.name,
            params_before=x.numel,
            metric_value=v,
            budget=float(k),
            params_after=x.numel,
            note=note,
        )
        for x, v, k, note in zip(
            prunable, budgets.values, budgets.ratios, budgets.layer_notes, strict=True
        )
    ]


__all__ = ["prune", "ANALYZE_OPTIONS"]
