"""``--fail-if`` gates: parse small threshold expressions and check them against layer metrics.

Grammar (see docs/gates.md)::

    gate      := condition [ "on" GLOB ]
    condition := operand CMP NUMBER
    operand   := METRIC | AGG "(" METRIC ")" | "count" "(" METRIC CMP NUMBER ")"

A hand-written tokenizer and recursive-descent parser; nothing is ever evaluated as Python.
NaN (or None) never satisfies a comparison, ``!=`` included, so a failed fit does not trip
``alpha > 6``: catch those with ``count(...)`` or the status column.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import numpy as np

from htsr_cli.engine.columns import METRICS, NUMERIC_COLUMNS
from htsr_cli.errors import InputError

GATE_COLUMNS: tuple[str, ...] = METRICS + NUMERIC_COLUMNS
AGGREGATES: tuple[str, ...] = ("mean", "median", "min", "max", "sum", "std")
_CMP: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt,
    "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}  # fmt: skip
# Numbers must not run into a name or a dot, so "6x" and "6.5.3" are rejected, not split.
_TOKEN = re.compile(
    r"(?P<num>[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|(?i:inf(?:inity)?|nan))(?![\w.]))"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<op>[<>=!]=|[<>])|(?P<paren>[()])|(?P<junk>[^\s()<>=!]+|\S)"
)
_MAX_NAMES = 8  # layer names listed in one message line before "+N more"


@dataclass(frozen=True)
class Gate:
    """One parsed ``--fail-if`` expression; ``agg`` is None for a per-layer condition."""

    text: str
    metric: str
    op: str
    threshold: float
    agg: str | None = None  # one of AGGREGATES, or "count"
    inner_op: str | None = None  # count(metric inner_op inner_threshold)
    inner_threshold: float | None = None
    glob: str | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    @property
    def operand(self) -> str:
        """Canonical operand text, e.g. ``mean(alpha)`` or ``count(alpha < 2)``."""
        if self.agg == "count":
            return f"count({self.metric} {self.inner_op} {_fmt(self.inner_threshold)})"
        return f"{self.agg}({self.metric})" if self.agg else self.metric


@dataclass
class GateResult:
    gate: str
    passed: bool
    value: float | None
    offending: list[dict]  # [{"name": layer name, "value": float}]
    message: str  # one human line, "FAIL ..." or "ok   ..."

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN becomes None."""

        def clean(v: float | None) -> float | None:
            return None if v is None or math.isnan(v) else v

        return {
            "gate": self.gate,
            "passed": self.passed,
            "value": clean(self.value),
            "offending": [{"name": o["name"], "value": clean(o["value"])} for o in self.offending],
            "message": self.message,
        }


class _Tok(NamedTuple):
    kind: str
    text: str
    col: int  # 1-based, for error messages


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, why: str) -> InputError:
        return InputError(f"malformed --fail-if {self.text!r}: {why}")

    @staticmethod
    def where(tok: _Tok | None) -> str:
        return f"at column {tok.col}" if tok else "at end of expression"

    def peek(self) -> _Tok | None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        m = _TOKEN.match(self.text, self.pos)
        return _Tok(m.lastgroup or "junk", m.group(), self.pos + 1) if m else None

    def take(self) -> _Tok | None:
        tok = self.peek()
        if tok:
            self.pos += len(tok.text)
        return tok

    def expect(self, kind: str, text: str, after: str) -> None:
        tok = self.take()
        if tok is None or (tok.kind, tok.text) != (kind, text):
            raise self.fail(f"expected '{text}' after {after!r} {self.where(tok)}")

    def parse(self) -> Gate:
        if not self.text.strip():
            raise self.fail("empty expression")
        agg, metric, inner_op, inner_thr = self.operand()
        op = self.cmp(after=metric if agg is None else ")")
        threshold = self.number(after=op)
        glob, tok = None, self.take()
        if tok is not None and (tok.kind, tok.text) == ("name", "on"):
            glob = self.glob()
        elif tok is not None:
            raise self.fail(f"unexpected {tok.text!r} {self.where(tok)}; expected 'on GLOB' or end")
        return Gate(self.text, metric, op, threshold, agg, inner_op, inner_thr, glob)

    def operand(self) -> tuple[str | None, str, str | None, float | None]:
        tok = self.take()
        if tok is None or tok.kind != "name":
            raise self.fail(f"expected a metric or an aggregate like mean(alpha) {self.where(tok)}")
        if tok.text not in AGGREGATES and tok.text != "count":
            return None, self.metric(tok), None, None
        self.expect("paren", "(", after=tok.text)
        metric = self.metric(self.take())
        inner_op = inner_thr = None
        if tok.text == "count":
            nxt = self.peek()
            if nxt is None or nxt.kind != "op":
                raise self.fail(
                    f"count() takes a condition like count({metric} < 2): expected a comparison "
                    f"after {metric!r} {self.where(nxt)}"
                )
            inner_op = self.cmp(after=metric)
            inner_thr = self.number(after=inner_op)
        self.expect("paren", ")", after=metric if inner_thr is None else _fmt(inner_thr))
        return tok.text, metric, inner_op, inner_thr

    def metric(self, tok: _Tok | None) -> str:
        if tok is None or tok.kind != "name":
            raise self.fail(f"expected a metric name {self.where(tok)}")
        if tok.text not in GATE_COLUMNS:
            raise self.fail(
                f"unknown metric {tok.text!r} at column {tok.col} "
                f"(allowed: {', '.join(GATE_COLUMNS)})"
            )
        return tok.text

    def cmp(self, after: str) -> str:
        tok = self.take()
        if tok is None or tok.kind != "op":
            raise self.fail(f"expected one of {' '.join(_CMP)} after {after!r} {self.where(tok)}")
        return tok.text

    def number(self, after: str) -> float:
        tok = self.take()
        if tok is None or tok.kind != "num":
            raise self.fail(f"expected a number after {after!r} {self.where(tok)}")
        value = float(tok.text)
        if math.isnan(value):
            raise self.fail(f"nan is not allowed {self.where(tok)} (nothing compares to NaN)")
        return value

    def glob(self) -> str:
        """Read the rest raw: globs like ``features.*`` are not made of tokens."""
        rest = self.text[self.pos :]
        body = rest.lstrip()
        col = len(self.text) - len(body) + 1
        if not body:
            raise self.fail("expected a layer glob after 'on' at end of expression")
        if body[0] in "'\"":
            end = body.find(body[0], 1)
            if end < 0:
                raise self.fail(f"unterminated quote at column {col}")
            glob, trailing = body[1:end], body[end + 1 :].strip()
        else:
            glob, *extra = body.split()
            trailing = " ".join(extra)
        if trailing:
            raise self.fail(f"unexpected {trailing!r} after the glob; quote a glob with spaces")
        if not glob:
            raise self.fail(f"empty glob at column {col}")
        return glob


def parse_gate(text: str) -> Gate:
    """Parse one ``--fail-if`` expression; raise InputError (one line) when it is malformed."""
    return _Parser(text).parse()


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.4g}"


def _as_float(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _holds(value: float, op: str, threshold: float) -> bool:
    # Explicit NaN check: IEEE makes ``nan != t`` true, but a missing value must never trip a gate.
    return not math.isnan(value) and _CMP[op](value, threshold)


def _names(rows: list[dict]) -> str:
    names = [str(r["name"]) for r in rows]
    more = f", ... +{len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
    return ", ".join(names[:_MAX_NAMES]) + more


def _aggregate(agg: str, rows: list[tuple[str, float]]) -> tuple[float, list[dict]]:
    """Aggregate non-NaN values; max/min also return their (first) arg layer."""
    if not rows:
        return math.nan, []
    if agg in ("max", "min"):
        name, v = (max if agg == "max" else min)(rows, key=lambda r: r[1])
        return v, [{"name": name, "value": v}]
    values = np.array([v for _, v in rows], dtype=float)
    with np.errstate(invalid="ignore"):  # inf - inf -> nan is an honest answer here
        fn = {"mean": np.mean, "median": np.median, "sum": np.sum, "std": np.std}[agg]
        return float(fn(values)), []


def require_metrics(gates: Sequence[Gate], computed: Collection[str]) -> None:
    """Refuse a gate on one of the ten metrics that is not ``computed`` (analyze calls this
    before any work; :func:`evaluate_gates` with the columns the layers have)."""
    for gate in gates:
        missing = [m for m in gate.metrics if m in METRICS and m not in computed]
        if missing:
            raise InputError(
                f"--fail-if {gate.text!r} needs metric {missing[0]}, which was "
                "not computed (add it to --metrics)"
            )


def _evaluate(gate: Gate, layers: Sequence[Mapping[str, Any]]) -> GateResult:
    if layers:
        require_metrics([gate], {key for layer in layers for key in layer})
    rows = [
        (str(layer.get("name", "")), _as_float(layer.get(gate.metric)))
        for layer in layers
        if gate.glob is None or fnmatchcase(str(layer.get("name", "")), gate.glob)
    ]
    text = gate.text.strip()
    if not rows:
        why = f"no layer matches {gate.glob!r}" if gate.glob is not None else "no layers"
        return GateResult(gate.text, True, None, [], f"ok   {text}: {why}")
    if gate.agg is None:
        hits = [{"name": n, "value": v} for n, v in rows if _holds(v, gate.op, gate.threshold)]
        if hits:
            noun = "layer" if len(hits) == 1 else "layers"
            msg = f"FAIL {text}: {len(hits)} {noun} ({_names(hits)})"
            return GateResult(gate.text, False, None, hits, msg)
        nans = sum(math.isnan(v) for _, v in rows)
        note = f" ({nans} without a value, never counted)" if nans else ""
        msg = f"ok   {text}: 0 of {len(rows)} layers{note}"
        return GateResult(gate.text, True, None, [], msg)
    if gate.agg == "count":
        assert gate.inner_op is not None and gate.inner_threshold is not None
        culprits = [
            {"name": n, "value": v}
            for n, v in rows
            if _holds(v, gate.inner_op, gate.inner_threshold)
        ]
        value = float(len(culprits))
    else:
        value, culprits = _aggregate(gate.agg, [(n, v) for n, v in rows if not math.isnan(v)])
    failed = _holds(value, gate.op, gate.threshold)
    detail = f"{gate.operand} = {_fmt(value)}"
    if math.isnan(value):
        detail += " (no values to aggregate; NaN never satisfies a comparison)"
    elif failed and culprits:
        detail += f" ({_names(culprits)})"
    msg = f"{'FAIL' if failed else 'ok  '} {text}: {detail}"
    return GateResult(gate.text, not failed, value, culprits if failed else [], msg)


def evaluate_gates(gates: Sequence[Gate], layers: Sequence[Mapping[str, Any]]) -> list[GateResult]:
    """Check every gate against ``layers`` (dicts with "name" and metric columns)."""
    return [_evaluate(gate, layers) for gate in gates]
