"""Lazy, safe access to the tensors of a weights file: safetensors, torch pickles, TorchScript.

A Stable Diffusion checkpoint is 2-7 GB of which the text encoder is a few hundred MB, so
nothing here reads a tensor before it is asked for.  Pickles (.ckpt .pt .bin) are read by a
restricted unpickler that can only build tensors and plain containers: a pickle that asks for
anything else (``os.system``, ``builtins.eval``...) is refused before any of it runs; the rare
pre-1.6 (non-zip) pickle goes to ``torch.load(weights_only=True)``.  Every broken file raises one
``BadInput`` naming the file and what is wrong.
"""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import re
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import BadInput

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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

    def __enter__(self) -> "TensorFile":
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
        self._fh = open(path, "rb")
        try:
            size = path.stat().st_size
            n = int.from_bytes(self._fh.read(8), "little")
            if n > size - 8:
                raise ValueError(f"the header needs {n} bytes, the file has {size - 8} after its length (truncated?)")
            header = json.loads(self._fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
            self._data = 8 + n
            self._info: dict[str, tuple[tuple[int, ...], str, int]] = {}
            for key, entry in header.items():
                shape, dtype, (begin, end) = tuple(entry["shape"]), entry["dtype"], entry["data_offsets"]
                if not _counts(shape):
                    raise ValueError(f"tensor {key} has shape {list(shape)}")
                itemsize = _SAFETENSORS_DTYPES[dtype].itemsize if dtype in _SAFETENSORS_DTYPES else None
                if itemsize is not None and end - begin != _numel(shape) * itemsize:
                    raise ValueError(f"tensor {key} has {end - begin} bytes for shape {list(shape)} {dtype}")
                if not 0 <= begin <= end or self._data + end > size:
                    raise ValueError(f"tensor {key} lies past the end of the file (truncated?)")
                self._info[key] = (shape, dtype, self._data + begin)
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
    return isinstance(values, tuple) and all(isinstance(v, int) and v >= 0 for v in values)


class ShardedSafetensors(TensorFile):
    """A ``*.safetensors.index.json`` and the shards it names, as one file."""

    def __init__(self, index: Path):
        self.path = index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{index}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(f"{index}: not a safetensors index (weight_map is not a name -> file mapping)")
        self._shards = {}
        for name in sorted(set(weight_map.values())):
            if not (index.parent / name).is_file():
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
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and offset >= 0 and _counts(size)
            and _counts(stride) and len(size) == len(stride)):
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


def _flatten(obj: Any, leaf: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Named tensors (instances of ``leaf``) of a nested checkpoint object (dicts, TorchScript module trees)."""
    if isinstance(obj, leaf):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, leaf, f"{prefix}{k}.")
    elif isinstance(obj, _ScriptModule) and isinstance(getattr(obj, "state", None), dict):
        for k, v in obj.state.items():
            yield from _flatten(v, leaf, f"{prefix}{k}.")


def _named_tensors(obj: Any, leaf: type) -> dict[str, Any]:
    """The weights of a checkpoint: a training checkpoint keeps them under "state_dict"
    (Lightning), "model" or "module", beside optimizer state that must not be mistaken for them."""
    if isinstance(obj, dict):
        for inner in ("state_dict", "model", "module"):
            tensors = dict(_flatten(obj.get(inner), leaf)) if isinstance(obj.get(inner), dict) else {}
            if tensors:
                return tensors
    return dict(_flatten(obj, leaf))


def _text_fields(obj: Any) -> dict[str, str]:
    """A pickled dict's top-level strings, as ``metadata`` (a textual-inversion file's ``name``)."""
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(obj, dict) else {}


def _refusal(path: Path, what: str) -> BadInput:
    return BadInput(f"{path}: refused: this pickle asks for {what}, which could run code; sdclip only loads "
                    f"tensors from pickles (convert the file to safetensors with a tool you trust)")


# what a malformed pickle or zip can raise once no foreign code runs: all mean a broken file
_CORRUPT = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, RecursionError, NotImplementedError, zlib.error)


class PickleFile(TensorFile):
    """A torch zip archive (torch.save since 1.6, TorchScript .pt), read without running code."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self._fh = open(path, "rb")
        try:
            self._zip = zipfile.ZipFile(self._fh)
            names = self._zip.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise BadInput(f"{path}: a zip archive without data.pkl, so not a torch or TorchScript file")
            self._root = pkl.rsplit("/", 1)[0]
            self.is_torchscript = any(n.endswith("/constants.pkl") for n in names)
            # torch.save on a big-endian machine writes its records in that byte order
            order = f"{self._root}/byteorder"
            self._big_endian = order in names and self._zip.read(order).strip() == b"big"
            with self._zip.open(pkl) as f:
                obj = _RestrictedUnpickler(f).load()
        except _Refused as e:
            self._fh.close()
            raise _refusal(path, str(e)) from None
        except BadInput:
            self._fh.close()
            raise
        except _CORRUPT as e:
            self._fh.close()
            raise BadInput(f"{path}: truncated or corrupt torch archive ({type(e).__name__}: {e})") from None
        self.metadata = _text_fields(obj)
        self._tensors: dict[str, _LazyTensor] = _named_tensors(obj, _LazyTensor)
        self._storages: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].storage.dtype

    def _read_storage(self, storage: _Storage) -> torch.Tensor:
        name = f"{self._root}/data/{storage.key}"
        try:
            info = self._zip.getinfo(name)
            nbytes = storage.numel * storage.dtype.itemsize
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
                raise ValueError(f"record {name} holds {info.file_size} bytes, expected {nbytes}")
            # read straight into the tensor's memory: torch writes records uncompressed
            self._fh.seek(info.header_offset)
            header = self._fh.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"record {name} has no local header")
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            flat = torch.empty(storage.numel, dtype=storage.dtype)
            if not _read_into(self._fh, start, flat):
                raise ValueError(f"record {name} is cut short")
            if self._big_endian and storage.dtype.itemsize > 1:
                raw = flat.view(torch.uint8).view(-1, storage.dtype.itemsize)
                raw.copy_(raw.flip(1))
        except (KeyError, ValueError, OSError) as e:
            raise BadInput(f"{self.path}: truncated or corrupt torch archive ({e})") from None
        return flat

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


class LegacyPickleFile(TensorFile):
    """A pre-1.6 torch pickle (not a zip): read whole by ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's safe loader names what it refused "GLOBAL module.name" ("GLOBAL eval" for builtins)
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if found is None:
                raise BadInput(f"{path}: truncated or corrupt torch file (UnpicklingError: {e})") from None
            module, _, name = found.group(1).rpartition(".")
            raise _refusal(path, ".".join(_py3_name(module or "builtins", name))) from None
        except Exception as e:  # torch raises many kinds on garbage
            raise BadInput(f"{path}: truncated or corrupt torch file ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
        self.metadata = _text_fields(obj)
        self._tensors: dict[str, torch.Tensor] = _named_tensors(obj, torch.Tensor)

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
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return ShardedSafetensors(path)
    with open(path, "rb") as f:
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
