"""Lazy, safe access to the tensors of a weights file: safetensors, torch pickles, TorchScript.

A Stable Diffusion checkpoint is 2-7 GB of which the text encoder is a few hundred MB, so
nothing here reads a tensor before it is asked for.  Pickles (.ckpt .pt .bin) are read by a
restricted unpickler that can only build tensors and plain containers: a pickle that asks for
anything else (``os.system``, ``builtins.eval``...) is refused before any of it runs.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .errors import BadInput

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
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
        n = 1
        for d in self.shape(key):
            n *= d
        return n * self.dtype(key).itemsize

    def close(self) -> None:
        """Release the file (tensors already returned stay valid)."""

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
            self.metadata = dict(self._file.metadata() or {})
            self._info = {}
            for k in self._keys:
                sl = self._file.get_slice(k)
                self._info[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInput(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> torch.dtype:
        name = self._info[key][1]
        if name not in _SAFETENSORS_DTYPES:
            raise BadInput(f"{self.path}: tensor {key} has dtype {name}, which sdclip cannot use")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        try:
            # slicing copies into ordinary memory; get_tensor would keep the file's pages mapped
            # and count them again in the process's memory
            return self._file.get_slice(key)[:] if self._info[key][0] else self._file.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise BadInput(f"{self.path}: cannot read tensor {key} ({e})") from None

    def close(self) -> None:
        self._file = None  # drops the memory map once no tensor refers to it


class ShardedSafetensors(TensorFile):
    """A ``*.safetensors.index.json`` and the shards it names, as one file."""

    def __init__(self, index: Path):
        self.path = index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{index}: not a safetensors index ({e})") from None
        self._shards = {name: SafetensorsFile(index.parent / name) for name in sorted(set(weight_map.values()))}
        self._where = {k: self._shards[v] for k, v in weight_map.items()}
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
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with encoding {encoding!r}")
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
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors (lazily) and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModule
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return _Opaque
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {dtype!r}")
        return _Storage(str(key), dtype, int(numel))


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, _LazyTensor]]:
    """Named tensors of a nested checkpoint object (dicts, TorchScript module trees)."""
    if isinstance(obj, _LazyTensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, _ScriptModule) and isinstance(getattr(obj, "state", None), dict):
        for k, v in obj.state.items():
            yield from _flatten(v, f"{prefix}{k}.")


class PickleFile(TensorFile):
    """A torch zip archive (torch.save since 1.6, TorchScript .pt), read without running code."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self._fh = open(path, "rb")
        try:
            self._zip = zipfile.ZipFile(self._fh)
            names = self._zip.namelist()
            pkl = next(n for n in names if n.endswith("data.pkl") and n.count("/") == 1)
            self._root = pkl.rsplit("/", 1)[0]
            self.is_torchscript = any(n.endswith("constants.pkl") for n in names)
            obj = _RestrictedUnpickler(self._zip.open(pkl)).load()
        except pickle.UnpicklingError as e:
            self._fh.close()
            raise BadInput(f"{path}: refused: this pickle asks to call {e}, which could run code; sdclip only "
                           f"loads tensors from pickles (convert the file to safetensors or trust a tool that "
                           f"does not check)") from None
        except (zipfile.BadZipFile, StopIteration, EOFError, OSError, ValueError, TypeError, KeyError,
                AttributeError, IndexError) as e:
            self._fh.close()
            raise BadInput(f"{path}: truncated or corrupt torch archive ({type(e).__name__}: {e})") from None
        # a training checkpoint keeps its weights under "state_dict" (Lightning) or "model"
        if isinstance(obj, dict):
            for inner in ("state_dict", "model", "module"):
                if isinstance(obj.get(inner), dict) and any(True for _ in _flatten(obj[inner])):
                    obj = obj[inner]
                    break
        self._tensors = dict(_flatten(obj))
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
            self._fh.seek(start)
            if self._fh.readinto(memoryview(flat.view(torch.uint8).numpy())) != nbytes:
                raise ValueError(f"record {name} is cut short")
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
            raise BadInput(f"{path}: refused: this pickle asks for more than tensors, which could run code "
                           f"({str(e).splitlines()[0]})") from None
        except Exception as e:  # torch raises many kinds on garbage
            raise BadInput(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise BadInput(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

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
        head = f.read(8)
    if len(head) < 8:
        raise BadInput(f"{path}: empty or truncated file ({len(head)} bytes)")
    if head[:2] == b"PK":
        return PickleFile(path)
    if head[:1] == b"\x80":
        return LegacyPickleFile(path)
    header_len = int.from_bytes(head, "little")
    if 2 <= header_len < 100_000_000:
        return SafetensorsFile(path)
    raise BadInput(f"{path}: not a safetensors, torch or TorchScript weights file")
