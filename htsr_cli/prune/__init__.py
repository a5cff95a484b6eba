"""``prune``: pruning budgets from the HT-SR metrics, applied to real models (docs/prune.md).

The stages, each in its module: :mod:`.budgets` (per-layer ratios of every method),
:mod:`.layers` (which tensors are prunable, and their budgets), :mod:`.plan` (the
``htsr.prune-plan/1`` document and its one reader), :mod:`.structured` (channels, with
Torch-Pruning) and :mod:`.unstructured` (smallest weights), :mod:`.record` (the pruning record
in a pruned checkpoint, and rebuilding the model from it), :mod:`.apply` (running a plan on a
model), :mod:`.api` (:func:`prune`) and :mod:`.report` (what ``htsr prune`` prints).

Public API::

    from htsr_cli.prune import prune, load_pruned_model, read_prune_record
    plan = prune("model.safetensors", sparsity=0.5, structured=True, arch="resnet18",
                 output="pruned.safetensors")
    plan.to_dict()                    # the htsr.prune-plan/1 document
    model = load_pruned_model("pruned.safetensors")   # rebuilt from its pruning record

Names are imported lazily, so that reading a plan (``htsr plot``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "prune": "api", "ANALYZE_OPTIONS": "api",
    "PLAN_SCHEMA": "plan", "GroupPlan": "plan", "LayerPlan": "plan", "PrunePlan": "plan",
    "read_plan": "plan",
    "RECORD_KEY": "record", "RECORD_SCHEMA": "record", "load_pruned_model": "record",
    "read_prune_record": "record", "replay_history": "record",
    "IMPORTANCES": "structured",
}  # fmt: skip

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
