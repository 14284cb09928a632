"""Textual-inversion embeddings: every file format the front ends read, read without running code.

* A1111 ``.pt`` / ``.bin``: a pickle ``{"string_to_param": {"*": [n, C]}, "name": ..., "step": ...}``
  (read by sdclip's restricted unpickler: a pickle that asks for code is refused);
* ``.safetensors``: ``emb_params`` [n, C] (A1111 / kohya SD1 and SD2), ``clip_l`` [n, 768] + ``clip_g``
  [n, 1280] (SDXL), or one ``{token: tensor}``;
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{placeholder_token: [n, C]}``;
* A1111 embedding images (PNG, WebP): the ``sd-ti-embedding`` text chunk, base64 JSON.

A1111 and ComfyUI call an embedding by its file name without extension (A1111's images: the name stored
inside); diffusers and compel by its token (the learned_embeds key, or the ``name`` an A1111 file
stores).  Vectors are kept per text encoder: ``"clip_l"`` / ``"clip_g"`` for SDXL pairs, ``"*"`` for a
file with one tensor, which fits any encoder of its width.
"""

from __future__ import annotations

import base64
import binascii
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch

from .checkpoint import ROLES
from .errors import BadInput
from .tensorfile import open_tensor_file

SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp")
IMAGE_SUFFIXES = (".png", ".webp")
IMAGE_KEY = "sd-ti-embedding"  # the text chunk A1111 hides an embedding in
ANY = "*"  # the role of a file's only tensor: any encoder of its width


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its names and its vectors [n, C] (float32) per text encoder."""

    name: str  # how A1111 and ComfyUI prompts call it
    token: str  # how diffusers and compel prompts call it
    vectors: Mapping[str, torch.Tensor]  # role ("clip_l", "clip_g", or "*") -> [n, C]
    path: Path | None = None

    @property
    def count(self) -> int:
        """Prompt positions the embedding takes (vectors per encoder)."""
        return next(iter(self.vectors.values())).shape[0]

    def for_encoder(self, width: int) -> torch.Tensor | None:
        """The vectors for a text encoder of this width (its role follows from the width, as sdclip
        infers it), or None when the file holds none that fit: the front end then skips it."""
        v = self.vectors.get(ROLES.get(width, ""), self.vectors.get(ANY))
        return v if v is not None and v.shape[1] == width else None

    def describe_widths(self) -> str:
        return " + ".join(f"{k} {v.shape[1]}" if k != ANY else str(v.shape[1]) for k, v in self.vectors.items())


EmbeddingSource = Union[str, Path, Embedding, Iterable[Union[str, Path, Embedding]], Mapping[str, Embedding]]


def _checked(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """[n, C] float32 with n >= 1, finite; a single vector [C] counts as n = 1."""
    if not tensor.is_floating_point():
        raise BadInput(f"{what}: holds {tensor.dtype} values, not an embedding's floating-point vectors")
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise BadInput(f"{what}: an embedding is [vectors, width], got shape {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise BadInput(f"{what}: holds NaN or infinite values (a broken training run?)")
    return tensor.detach().to(torch.float32).contiguous()


def _from_tensors(tensors: dict[str, torch.Tensor], texts: Mapping[str, str], path: Path, stem: str) -> Embedding:
    """An embedding from a file's named tensors (nested names joined with dots) and text fields."""
    params = {k: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if params:  # A1111 / original textual inversion; its string_to_token entries are not vectors
        if len(params) != 1:
            raise BadInput(f"{path}: the embedding file has {len(params)} terms in it; A1111 reads files with one")
        vectors = {ANY: _checked(next(iter(params.values())), f"{path}")}
        token = texts.get("name") or stem
    elif set(tensors) == {"clip_l", "clip_g"}:  # SDXL
        vectors = {k: _checked(tensors[k], f"{path} [{k}]") for k in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise BadInput(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g "
                           f"{vectors['clip_g'].shape[0]}; an SDXL embedding has as many for both")
        token = stem
    elif len(tensors) == 1:  # emb_params, diffusers learned_embeds {token: tensor}
        key, value = next(iter(tensors.items()))
        vectors, token = {ANY: _checked(value, f"{path}")}, key
    elif not tensors:
        raise BadInput(f"{path}: holds no tensors, so no embedding")
    else:
        raise BadInput(f"{path}: not an embedding file: {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}...) "
                       f"and none of string_to_param, emb_params, clip_l + clip_g")
    return Embedding(texts.get("name", stem) if path.suffix.lower() in IMAGE_SUFFIXES else stem, token, vectors, path)


def _image_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and text fields of an A1111 embedding image, or None for a picture without one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            chunks = getattr(image, "text", None) or image.info
            data = chunks.get(IMAGE_KEY)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise BadInput(f"{path}: not a readable image ({e})") from None
    if data is None:
        return None
    try:
        value = json.loads(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{path}: the {IMAGE_KEY} chunk is not base64 JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}: the {IMAGE_KEY} chunk holds no embedding")
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: object, prefix: str) -> None:  # A1111 writes each tensor as {"TORCHTENSOR": nested lists}
        if isinstance(obj, dict) and set(obj) == {"TORCHTENSOR"}:
            try:
                tensors[prefix.rstrip(".")] = torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64)
            except (TypeError, ValueError) as e:
                raise BadInput(f"{path}: a malformed tensor in the {IMAGE_KEY} chunk ({e})") from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")

    walk(value, "")
    return tensors, {k: v for k, v in value.items() if isinstance(v, str)}


def read_embedding(path: str | Path) -> Embedding:
    """One embedding file (any format above); a broken, empty or code-carrying file raises ``BadInput``."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such embedding file")
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if path.suffix.lower() in IMAGE_SUFFIXES:
        found = _image_tensors(path)
        if found is None:
            raise BadInput(f"{path}: an image without an embedding (no {IMAGE_KEY} text chunk)")
        return _from_tensors(*found, path, stem)
    with open_tensor_file(path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
        return _from_tensors(tensors, f.metadata, path, stem)


def _scan(folder: Path) -> list[Embedding]:
    """Every embedding under a folder (sub-folders too), as A1111 and ComfyUI scan theirs: empty files and
    pictures without an embedding are passed over; a broken file is skipped with a warning."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
        if path.stat().st_size == 0 or path.name.lower().endswith(tuple(f".preview{s}" for s in IMAGE_SUFFIXES)):
            continue
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES and _image_tensors(path) is None:
                continue
            out.append(read_embedding(path))
        except BadInput as e:
            warnings.warn(f"skipping embedding: {e}", stacklevel=3)
    return out


def load_embeddings(source: EmbeddingSource) -> list[Embedding]:
    """Embeddings from a file, a folder (scanned), ``Embedding`` objects, a list of these, or a mapping
    name -> ``Embedding`` (the key becomes its name in every dialect)."""
    if isinstance(source, Embedding):
        return [source]
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _scan(path)
        return [read_embedding(path)]
    if isinstance(source, Mapping):
        out = []
        for name, e in source.items():
            if not isinstance(e, Embedding):
                raise BadInput(f"embedding {name!r}: expected an Embedding, got {type(e).__name__}")
            out.append(Embedding(name, name, e.vectors, e.path))
        return out
    return [e for item in source for e in load_embeddings(item)]


def by_name(embeddings: Iterable[Embedding], token: bool = False) -> dict[str, Embedding]:
    """Name (or, with ``token``, diffusers token) -> embedding; a name met twice keeps the first, with a warning."""
    out: dict[str, Embedding] = {}
    for e in embeddings:
        key = e.token if token else e.name
        if key in out:
            warnings.warn(f"embedding {key!r}: {e.path} has the same name as {out[key].path}; using the first",
                          stacklevel=2)
            continue
        out[key] = e
    return out
