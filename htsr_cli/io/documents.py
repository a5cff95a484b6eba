"""Reading versioned JSON documents: parsing, the schema check every reader makes, and the
reader of analyses (``htsr.analysis/1``). The plan documents are read beside their classes
(:mod:`htsr_cli.allocate.plan`, :mod:`htsr_cli.prune.plan`) with these helpers.

A document names its schema as ``name/major``; a reader refuses another name or a major
version it does not know, and missing fields, with one clear line. Torch-free.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io import schemas

ANALYSIS_SCHEMA = schemas.ANALYSIS


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
        raise InputError(
            f"{label} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
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
    :class:`~htsr_cli.engine.analysis.Analysis`) rather than a checkpoint to analyse."""
    if isinstance(source, Mapping):
        return "schema" in source or "layers" in source
    if isinstance(source, str | Path):
        return str(source) == "-" or Path(source).suffix.lower() == ".json"
    # Only an already imported htsr_cli.engine.analysis can have made an Analysis: no torch import.
    mod = sys.modules.get("htsr_cli.engine.analysis")
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
