"""The shapes prompts take between text and conditioning, shared by every dialect.

A parsed prompt is a tree whose leaves are lists of weighted ``Segment``\\ s:

* a plain list of segments (most prompts),
* ``Blend`` — compel's ``("a", "b").blend(0.7, 0.3)``: encode each part, mix the conditionings,
* ``Conjunction`` — compel's ``.and()`` and A1111's ``AND``: encode each part, combine with weights,
* ``Schedule`` — A1111 prompt editing / alternation: which conjunction holds until which step.

Chunking maps every leaf to a ``Chunked`` (token ids and per-token weights in 77-token chunks), keeping
the tree, so the encoder can walk one shape whatever the dialect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, Mapping, NamedTuple, Sequence, TypeVar, Union

if TYPE_CHECKING:
    import torch

CHUNK_LENGTH = 77  # BOS + 75 prompt tokens + EOS/padding
# textual-inversion vectors sit where this id is; the encoder overwrites those positions' input
# embeddings (A1111 uses 0 too).
PLACEHOLDER_ID = 0
# Deeper bracket nesting is refused (BadInput): A1111 and ComfyUI hit RecursionError a few hundred levels
# down, compel takes hours beyond about 8; no prompt needs 100.
MAX_NESTING = 100


@dataclass(frozen=True)
class Segment:
    """A run of prompt text and the weight every token of it gets."""

    text: str
    weight: float

    @property
    def is_break(self) -> bool:
        # A1111 tests exactly this pair, so a BREAK whose weight brackets changed is plain text again.
        return self.text == "BREAK" and self.weight == -1


BREAK = Segment("BREAK", -1.0)
"""A1111's chunk break marker, as its parser emits it."""

L = TypeVar("L")
M = TypeVar("M")


@dataclass(frozen=True)
class Blend(Generic[L]):
    """Encode each part, then mix the conditionings with ``weights`` (divided by their sum if ``normalize``)."""

    parts: tuple[L, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class Conjunction(Generic[L]):
    """Encode each part on its own; the parts are combined with ``weights`` (compel: lerp from the empty
    prompt and concatenate on the token axis; A1111: composable diffusion in the sampler)."""

    parts: tuple[Union[L, Blend[L]], ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Schedule(Generic[L]):
    """A1111 prompt editing: ``entries[i] = (until_step, conjunction)``.  A1111's sampler, at 0-based step
    s, uses the first entry with ``s <= until_step`` (so the first entry also covers step 0)."""

    steps: int
    entries: tuple[tuple[int, Conjunction[L]], ...]

    def at(self, step: int) -> Conjunction[L]:
        """The conjunction A1111 conditions on at 0-based sampler step ``step``."""
        for until, conj in self.entries:
            if step <= until:
                return conj
        return self.entries[0][1]  # A1111 falls back to the first entry past the end


Node = Union[L, Blend[L], Conjunction[L], Schedule[L]]


def map_leaves(node: Node[L], fn: Callable[[L], M]) -> Node[M]:
    """The same tree with ``fn`` applied to every leaf (used to chunk every part of a parsed prompt)."""
    if isinstance(node, Schedule):
        return Schedule(node.steps, tuple((t, map_leaves(c, fn)) for t, c in node.entries))
    if isinstance(node, Conjunction):
        return Conjunction(tuple(map_leaves(p, fn) for p in node.parts), node.weights)
    if isinstance(node, Blend):
        return Blend(tuple(fn(p) for p in node.parts), node.weights, node.normalize)
    return fn(node)


@dataclass(frozen=True)
class EmbeddingSlot:
    """One textual-inversion vector: put vector ``vector`` of embedding ``name`` at ``position`` (0 = BOS)
    of chunk ``chunk``; the id there is ``PLACEHOLDER_ID``."""

    chunk: int
    position: int
    name: str
    vector: int


@dataclass(frozen=True)
class Chunked:
    """A prompt as the text encoder reads it: ``len(ids)`` chunks of 77 ids (BOS, prompt, EOS, padding).

    ``weights[c][p]`` is the emphasis of position p (1.0 for BOS/EOS/padding); ``sources[c][p]`` the index
    in ``segments`` the token came from (-1 for BOS/EOS/padding); ``slots`` the textual-inversion vectors
    to place; ``token_count`` the count the front end shows (A1111: 75 per full chunk plus the last
    chunk's length; others: prompt tokens before truncation); ``lost`` the (segment, id) pairs cut off by
    truncation; ``warnings`` what the front end would log (e.g. an unknown ComfyUI embedding).
    """

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    sources: tuple[tuple[int, ...], ...]
    segments: tuple[Segment, ...]
    token_count: int
    slots: tuple[EmbeddingSlot, ...] = ()
    lost: tuple[tuple[int, int], ...] = ()
    warnings: tuple[str, ...] = ()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [k, 77] long, weights [k, 77] float32)`` for the encoder."""
        import torch

        return (torch.tensor(self.ids, dtype=torch.long), torch.tensor(self.weights, dtype=torch.float32))


Embeddings = Mapping[str, object]
"""Textual-inversion lookup: name -> tensor [n, C] (or [C] for one vector) or simply the vector count n."""


def vector_count(value: object) -> int:
    """How many prompt positions an embedding takes."""
    if isinstance(value, int):
        return value
    shape = getattr(value, "shape", None)
    if shape is None:
        raise TypeError(f"an embedding must be a tensor or a vector count, got {type(value).__name__}")
    return 1 if len(shape) == 1 else int(shape[0])


class Entry(NamedTuple):
    """One prompt position while chunking."""

    id: int  # token id (``PLACEHOLDER_ID`` for an embedding vector)
    weight: float
    segment: int  # index of the segment it came from
    embedding: tuple[str, int] | None = None  # (embedding name, vector) for an embedding vector


@dataclass
class ChunkBuilder:
    """Collects chunks; every dialect's chunker feeds it bodies of entries and calls ``result``."""

    bos: int
    eos: int
    pad: int
    ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    sources: list[list[int]] = field(default_factory=list)
    slots: list[EmbeddingSlot] = field(default_factory=list)

    def add(self, body: list[Entry]) -> None:
        """Append one chunk: BOS, the body (at most 75 entries), EOS, padding."""
        n, pad = len(self.ids), CHUNK_LENGTH - 2 - len(body)
        self.ids.append([self.bos, *(e.id for e in body), self.eos, *[self.pad] * pad])
        self.weights.append([1.0, *(e.weight for e in body), 1.0, *[1.0] * pad])
        self.sources.append([-1, *(e.segment for e in body), -1, *[-1] * pad])
        self.slots.extend(EmbeddingSlot(n, p + 1, *e.embedding) for p, e in enumerate(body) if e.embedding is not None)

    def result(
        self,
        segments: list[Segment],
        token_count: int,
        lost: Sequence[tuple[int, int]] = (),
        warnings: Sequence[str] = (),
    ) -> Chunked:
        """The finished, immutable chunks."""
        return Chunked(
            tuple(map(tuple, self.ids)),
            tuple(map(tuple, self.weights)),
            tuple(map(tuple, self.sources)),
            tuple(segments),
            token_count,
            tuple(self.slots),
            tuple(lost),
            tuple(warnings),
        )


def empty_prompt(bos: int, eos: int, pad: int) -> Chunked:
    """The empty prompt's one chunk (BOS, EOS, padding): what weights lerp from and short prompts are padded with."""
    out = ChunkBuilder(bos, eos, pad)
    out.add([])
    return out.result([Segment("", 1.0)], 0)
