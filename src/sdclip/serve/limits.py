"""What one request may ask for, and the refusal that names the limit (HTTP 413)."""

from __future__ import annotations

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


def chunk_checked(
    te: sdclip.TextEncoder, text: str, dialect: str, options: dict[str, Any], max_tokens: int, what: str, strict: bool
) -> Node:
    """The prompt's chunk tree in its dialect; refuses a prompt of more than ``max_tokens`` tokens as the dialect
    counts them.  An option the dialect does not take is refused when ``strict``, else left out (the conditioner
    ignores it, as ``encode_prompts`` does)."""
    pad = te.towers[0].config.pad_id
    try:
        tree = chunk_prompt(text, dialect, te.tokenizers[0], pad_id=pad, **options)
    except TypeError as e:
        if strict:
            raise BadInput(f"dialect {dialect!r} does not take that option ({e})") from None
        tree = chunk_prompt(text, dialect, te.tokenizers[0], pad_id=pad)
    count = sum(leaf.token_count for leaf in leaves(tree))
    if count > max_tokens:
        raise LimitExceeded("max_tokens", max_tokens, f"{what} ({count} tokens)")
    return tree
