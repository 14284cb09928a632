"""Plain prompts, as diffusers pipelines encode them: no weighting syntax, the whole prompt tokenized at
once and cut to BOS + 75 tokens + EOS (diffusers warns about the rest).

Textual inversion the diffusers way (``load_textual_inversion``): an embedding's name, e.g. ``<cat-toy>``,
is a token of its own wherever it appears in the text, and expands to one position per vector (diffusers
adds ``<cat-toy>_1``, ``<cat-toy>_2``, ... and rewrites the prompt).  compel uses the same names.
"""

from __future__ import annotations

import re
from typing import Any

from ..families import Family
from ..tokenizer import Tokenizer
from .dialect import Dialect
from .types import CHUNK_LENGTH, PLACEHOLDER_ID, ChunkBuilder, Chunked, Embeddings, Entry, Segment, vector_count


def parse(text: str) -> list[Segment]:
    """The prompt as one segment of weight 1: diffusers reads no syntax."""
    return [Segment(text, 1.0)]


def name_pattern(embeddings: Embeddings | None) -> re.Pattern | None:
    """Embedding names as they split the text: leftmost first, longest first (transformers' added-token
    trie)."""
    names = sorted((n for n in (embeddings or {}) if n), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None


def units(tokenizer: Tokenizer, text: str, pattern: re.Pattern | None) -> list[int | str]:
    """Token ids of ``text``, with each embedding name kept as one unit (the name) between them."""
    if pattern is None:
        return list(tokenizer.tokenize(text))
    out: list[int | str] = []
    for k, piece in enumerate(pattern.split(text)):
        if k % 2:
            out.append(piece)
        elif piece:
            out.extend(tokenizer.tokenize(piece))
    return out


def expand(items: list[int | str], embeddings: Embeddings | None, weight: float = 1.0, source: int = 0) -> list[Entry]:
    """Chunk entries; each embedding name becomes one placeholder per vector."""
    out: list[Entry] = []
    for item in items:
        if isinstance(item, str):
            n = vector_count(embeddings[item])  # type: ignore[index]
            out.extend(Entry(PLACEHOLDER_ID, weight, source, (item, v)) for v in range(n))
        else:
            out.append(Entry(item, weight, source))
    return out


def chunk(
    text: str, tokenizer: Tokenizer, *, pad_id: int | None = None, embeddings: Embeddings | None = None
) -> Chunked:
    """One chunk: BOS + the first 75 tokens + EOS, padded with ``pad_id`` (EOS by default; SD2 and SDXL's
    second tokenizer pad with 0); ``lost`` holds what was cut."""
    entries = expand(units(tokenizer, text, name_pattern(embeddings)), embeddings)
    room = CHUNK_LENGTH - 2
    out = ChunkBuilder(tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_id if pad_id is None else pad_id)
    out.add(entries[:room])
    return out.result(parse(text), len(entries), lost=[(e.segment, e.id) for e in entries[room:]])


class Diffusers(Dialect):
    """diffusers pipelines: one 77-token chunk, no weighting, no empty-prompt padding; ``clip_skip`` skips layers
    for the prompt only; embeddings by token, refused when they do not fit every encoder; SDXL's missing negative
    is zeros (``force_zeros_for_empty_prompt``)."""

    name = "diffusers"
    title = "diffusers"
    aliases = ("plain",)
    uses_empty_prompt = False
    embeddings_by_token = True
    clip_skip_on_negative = False
    warn_truncation = True

    def parse(self, text: str, **options: Any) -> list[Segment]:
        return parse(text)

    def chunk(self, text: str, tokenizer: Tokenizer, **options: Any) -> Chunked:
        return chunk(text, tokenizer, **options)

    def zero_negative(self, negative: str | None, family: Family) -> bool:
        return negative is None and family.force_zeros_for_empty_prompt


DIALECT = Diffusers()
