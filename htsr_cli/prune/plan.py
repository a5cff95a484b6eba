"""The pruning plan: the ``htsr.prune-plan/1`` document (docs/prune.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io import schemas
from htsr_cli.io.documents import check_schema, finite, read_json, require
from htsr_cli.io.output import jsonable

PLAN_SCHEMA = schemas.PRUNE_PLAN


@dataclass
class LayerPlan:
    """One prunable layer: its metric, planned budget and what pruning achieved.

    ``budget`` is the method's fraction of parameters to remove (before channel rounding in
    structured mode); ``ratio`` is the fraction actually removed, ``1 - after/before``.
    """

    name: str
    params_before: int
    metric_value: float = math.nan
    budget: float = 0.0
    params_after: int = 0
    channels_before: int | None = None
    channels_after: int | None = None
    group: str | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "metric_value": self.metric_value,
            "budget": self.budget,
            "ratio": self.ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }
        if self.channels_before is not None:
            d["channels_before"] = self.channels_before
            d["channels_after"] = self.channels_after
        if self.group is not None:
            d["group"] = self.group
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class GroupPlan:
    """Layers whose output channels Torch-Pruning removes together (residual adds, depthwise
    convolutions, concatenations): one channel ratio for all of them."""

    name: str  # the group's root layer
    members: list[str]
    budget: float  # parameter-weighted mean of the members' budgets
    channel_ratio: float  # the ratio of output channels passed to Torch-Pruning
    channels_before: int
    channels_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "coupled": len(self.members) > 1,
            "budget": self.budget,
            "channel_ratio": self.channel_ratio,
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
        }


@dataclass
class PrunePlan:
    """The result of :func:`htsr_cli.prune.prune`; ``to_dict()`` is the plan document.

    ``model`` is the pruned ``nn.Module`` after structured pruning (not serialised).
    """

    source: dict[str, Any]
    mode: str  # "unstructured" | "structured"
    method: str
    metric: str | None
    params: dict[str, Any]
    target: dict[str, Any]
    achieved: dict[str, Any]
    layers: list[LayerPlan]
    groups: list[GroupPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    model: Any = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": PLAN_SCHEMA,
            "source": self.source,
            "mode": self.mode,
            "method": self.method,
            "metric": self.metric,
            "params": self.params,
            "target": self.target,
            "achieved": self.achieved,
            "groups": [g.to_dict() for g in self.groups],
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
        }
        if self.output is not None:
            doc["output"] = self.output
        return jsonable(doc)


def read_plan(source: str | Mapping[str, Any], label: str = "plan") -> tuple[dict[str, Any], str]:
    """The one reader of ``htsr.prune-plan/1`` documents (``prune --plan`` and ``plot
    prune-plan``): from a path, ``-`` or a dict, checked for everything either uses; returns
    (document, label)."""
    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        doc, label = read_json(source)
    check_schema(doc, PLAN_SCHEMA, label)
    require(doc, ("method", "target", "layers"), label)
    target = doc["target"]
    sparsity = finite(target.get("sparsity")) if isinstance(target, Mapping) else math.nan
    if not (math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise InputError(
            f"{label}: target.sparsity must be a number in [0, 1), got "
            f"{target.get('sparsity') if isinstance(target, Mapping) else target!r}"
        )
    layers = doc["layers"]
    if not isinstance(layers, list) or not layers:
        raise InputError(f"{label}: 'layers' must be a non-empty list of objects")
    for i, layer in enumerate(layers):
        where = f"{label} layers[{i}]"
        if not isinstance(layer, dict):
            raise InputError(f"{where} is not an object")
        require(layer, ("name",), where)
        if "budget" not in layer and "ratio" not in layer:
            raise InputError(f"{where} ({layer['name']}) has neither 'budget' nor 'ratio'")
        # A budget is what a layer may lose (< 1: a layer is never removed whole); a ratio is
        # what it lost, in [0, 1].
        for key, closed in (("budget", False), ("ratio", True)):
            value = finite(layer.get(key, 0.0))
            if not (math.isfinite(value) and 0 <= value and (value <= 1 if closed else value < 1)):
                raise InputError(
                    f"{where} ({layer['name']}): {key} must be in [0, 1{']' if closed else ')'}, "
                    f"got {layer.get(key)!r}"
                )
    return doc, label


def plan_ratios(doc: Mapping[str, Any]) -> dict[str, float]:
    """Layer name -> the fraction of the layer removed (its achieved ``ratio``, else its
    ``budget``), as drawn by ``plot prune-plan``."""
    return {str(x["name"]): float(finite(x.get("ratio", x.get("budget")))) for x in doc["layers"]}


def plan_budgets(doc: Mapping[str, Any]) -> dict[str, float]:
    """Layer name -> the plan's budget (its ``budget``, else its achieved ``ratio``)."""
    return {str(x["name"]): float(finite(x.get("budget", x.get("ratio")))) for x in doc["layers"]}


__all__ = ["PLAN_SCHEMA", "LayerPlan", "GroupPlan", "PrunePlan", "read_plan", "plan_budgets"]
