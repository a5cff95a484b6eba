"""Gates written once, in the repository: ``[tool.htsr.gate]`` in ``pyproject.toml`` or
``[gate]`` in ``htsr.toml``, found from the working directory upwards as ruff and pytest do.

In each directory, from the working directory up to the filesystem root, ``htsr.toml`` is
taken if it exists (with or without a ``[gate]`` table), else ``pyproject.toml`` if it has a
``[tool.htsr.gate]`` table; the first one found is the configuration. Keys: ``fail-if`` (a
list of gate expressions, or one), ``baseline`` (a path, relative to the file's directory),
``strict`` (a boolean). The command line adds gates to the file's and overrides the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError
from htsr_cli.io.terminal import printable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONFIG_FILES = ("htsr.toml", "pyproject.toml")
KEYS = ("fail-if", "baseline", "strict")
COMMAND_LINE = "command line"


@dataclass
class GateConfig:
    """What applies to one ``htsr gate`` run, and where each setting came from."""

    fail_if: list[str] = field(default_factory=list)
    baseline: str | None = None
    strict: bool = False
    file: Path | None = None  # the configuration file, None when none applies
    table: str | None = None  # "[tool.htsr.gate]" or "[gate]"
    #: setting -> where it came from ("command line", the file); fail-if per expression.
    origin: dict[str, str] = field(default_factory=dict)
    fail_if_origin: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file) if self.file else None,
            "table": self.table,
            "fail_if": [
                {"gate": g, "from": o}
                for g, o in zip(self.fail_if, self.fail_if_origin, strict=True)
            ],
            "baseline": self.baseline,
            "strict": self.strict,
            "origin": dict(self.origin),
        }

    def lines(self) -> list[str]:
        """What ``htsr gate --show-config`` prints."""
        where = f"{printable(self.file)} {self.table}" if self.file else "none found"
        out = [f"config: {where}"]
        if self.fail_if:
            out.append("fail-if:")
            for g, o in zip(self.fail_if, self.fail_if_origin, strict=True):
                out.append(f"  {printable(g)}    ({printable(o)})")
        else:
            out.append("fail-if: (none)")
        base = printable(self.baseline) if self.baseline else "(none)"
        out.append(f"baseline: {base}" + self._from("baseline"))
        out.append(f"strict: {'true' if self.strict else 'false'}" + self._from("strict"))
        return out

    def _from(self, key: str) -> str:
        return f"    ({printable(self.origin[key])})" if key in self.origin else ""


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {printable(path)}: {printable(exc)}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{printable(path)} is not valid TOML: {printable(exc)}") from None
    except RecursionError:
        raise InputError(f"{printable(path)} is not valid TOML: nested too deeply") from None


def find_config(start: str | os.PathLike | None = None) -> tuple[Path, str, Mapping] | None:
    """``(file, table name, table)`` of the configuration that applies from ``start`` (the
    working directory), or None. A file that does not parse is an input error."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for d in (here, *here.parents):
        htsr_toml = d / "htsr.toml"
        if htsr_toml.is_file():
            data = _load_toml(htsr_toml)
            unknown = [k for k in data if k != "gate"]
            if unknown:
                raise InputError(
                    f"{printable(htsr_toml)}: unknown key {printable(unknown[0])!r} "
                    "(htsr.toml holds a [gate] table)"
                )
            table = data.get("gate", {})
            return htsr_toml, "[gate]", _check_table(table, htsr_toml, "[gate]")
        pyproject = d / "pyproject.toml"
        if pyproject.is_file():
            data = _load_toml(pyproject)
            tool = data.get("tool")
            htsr = tool.get("htsr") if isinstance(tool, Mapping) else None
            if isinstance(htsr, Mapping) and "gate" in htsr:
                where = "[tool.htsr.gate]"
                return pyproject, where, _check_table(htsr["gate"], pyproject, where)
    return None


def _check_table(table: Any, path: Path, where: str) -> Mapping:
    label = f"{printable(path)} {where}"
    if not isinstance(table, Mapping):
        raise InputError(f"{label} must be a table")
    for key in table:
        if key not in KEYS:
            raise InputError(f"{label}: unknown key {printable(key)!r} (known: {', '.join(KEYS)})")
    gates = table.get("fail-if", [])
    if isinstance(gates, str):
        gates = [gates]
    if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
        raise InputError(f"{label}: fail-if must be a list of strings")
    if "baseline" in table and not isinstance(table["baseline"], str):
        raise InputError(f"{label}: baseline must be a string (a path)")
    if "baseline" in table and not table["baseline"]:
        raise InputError(f"{label}: baseline is empty")
    if "strict" in table and not isinstance(table["strict"], bool):
        raise InputError(f"{label}: strict must be true or false")
    return {**table, "fail-if": gates}


def resolve_config(
    fail_if: Sequence[str] = (),
    baseline: str | None = None,
    strict: bool | None = None,
    *,
    use_config: bool = True,
    cwd: str | os.PathLike | None = None,
) -> GateConfig:
    """The settings of a run: the configuration file's (unless ``use_config`` is False), the
    command line's gates added after them, its ``baseline`` and ``strict`` overriding."""
    config = GateConfig()
    found = find_config(cwd) if use_config else None
    if found is not None:
        path, where, table = found
        config.file, config.table = path, where
        origin = f"{path.name} {where}"
        config.fail_if = list(table.get("fail-if", []))
        config.fail_if_origin = [origin] * len(config.fail_if)
        if "baseline" in table:
            # Relative to the file, so that every directory of the repository means the same.
            base = table["baseline"]
            config.baseline = base if base == "-" else str(path.parent / base)
            config.origin["baseline"] = origin
        if "strict" in table:
            config.strict = bool(table["strict"])
            config.origin["strict"] = origin
    config.fail_if += list(fail_if)
    config.fail_if_origin += [COMMAND_LINE] * len(fail_if)
    if baseline is not None:
        config.baseline = baseline
        config.origin["baseline"] = COMMAND_LINE
    if strict is not None:
        config.strict = strict
        config.origin["strict"] = COMMAND_LINE
    return config
