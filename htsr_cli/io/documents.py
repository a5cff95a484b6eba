"""Reading versioned JSON documents: parsing, the schema check every reader makes, and the
reader of analyses (``htsr.analysis/1``). The plan documents are read beside their classes
(:mod:`htsr_cli.allocate.plan`, :mod:`htsr_cli.prune.plan`) with these helpers.

A document names its schema as ``name/major``; a reader refuses another name or a major
version it does not know, and missing fields, with one clear line. Torch-free.

Every document is checked fully here, once, so that the code past a reader can trust it:
:func:`read_json` refuses nesting deeper than :data:`MAX_DEPTH` and integers longer than
:data:`MAX_INT_DIGITS` digits (both made Python raise RecursionError or ValueError); the
analysis reader (:func:`validate_analysis`) checks the type and range of every field the
commands use, and refuses two layers of the same name.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io import schemas

ANALYSIS_SCHEMA = schemas.ANALYSIS


def check_regular_file(path: str | os.PathLike, what: str = "input") -> None:
    """Refuse an input that is not a regular file (a directory is checked by its caller): a
    FIFO or a device would block ``open()`` or never end. ``-`` is how stdin is read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        hint = " (use - to read it from stdin)" if what == "document" else ""
        raise InputError(
            f"{path} is not a regular file (a pipe or a device); the {what} must be a file{hint}"
        )


def read_json(source: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a JSON document from a path or ``-`` (stdin); returns (document, label)."""
    label = "stdin" if str(source) == "-" else str(source)
    if str(source) == "-" and sys.stdin is not None and sys.stdin.isatty():
        # Reading would wait for typed JSON: nobody means that.
        raise InputError(
            "'-' reads a document from stdin, but stdin is a terminal: pipe one "
            "in, e.g. htsr analyze m.safetensors --format json | htsr allocate - "
            "--lr 0.1"
        )
    if str(source) != "-":
        check_regular_file(source, "document")
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
    return parse_json(text, label), label


#: Deepest nesting of objects and lists a document may have (htsr writes at most 5 levels).
MAX_DEPTH = 64
#: Longest integer a document may hold: any count htsr writes has far fewer digits.
MAX_INT_DIGITS = 20


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


class _TooLong(ValueError):
    """A JSON integer longer than :data:`MAX_INT_DIGITS` digits."""


def parse_json(text: str, label: str) -> dict[str, Any]:
    """Parse JSON text into an object, refusing (one line, :class:`InputError`) what is not
    JSON, not an object, nested deeper than :data:`MAX_DEPTH` or holding an integer longer
    than :data:`MAX_INT_DIGITS` digits."""
    try:
        doc = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{label} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _TooLong as exc:
        raise InputError(f"{label} holds {exc} (at most {MAX_INT_DIGITS})") from None
    except RecursionError:
        raise InputError(f"{label} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(doc, dict):
        raise InputError(f"{label} is not a JSON object")
    check_depth(doc, label)
    return doc


def check_depth(doc: Any, label: str) -> None:
    """Refuse a value nested deeper than :data:`MAX_DEPTH` (walked without recursion, so
    that what is past the reader may recurse into the document safely)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"{label} is nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


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
    check = _PLAN_CHECKS.get(expected)
    if check is not None:  # the plans are checked fully here, whichever reader asks
        check_depth(doc, label)
        check(doc, label)


def require(doc: Mapping[str, Any], fields: tuple[str, ...], label: str) -> None:
    missing = [f for f in fields if f not in doc]
    if missing:
        raise InputError(f"{label} lacks field(s) {', '.join(missing)}")


#: Largest size (a side, a count of eigenvalues or of parameters) a document may state: every
#: such number is then exact in float64 and fits torch's int64.
MAX_SIZE = 2**53

# Per-layer fields of an analysis, by kind.
_SIZE_FIELDS = ("N", "M", "rf", "num_evals")
_COUNT_FIELDS = ("num_pl_spikes", "matrix_rank", "num_fingers")
_TEXT_FIELDS = ("type", "status", "warning")
# The ten metrics and the fit's numbers.
_NUMBER_FIELDS = (
    *schemas.METRICS,
    "Q",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "raw_alpha",
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(value: Any, where: str, lo: int = 0, hi: int = MAX_SIZE) -> int:
    """``value`` as an integer in ``[lo, hi]`` (a JSON number with no fraction), else an
    :class:`InputError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{where} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def check_number(value: Any, where: str) -> float:
    """``value`` as a float: a JSON number, or null (NaN, as htsr writes a NaN); a NaN or an
    infinity (Python's JSON reads them) is kept and, like null, means "no value" to the
    commands. Anything else is an :class:`InputError` naming ``where``."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where} must be a number or null, got {_short(value)}")
    return float(value)


def check_text(value: Any, where: str) -> str:
    """``value`` as a string, else an :class:`InputError` naming ``where``."""
    if not isinstance(value, str):
        raise InputError(f"{where} must be a string, got {_short(value)}")
    return value


def check_object(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as a JSON object, else an :class:`InputError` naming ``where``."""
    if not isinstance(value, Mapping):
        raise InputError(f"{where} must be an object, got {_short(value)}")
    return value


def check_list(value: Any, where: str) -> list[Any]:
    """``value`` as a JSON list, else an :class:`InputError` naming ``where``."""
    if not isinstance(value, list | tuple):
        raise InputError(f"{where} must be a list, got {_short(value)}")
    return list(value)


def _check_layer(layer: Any, where: str) -> None:
    layer = check_object(layer, where)
    require(layer, ("name", "num_evals"), where)
    check_text(layer["name"], f"{where}.name")
    if not layer["name"]:
        raise InputError(f"{where}.name is empty")
    where = f"{where} ({printable_name(layer['name'])})"
    for key in _SIZE_FIELDS:
        if key in layer:
            check_int(layer[key], f"{where}.{key}", lo=1)
    if all(k in layer for k in ("N", "M", "rf")) and layer["N"] * layer["M"] * layer["rf"] > (
        MAX_SIZE
    ):
        raise InputError(f"{where}: N*M*rf exceeds {MAX_SIZE}")
    for key in _COUNT_FIELDS:
        if layer.get(key) is not None:
            check_int(layer[key], f"{where}.{key}")
    for key in _TEXT_FIELDS:
        if key in layer:
            check_text(layer[key], f"{where}.{key}")
    for key in _NUMBER_FIELDS:  # other fields (a later minor version's) are not read
        if key in layer:
            check_number(layer[key], f"{where}.{key}")


def _check_skipped(rec: Any, where: str) -> None:
    rec = check_object(rec, where)
    require(rec, ("name",), where)
    check_text(rec["name"], f"{where}.name")
    for key in ("reason", "dtype"):
        if key in rec:
            check_text(rec[key], f"{where}.{key}")
    if "shape" in rec:
        size = 1
        for i, dim in enumerate(check_list(rec["shape"], f"{where}.shape")):
            size *= check_int(dim, f"{where}.shape[{i}]")
            if size > MAX_SIZE:
                raise InputError(f"{where}.shape has more than {MAX_SIZE} elements")


def _check_named_layers(doc: Mapping[str, Any], label: str) -> list[Mapping[str, Any]]:
    """``layers``: a list of objects with non-empty string names, no name twice."""
    require(doc, ("layers",), label)
    layers = check_list(doc["layers"], f"{label}: 'layers'")
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        where = f"{label} layers[{i}]"
        layer = check_object(layer, where)
        require(layer, ("name",), where)
        name = check_text(layer["name"], f"{where}.name")
        if not name:
            raise InputError(f"{where}.name is empty")
        if name in seen:
            raise InputError(f"{label} names layer {printable_name(name)} twice")
        seen.add(name)
    return layers


def _check_lr_plan(doc: Mapping[str, Any], label: str) -> None:
    """``htsr.lr-plan/1`` (docs/allocate.md): the types of every field a reader uses; the
    ranges (positive multipliers...) are :meth:`LRPlan.from_dict`'s."""
    for i, layer in enumerate(_check_named_layers(doc, label)):
        where = f"{label} layers[{i}] ({printable_name(layer['name'])})"
        for key in ("metric_value", "lr"):  # multipliers: LRPlan.from_dict's own message
            if key in layer:
                check_number(layer[key], f"{where}.{key}")
        for key in ("status", "reason"):
            if key in layer:
                check_text(layer[key], f"{where}.{key}")
    for key in ("params", "source", "summary"):
        if key in doc:
            check_object(doc[key], f"{label}: '{key}'")
    for key in ("scheme", "metric", "wd_scheme"):
        if doc.get(key) is not None:
            check_text(doc[key], f"{label}: '{key}'")


def _check_prune_plan(doc: Mapping[str, Any], label: str) -> None:
    """``htsr.prune-plan/1`` (docs/prune.md): the types of every field a reader uses; the
    ranges (budgets in [0, 1)...) are :func:`htsr_cli.prune.plan.read_plan`'s."""
    for i, layer in enumerate(_check_named_layers(doc, label)):
        where = f"{label} layers[{i}] ({printable_name(layer['name'])})"
        if "metric_value" in layer:  # budget and ratio: read_plan's own message
            check_number(layer["metric_value"], f"{where}.metric_value")
        for key in ("params_before", "params_after", "channels_before", "channels_after"):
            if layer.get(key) is not None:
                check_int(layer[key], f"{where}.{key}")
        for key in ("group", "note"):
            if layer.get(key) is not None:
                check_text(layer[key], f"{where}.{key}")
    for key in ("params", "source", "target", "achieved"):
        if key in doc:
            check_object(doc[key], f"{label}: '{key}'")
    for key in ("mode", "method", "metric", "output"):
        if doc.get(key) is not None:
            check_text(doc[key], f"{label}: '{key}'")
    for key in ("groups", "notes"):
        if key in doc:
            check_list(doc[key], f"{label}: '{key}'")
    for i, note in enumerate(doc.get("notes", [])):
        check_text(note, f"{label} notes[{i}]")
    for i, group in enumerate(doc.get("groups", [])):
        where = f"{label} groups[{i}]"
        group = check_object(group, where)
        if "name" in group:
            check_text(group["name"], f"{where}.name")
        for j, member in enumerate(check_list(group.get("members", []), f"{where}.members")):
            check_text(member, f"{where}.members[{j}]")


_PLAN_CHECKS = {schemas.LR_PLAN: _check_lr_plan, schemas.PRUNE_PLAN: _check_prune_plan}


def printable_name(name: str) -> str:
    """A name quoted for a message (repr: controls escaped, at most 60 characters)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_analysis(
    doc: Mapping[str, Any], label: str = "analysis", *, allow_empty: bool = False
) -> dict[str, Any]:
    """Check an ``htsr.analysis/1`` document fully (docs/analysis-schema.md): the type and
    range of every field the commands use, and no two layers (analysed or skipped) of the
    same name. Past this, a consumer may index and compute without further checks.

    ``allow_empty`` accepts an analysis whose every layer was skipped (a diverged model, which
    a gate must fail rather than refuse); plans need analysed layers and refuse it."""
    check_schema(doc, ANALYSIS_SCHEMA, label)
    check_depth(doc, label)
    require(doc, ("source", "options", "layers"), label)
    for key in ("source", "options"):
        check_object(doc[key], f"{label}: '{key}'")
    for key in ("summary",):
        if doc.get(key) is not None:
            check_object(doc[key], f"{label}: '{key}'")
    source = doc["source"]
    if source.get("path") is not None:
        check_text(source["path"], f"{label}: source.path")
    layers = check_list(doc["layers"], f"{label}: 'layers'")
    if not layers and not (allow_empty and doc.get("skipped")):
        raise InputError(f"{label} has no analysed layer")
    for i, layer in enumerate(layers):
        _check_layer(layer, f"{label} layers[{i}]")
    skipped = check_list(doc.get("skipped", []), f"{label}: 'skipped'")
    for i, rec in enumerate(skipped):
        _check_skipped(rec, f"{label} skipped[{i}]")
    if "gates" in doc:
        check_list(doc["gates"], f"{label}: 'gates'")
    seen: set[str] = set()
    for rec in [*layers, *skipped]:
        if rec["name"] in seen:
            raise InputError(f"{label} names layer {printable_name(rec['name'])} twice")
        seen.add(rec["name"])
    return dict(doc)


def is_analysis_document(source: Any) -> bool:
    """Whether ``source`` is an analysis (``-``, a ``.json`` path, a parsed document or an
    :class:`~htsr_cli.engine.analysis.Analysis`) rather than a checkpoint to analyse."""
    if isinstance(source, Mapping):
        return "schema" in source or "layers" in source
    if isinstance(source, str | Path):
        return str(source) == "-" or Path(source).suffix.lower() == ".json"
    # Only an already imported htsr_cli.engine.analysis can have made an Analysis: no torch import.
    mod = sys.modules.get("htsr_cli.engine.analysis")
    return mod is not None and isinstance(source, mod.Analysis)


def read_analysis(
    source: Any, label: str = "analysis", *, allow_empty: bool = False
) -> tuple[dict[str, Any], str | None]:
    """The validated analysis document behind ``source`` (see :func:`is_analysis_document`)
    and the file it came from (``stdin`` or the path; None for an in-memory one);
    ``allow_empty`` as for :func:`validate_analysis`."""
    if isinstance(source, str | Path):
        doc, file = read_json(source)
        return validate_analysis(doc, file, allow_empty=allow_empty), file
    if not isinstance(source, Mapping):
        source = source.to_dict()  # an Analysis
    return validate_analysis(source, label, allow_empty=allow_empty), None


def finite(value: Any) -> float:
    """A metric value from a document as float; null and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)
