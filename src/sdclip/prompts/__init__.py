"""Prompt dialects: text -> weighted segments -> 77-token chunks, exactly as each front end builds them.

    >>> from sdclip import Tokenizer
    >>> from sdclip.prompts import parse, chunk
    >>> parse("a (red:1.2) cat", "a1111")
    [Segment(text='a ', weight=1.0), Segment(text='red', weight=1.2), Segment(text=' cat', weight=1.0)]
    >>> c = chunk("a (red:1.2) cat", "a1111", Tokenizer())
    >>> c.ids[0][:5], c.weights[0][:5]
    ((49406, 320, 736, 2368, 49407), (1.0, 1.0, 1.2, 1.0, 1.0))

``parse`` and ``chunk`` return a tree (see ``types``): a leaf for simple prompts, ``Blend`` /
``Conjunction`` for compel's ``.blend()`` / ``.and()``, ``Schedule`` for A1111's ``AND`` and prompt
editing.  Per dialect options: a1111 ``steps``, ``hires_steps``, ``old_scheduling``, and for ``chunk``
``comma_backtrack``, ``emphasis``; compel ``truncate``, ``split``.  Every ``chunk`` takes ``pad_id``
(default EOS as CLIP-L; 0 for SD2 and SDXL's bigG) and ``embeddings`` (name -> tensor [n, C] or n).
"""

from __future__ import annotations

from ..errors import BadInput
from ..limits import MAX_PROMPT_CHARS, check_prompt
from ..tokenizer import Tokenizer
from . import a1111, comfy, compel, plain
from .dialect import Dialect, Option
from .types import BREAK, Blend, Chunked, Conjunction, EmbeddingSlot, Node, Schedule, Segment, map_leaves

# The front ends, one object each (see ``dialect``): adding one is a module and a line here.
REGISTRY: dict[str, Dialect] = {d.name: d for d in (a1111.DIALECT, comfy.DIALECT, compel.DIALECT, plain.DIALECT)}
DIALECTS = tuple(REGISTRY)
ALIASES = {alias: d.name for d in REGISTRY.values() for alias in d.aliases}


def get(name: str) -> Dialect:
    """The front end called ``name`` (or one of its aliases)."""
    found = REGISTRY.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if found is None:
        raise BadInput(f"unknown prompt dialect {name!r}; choose one of {', '.join(DIALECTS)}")
    return found


def check_options(**options) -> None:
    """Refuse an option value a front end cannot take (every front end checks its own)."""
    for d in REGISTRY.values():
        d.check(**options)


def _text(prompt: object, max_prompt_chars: int | None) -> str:
    if not isinstance(prompt, str):
        raise BadInput(f"a prompt must be a string, got {type(prompt).__name__}")
    return check_prompt(prompt, max_prompt_chars)


def parse(
    prompt: str, dialect: str, *, max_prompt_chars: int | None = MAX_PROMPT_CHARS, **options
) -> Node[list[Segment]]:
    """The prompt's weighted segments as ``dialect`` reads it (a tree for blends, AND, schedules).  A prompt
    longer than ``max_prompt_chars`` is refused before it is parsed (None: no limit)."""
    return get(dialect).parse(_text(prompt, max_prompt_chars), **options)


def chunk(
    prompt: str, dialect: str, tokenizer: Tokenizer, *, max_prompt_chars: int | None = MAX_PROMPT_CHARS, **options
) -> Node[Chunked]:
    """The token ids, per-token weights and embedding slots ``dialect`` feeds the text encoder (``max_prompt_chars``
    as in ``parse``)."""
    return get(dialect).chunk(_text(prompt, max_prompt_chars), tokenizer, **options)


__all__ = [
    "DIALECTS",
    "REGISTRY",
    "Dialect",
    "Option",
    "get",
    "check_options",
    "parse",
    "chunk",
    "Segment",
    "BREAK",
    "Chunked",
    "EmbeddingSlot",
    "Blend",
    "Conjunction",
    "Schedule",
    "Node",
    "map_leaves",
]
