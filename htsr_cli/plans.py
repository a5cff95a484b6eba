"""Versioned JSON documents: reading and validating analyses, and the learning-rate plan.

One reader for every document the tools exchange (``htsr.analysis/1``, ``htsr.lr-plan/1``,
later ``htsr.prune-plan/1``): a document names its schema as ``name/major``; a reader refuses
another name or a major version it does not know, and missing fields, with one clear line.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

ANALYSIS_SCHEMA = "htsr.analysis/1"
LR_PLAN_SCHEMA = "htsr.lr-plan/1"


def read_json(source: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a JSON document from a path or ``-`` (stdin); returns (document, label)."""
    label = "stdin" if str(source) == "-" else str(source)
    if str(source) == "-" and sys.stdin is not None and sys.stdin.isatty():
        # Reading would wait for typed JSON: nobody means that.
        raise InputError("'-' reads a document from stdin, but stdin is a terminal: pipe one "
                         "in, e.g. htsr analyze m.safetensors --format json | htsr allocate - "
                         "--lr 0.1")
    try:
        if str(source) == "-":
            text = sys.stdin.read()
        else:
            text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{label} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {label}: {exc}") from None
    if not text.strip():
        raise InputError(f"{label} is empty (expected a JSON document)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{label} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{label} is not a JSON object")
    return doc, label


def check_schema(doc: Mapping[str, Any], expected: str, label: str) -> None:
    """Refuse a document of another schema or of an unknown major version."""
    got = doc.get("schema")
    if not isinstance(got, str):
        raise InputError(f"{label} has no 'schema' field (expected {expected!r})")
    name, _, major = got.partition("/")
    want_name, _, want_major = expected.partition("/")
    if name != want_name:
        raise InputError(f"{label} is a {got!r} document, expected {expected!r}")
    if major != want_major:
        raise InputError(f"{label} has schema version {got!r}; this htsr reads {expected!r}")


def require(doc: Mapping[str, Any], fields: tuple[str, ...], label: str) -> None:
    missing = [f for f in fields if f not in doc]
    if missing:
        raise InputError(f"{label} lacks field(s) {', '.join(missing)}")


def validate_analysis(doc: Mapping[str, Any], label: str = "analysis") -> dict[str, Any]:
    """Check an ``htsr.analysis/1`` document enough for the commands that consume it."""
    check_schema(doc, ANALYSIS_SCHEMA, label)
    require(doc, ("source", "options", "layers"), label)
    for key in ("source", "options"):
        if not isinstance(doc[key], Mapping):
            raise InputError(f"{label}: '{key}' must be an object")
    layers = doc["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise InputError(f"{label}: 'layers' must be a list of objects")
    for i, layer in enumerate(layers):
        require(layer, ("name", "num_evals"), f"{label} layers[{i}]")
    if not layers:
        raise InputError(f"{label} has no analysed layer")
    return dict(doc)


def is_analysis_document(source: Any) -> bool:
    """Whether ``source`` is an analysis (``-``, a ``.json`` path, a parsed document or an
    :class:`~htsr_cli.analysis.Analysis`) rather than a checkpoint to analyse."""
    if isinstance(source, Mapping):
        return "schema" in source or "layers" in source
    if isinstance(source, str | Path):
        return str(source) == "-" or Path(source).suffix.lower() == ".json"
    # Only an already imported htsr_cli.analysis can have made an Analysis: no torch import.
    mod = sys.modules.get("htsr_cli.analysis")
    return mod is not None and isinstance(source, mod.Analysis)


def read_analysis(source: Any, label: str = "analysis") -> tuple[dict[str, Any], str | None]:
    """The validated analysis document behind ``source`` (see :func:`is_analysis_document`)
    and the file it came from (``stdin`` or the path; None for an in-memory one)."""
    if isinstance(source, str | Path):
        doc, file = read_json(source)
        return validate_analysis(doc, file), file
    if not isinstance(source, Mapping):
        source = source.to_dict()  # an Analysis
    return validate_analysis(source, label), None


def finite(value: Any) -> float:
    """A metric value from a document as float; null and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


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
            "multiplier": self.multiplier, "lr": self.lr, "status": self.status,
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
            "schema": LR_PLAN_SCHEMA, "source": self.source, "scheme": self.scheme,
            "params": self.params, "base_lr": self.base_lr, "metric": self.metric,
            "summary": self.summary(), "layers": [p.to_dict() for p in self.layers],
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
                    raise InputError(f"{where} ({d['name']}): {what} must be a positive "
                                     f"number, got {d.get(what)!r}")
            layers.append(PlanLayer(
                name=str(d["name"]), metric_value=finite(d.get("metric_value")),
                multiplier=mult, lr=finite(d["lr"]), status=str(d["status"]),
                reason=str(d.get("reason", "")),
                wd_multiplier=None if wd is None else float(wd)))
        base_lr = finite(doc["base_lr"])
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise InputError(f"{label}: base_lr must be a positive number")
        for key in ("params", "source"):
            if not isinstance(doc.get(key, {}), Mapping):
                raise InputError(f"{label}: '{key}' must be an object")
        base_wd = doc.get("base_wd")
        if base_wd is not None and not (math.isfinite(finite(base_wd)) and finite(base_wd) >= 0):
            raise InputError(f"{label}: base_wd must be a non-negative number")
        return cls(scheme=str(doc["scheme"]), metric=str(doc["metric"]), base_lr=base_lr,
                   params=dict(doc["params"]), layers=layers, source=dict(doc.get("source", {})),
                   base_wd=None if base_wd is None else float(base_wd),
                   wd_scheme=doc.get("wd_scheme"))


def load_plan(source: str | Path | Mapping[str, Any] | LRPlan) -> LRPlan:
    """An LR plan from a path, ``-``, a parsed document or an :class:`LRPlan`."""
    if isinstance(source, LRPlan):
        return source
    if isinstance(source, Mapping):
        return LRPlan.from_dict(source)
    doc, label = read_json(source)
    return LRPlan.from_dict(doc, label)
