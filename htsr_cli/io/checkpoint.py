"""Open a checkpoint in any supported layout and read its tensors one at a time.

``open_checkpoint(source)`` accepts a path, a state dict (``Mapping[str, Tensor]``) or an
``nn.Module`` and returns a :class:`Checkpoint`. ``Checkpoint.format`` is one of:

- ``"safetensors"``: a single ``.safetensors`` file.
- ``"safetensors-sharded"``: a directory with ``model.safetensors.index.json`` (Hugging Face
  ``{"weight_map": {key: shard}}``); tensors are listed in index order.
- ``"safetensors-dir"``: a directory with ``model.safetensors`` or several ``*.safetensors``
  files and no index; the files are read in sorted name order.
- ``"torch"``: a single ``.pt``/``.pth``/``.bin``/``.ckpt`` file written by ``torch.save``.
- ``"torch-sharded"``: a directory with ``pytorch_model.bin.index.json`` (same layout).
- ``"torch-dir"``: a directory with ``pytorch_model.bin``.
- ``"state_dict"`` / ``"module"``: an in-memory source.

A directory prefers safetensors over ``.bin`` files. A path to an ``*.index.json`` file is
treated like its directory. A leading DDP ``module.`` is stripped from keys when most keys carry
it (and stripping merges none). Non-tensor entries are ignored.

Within a safetensors file tensors are listed in on-disk (data offset) order; within a torch
file in state-dict order. ``files()`` lists an index json first, then data files by name.

Memory: only one tensor needs to be resident at a time. safetensors files are memory-mapped
by ``safe_open`` and ``load`` copies out just the requested tensor. Torch zip files are loaded
with ``mmap=True`` (private mapping: the file is never written), so tensors are paged in on
use; legacy (pre-1.6, non-zip) torch files cannot be mapped and are read fully. Torch files
are unpickled with ``weights_only=True`` unless ``trust_pickle=True``.

Every user mistake (missing, empty, corrupt or unknown input) raises
:class:`~htsr_cli.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from htsr_cli.errors import InputError, one_line
from htsr_cli.io import digest, schemas
from htsr_cli.io.documents import check_regular_file
from htsr_cli.io.output import open_output
from htsr_cli.io.terminal import printable

__all__ = [
    "STATE_KEYS",
    "Checkpoint",
    "TensorRef",
    "find_state_dict",
    "hf_cache_dirs",
    "open_checkpoint",
    "resolve_hf_id",
]

_TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
#: Where people keep the state dict in a training checkpoint, in the order tried: the
#: model's own weights before an EMA copy (PyTorch's tutorial, Lightning, timm, DDP wrappers).
STATE_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
)
#: Top-level keys that mark a PyTorch Lightning checkpoint (its state dict keys carry the
#: LightningModule's attribute name, ``model.``).
_LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")
_EXPECTED = "expected .safetensors, .pt/.pth/.bin/.ckpt or a Hugging Face model directory"
_DIR_EXPECTED = (
    "expected model.safetensors, model.safetensors.index.json, *.safetensors, "
    "pytorch_model.bin or pytorch_model.bin.index.json"
)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64", "C128": "complex128",
}  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    """Metadata of one stored tensor; obtaining it loads no tensor data."""

    key: str  # state-dict key as stored, after stripping a DDP "module." prefix
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    file: str | None  # file the tensor lives in; None for in-memory sources


#: safetensors ``__metadata__`` key holding the state dict's key order (a JSON list).
KEY_ORDER_META = schemas.KEY_ORDER_META


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a state dict as safetensors, atomically, recording its key (model) order.

    ``metadata`` values must be strings.
    """
    meta = {KEY_ORDER_META: json.dumps(list(tensors)), **(metadata or {})}
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_safetensors(path, tensors.items(), layout, meta)


# safetensors dtype codes (the format's own names)
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str],
) -> None:
    """Write a safetensors file atomically, one tensor at a time.

    ``layout`` lists every (key, dtype, shape) in file order, known before any data is read, so
    the header goes first and peak memory is one tensor, not the checkpoint. ``tensors`` must
    yield the same keys, dtypes and shapes in the same order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in layout:
        if dtype not in _DTYPE_CODES:
            raise InputError(f"cannot write tensor {key!r}: dtype {dtype} has no safetensors code")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
    expected = iter(layout)
    with open_output(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for key, tensor in tensors:
            want_key, want_dtype, want_shape = next(expected)
            if (key, tensor.dtype, tuple(tensor.shape)) != (want_key, want_dtype, want_shape):
                raise RuntimeError(f"tensor {key!r} does not match the announced layout")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            fh.write(memoryview(flat.view(torch.uint8).numpy()))
        if next(expected, None) is not None:  # a short file must not replace the target
            raise RuntimeError("fewer tensors than announced in the safetensors header")


def _header_offsets(file: str) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of every tensor, from the safetensors header (an 8-byte
    little-endian length, then that many bytes of JSON with ``data_offsets`` relative to the
    end of the header)."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    base = 8 + n
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


class _SafetensorsShard:
    """One safetensors file; only the header is read at open.

    ``safe_open`` validates the header and serves shapes and metadata. Tensor data is read with
    ``pread`` into a fresh buffer instead of through safetensors' memory map: mapped pages stay
    in the process's resident set until the file is closed, so a whole checkpoint would count
    against peak RSS; a read keeps it at the tensor in hand.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        try:
            self._handle = safe_open(file, framework="pt")
            # Offset (on-disk) order, so a caller loading in order reads the file sequentially.
            by_offset = getattr(self._handle, "offset_keys", self._handle.keys)
            self.keys = dict.fromkeys(by_offset())  # ordered, O(1) lookup
            self._offsets = _header_offsets(file)
        except Exception as exc:  # SafetensorError, OSError, ...: all mean unreadable input
            raise InputError(
                f"{file} is not a valid safetensors file (truncated or corrupt?): {one_line(exc)}"
            ) from None

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self._handle.get_slice(key)
        raw = sl.get_dtype()
        return tuple(sl.get_shape()), _ST_DTYPES.get(raw, raw.lower())

    def get(self, key: str) -> torch.Tensor:
        try:
            shape, dtype = self.meta(key)
            start, end = self._offsets[key]
            torch_dtype = getattr(torch, dtype, None)
            if torch_dtype is None or end <= start:  # exotic dtype or empty: the library path
                return self._handle.get_tensor(key)
            buf = bytearray(end - start)
            view, n = memoryview(buf), 0
            with open(self.file, "rb", buffering=0) as fh:
                fh.seek(start)
                while n < len(buf):  # one read() returns at most ~2 GiB on Linux
                    got = fh.readinto(view[n:])
                    if not got:
                        raise OSError(f"file ends {len(buf) - n} bytes early")
                    n += got
            return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)
        except Exception as exc:  # the file may have changed or be damaged past the header
            raise InputError(
                f"cannot read tensor {key!r} from {self.file}: {one_line(exc)}"
            ) from None

    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata() or {})

    def close(self) -> None:
        self._handle.__exit__(None, None, None)


class _DictShard:
    """A state dict already in memory (from torch.load or an in-memory source)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], file: str | None) -> None:
        self.file = file
        self._tensors = tensors
        self.keys = dict.fromkeys(tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        t = self._tensors[key]
        return tuple(t.shape), str(t.dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        # detach() shares storage: no copy; mmap'd tensors are private mappings anyway. The
        # tensor stays on its device, so a live CUDA model is analysed on CUDA.
        return self._tensors[key].detach()

    def close(self) -> None:
        self._tensors = {}


def _tensor_items(obj: Any) -> dict[str, torch.Tensor]:
    """The str->Tensor entries of a mapping or a module's state dict; {} otherwise."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _load_torch(file: str, trust_pickle: bool, key: str | None = None) -> _DictShard:
    """torch.load a file lazily (mmap for zip files) and locate its state dict (see
    :func:`find_state_dict`)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read {file}: {one_line(exc)}") from None
    if not head:
        raise InputError(f"{file} is empty (0 bytes); expected a torch.save checkpoint")
    is_zip = head.startswith(b"PK\x03\x04")
    # Legacy (non-zip) torch.save files are bare pickles: PROTO opcode 0x80 first.
    if not is_zip and not head.startswith(b"\x80"):
        raise InputError(f"{file} is not a PyTorch checkpoint (not a torch.save zip or pickle)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        # torch words a refused global "Unsupported global" (<= 2.5) or "unsupported GLOBAL
        # ... blocked" (2.6+): the file pickles code. Other weights-only failures (bad
        # opcodes of random bytes) are corrupt data, not a matter of trust.
        if not trust_pickle and "unsupported global" in str(exc).lower():
            raise InputError(
                f"{file} needs arbitrary code to unpickle (it pickles Python objects, not just "
                "tensors); rerun with --trust-pickle only if you trust its source"
            ) from None
        raise InputError(
            f"{file} is corrupt or not a torch.save checkpoint (bad pickle data)"
        ) from None
    except Exception as exc:  # RuntimeError, EOFError, zipfile/pickle errors, ... on bad files
        raise InputError(f"cannot load {file} (corrupt or truncated?): {one_line(exc)}") from None
    return _DictShard(find_state_dict(obj, file, key), file)


def _keys_seen(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"it holds a {type(obj).__name__}, not a dict"
    keys = [printable(k) for k in obj if isinstance(k, str)]
    shown = ", ".join(keys[:12]) + (f", ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
    return f"top-level keys: {shown or '(none)'}"


def _lookup(obj: Any, path: str) -> Any:
    """``obj[path]``, else the path split on ``/`` (then on ``.``) walked one key at a time;
    None when it leads nowhere."""
    if isinstance(obj, Mapping) and path in obj:
        return obj[path]
    for sep in ("/", "."):
        if sep not in path:
            continue
        node = obj
        for part in path.split(sep):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def find_state_dict(obj: Any, file: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded torch file: under ``key`` when given (``a/b`` or
    ``a.b`` for a nested one); else under the first of :data:`STATE_KEYS` that holds tensors,
    at the top level, then one level down (``{"ema": {"module": ...}}``,
    ``{"checkpoint": {"model": ...}}``); else the top level's tensors; else the one
    top-level entry that is a state dict (``{"epoch": 3, "weights": {...}}``). A
    Lightning checkpoint's ``model.`` prefix is dropped when every key carries it.

    Raises:
        InputError: nothing found; the message lists the top-level keys seen.
    """
    if key is not None:
        tensors = _tensor_items(_lookup(obj, key))
        if not tensors:
            raise InputError(f"--key {key!r}: no tensors there in {file} ({_keys_seen(obj)})")
        return tensors
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(obj, Mapping):
        # A state dict nested under a conventional key wins over stray top-level tensors.
        # First a conventional key at the top, then one under any top-level dict.
        places = [obj.get(name) for name in STATE_KEYS]
        places += [
            v.get(name) for v in obj.values() if isinstance(v, Mapping) for name in STATE_KEYS
        ]
        tensors = next((t for p in places if (t := _tensor_items(p))), {})
        if tensors and any(m in obj for m in _LIGHTNING_MARKERS):
            stripped = {k.removeprefix("model."): v for k, v in tensors.items()}
            if all(k.startswith("model.") for k in tensors) and len(stripped) == len(tensors):
                tensors = stripped
    if not tensors:
        tensors = _tensor_items(obj)
    if not tensors and isinstance(obj, Mapping):
        # {"epoch": 3, "weights": {...}}: the one top-level entry that is a state dict.
        holders = [k for k, v in obj.items() if isinstance(k, str) and _tensor_items(v)]
        if len(holders) > 1:
            raise InputError(
                f"{file} holds several state dicts ({', '.join(map(printable, holders))}); "
                "name the one to read with --key"
            )
        if holders:
            tensors = _tensor_items(obj[holders[0]])
    if not tensors:
        raise InputError(
            f"{file} holds no state dict: no tensors at its top level or under "
            f"{', '.join(STATE_KEYS)} (at the top or one level down); {_keys_seen(obj)}; "
            "name the one to read with --key"
        )
    return tensors


def strip_ddp_prefix(keys: list[str]) -> list[str]:
    """Drop a DDP 'module.' prefix when most keys have it and no two keys would merge."""
    n = sum(k.startswith("module.") for k in keys)
    if n * 2 <= len(keys):
        return keys
    stripped = [k.removeprefix("module.") for k in keys]
    return stripped if len(set(stripped)) == len(stripped) else keys


class Checkpoint:
    """A lazily read checkpoint. Use :func:`open_checkpoint` to create one."""

    def __init__(
        self,
        path: str | None,
        fmt: str,
        *,
        shards: list[str] | None = None,
        index: dict[str, str] | None = None,
        extra_files: list[str] | None = None,
        memory: _DictShard | None = None,
        trust_pickle: bool = False,
        key: str | None = None,
    ) -> None:
        self.path = path
        self.format = fmt
        self._shard_files = shards or []
        self._index = index  # original key -> shard file, in index order
        self._hash_paths = (extra_files or []) + self._shard_files
        self._trust_pickle = trust_pickle
        self._key = key  # where the state dict lives inside a torch file (--key)
        self._open: dict[str | None, _SafetensorsShard | _DictShard] = {}
        if memory is not None:
            self._open[None] = memory
        self._refs: list[TensorRef] | None = None
        self._where: dict[str, tuple[str | None, str]] = {}  # key -> (file, stored key)

    def _shard(self, file: str | None) -> _SafetensorsShard | _DictShard:
        if file not in self._open:
            assert file is not None  # the in-memory shard is registered at construction
            if file.endswith(".safetensors"):
                self._open[file] = _SafetensorsShard(file)
            else:
                self._open[file] = _load_torch(file, self._trust_pickle, self._key)
        return self._open[file]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` strings of a safetensors checkpoint (of its first shard); empty
        for other formats. htsr keeps its pruning record there."""
        first = self._shard_files[0] if self._shard_files else None
        if first is None or not first.endswith(".safetensors"):
            return {}
        shard = self._shard(first)
        return shard.metadata() if isinstance(shard, _SafetensorsShard) else {}

    def tensors(self) -> list[TensorRef]:
        """Every tensor's key, shape, dtype and file, in index/file order, loading no data."""
        if self._refs is None:
            entries: list[tuple[str | None, str]] = []  # (file, stored key)
            if self._index is not None:
                for key, file in self._index.items():
                    if key not in self._shard(file).keys:
                        raise InputError(
                            f"index in {self.path} maps {key!r} to {file}, which lacks that tensor"
                        )
                    entries.append((file, key))
            else:
                files: list[str | None] = [None] if None in self._open else []
                for file in files + list(self._shard_files):
                    entries.extend((file, key) for key in self._shard(file).keys)
            refs, where = [], {}
            for (file, stored), key in zip(
                entries, strip_ddp_prefix([k for _, k in entries]), strict=True
            ):
                if key in where:
                    raise InputError(
                        f"tensor {key!r} appears twice in {self.path} ({where[key][0]} and {file})"
                    )
                shape, dtype = self._shard(file).meta(stored)
                refs.append(TensorRef(key=key, shape=shape, dtype=dtype, file=file))
                where[key] = (file, stored)
            order = self._stored_order()
            if order is not None:
                rank = {k: i for i, k in enumerate(order)}
                refs.sort(key=lambda r: rank.get(r.key, len(rank)))
            self._refs, self._where = refs, where
        return list(self._refs)

    def _stored_order(self) -> list[str] | None:
        """The model's key order, when htsr wrote it into the safetensors metadata."""
        raw = self.metadata().get(KEY_ORDER_META)
        if raw is None:
            return None
        try:
            order = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return order if isinstance(order, list) else None

    @property
    def model_order(self) -> bool:
        """Whether ``tensors()`` lists tensors in the model's order: torch files and in-memory
        state dicts keep it; safetensors only when htsr recorded it (safetensors itself stores
        tensors sorted by dtype and name)."""
        if not self.format.startswith("safetensors"):
            return True
        return self._stored_order() is not None

    def load(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype) by its (DDP-stripped) key."""
        if self._refs is None:
            self.tensors()
        if key not in self._where:
            raise InputError(f"no tensor named {key!r} in {self.path or 'the checkpoint'}")
        file, stored = self._where[key]
        return self._shard(file).get(stored)

    def start_hashing(self) -> None:
        """Start hashing the input files in the background (idempotent; htsr_cli.io.digest)."""
        for path in self._hash_paths:
            digest.start(path)

    def files(self) -> list[dict[str, Any]]:
        """``[{"path", "bytes", "sha256"}]`` for every input file; [] for in-memory sources."""
        return [digest.record(path) for path in self._hash_paths]

    def close(self) -> None:
        """Release file handles and mappings; metadata stays available."""
        for file, shard in list(self._open.items()):
            if file is not None:
                shard.close()
                del self._open[file]

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint(path={self.path!r}, format={self.format!r})"


def _from_index(given: str, index_path: str, trust_pickle: bool) -> Checkpoint:
    """A sharded checkpoint described by a Hugging Face ``*.index.json`` weight map."""
    directory = os.path.dirname(index_path) or "."
    fmt = (
        "safetensors-sharded" if index_path.endswith(".safetensors.index.json") else "torch-sharded"
    )
    try:
        with open(index_path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decode errors
        raise InputError(f"cannot read index {index_path}: {one_line(exc)}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{index_path} has no valid 'weight_map' (expected {{\"weight_map\": {{key: shard}}}})"
        )
    index = {key: os.path.join(directory, shard) for key, shard in weight_map.items()}
    shards = sorted(set(index.values()))
    # A shard is a file of the model directory: a name such as ../../x, an absolute path or a
    # symlink out of it would make htsr read (and hash into the report) another file. The one
    # exception is the Hugging Face cache, whose snapshots/<hash>/ files link to ../../blobs.
    roots = [os.path.realpath(directory)]
    if os.path.basename(os.path.dirname(os.path.abspath(directory))) == "snapshots":
        roots.append(os.path.realpath(os.path.join(directory, os.pardir, os.pardir, "blobs")))
    for shard in shards:
        real = os.path.realpath(shard)
        lexical = os.path.normpath(os.path.join(roots[0], os.path.relpath(shard, directory)))
        if os.path.commonpath([roots[0], lexical]) != roots[0] or not any(
            os.path.commonpath([root, real]) == root and real != root for root in roots
        ):
            raise InputError(
                f"{index_path} names shard {os.path.relpath(shard, directory)!r}, which is "
                f"outside the model directory {directory}"
            )
    for shard in shards:
        if not os.path.isfile(shard):
            raise InputError(
                f"{index_path} names shard {os.path.basename(shard)!r}, "
                f"which does not exist in {directory}"
            )
    return Checkpoint(
        given, fmt, shards=shards, index=index, extra_files=[index_path], trust_pickle=trust_pickle
    )


def _open_dir(directory: str, trust_pickle: bool) -> Checkpoint:
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise InputError(f"cannot list directory {directory}: {one_line(exc)}") from None
    if not names:
        raise InputError(f"{directory} is an empty directory ({_DIR_EXPECTED})")

    def join(name: str) -> str:
        return os.path.join(directory, name)

    if "model.safetensors.index.json" in names:
        return _from_index(directory, join("model.safetensors.index.json"), trust_pickle)
    st_files = [join(n) for n in names if n.endswith(".safetensors") and os.path.isfile(join(n))]
    if st_files:
        return Checkpoint(directory, "safetensors-dir", shards=st_files)
    if "pytorch_model.bin.index.json" in names:
        return _from_index(directory, join("pytorch_model.bin.index.json"), trust_pickle)
    if os.path.isfile(join("pytorch_model.bin")):
        bin_file = join("pytorch_model.bin")
        return Checkpoint(directory, "torch-dir", shards=[bin_file], trust_pickle=trust_pickle)
    raise InputError(f"no checkpoint found in directory {directory} ({_DIR_EXPECTED})")


#: A Hugging Face model id, ``org/name`` with an optional ``@revision``.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hf_cache_dirs() -> list[str]:
    """Where the Hugging Face hub cache may be, in the order ``huggingface_hub`` uses:
    ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub`` (the legacy ``HUGGINGFACE_HUB_CACHE`` too)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return [env["HF_HUB_CACHE"]]
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return [env["HUGGINGFACE_HUB_CACHE"]]
    if env.get("HF_HOME"):
        return [os.path.join(env["HF_HOME"], "hub")]
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(xdg, "huggingface", "hub")]


def resolve_hf_id(model_id: str) -> str:
    """The snapshot directory of a Hugging Face model id (``org/name`` or
    ``org/name@revision``) in the local hub cache, without network: the hub's layout is
    ``models--org--name/refs/<revision>`` (a commit hash) and ``.../snapshots/<hash>/``.
    The revision defaults to ``main``; a commit hash names a snapshot directly.

    Raises:
        InputError: not in the cache; the message says where it looked.
    """
    repo, _, rev = model_id.partition("@")
    rev = rev or "main"
    folder = "models--" + repo.replace("/", "--")
    looked = []
    for cache in hf_cache_dirs():
        root = os.path.join(cache, folder)
        looked.append(root)
        if not os.path.isdir(root):
            continue
        commit = rev
        ref = os.path.join(root, "refs", rev)
        if os.path.isfile(ref):
            with open(ref, encoding="utf-8") as fh:
                commit = fh.read().strip()
        snapshot = os.path.join(root, "snapshots", commit)
        if commit and os.path.isdir(snapshot):
            return snapshot
        snapshots = os.path.join(root, "snapshots")
        have = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
        raise InputError(
            f"{model_id}: the Hugging Face cache has {root} but no snapshot for revision "
            f"{rev!r} (snapshots: {', '.join(have) or 'none'})"
        )
    raise InputError(
        f"{model_id} is not a file or directory, nor in the Hugging Face cache (looked in "
        f"{', '.join(looked)}; set HF_HOME or HF_HUB_CACHE, or download it first, e.g. "
        f"huggingface-cli download {repo})"
    )


def open_checkpoint(
    source: Any, *, trust_pickle: bool = False, key: str | None = None
) -> Checkpoint:
    """Open ``source`` (path, Hugging Face model id, state dict or ``nn.Module``) without
    loading tensor data.

    ``trust_pickle=True`` unpickles torch files with ``weights_only=False``, which can run
    arbitrary code; only use it for files from a trusted source. ``key`` names where the
    state dict lives inside a torch file or an in-memory dict (``--key``, see
    :func:`find_state_dict`); by default it is found under the usual keys. A path that does
    not exist and reads ``org/name`` is looked up in the local Hugging Face cache
    (:func:`resolve_hf_id`).
    """
    if isinstance(source, torch.nn.Module):
        return Checkpoint(None, "module", memory=_DictShard(source.state_dict(), None))
    if isinstance(source, Mapping):
        tensors = find_state_dict(source, "the state dict", key) if source else {}
        return Checkpoint(None, "state_dict", memory=_DictShard(tensors, None))
    if not isinstance(source, str | os.PathLike):
        raise InputError(
            f"cannot open a checkpoint from a {type(source).__name__}; "
            "pass a path, a state dict or an nn.Module"
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        if _HF_ID.match(path):
            path = resolve_hf_id(path)
        else:
            raise InputError(f"{path} does not exist; check the checkpoint path")
    check_regular_file(path, "checkpoint")  # a FIFO would block open() for ever
    if os.path.isdir(path):
        ckpt = _open_dir(path, trust_pickle)
    else:
        name = os.path.basename(path).lower()
        if name.endswith(".index.json"):
            ckpt = _from_index(path, path, trust_pickle)
        elif name.endswith(".safetensors"):
            ckpt = Checkpoint(path, "safetensors", shards=[path])
        elif name.endswith(_TORCH_EXTS):
            ckpt = Checkpoint(path, "torch", shards=[path], trust_pickle=trust_pickle, key=key)
        else:
            raise InputError(f"unknown checkpoint format for {path} ({_EXPECTED})")
    if key is not None:
        if ckpt.format.startswith("safetensors"):
            raise InputError(
                f"--key {key!r}: {path} is safetensors, a flat state dict with nothing to pick"
            )
        ckpt._key = key
    if not os.path.isdir(path) and not name.endswith(".index.json"):
        ckpt._shard(path)  # a single file is cheap to open: report corrupt input right away
    return ckpt
