"""Textual-inversion embeddings: every file format the front ends read, read without running code.

* A1111 ``.pt`` / ``.bin``: a pickle ``{"string_to_param": {"*": [n, C]}, "name": ..., "step": ...}``
  (read by sdclip's restricted unpickler: a pickle that asks for code is refused);
* ``.safetensors``: ``emb_params`` [n, C] (A1111 / kohya SD1 and SD2), ``clip_l`` [n, 768] + ``clip_g``
  [n, 1280] (SDXL), or one ``{token: tensor}``;
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{placeholder_token: [n, C]}``;
* A1111 embedding images (PNG, WebP): the ``sd-ti-embedding`` text chunk, base64 JSON.

A1111 calls an embedding by its file name without extension (its images: the name stored inside), ComfyUI
by its path in the embeddings folder, extension optional (``location``; see ``prompts.comfy``); diffusers
and compel by its token (the learned_embeds key, or the ``name`` an A1111 file stores).  Vectors are kept
per text encoder: ``"clip_l"`` / ``"clip_g"`` for SDXL pairs, ``"*"`` for a file with one tensor, which fits
any encoder of its width.

``save_embedding`` writes the first three formats (what ``sdclip ti train`` and ``ti convert`` produce);
``inject`` builds a text tower's input with an embedding's vectors in place, differentiably (textual
inversion trains through it; ``CLIPModel.encode_text`` reads learned words with it).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence, Union

import torch

from . import families, limits
from .atomic import write_bytes, write_safetensors
from .errors import BadInput
from .prompts import plain
from .runconfig import FORMATS
from .tensorfile import open_tensor_file
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .model import TextTransformer

SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp")
IMAGE_SUFFIXES = (".png", ".webp")
IMAGE_KEY = "sd-ti-embedding"  # the text chunk A1111 hides an embedding in
ANY = "*"  # the role of a file's only tensor: any encoder of its width
SDXL_ROLES = families.FAMILIES["sdxl"].roles or ()  # an SDXL file's tensors, for its first and second text encoder
_STAR_ID = 265  # CLIP's id of "*": the placeholder A1111 records in string_to_token


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its names and its vectors [n, C] (float32) per text encoder."""

    name: str  # how A1111 and ComfyUI prompts call it
    token: str  # how diffusers and compel prompts call it
    vectors: Mapping[str, torch.Tensor]  # role ("clip_l", "clip_g", or "*") -> [n, C]
    path: Path | None = None
    location: str | None = None  # its path in the folder it was loaded from, "/"-separated (how ComfyUI calls it)

    @property
    def count(self) -> int:
        """Prompt positions the embedding takes (vectors per encoder)."""
        return next(iter(self.vectors.values())).shape[0]

    def for_encoder(self, width: int) -> torch.Tensor | None:
        """The vectors for a text encoder of this width (its role follows from the width, as sdclip
        infers it), or None when the file holds none that fit: the front end then skips it."""
        known = families.ARCHITECTURES.get(width)
        v = self.vectors.get(known.role if known else "", self.vectors.get(ANY))
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
    elif set(SDXL_ROLES) <= set(tensors):  # SDXL; A1111 and ComfyUI read these two whatever else is there
        vectors = {k: _checked(tensors[k], f"{path} [{k}]") for k in SDXL_ROLES}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise BadInput(
                f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g "
                f"{vectors['clip_g'].shape[0]}; an SDXL embedding has as many for both"
            )
        token = stem
    elif len(tensors) == 1:  # emb_params, diffusers learned_embeds {token: tensor}
        key, value = next(iter(tensors.items()))
        vectors, token = {ANY: _checked(value, f"{path}")}, key
    elif not tensors:
        raise BadInput(f"{path}: holds no tensors, so no embedding")
    else:
        raise BadInput(
            f"{path}: not an embedding file: {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}...) "
            f"and none of string_to_param, emb_params, clip_l + clip_g"
        )
    return Embedding(texts.get("name", stem) if path.suffix.lower() in IMAGE_SUFFIXES else stem, token, vectors, path)


def _image_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and text fields of an A1111 embedding image, or None for a picture without one.  PNG text
    chunks are read without decoding pixels; a WebP's metadata is read from its header."""
    from PIL import Image, UnidentifiedImageError

    from .images import PNG_SIGNATURE, png_text

    with limits.open_regular(path, "embedding file") as f:
        png = f.read(8) == PNG_SIGNATURE
    if png:
        data = png_text(path, IMAGE_KEY)
    else:
        try:
            with limits.open_regular(path, "embedding file") as f, Image.open(f) as image:
                data = image.info.get(IMAGE_KEY)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as e:
            raise BadInput(f"{path}: not a readable image ({e})") from None
    if data is None:
        return None
    try:
        value = json.loads(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError, RecursionError) as e:
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

    try:
        walk(value, "")
    except RecursionError:
        raise BadInput(f"{path}: the {IMAGE_KEY} chunk nests too deep to be an embedding") from None
    return tensors, {k: v for k, v in value.items() if isinstance(v, str)}


def read_embedding(path: str | Path) -> Embedding:
    """One embedding file (any format above); a broken, empty or code-carrying file raises ``BadInput``."""
    path = limits.regular_file(path, "embedding file")
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if path.suffix.lower() in IMAGE_SUFFIXES:
        found = _image_tensors(path)
        if found is None:
            raise BadInput(f"{path}: an image without an embedding (no {IMAGE_KEY} text chunk)")
        return _from_tensors(*found, path, stem)
    with open_tensor_file(path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
        return _from_tensors(tensors, f.metadata, path, stem)


def _files_under(folder: Path) -> list[Path]:
    """Every file under a folder, sorted, linked sub-folders followed as A1111 and ComfyUI follow them
    (``os.walk(followlinks=True)``), each folder once: a link back up would loop."""
    seen: set[tuple[int, int]] = set()
    out = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        out += [Path(root, name) for name in names]
    return sorted(out)


def _scan(folder: Path, strict: bool = False) -> list[Embedding]:
    """Every embedding under a folder (sub-folders too), as A1111 and ComfyUI scan theirs: empty files and
    pictures without an embedding are passed over; a broken file is skipped with a warning (``strict``: an
    error)."""
    out = []
    for path in _files_under(folder):
        if not path.is_file() or path.suffix.lower() not in SUFFIXES:
            continue
        if path.stat().st_size == 0 or path.name.lower().endswith(tuple(f".preview{s}" for s in IMAGE_SUFFIXES)):
            continue
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES and _image_tensors(path) is None:
                continue
            out.append(replace(read_embedding(path), location=path.relative_to(folder).as_posix()))
        except BadInput as e:
            if strict:
                raise
            warnings.warn(
                f"skipping embedding: {e} (as A1111 and ComfyUI skip it; --strict-embeddings makes this an error)",
                stacklevel=3,
            )
    return out


def load_embeddings(source: EmbeddingSource, strict: bool = False) -> list[Embedding]:
    """Embeddings from a file, a folder (scanned), ``Embedding`` objects, a list of these, or a mapping
    name -> ``Embedding`` (the key becomes its name in every dialect).  A broken file in a folder is skipped
    with a warning, as A1111 and ComfyUI skip it; ``strict=True`` raises ``BadInput`` instead.  A file named
    on its own is always read or refused."""
    if isinstance(source, Embedding):
        return [source]
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _scan(path, strict)
        return [replace(read_embedding(path), location=path.name)]
    if isinstance(source, Mapping):
        out = []
        for name, e in source.items():
            if not isinstance(e, Embedding):
                raise BadInput(f"embedding {name!r}: expected an Embedding, got {type(e).__name__}")
            out.append(Embedding(name, name, e.vectors, e.path))
        return out
    return [e for item in source for e in load_embeddings(item, strict)]


def by_name(
    embeddings: Iterable[Embedding], key_of: Callable[[Embedding], str | None] = lambda e: e.name
) -> dict[str, Embedding]:
    """Name (or what ``key_of`` gives: the diffusers token, a path; None leaves it out) -> embedding; a name met
    twice keeps the first, with a warning."""
    out: dict[str, Embedding] = {}
    for e in embeddings:
        key = key_of(e)
        if key is None:
            continue
        if key in out:
            warnings.warn(
                f"embedding {key!r}: {e.path} has the same name as {out[key].path}; using the first", stacklevel=2
            )
            continue
        out[key] = e
    return out


# --- vectors into prompts -----------------------------------------------------------------------------


def token_table(source: EmbeddingSource, width: int) -> dict[str, torch.Tensor]:
    """Token -> vectors [n, C] for a text encoder of ``width``, called by token as diffusers and compel call
    them; an embedding without vectors of that width is refused, as diffusers refuses it."""
    table = {}
    for token, e in by_name(load_embeddings(source), lambda e: e.token).items():
        v = e.for_encoder(width)
        if v is None:
            raise BadInput(
                f"embedding {token!r} ({e.path or 'in memory'}) has vectors of width {e.describe_widths()}; "
                f"this text encoder takes {width}"
            )
        table[token] = v
    return table


def inject(
    tower: TextTransformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    vectors: Mapping[str, torch.Tensor],
    *,
    trim: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], token_embeds [B, L, C])`` for ``tower``: each name in ``vectors`` stands, wherever it
    appears in a prompt, for its n vectors (diffusers' rule), the other positions get the tower's own token
    embedding.  Differentiable in ``vectors``.  ``trim`` cuts the rows after the last first EOS: causal
    attention never lets the pooled output see further, so pooled-only callers save the work."""
    counts = {name: v.shape[0] for name, v in vectors.items()}
    rows = [plain.chunk(p, tokenizer, pad_id=tower.config.pad_id, embeddings=counts) for p in prompts]
    device = tower.token_embedding.weight.device
    ids = torch.tensor([r.ids[0] for r in rows], dtype=torch.long, device=device)
    if trim:
        ids = ids[:, : int((ids == tower.config.eos_id).int().argmax(-1).max()) + 1]
    embeds = tower.token_embedding(ids)
    return ids, put_vectors(
        embeds, [(b, s.position, vectors[s.name][s.vector]) for b, r in enumerate(rows) for s in r.slots]
    )


def put_vectors(embeds: torch.Tensor, slots: Sequence[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``embeds`` [B, L, C] with each ``(row, position, vector)`` of ``slots`` in place: the one place where
    embedding vectors enter a tower's input.  Differentiable in the vectors."""
    if not slots:
        return embeds
    where = tuple(torch.tensor(k, device=embeds.device) for k in zip(*[(b, p) for b, p, _ in slots]))
    return embeds.index_put(where, torch.stack([v for _, _, v in slots]).to(embeds.device, embeds.dtype))


# --- writing ------------------------------------------------------------------------------------------


def format_for(path: str | Path) -> str:
    """The format a file name asks for: ``learned_embeds.*`` diffusers, ``.safetensors`` safetensors
    (``emb_params``), ``.pt`` / ``.bin`` A1111."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.name.lower().startswith("learned_embeds") and suffix in (".safetensors", ".bin"):
        return "diffusers"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".bin"):
        return "a1111"
    raise BadInput(
        f"{path}: name the file .pt (A1111), .safetensors, or learned_embeds.safetensors (diffusers), "
        f"or give the format"
    )


def save_embedding(
    embedding: Embedding,
    path: str | Path,
    format: str | None = None,
    *,
    step: int | None = None,
    checkpoint: str | None = None,
) -> Path:
    """Write ``embedding`` where A1111, ComfyUI, kohya, diffusers and sdclip read it (``read_embedding`` gives
    the same vectors back); ``format`` defaults to what the file name asks for (``format_for``).

    * ``a1111``: ``.pt`` / ``.bin``, a plain pickled dict (``string_to_param`` {"*": [n, C]}, ``name`` = the
      token, ``step``, ``sd_checkpoint_name`` = ``checkpoint``) with tensors, strings and numbers only, so
      ``torch.load(weights_only=True)`` and sdclip's restricted unpickler read it;
    * ``safetensors``: ``emb_params`` [n, C]; an SDXL embedding as ``clip_l`` + ``clip_g`` (SDXL embeddings
      exist only in this form);
    * ``diffusers``: ``{token: [n, C]}`` as ``.safetensors`` or (pickled) ``.bin``.
    """
    path = Path(path)
    format = format or format_for(path)
    if format not in FORMATS:
        raise BadInput(f"unknown embedding format {format!r}; choose one of {', '.join(FORMATS)}")
    suffixes = {"a1111": (".pt", ".bin"), "safetensors": (".safetensors",), "diffusers": (".safetensors", ".bin")}
    if path.suffix.lower() not in suffixes[format]:
        raise BadInput(f"{path}: a {format} embedding file ends in {' or '.join(suffixes[format])}")
    # own storage: torch.save writes a view's whole storage
    tensors = {
        k: v.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        for k, v in embedding.vectors.items()
    }
    if set(tensors) == set(SDXL_ROLES):
        if format != "safetensors":
            raise BadInput(
                f"{embedding.name}: an SDXL embedding (clip_l + clip_g) is written as .safetensors (the "
                f"form A1111, ComfyUI and kohya read; diffusers loads each part with "
                f"load_textual_inversion(tensors['clip_l'], token=..., text_encoder=..., tokenizer=...))"
            )
    elif len(tensors) != 1:
        raise BadInput(f"{embedding.name}: vectors for {', '.join(tensors)}; a file holds one set, or an SDXL pair")
    vec = next(iter(tensors.values()))
    if format == "safetensors":
        write_safetensors(path, tensors if len(tensors) == 2 else {"emb_params": vec})
    elif format == "diffusers" and path.suffix.lower() == ".safetensors":
        write_safetensors(path, {embedding.token: vec})
    else:
        data = (
            {
                "string_to_token": {"*": _STAR_ID},
                "string_to_param": {"*": vec},
                "name": embedding.token,
                "step": step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": checkpoint,
            }
            if format == "a1111"
            else {embedding.token: vec}
        )
        buffer = io.BytesIO()  # small; torch's own file writer reports a full disk as an opaque RuntimeError
        torch.save(data, buffer)
        write_bytes(path, buffer.getvalue())
    return path
