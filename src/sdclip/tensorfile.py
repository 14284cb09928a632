"""Lazy, safe access to the tensors of a weights file: safetensors, torch pickles, TorchScript.

A Stable Diffusion checkpoint is 2-7 GB of which the text encoder is a few hundred MB, so
nothing here reads a tensor before it is asked for.  Pickles (.ckpt .pt .bin) are read by a
restricted unpickler that can only build tensors and plain containers: a pickle that asks for
anything else (``os.system``, ``builtins.eval``...) is refused before any of it runs; the rare
pre-1.6 (non-zip) pickle goes to ``torch.load(weights_only=True)``.  Every broken file raises one
``BadInput`` naming the file and what is wrong.

Nothing is taken on trust: a safetensors header must account for every byte of the file exactly once, a
zip member's CRC32 is checked on every read, pickles are bounded in size and opcodes, and the object tree
they build in depth and size (``sdclip.limits``), so a hostile file costs memory and time in proportion
to its real size, never more.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import os
import pickle
import pickletools
import re
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import limits
from .errors import BadInput

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorFile:
    """Read-only, lazy view of the named tensors in one file."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return _numel(self.shape(key)) * self.dtype(key).itemsize

    def close(self) -> None:
        """Release the file (tensors already returned stay valid)."""

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_into(fh: Any, offset: int, out: torch.Tensor) -> bool:
    """Read ``out``'s bytes from ``offset`` straight into its memory; False if the file ends early."""
    if out.numel() == 0:
        return True
    fh.seek(offset)
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    return fh.readinto(view) == len(view)


class SafetensorsFile(TensorFile):
    """A .safetensors file, read tensor by tensor with plain reads.

    The format is an 8-byte header length, a JSON header and raw data.  sdclip reads it itself
    rather than through ``safe_open``: a memory map keeps every page it touched resident, so
    converting a 2 GB checkpoint's text encoder to float32 would count the file's pages on top
    of the converted weights.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh = limits.open_regular(path, "weights file")
        try:
            size = os.fstat(self._fh.fileno()).st_size
            n = int.from_bytes(self._fh.read(8), "little")
            if n > size - 8:
                raise ValueError(f"the header needs {n} bytes, the file has {size - 8} after its length (truncated?)")
            if n > limits.MAX_SAFETENSORS_HEADER:
                raise ValueError(f"a header of {n:,} bytes, more than the {limits.MAX_SAFETENSORS_HEADER:,} allowed")
            header = json.loads(self._fh.read(n), object_pairs_hook=_unique_keys)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict):
                raise ValueError("__metadata__ is not a JSON object")
            self.metadata = {str(k): str(v) for k, v in metadata.items()}
            self._data = 8 + n
            self._info = {key: _safetensors_entry(key, entry) for key, entry in header.items()}
            _check_layout(self._info, size - self._data)
            self._info = {k: (shape, dtype, self._data + begin) for k, (shape, dtype, begin, _) in self._info.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            self._fh.close()
            raise BadInput(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> torch.dtype:
        name = self._info[key][1]
        if name not in _SAFETENSORS_DTYPES:
            raise BadInput(f"{self.path}: tensor {key} has dtype {name}, which sdclip cannot use")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if not _read_into(self._fh, self._info[key][2], out):
            raise BadInput(f"{self.path}: tensor {key} is cut short (truncated file?)")
        return out

    def close(self) -> None:
        self._fh.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _counts(values: Any) -> bool:
    """Whether ``values`` is a valid shape or stride: a tuple of non-negative ints."""
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (``json`` would silently keep the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the header names {key!r} twice")
        out[key] = value
    return out


# bits per element of the safetensors dtypes sdclip cannot use, so that their sizes are still checked
_OTHER_SAFETENSORS_BITS = {
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "C64": 64,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}


def _safetensors_entry(key: str, entry: Any) -> tuple[tuple[int, ...], str, int, int]:
    """(shape, dtype, begin, end) of one header entry, with its byte count checked against dtype x shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"tensor {key} has no dtype, shape and data_offsets")
    shape, dtype, offsets = entry["shape"], entry["dtype"], entry["data_offsets"]
    if not isinstance(shape, list) or not _counts(tuple(shape)):
        raise ValueError(f"tensor {key} has shape {shape!r}")
    if not isinstance(dtype, str):
        raise ValueError(f"tensor {key} has dtype {dtype!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _counts(tuple(offsets)) and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {key} has data_offsets {offsets!r}")
    begin, end = offsets
    bits = (
        _SAFETENSORS_DTYPES[dtype].itemsize * 8 if dtype in _SAFETENSORS_DTYPES else _OTHER_SAFETENSORS_BITS.get(dtype)
    )
    if bits is not None and end - begin != -(-_numel(tuple(shape)) * bits // 8):
        raise ValueError(f"tensor {key} has {end - begin} bytes for shape {shape} {dtype}")
    return tuple(shape), dtype, begin, end


def _check_layout(info: dict[str, tuple[tuple[int, ...], str, int, int]], data_size: int) -> None:
    """The tensors tile the data section exactly: no overlap (two names for one set of bytes would load
    silently wrong weights), no gap, nothing past the end and no trailing bytes."""
    at, previous = 0, None
    for key, (_, _, begin, end) in sorted(info.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < at:
            raise ValueError(f"tensor {key} overlaps tensor {previous} (bytes {begin}-{end} of the data)")
        if begin > at:
            raise ValueError(f"a gap of {begin - at} bytes before tensor {key}")
        at, previous = end, key
    if at > data_size:
        raise ValueError(f"tensor {previous} lies past the end of the file (truncated?)")
    if at < data_size:
        raise ValueError(f"{data_size - at} bytes of trailing data after the last tensor")


class ShardedSafetensors(TensorFile):
    """A ``*.safetensors.index.json`` and the shards it names, as one file."""

    def __init__(self, index: Path):
        self.path = index
        try:
            weight_map = json.loads(
                limits.read_regular(index, "safetensors index", limits.MAX_SAFETENSORS_HEADER),
                object_pairs_hook=_unique_keys,
            )["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{index}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(f"{index}: not a safetensors index (weight_map is not a name -> file mapping)")
        self._shards = {}
        for name in sorted(set(weight_map.values())):
            if not (index.parent / name).exists():
                raise BadInput(f"{index}: names shard {name}, which is not in {index.parent}")
            self._shards[name] = SafetensorsFile(index.parent / name)
        self._where = {k: self._shards[v] for k, v in weight_map.items()}
        for k, shard in self._where.items():
            if k not in shard._info:
                raise BadInput(f"{index}: names tensor {k} in {shard.path.name}, which does not hold it")
        self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# --- pickles ---------------------------------------------------------------------------------


@dataclass
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Refused(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowlist; the message is its dotted name."""


class _Opaque:
    """Stand-in for harmless objects found in training checkpoints (Lightning callbacks, numpy
    scalars, TorchScript module objects): it keeps the state it is given and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ScriptModule(_Opaque):
    """A module object in a TorchScript archive; its attributes hold the tensors."""


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _LazyTensor:
    size, stride = tuple(size), tuple(stride)
    if not (
        isinstance(storage, _Storage)
        and isinstance(offset, int)
        and offset >= 0
        and _counts(size)
        and _counts(stride)
        and len(size) == len(stride)
    ):
        raise ValueError("a tensor record with a malformed storage, offset, size or stride")
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _unwrap(value: Any, *_: Any) -> Any:
    """``torch.jit._pickle``'s typed-list builders and type tags: they return their argument."""
    return value


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1,
    ("numpy.core.multiarray", "scalar"): _Opaque,
    ("numpy._core.multiarray", "scalar"): _Opaque,
    ("numpy", "dtype"): _Opaque,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Opaque,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): _Opaque,
    ("torch.torch_version", "TorchVersion"): str,
    # a scripted module's typed attributes (a Conv2d's padding: List[int]) in a TorchScript archive
    **{("torch.jit._pickle", f"build_{kind}list"): _unwrap for kind in ("int", "double", "bool", "tensor", "generic")},
    ("torch.jit._pickle", "restore_type_tag"): _unwrap,
}


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles name Python 3 globals the Python 2 way (``__builtin__.set``,
    ``commands.Popen``); map them back as ``pickle`` itself does."""
    return _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors (lazily) and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_name(module, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        # vars(), not getattr(): torch's module __getattr__ imports submodules on demand
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModule
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return _Opaque
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _Refused(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"unexpected storage {pid!r}")
        return _Storage(str(key), dtype, numel)


class _TooBig(ValueError):
    """A pickle whose object tree is deeper, larger or more tangled than a checkpoint's."""


def _children(obj: Any) -> Any:
    """A container's (name, value) pairs: dicts and TorchScript module objects; None for anything else."""
    if isinstance(obj, dict):
        return obj.items()
    if isinstance(obj, _ScriptModule) and isinstance(getattr(obj, "state", None), dict):
        return obj.state.items()
    return None


def _tree_size(obj: Any) -> int:
    """How many entries walking ``obj`` visits, counted once per distinct container: pickles share objects,
    so a few hundred bytes can describe a tree with 2^40 paths, or a dict that holds itself.  Refuses a
    cycle, more than ``limits.MAX_TREE_DEPTH`` levels and more than ``limits.MAX_TREE_NODES`` entries."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(obj: Any, depth: int) -> int:
        items = _children(obj)
        if items is None:
            return 1
        if id(obj) in sizes:
            return sizes[id(obj)]
        if id(obj) in walking:
            raise _TooBig("a container holds itself")
        if depth >= limits.MAX_TREE_DEPTH:
            raise _TooBig(f"its containers nest more than {limits.MAX_TREE_DEPTH} deep")
        walking.add(id(obj))
        total = 1 + sum(size(v, depth + 1) for _, v in items)
        walking.discard(id(obj))
        if total > limits.MAX_TREE_NODES:
            raise _TooBig(
                f"its objects form a tree of more than {limits.MAX_TREE_NODES:,} entries (shared "
                f"sub-objects repeated?), more than any checkpoint has"
            )
        sizes[id(obj)] = total
        return total

    return size(obj, 0)


def _flatten(obj: Any, leaf: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Named tensors (instances of ``leaf``) of a nested checkpoint object (dicts, TorchScript module trees),
    after ``_tree_size`` has bounded the walk."""
    _tree_size(obj)
    out: list[tuple[str, Any]] = []

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, leaf):
            out.append((prefix.rstrip("."), obj))
            return
        for k, v in _children(obj) or ():
            walk(v, f"{prefix}{k}.")

    walk(obj, prefix)
    return out


def _named_tensors(obj: Any, leaf: type) -> dict[str, Any]:
    """The weights of a checkpoint: a training checkpoint keeps them under "state_dict"
    (Lightning), "model" or "module", beside optimizer state that must not be mistaken for them."""
    if isinstance(obj, dict):
        for inner in ("state_dict", "model", "module"):
            tensors = dict(_flatten(obj.get(inner), leaf)) if isinstance(obj.get(inner), dict) else {}
            if tensors:
                return tensors
    return dict(_flatten(obj, leaf))


def _check_pickle_ops(data: bytes) -> None:
    """Refuse a pickle with more opcodes than ``limits.MAX_PICKLE_OPS`` before building any object: each
    opcode builds at most one, so this bounds the memory unpickling takes."""
    for n, _ in enumerate(pickletools.genops(data), 1):
        if n > limits.MAX_PICKLE_OPS:
            raise _TooBig(f"its pickle has more than {limits.MAX_PICKLE_OPS:,} opcodes, more than any checkpoint has")


def _text_fields(obj: Any) -> dict[str, str]:
    """A pickled dict's top-level strings, as ``metadata`` (a textual-inversion file's ``name``)."""
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(obj, dict) else {}


def _refusal(path: Path, what: str) -> BadInput:
    return BadInput(
        f"{path}: refused: this pickle asks for {what}, which could run code; sdclip only loads "
        f"tensors from pickles (convert the file to safetensors with a tool you trust)"
    )


# what a malformed pickle or zip can raise once no foreign code runs: all mean a broken file
_CORRUPT = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    RecursionError,
    NotImplementedError,
    zlib.error,
)


class PickleFile(TensorFile):
    """A torch zip archive (torch.save since 1.6, TorchScript .pt), read without running code.

    Every member's claimed sizes are checked against the archive's real size when it is opened, and the
    CRC32 of every member read is verified, so a flipped bit or a shifted record is refused, not loaded."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self._fh = limits.open_regular(path, "weights file")
        try:
            self._zip = zipfile.ZipFile(self._fh)
            self._size = os.fstat(self._fh.fileno()).st_size
            names = self._zip.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise BadInput(f"{path}: a zip archive without data.pkl, so not a torch or TorchScript file")
            if len(set(names)) != len(names):  # zipfile would silently read the last of two
                twice = next(n for n in names if names.count(n) > 1)
                raise ValueError(f"the archive names member {twice} twice")
            for info in self._zip.infolist():
                self._check_member(info)
            self._root = pkl.rsplit("/", 1)[0]
            self.is_torchscript = any(n.endswith("/constants.pkl") for n in names)
            # torch.save on a big-endian machine writes its records in that byte order
            order = f"{self._root}/byteorder"
            self._big_endian = order in names and self._zip.read(order).strip() == b"big"
            if self._zip.getinfo(pkl).file_size > limits.MAX_PICKLE_BYTES:
                raise _TooBig(
                    f"{pkl} claims {self._zip.getinfo(pkl).file_size:,} bytes, more than the "
                    f"{limits.MAX_PICKLE_BYTES:,} a checkpoint's pickle may have"
                )
            data = self._zip.read(pkl)  # checks the CRC32
            _check_pickle_ops(data)
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
            del data
            self._tensors: dict[str, _LazyTensor] = _named_tensors(obj, _LazyTensor)
            for key, lazy in self._tensors.items():
                _check_repeats(key, _numel(lazy.size), lazy.storage.numel)
        except _Refused as e:
            self._fh.close()
            raise _refusal(path, str(e)) from None
        except BadInput:
            self._fh.close()
            raise
        except _TooBig as e:
            self._fh.close()
            raise BadInput(f"{path}: refused: {e}") from None
        except _CORRUPT as e:
            self._fh.close()
            raise BadInput(f"{path}: truncated or corrupt torch archive ({type(e).__name__}: {e})") from None
        self.metadata = _text_fields(obj)
        self._storages: dict[str, torch.Tensor] = {}

    def _check_member(self, info: zipfile.ZipInfo) -> None:
        """A member's sizes fit in the archive (a central directory claiming 400 GB is refused here, before
        anything is allocated) and its compression is one torch.load reads."""
        name = info.filename
        if info.header_offset + info.compress_size > self._size:
            raise ValueError(
                f"member {name} claims {info.compress_size:,} bytes at offset {info.header_offset:,}, "
                f"past the end of the {self._size:,}-byte archive"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise ValueError(
                f"member {name} is stored uncompressed with {info.compress_size:,} bytes, yet claims {info.file_size:,}"
            )
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > limits.MAX_DEFLATE_RATIO * max(
            info.compress_size, 1
        ):
            raise ValueError(
                f"member {name} claims {info.file_size:,} bytes from {info.compress_size:,} compressed, "
                f"more than deflate can expand"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(
                f"member {name} uses zip compression method {info.compress_type}, which torch archives do not use"
            )

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].storage.dtype

    def _read_storage(self, storage: _Storage) -> torch.Tensor:
        """A storage's elements, read straight into a tensor's memory; the record's CRC32 is checked."""
        name = f"{self._root}/data/{storage.key}"
        try:
            info = self._zip.getinfo(name)
            nbytes = storage.numel * storage.dtype.itemsize
            if info.file_size < nbytes:
                raise ValueError(
                    f"record {name} holds {info.file_size} bytes, a storage of {storage.numel} "
                    f"{str(storage.dtype).removeprefix('torch.')} needs {nbytes}"
                )
            flat = torch.empty(storage.numel, dtype=storage.dtype)
            view = memoryview(flat.view(torch.uint8).numpy())
            if info.compress_type == zipfile.ZIP_STORED:
                crc = self._read_stored(info, view)
            else:  # deflate, as torch.load reads it: zipfile checks the CRC32 when the record is read to its end
                with self._zip.open(info) as f:
                    if f.readinto(view) != nbytes:
                        raise ValueError(f"record {name} is cut short")
                    while f.read(1 << 20):
                        pass
                crc = info.CRC
            if crc != info.CRC:
                raise ValueError(f"record {name} fails its CRC32 check (a damaged or altered file)")
            if self._big_endian and storage.dtype.itemsize > 1:
                raw = flat.view(torch.uint8).view(-1, storage.dtype.itemsize)
                raw.copy_(raw.flip(1))
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise BadInput(f"{self.path}: truncated or corrupt torch archive ({e})") from None
        return flat

    def _read_stored(self, info: zipfile.ZipInfo, view: memoryview) -> int:
        """Read an uncompressed record's first ``len(view)`` bytes into ``view``; the CRC32 of the whole record."""
        name = info.filename
        self._fh.seek(info.header_offset)
        header = self._fh.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"record {name} has no local header")
        name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        if self._fh.read(name_length).decode("utf-8", "replace") != name:
            raise ValueError(f"record {name}: its local header names another member")
        start = info.header_offset + 30 + name_length + extra_length
        if start + info.file_size > self._size:
            raise ValueError(f"record {name} is cut short")
        self._fh.seek(start)
        if self._fh.readinto(view) != len(view):
            raise ValueError(f"record {name} is cut short")
        crc = zlib.crc32(view)
        left = info.file_size - len(view)
        while left > 0:  # bytes past the storage (torch writes none): still covered by the CRC
            chunk = self._fh.read(min(left, 1 << 20))
            if not chunk:
                raise ValueError(f"record {name} is cut short")
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        return crc

    def get(self, key: str) -> torch.Tensor:
        lazy = self._tensors[key]
        flat = self._storages.get(lazy.storage.key)
        if flat is None:
            flat = self._storages[lazy.storage.key] = self._read_storage(lazy.storage)
        needed = lazy.offset + sum((s - 1) * st for s, st in zip(lazy.size, lazy.stride)) + 1
        if any(s == 0 for s in lazy.size):
            needed = 0
        if needed > flat.numel():
            raise BadInput(f"{self.path}: tensor {key} reaches past the end of its storage")
        return flat.as_strided(lazy.size, lazy.stride, lazy.offset)

    def release(self) -> None:
        """Forget cached storages (tensors already returned stay valid)."""
        self._storages.clear()

    def close(self) -> None:
        self._storages.clear()
        self._fh.close()


def _check_repeats(key: str, numel: int, stored: int) -> None:
    """Refuse a view with far more elements than its storage holds (stride 0: 64 floats as a [4e7, 64]
    tensor), which would become gigabytes once read; small broadcasts (a scalar expanded) pass."""
    if numel > stored and numel > limits.MAX_REPEATED_ELEMENTS:
        raise _TooBig(
            f"tensor {key} is a view of {numel:,} elements over a storage of {stored:,} (stride 0?): "
            f"it would take far more memory than the file holds"
        )


class LegacyPickleFile(TensorFile):
    """A pre-1.6 torch pickle (not a zip): read whole by ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        f = limits.open_regular(path, "weights file")
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's safe loader names what it refused "GLOBAL module.name" ("GLOBAL eval" for builtins)
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if found is None:
                raise BadInput(f"{path}: truncated or corrupt torch file (UnpicklingError: {e})") from None
            module, _, name = found.group(1).rpartition(".")
            raise _refusal(path, ".".join(_py3_name(module or "builtins", name))) from None
        except Exception as e:  # torch raises many kinds on garbage
            raise BadInput(f"{path}: truncated or corrupt torch file ({type(e).__name__}: {e})") from None
        finally:
            f.close()
        if not isinstance(obj, dict):
            raise BadInput(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
        self.metadata = _text_fields(obj)
        try:
            self._tensors: dict[str, torch.Tensor] = _named_tensors(obj, torch.Tensor)
            for key, t in self._tensors.items():
                _check_repeats(key, t.numel(), t.untyped_storage().nbytes() // max(t.element_size(), 1))
        except _TooBig as e:
            raise BadInput(f"{path}: refused: {e}") from None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def open_tensor_file(path: str | Path) -> TensorFile:
    """Open a weights file by its content (not its name): safetensors, torch zip, legacy pickle."""
    path = limits.regular_file(path, "weights file")
    if path.name.endswith(".index.json"):
        return ShardedSafetensors(path)
    with limits.open_regular(path, "weights file") as f:
        head = f.read(9)
    if len(head) < 9:
        raise BadInput(f"{path}: empty or truncated file ({len(head)} bytes)")
    # safetensors first: its 8-byte header length may well start with the pickle byte 0x80
    if head[8:9] == b"{":
        return SafetensorsFile(path)
    if head[:4] == b"PK\x03\x04":
        return PickleFile(path)
    if head[:1] == b"\x80":
        return LegacyPickleFile(path)
    raise BadInput(f"{path}: not a safetensors, torch or TorchScript weights file")
