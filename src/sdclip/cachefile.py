"""Reading a cache that ``sdclip cache`` wrote: ``sdclip.open_cache(DIR)``.

    >>> cache = sdclip.open_cache("captions.cache")
    >>> row = cache["photos.txt:12"]                 # by id
    >>> row.hidden.shape, row.to_diffusers().keys()
    >>> loader = torch.utils.data.DataLoader(cache, batch_size=8, collate_fn=list)   # a Dataset of rows

Rows come in index order (the input order, errors left out).  Shards are opened lazily and a few are kept
open, so a pass over the cache reads each shard once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cachejob import FORMAT, CacheDir
from .dataset import require_pyarrow
from .errors import BadInput, SdclipError


@dataclass
class CachedRow:
    """One row: its id and caption, ``hidden`` [77 k, C] and, where the model gives them, ``pooled`` [P]
    (raw caches: also ``pooled_projected``)."""

    id: str
    caption: str
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    pooled_projected: torch.Tensor | None = None
    token_count: int = 0
    truncated: bool = False

    def to_diffusers(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a diffusers pipeline or training step: ``prompt_embeds`` [1, L, C] and, for
        SDXL, ``pooled_prompt_embeds`` [1, P] (a cache holds prompts, not negatives)."""
        out = {"prompt_embeds": self.hidden[None]}
        if self.pooled is not None:
            out["pooled_prompt_embeds"] = self.pooled[None]
        return out


class CacheReader(Dataset):
    """A finished cache: ``len``, ``cache[i]`` (i-th row), ``cache[id]`` / ``get(id)``, iteration."""

    def __init__(self, root: str | Path, open_shards: int = 4):
        pa = require_pyarrow()
        self.folder = CacheDir(root)
        manifest = self.folder.read_manifest()
        if manifest is None or manifest.get("format") != FORMAT:
            raise BadInput(f"{root}: not an sdclip cache (no manifest.json)")
        if manifest.get("state") != "complete":
            raise SdclipError(f"{root}: the job that writes this cache has not finished; run it again to resume")
        self.manifest = manifest
        self.index = pa.parquet.read_table(self.folder.root / manifest["index"])
        self._columns = {name: self.index.column(name) for name in self.index.column_names}
        self._by_id: dict[str, int] | None = None
        self._open: OrderedDict[int, object] = OrderedDict()
        self._open_max = open_shards

    def __len__(self) -> int:
        return self.index.num_rows

    def __getitem__(self, key: int | str) -> CachedRow:
        if isinstance(key, str):
            return self.get(key)
        if not -len(self) <= key < len(self):
            raise IndexError(f"row {key} of a cache of {len(self)} rows")
        i = key % len(self)
        value = {name: column[i].as_py() for name, column in self._columns.items()}
        f = self._shard(value["shard"])
        r = value["row"]
        length = int(f.get_slice("length")[r : r + 1][0])
        held = set(f.keys())  # a safe_open handle, not a dict
        tensors = {name: f.get_slice(name)[r : r + 1][0] for name in ("pooled", "pooled_projected") if name in held}
        return CachedRow(
            value["id"],
            value["caption"],
            f.get_slice("hidden")[r : r + 1][0, :length],
            **tensors,
            token_count=value["token_count"],
            truncated=value["truncated"],
        )

    def get(self, row_id: str) -> CachedRow:
        """The row with this id (KeyError if the cache has none: not in the input, or an error row)."""
        if self._by_id is None:
            self._by_id = {value: i for i, value in enumerate(self._columns["id"].to_pylist())}
        return self[self._by_id[row_id]]

    def __iter__(self) -> Iterator[CachedRow]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        """DataLoader workers get a copy without open shard handles (each opens its own)."""
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard(self, number: int):
        from safetensors import safe_open

        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        if len(self._open) >= self._open_max:
            self._open.popitem(last=False)
        handle = safe_open(str(self.folder.shard_path(number)), framework="pt")
        self._open[number] = handle
        return handle


def open_cache(root: str | Path) -> CacheReader:
    """Open a cache written by ``sdclip cache`` (format sdclip) for reading."""
    return CacheReader(root)
