"""The learning-rate plan, ``htsr.lr-plan/1``: per-layer multipliers of a base learning rate
(docs/allocate.md), with its one reader. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io import schemas
from htsr_cli.io.documents import check_schema, finite, read_json, require

LR_PLAN_SCHEMA = schemas.LR_PLAN


@dataclass
class PlanLayer:
    """One layer of a learning-rate plan."""

    name: str
    metric_value: float
    multiplier: float
    lr: float
    status: str  # "allocated" | "base" (kept at the base LR by a guard)
    reason: str = ""
    wd_multiplier: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "metric_value": self.metric_value if math.isfinite(self.metric_value) else None,
            "multiplier": self.multiplier,
            "lr": self.lr,
            "status": self.status,
        }
        if self.reason:
            d["reason"] = self.reason
        if self.wd_multiplier is not None:
            d["wd_multiplier"] = self.wd_multiplier
        return d


@dataclass
class LRPlan:
    """An ``htsr.lr-plan/1`` document: per-layer learning-rate multipliers."""

    scheme: str
    metric: str
    base_lr: float
    params: dict[str, Any]
    layers: list[PlanLayer]
    source: dict[str, Any] = field(default_factory=dict)
    base_wd: float | None = None
    wd_scheme: str | None = None

    def multipliers(self) -> dict[str, float]:
        return {p.name: p.multiplier for p in self.layers}

    def wd_multipliers(self) -> dict[str, float]:
        return {p.name: p.wd_multiplier for p in self.layers if p.wd_multiplier is not None}

    def summary(self) -> dict[str, float]:
        m = [p.multiplier for p in self.layers]
        return {"mean_multiplier": sum(m) / len(m), "min": min(m), "max": max(m)}

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": LR_PLAN_SCHEMA,
            "source": self.source,
            "scheme": self.scheme,
            "params": self.params,
            "base_lr": self.base_lr,
            "metric": self.metric,
            "summary": self.summary(),
            "layers": [p.to_dict() for p in self.layers],
        }
        if self.base_wd is not None:
            doc["base_wd"] = self.base_wd
            doc["wd_scheme"] = self.wd_scheme
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], label: str = "plan") -> LRPlan:
        """Validate and load a plan document (refuses wrong schema, missing fields and
        multipliers that are not finite and positive)."""
        check_schema(doc, LR_PLAN_SCHEMA, label)
        require(doc, ("scheme", "params", "base_lr", "metric", "layers"), label)
        if not isinstance(doc["layers"], list) or not doc["layers"]:
            raise InputError(f"{label}: 'layers' must be a non-empty list")
        layers = []
        for i, d in enumerate(doc["layers"]):
            where = f"{label} layers[{i}]"
            if not isinstance(d, dict):
                raise InputError(f"{where} is not an object")
            require(d, ("name", "multiplier", "lr", "status"), where)
            mult = finite(d["multiplier"])
            wd = d.get("wd_multiplier")
            for what, v in (("multiplier", mult), ("wd_multiplier", finite(wd))):
                if (what == "multiplier" or wd is not None) and not (math.isfinite(v) and v > 0):
                    raise InputError(
                        f"{where} ({d['name']}): {what} must be a positive "
                        f"number, got {d.get(what)!r}"
                    )
            layers.append(
                PlanLayer(
                    name=str(d["name"]),
                    metric_value=finite(d.get("metric_value")),
                    multiplier=mult,
                    lr=finite(d["lr"]),
                    status=str(d["status"]),
                    reason=str(d.get("reason", "")),
                    wd_multiplier=None if wd is None else float(wd),
                )
            )
        base_lr = finite(doc["base_lr"])
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise InputError(f"{label}: base_lr must be a positive number")
        for key in ("params", "source"):
            if not isinstance(doc.get(key, {}), Mapping):
                raise InputError(f"{label}: '{key}' must be an object")
        base_wd = doc.get("base_wd")
        if base_wd is not None and not (math.isfinite(finite(base_wd)) and finite(base_wd) >= 0):
            raise InputError(f"{label}: base_wd must be a non-negative number")
        return cls(
            scheme=str(doc["scheme"]),
            metric=str(doc["metric"]),
            base_lr=base_lr,
            params=dict(doc["params"]),
            layers=layers,
            source=dict(doc.get("source", {})),
            base_wd=None if base_wd is None else float(base_wd),
            wd_scheme=doc.get("wd_scheme"),
        )


def load_plan(source: str | Path | Mapping[str, Any] | LRPlan) -> LRPlan:
    """An LR plan from a path, ``-``, a parsed document or an :class:`LRPlan`."""
    if isinstance(source, LRPlan):
        return source
    if isinstance(source, Mapping):
        return LRPlan.from_dict(source)
    doc, label = read_json(source)
    return LRPlan.from_dict(doc, label)
