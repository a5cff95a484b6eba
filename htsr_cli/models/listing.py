"""``htsr models``: the model zoo as rows (name, dataset, input, parameters) and their output.

Parameter counts are exact: each model is built on torch's ``meta`` device, which allocates no
memory, so listing the zoo (ResNet-152, WRN-28-10 included) takes a fraction of a second.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from rich.table import Table

from htsr_cli.errors import InputError
from htsr_cli.io import schemas
from htsr_cli.io.output import choose_format as output_format
from htsr_cli.io.output import dump_json, open_output
from htsr_cli.io.terminal import table_console
from htsr_cli.models import ARCHS, ArchSpec

#: The data sets each family of built-ins is made for (and its default class count).
DATASETS = {"cifar": "CIFAR-10/100", "imagenet": "ImageNet"}
FORMATS = ("table", "json")


def _params(spec: ArchSpec) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = spec.factory(num_classes=spec.num_classes)
    return sum(p.numel() for p in model.parameters())


def zoo() -> list[dict[str, Any]]:
    """One row per built-in architecture: ``name``, ``family``, ``dataset``, ``input``
    (``CxHxW``), ``num_classes`` (its default), ``params`` (at that class count) and
    ``description``."""
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "dataset": DATASETS.get(spec.family, spec.family),
            "input": "x".join(str(d) for d in spec.input_size),
            "num_classes": spec.num_classes,
            "params": _params(spec),
            "description": spec.description,
        }
        for spec in ARCHS.values()
    ]


def _table(rows: list[dict[str, Any]], *, describe: bool) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for name in ("name", "dataset", "input"):
        table.add_column(name, no_wrap=True)
    table.add_column("classes", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    if describe:
        table.add_column("model", no_wrap=True)
    for r in rows:
        cells = [r["name"], r["dataset"], r["input"], str(r["num_classes"]), f"{r['params']:,}"]
        table.add_row(*cells, *([r["description"]] if describe else []))
    return table


def run_models(fmt: str | None = None, output: str | None = None) -> list[dict[str, Any]]:
    """Print the zoo: a table on a terminal (the descriptions only where the width allows),
    ``{"schema": "htsr.models/1", "models": [...]}`` JSON in a pipe or with ``fmt="json"``;
    ``output`` writes a file (atomically)."""
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    fmt = output_format(fmt, output, sys.stdout.isatty(), FORMATS)
    rows = zoo()
    with open_output(output) as fh:
        if fmt == "json":
            dump_json({"schema": schemas.MODELS, "models": rows}, fh)
            return rows
        terminal = output in (None, "-") and sys.stdout.isatty()
        console = table_console(fh, terminal, 200)
        table = _table(rows, describe=True)
        wide = console.options.update_width(100_000)
        if console.measure(table, options=wide).maximum > console.width:
            table = _table(rows, describe=False)  # never a cut cell: drop the description
        console.print(table)
        console.print(
            "--arch NAME picks one (names are case-insensitive); --arch package.module:function "
            "takes your own factory.",
            soft_wrap=True,
            markup=False,
        )
    return rows


__all__ = ["DATASETS", "FORMATS", "run_models", "zoo"]
