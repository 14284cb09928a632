"""What one request may ask for, and the refusal that names the limit (HTTP 413)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import sdclip
from sdclip.errors import BadInput
from sdclip.prompts import Blend, Conjunction, Node, Schedule
from sdclip.prompts import chunk as chunk_prompt


@dataclass
class Limits:
    """What one request may ask for; each refusal names the limit and its value."""

    max_prompts: int = 64  # prompts (and inputs) per request
    max_chars: int = 4000  # characters per prompt
    max_tokens: int = 600  # tokens per prompt, as its dialect counts them (A1111: 75 per full chunk)
    max_body_bytes: int = 1 << 20


class LimitExceeded(BadInput):
    """A request asks for more than a limit allows."""

    def __init__(self, name: str, value: int, what: str):
        super().__init__(f"{what} exceeds the limit {name} = {value}")
        self.name, self.value = name, value


def leaves(node: Node) -> Any:
    """Every chunked prompt of a tree (blends, ANDs, schedule entries)."""
    if isinstance(node, Schedule):
        for _, conj in node.entries:
            yield from leaves(conj)
    elif isinstance(node, (Conjunction, Blend)):
        for part in node.parts:
            yield from leaves(part)
    else:
        yield node


def chunk_counted(
    te: sdclip.TextEncoder, text: str, dialect: str, options: dict[str, Any], strict: bool
) -> tuple[Node, int]:
    """The prompt's chunk tree in its dialect and its token count as the dialect counts them.  An option the dialect
    does not take is refused when ``strict``, else left out (the conditioner ignores it, as ``encode_prompts``
    does)."""
    pad = te.towers[0].config.pad_id
    try:
        tree = chunk_prompt(text, dialect, te.tokenizers[0], pad_id=pad, **options)
    except TypeError as e:
        if strict:
            raise BadInput(f"dialect {dialect!r} does not take that option ({e})") from None
        tree = chunk_prompt(text, dialect, te.tokenizers[0], pad_id=pad)
    return tree, sum(leaf.token_count for leaf in leaves(tree))


class TokenCounts:
    """Prompts' token counts by model, dialect and options, remembered: most requests repeat a negative or quality
    tags already checked.  Least recently used first out, at most ``max_chars`` characters of prompts held;
    thread-safe."""

    def __init__(self, max_chars: int = 1 << 22):
        self.max_chars, self.chars = max_chars, 0
        self._counts: OrderedDict[tuple, int] = OrderedDict()
        self._lock = threading.Lock()

    def count(self, model: str, te: sdclip.TextEncoder, text: str, dialect: str, options: dict[str, Any]) -> int:
        key = (model, dialect, tuple(sorted(options.items())), text)
        with self._lock:
            found = self._counts.get(key)
            if found is not None:
                self._counts.move_to_end(key)
                return found
        _, count = chunk_counted(te, text, dialect, options, False)
        with self._lock:
            if key not in self._counts:
                self._counts[key] = count
                self.chars += len(text)
            while self.chars > self.max_chars:
                (_, _, _, old), _ = self._counts.popitem(last=False)
                self.chars -= len(old)
        return count
