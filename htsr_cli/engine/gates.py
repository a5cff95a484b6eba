"""``--fail-if`` gates: parse small threshold expressions and check them against layer metrics,
optionally against a baseline analysis (docs/gates.md). Torch-free: ``htsr gate`` on a stored
report never imports torch.

Grammar::

    gate      := condition [ "on" GLOB ]
    condition := operand CMP NUMBER
    operand   := value | AGG "(" value ")" | "count" "(" value CMP NUMBER ")"
               | "count" "(" SET ")" | SET
    value     := METRIC | "delta" "(" METRIC ")" | "ratio" "(" METRIC ")"
    SET       := added | removed | nonfinite | skipped

A hand-written scanner (linear in the length of the text: no backtracking regex) and a
recursive-descent parser; nothing is ever evaluated as Python. NaN (or None) never satisfies a
comparison, ``!=`` included, so a failed fit does not trip ``alpha > 6``: catch those with
``count(...)``. A layer whose weights are not finite is never silently passed: it fails every
value gate that selects it (docs/gates.md, "Diverged models").
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import numpy as np

from htsr_cli.engine.columns import METRICS, NUMERIC_COLUMNS
from htsr_cli.errors import InputError

GATE_COLUMNS: tuple[str, ...] = METRICS + NUMERIC_COLUMNS
AGGREGATES: tuple[str, ...] = ("mean", "median", "min", "max", "sum", "std")
#: Per-layer comparisons with the baseline: this minus baseline, this over baseline.
TRANSFORMS: tuple[str, ...] = ("delta", "ratio")
#: Sets of layers a gate can count: ``added > 0``, ``count(nonfinite) > 0``.
LAYER_SETS: tuple[str, ...] = ("added", "removed", "nonfinite", "skipped")
_CMP: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt,
    "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}  # fmt: skip
_SPECIAL_NUMBERS = ("inf", "infinity", "nan")
_DELIMS = frozenset("()<>=!")
_MAX_NAMES = 8  # layer names listed in one message line before "+N more"
_MAX_QUOTED = 80  # characters of an expression quoted in an error message
#: The reason of a skipped layer whose weights hold NaN or infinite entries, in documents
#: written before skipped records carried ``"nonfinite": true``.
_NONFINITE_REASON = "NaN or infinite"


@dataclass(frozen=True)
class Gate:
    """One parsed ``--fail-if`` expression; ``agg`` is None for a per-layer condition, and
    ``"count"`` with no ``inner_op`` for a count of a layer set (``metric`` in LAYER_SETS)."""

    text: str
    metric: str
    op: str
    threshold: float
    agg: str | None = None  # one of AGGREGATES, or "count"
    inner_op: str | None = None  # count(value inner_op inner_threshold)
    inner_threshold: float | None = None
    glob: str | None = None
    transform: str | None = None  # one of TRANSFORMS: the value is compared with the baseline

    @property
    def metrics(self) -> tuple[str, ...]:
        """The per-layer columns the gate reads (none for a layer-set count)."""
        return (self.metric,) if self.metric in GATE_COLUMNS else ()

    @property
    def counts_set(self) -> bool:
        return self.metric in LAYER_SETS

    @property
    def needs_baseline(self) -> bool:
        return self.transform is not None or self.metric in ("added", "removed")

    @property
    def value_text(self) -> str:
        """``alpha`` or ``delta(alpha)``."""
        return f"{self.transform}({self.metric})" if self.transform else self.metric

    @property
    def operand(self) -> str:
        """Canonical operand text, e.g. ``mean(delta(alpha))`` or ``count(alpha < 2)``."""
        if self.counts_set:
            return f"count({self.metric})"
        if self.agg == "count":
            return f"count({self.value_text} {self.inner_op} {_fmt(self.inner_threshold)})"
        return f"{self.agg}({self.value_text})" if self.agg else self.value_text


@dataclass
class GateResult:
    gate: str
    passed: bool
    value: float | None
    offending: list[dict]  # [{"name": layer name, "value": float, "reason"?: str}]
    message: str  # one human line, "FAIL ..." or "ok   ..."
    #: Notes that do not fail the gate (a glob matching no layer); shown on stderr.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN and infinities become None (JSON has neither)."""

        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else v

        offending = []
        for o in self.offending:
            item = {"name": o["name"], "value": clean(o["value"])}
            if o.get("reason"):
                item["reason"] = o["reason"]
            offending.append(item)
        return {
            "gate": self.gate,
            "passed": self.passed,
            "value": clean(self.value),
            "offending": offending,
            "message": self.message,
            "warnings": list(self.warnings),
        }


class _Tok(NamedTuple):
    kind: str  # num, name, op, paren, junk
    text: str
    col: int  # 1-based, for error messages


def _quoted(text: str) -> str:
    """``repr`` of an expression for a message, its middle cut when it is very long."""
    if len(text) <= _MAX_QUOTED:
        return repr(text)
    return repr(text[: _MAX_QUOTED // 2]) + f"...({len(text)} characters)"


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, why: str) -> InputError:
        return InputError(f"malformed --fail-if {_quoted(self.text)}: {why}")

    @staticmethod
    def where(tok: _Tok | None) -> str:
        return f"at column {tok.col}" if tok else "at end of expression"

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _run(self, i: int, accept: Callable[[str], bool]) -> int:
        while i < len(self.text) and accept(self.text[i]):
            i += 1
        return i

    def _junk_end(self, i: int) -> int:
        return self._run(i, lambda c: not c.isspace() and c not in _DELIMS)

    def _scan_number(self, start: int) -> tuple[str, int]:
        """A number token from ``start`` (digits, a dot or a sign there): ``num`` when it is a
        whole float literal, else ``junk`` up to the next delimiter. One pass, no backtracking:
        the scan is linear however many digits a literal has."""
        text, i = self.text, start
        if text[i] in "+-":
            i += 1
        if i < len(text) and text[i].isalpha():  # +inf, -infinity
            end = self._run(i, _is_word)
            ok = text[i:end].lower() in _SPECIAL_NUMBERS
            return ("num", end) if ok else ("junk", self._junk_end(end))
        int_end = self._run(i, lambda c: "0" <= c <= "9")
        j = int_end
        frac_digits = 0
        if j < len(text) and text[j] == ".":
            frac_end = self._run(j + 1, lambda c: "0" <= c <= "9")
            frac_digits, j = frac_end - j - 1, frac_end
        if int_end == i and frac_digits == 0:
            return "junk", self._junk_end(max(j, start + 1))
        if j < len(text) and text[j] in "eE":
            k = j + 1
            if k < len(text) and text[k] in "+-":
                k += 1
            exp_end = self._run(k, lambda c: "0" <= c <= "9")
            if exp_end > k:
                j = exp_end
        if j < len(text) and (_is_word(text[j]) or text[j] == "."):
            return "junk", self._junk_end(j)  # "6x", "6.5.3": rejected, never split
        return "num", j

    def peek(self) -> _Tok | None:
        self._skip_space()
        text, i = self.text, self.pos
        if i >= len(text):
            return None
        c = text[i]
        if c.isalpha() or c == "_":
            end = self._run(i, _is_word)
            kind = "num" if text[i:end].lower() in _SPECIAL_NUMBERS else "name"
        elif c.isdigit() or c in "+-.":
            kind, end = self._scan_number(i)
        elif c in "<>=!":
            two = text[i : i + 2]
            if two in ("<=", ">=", "==", "!="):
                kind, end = "op", i + 2
            else:
                kind, end = ("op" if c in "<>" else "junk"), i + 1
        elif c in "()":
            kind, end = "paren", i + 1
        else:
            kind, end = "junk", self._junk_end(i + 1)
        return _Tok(kind, text[i:end], i + 1)

    def take(self) -> _Tok | None:
        tok = self.peek()
        if tok:
            self.pos = tok.col - 1 + len(tok.text)
        return tok

    def expect(self, kind: str, text: str, after: str) -> None:
        tok = self.take()
        if tok is None or (tok.kind, tok.text) != (kind, text):
            raise self.fail(f"expected '{text}' after {_quoted(after)} {self.where(tok)}")

    def parse(self) -> Gate:
        if not self.text.strip():
            raise self.fail("empty expression")
        operand = self.operand()
        after = operand["metric"] if operand.get("agg") is None else ")"
        if operand.get("bare_set"):
            after = operand["metric"]
        op = self.cmp(after=after)
        threshold = self.number(after=op)
        glob, tok = None, self.take()
        if tok is not None and (tok.kind, tok.text) == ("name", "on"):
            glob = self.glob()
        elif tok is not None:
            raise self.fail(
                f"unexpected {_quoted(tok.text)} {self.where(tok)}; expected 'on GLOB' or end"
            )
        return Gate(
            self.text,
            operand["metric"],
            op,
            threshold,
            operand.get("agg"),
            operand.get("inner_op"),
            operand.get("inner_threshold"),
            glob,
            operand.get("transform"),
        )

    def operand(self) -> dict[str, Any]:
        tok = self.take()
        if tok is None or tok.kind != "name":
            raise self.fail(f"expected a metric or an aggregate like mean(alpha) {self.where(tok)}")
        if tok.text in LAYER_SETS:
            return {"agg": "count", "metric": tok.text, "bare_set": True}
        if tok.text not in AGGREGATES and tok.text != "count":
            transform, metric = self.value(tok)
            return {"metric": metric, "transform": transform}
        self.expect("paren", "(", after=tok.text)
        nxt = self.peek()
        if tok.text == "count" and nxt is not None and nxt.text in LAYER_SETS:
            self.take()
            self.expect("paren", ")", after=nxt.text)
            return {"agg": "count", "metric": nxt.text}
        transform, metric = self.value(self.take())
        shown = f"{transform}({metric})" if transform else metric
        out: dict[str, Any] = {"agg": tok.text, "metric": metric, "transform": transform}
        if tok.text == "count":
            nxt = self.peek()
            if nxt is None or nxt.kind != "op":
                raise self.fail(
                    f"count() takes a condition like count({shown} < 2) or a layer set "
                    f"({', '.join(LAYER_SETS)}): expected a comparison after {shown!r} "
                    f"{self.where(nxt)}"
                )
            out["inner_op"] = self.cmp(after=shown)
            out["inner_threshold"] = self.number(after=out["inner_op"])
            shown = _fmt(out["inner_threshold"])
        self.expect("paren", ")", after=shown)
        return out

    def value(self, tok: _Tok | None) -> tuple[str | None, str]:
        """``METRIC`` or ``delta(METRIC)`` / ``ratio(METRIC)``: (transform, metric)."""
        if tok is not None and tok.kind == "name" and tok.text in TRANSFORMS:
            self.expect("paren", "(", after=tok.text)
            metric = self.metric(self.take())
            self.expect("paren", ")", after=metric)
            return tok.text, metric
        return None, self.metric(tok)

    def metric(self, tok: _Tok | None) -> str:
        if tok is None or tok.kind != "name":
            raise self.fail(f"expected a metric name {self.where(tok)}")
        if tok.text not in GATE_COLUMNS:
            hint = ""
            if tok.text in LAYER_SETS:
                hint = f"; {tok.text} is a layer set: write count({tok.text}) or {tok.text} > N"
            raise self.fail(
                f"unknown metric {_quoted(tok.text)} at column {tok.col} "
                f"(allowed: {', '.join(GATE_COLUMNS)}){hint}"
            )
        return tok.text

    def cmp(self, after: str) -> str:
        tok = self.take()
        if tok is None or tok.kind != "op":
            raise self.fail(
                f"expected one of {' '.join(_CMP)} after {_quoted(after)} {self.where(tok)}"
            )
        return tok.text

    def number(self, after: str) -> float:
        tok = self.take()
        if tok is None or tok.kind != "num":
            raise self.fail(f"expected a number after {_quoted(after)} {self.where(tok)}")
        value = float(tok.text)
        if math.isnan(value):
            raise self.fail(f"nan is not allowed {self.where(tok)} (nothing compares to NaN)")
        if math.isinf(value) and tok.text.lstrip("+-")[:1].lower() != "i":
            raise self.fail(f"number out of range {self.where(tok)} (write inf for infinity)")
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
            raise self.fail(
                f"unexpected {_quoted(trailing)} after the glob; quote a glob with spaces"
            )
        if not glob:
            raise self.fail(f"empty glob at column {col}")
        return glob


def parse_gate(text: str) -> Gate:
    """Parse one ``--fail-if`` expression; raise InputError (one line) when it is malformed.
    Linear in ``len(text)``."""
    if not isinstance(text, str):
        raise InputError(f"--fail-if must be a string, got {type(text).__name__}")
    return _Parser(text).parse()


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.4g}"


def _as_float(v: Any) -> float:
    if isinstance(v, bool):
        return math.nan
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError, OverflowError):
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
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf -> nan is an honest answer
        fn = {"mean": np.mean, "median": np.median, "sum": np.sum, "std": np.std}[agg]
        return float(fn(values)), []


def compare(transform: str, value: float, base: float) -> float:
    """``delta`` (value - base) or ``ratio`` (value / base) of two metric values; NaN when
    either is missing. A ratio over a zero baseline is ±inf (0/0 is NaN), as in IEEE."""
    if math.isnan(value) or math.isnan(base):
        return math.nan
    if transform == "delta":
        return value - base  # Python floats: inf - inf is nan and overflow is inf, no raise
    if base == 0:
        if value == 0:
            return math.nan
        return math.copysign(math.inf, value) * math.copysign(1.0, base)
    try:
        return value / base
    except OverflowError:  # pragma: no cover (float division overflows to inf in CPython)
        return math.copysign(math.inf, value) * math.copysign(1.0, base)


def is_nonfinite(record: Mapping[str, Any]) -> bool:
    """Whether a skipped record is a layer skipped because its weights are NaN or infinite."""
    if record.get("nonfinite") is True:
        return True
    return _NONFINITE_REASON in str(record.get("reason", ""))


def pair_names(
    current: Iterable[str], baseline: Iterable[str]
) -> tuple[list[str], list[str], list[str]]:
    """``(common, added, removed)``: names in both (current order), only in ``current``,
    only in ``baseline`` (its order). Layers are paired by name, nothing else."""
    cur, base = list(dict.fromkeys(current)), list(dict.fromkeys(baseline))
    in_base, in_cur = set(base), set(cur)
    return (
        [n for n in cur if n in in_base],
        [n for n in cur if n not in in_base],
        [n for n in base if n not in in_cur],
    )


def require_metrics(
    gates: Sequence[Gate],
    computed: Collection[str],
    baseline: Collection[str] | None = None,
) -> None:
    """Refuse a gate on one of the ten metrics that is not ``computed`` (analyze calls this
    before any work; :func:`evaluate_gates` with the columns the layers have), and a gate that
    compares with a baseline when there is none (``baseline`` None) or the baseline lacks
    the metric."""
    for gate in gates:
        if gate.needs_baseline and baseline is None:
            raise InputError(
                f"--fail-if {_quoted(gate.text)} compares with a baseline, and none was given "
                "(htsr gate SOURCE --baseline BASE)"
            )
        missing = [m for m in gate.metrics if m in METRICS and m not in computed]
        if missing:
            raise InputError(
                f"--fail-if {_quoted(gate.text)} needs metric {missing[0]}, which was "
                "not computed (add it to --metrics)"
            )
        if gate.transform and baseline is not None:
            missing = [m for m in gate.metrics if m in METRICS and m not in baseline]
            if missing:
                raise InputError(
                    f"--fail-if {_quoted(gate.text)} needs metric {missing[0]} in the "
                    "baseline, which does not have it (analyse it with that metric)"
                )


@dataclass
class _Context:
    """What every gate of one evaluation sees."""

    layers: list[Mapping[str, Any]]
    skipped: list[Mapping[str, Any]]
    baseline: dict[str, Mapping[str, Any]] | None
    added: list[str]
    removed: list[str]
    universe: list[str]  # every name a glob may match

    def select(self, names: Iterable[str], glob: str | None) -> list[str]:
        return [n for n in names if glob is None or fnmatchcase(n, glob)]


def _name(row: Mapping[str, Any]) -> str:
    return str(row.get("name", ""))


def _evaluate_set(gate: Gate, ctx: _Context) -> GateResult:
    if gate.metric == "added":
        members = [{"name": n, "value": None} for n in ctx.added]
    elif gate.metric == "removed":
        members = [{"name": n, "value": None} for n in ctx.removed]
    else:
        members = [
            {"name": _name(r), "value": None, "reason": str(r.get("reason", ""))}
            for r in ctx.skipped
            if gate.metric == "skipped" or is_nonfinite(r)
        ]
    members = [m for m in members if gate.glob is None or fnmatchcase(m["name"], gate.glob)]
    value = float(len(members))
    failed = _holds(value, gate.op, gate.threshold)
    detail = f"{gate.operand} = {_fmt(value)}"
    if failed and members:
        detail += f" ({_names(members)})"
    text = gate.text.strip()
    msg = f"{'FAIL' if failed else 'ok  '} {text}: {detail}"
    return GateResult(gate.text, not failed, value, members if failed else [], msg)


def _rows(gate: Gate, ctx: _Context) -> tuple[list[tuple[str, float]], list[str]]:
    """(name, value) of the selected analysed layers, and the selected layers with no
    analysed counterpart in the baseline (for delta/ratio)."""
    rows: list[tuple[str, float]] = []
    unpaired: list[str] = []
    for layer in ctx.layers:
        name = _name(layer)
        if gate.glob is not None and not fnmatchcase(name, gate.glob):
            continue
        value = _as_float(layer.get(gate.metric))
        if gate.transform:
            assert ctx.baseline is not None
            base = ctx.baseline.get(name)
            if base is None:
                unpaired.append(name)
                continue
            value = compare(gate.transform, value, _as_float(base.get(gate.metric)))
        rows.append((name, value))
    return rows, unpaired


def _evaluate(gate: Gate, ctx: _Context) -> GateResult:
    text = gate.text.strip()
    if gate.counts_set:
        return _evaluate_set(gate, ctx)
    rows, unpaired = _rows(gate, ctx)
    skipped = [r for r in ctx.skipped if gate.glob is None or fnmatchcase(_name(r), gate.glob)]
    diverged = [
        {"name": _name(r), "value": None, "reason": "weights are NaN or infinite"}
        for r in skipped
        if is_nonfinite(r)
    ]
    if not rows and skipped and not unpaired:
        # Every selected layer was skipped: the gate checked nothing, which is never a pass.
        why = "; ".join(dict.fromkeys(str(r.get("reason", "skipped")) for r in skipped))
        offending = [
            {"name": _name(r), "value": None, "reason": str(r.get("reason", ""))} for r in skipped
        ]
        msg = (
            f"FAIL {text}: all {len(skipped)} selected layers were skipped, nothing to check "
            f"({_names(offending)}: {why})"
        )
        return GateResult(gate.text, False, None, offending, msg)
    if not rows and not skipped and not unpaired:
        why = f"no layer matches {gate.glob!r}" if gate.glob is not None else "no layers"
        return GateResult(gate.text, True, None, [], f"ok   {text}: {why}")
    notes = []
    added = set(ctx.added)
    new = sum(1 for n in unpaired if n in added)
    if new:
        notes.append(f"{_count(new, 'layer')} only in this model, not compared (see added)")
    if len(unpaired) > new:  # present in the baseline, but skipped there
        notes.append(
            f"{_count(len(unpaired) - new, 'layer')} skipped in the baseline, not compared"
        )
    if gate.agg is None:
        hits = [{"name": n, "value": v} for n, v in rows if _holds(v, gate.op, gate.threshold)]
        hits += diverged
        if hits:
            if diverged:
                notes.insert(0, f"{len(diverged)} with non-finite weights")
            tail = "; " + "; ".join(notes) if notes else ""
            msg = f"FAIL {text}: {_count(len(hits), 'layer')} ({_names(hits)}){tail}"
            return GateResult(gate.text, False, None, hits, msg)
        nans = sum(math.isnan(v) for _, v in rows)
        if nans:
            notes.insert(0, f"{nans} without a value, never counted")
        tail = f" ({'; '.join(notes)})" if notes else ""
        msg = f"ok   {text}: 0 of {len(rows)} layers{tail}"
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
    holds = _holds(value, gate.op, gate.threshold)
    detail = f"{gate.operand} = {_fmt(value)}"
    if math.isnan(value):
        detail += " (no values to aggregate; NaN never satisfies a comparison)"
    elif holds and culprits:
        detail += f" ({_names(culprits)})"
    if diverged:
        notes.insert(
            0, f"{_count(len(diverged), 'layer')} with non-finite weights ({_names(diverged)})"
        )
    if notes:
        detail += "; " + "; ".join(notes)
    failed = holds or bool(diverged)
    offending = (culprits if holds else []) + diverged
    msg = f"{'FAIL' if failed else 'ok  '} {text}: {detail}"
    return GateResult(gate.text, not failed, value, offending if failed else [], msg)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _glob_warning(gate: Gate, ctx: _Context, strict: bool) -> str | None:
    if gate.glob is None or any(fnmatchcase(n, gate.glob) for n in ctx.universe):
        return None
    text = f"--fail-if {_quoted(gate.text.strip())}: no layer matches {gate.glob!r}"
    if strict:
        raise InputError(f"{text} (--strict)")
    return text


def evaluate_gates(
    gates: Sequence[Gate],
    layers: Sequence[Mapping[str, Any]],
    *,
    skipped: Sequence[Mapping[str, Any]] = (),
    baseline: Sequence[Mapping[str, Any]] | None = None,
    baseline_skipped: Sequence[Mapping[str, Any]] = (),
    strict: bool = False,
    pairing: tuple[Sequence[str], Sequence[str]] | None = None,
) -> list[GateResult]:
    """Check every gate against ``layers`` (dicts with "name" and metric columns).

    Args:
        gates: parsed gates (:func:`parse_gate`).
        layers: the analysed layers of the model.
        skipped: its skipped records (``{"name", "reason", "nonfinite"?}``): a layer skipped
            for non-finite weights fails every value gate that selects it, and a gate whose
            selected layers were all skipped fails.
        baseline, baseline_skipped: the baseline's analysed layers and skipped records, for
            ``delta()``, ``ratio()``, ``added`` and ``removed``; paired by name.
        strict: a glob that matches no layer raises InputError instead of warning.
        pairing: ``(added, removed)`` of the baseline, when the caller has already paired
            the two by name (:func:`pair_names` of every name, analysed then skipped, as
            ``htsr gate`` does): used as given instead of pairing again. None pairs here.

    Raises:
        InputError: a gate needs a metric the layers (or the baseline) lack, or a baseline
            that was not given; with ``strict``, a glob that matches no layer.
    """
    layers, skipped = list(layers), list(skipped)
    current = [_name(r) for r in layers] + [_name(r) for r in skipped]
    base_map = None
    added: list[str] = []
    removed: list[str] = []
    base_cols: set[str] | None = None
    if baseline is not None:
        base_rows = list(baseline)
        base_map = {_name(r): r for r in base_rows}
        if pairing is None:
            base_names = list(base_map) + [_name(r) for r in baseline_skipped]
            _, added, removed = pair_names(current, base_names)
        else:
            added, removed = list(pairing[0]), list(pairing[1])
        base_cols = {key for row in base_rows for key in row} if base_rows else set(METRICS)
    computed = {key for row in layers for key in row} if layers else set(METRICS)
    require_metrics(gates, computed, base_cols)
    ctx = _Context(layers, skipped, base_map, added, removed, current + removed)
    results = []
    for gate in gates:
        warning = _glob_warning(gate, ctx, strict)
        result = _evaluate(gate, ctx)
        if warning:
            result.warnings.append(warning)
        results.append(result)
    return results
