"""What a front end is: one ``Dialect`` object per front end holds every rule in which front ends differ.

``sdclip.prompts`` keeps the registry of these objects; ``Conditioner`` and the CLI ask the object and know no
front end by name.  A new front end is one module with a ``Dialect`` subclass, one line in the registry
(``prompts/__init__.py``) and its tests.

The rules, each an attribute or method below: parsing and chunking (``parse``, ``chunk``, ``leaf``); the shape
of a prompt (``structure``: one text, A1111's ``AND`` / prompt-editing schedule, compel's blends); the weighting
method; how prompts and negatives are brought to one length; clip-skip numbering; how embeddings are named and
what happens to one that does not fit an encoder; when a negative prompt is zeros; where the pooled output
comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import BadInput
from ..families import Family
from ..tokenizer import Tokenizer
from .types import Chunked, Embeddings, Node, Schedule, Segment

if TYPE_CHECKING:
    from ..embeddings import Embedding


@dataclass(frozen=True)
class Option:
    """A dialect option as the command line offers it: ``flag`` sets keyword ``name`` (of ``chunk``, ``parse``
    and ``Conditioner``); ``stage`` says which commands take it: "parse" (parse, tokens, tokenize, encode),
    "chunk" (tokens, tokenize, encode) or "encode" (encode only)."""

    name: str
    flag: str
    stage: str
    help: str
    argparse: dict[str, Any] = field(default_factory=dict)  # type, default, choices, action
    value: Callable[[Any], Any] | None = None  # the keyword's value from the parsed arguments (default: as read)

    def read(self, args: Any) -> Any:
        """The keyword's value from parsed arguments."""
        return self.value(args) if self.value is not None else self.given(args)

    def given(self, args: Any) -> Any:
        """The flag's value as parsed."""
        return getattr(args, self.flag.lstrip("-").replace("-", "_"))


class Dialect:
    """A front end's rules.  The defaults are diffusers' (plain prompts); each front end overrides its own."""

    name: str = ""
    title: str = ""  # as messages name the front end
    aliases: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()  # what the command line offers for this front end
    clip_skip_help: str = "clip_skip k, 0 = default"  # its clip-skip setting, as ``--clip-skip`` help says
    # "text": each prompt is one leaf; "schedule": A1111 AND / prompt editing (``schedule``, ``timeline``);
    # "blend": compel's blends and conjunctions (``parse``), weights below 1 also down-weighted by masking
    structure: str = "text"
    weighting: str = "none"  # "emphasis": A1111 (multiply, restore the mean); "lerp": from the empty prompt
    uses_empty_prompt: bool = True  # the empty prompt's encoding pads short prompts (and weights lerp from it)
    batch_fill: str | None = None  # prompts of a batch to one length first: "last" repeats the last vector
    negative_fill: str = "empty"  # prompts and negatives to one length: "empty" chunks, "lcm" tiling
    embeddings_by_token: bool = False  # prompts name embeddings by token (else by file name)
    unfit_embedding: str = "refuse"  # an embedding without vectors for every encoder: "refuse" (error once a prompt
    # uses it), "skip" (warn and leave it out), "drop" (leave out the vectors an encoder has no width for)
    clip_skip_on_negative: bool = True  # the negative prompt is encoded at the clip-skip layer too
    cut_to_shorter_encoder: bool = False  # encoders chunking a prompt to different lengths: cut (else refuse)
    warn_truncation: bool = False  # say when a prompt was cut to 77 tokens

    def embedding_key(self, embedding: Embedding) -> str | None:
        """The key prompts find an embedding by in ``chunk``'s ``embeddings`` (None: this front end cannot use it):
        its diffusers token, or its file name without extension."""
        return embedding.token if self.embeddings_by_token else embedding.name

    # --- parsing and chunking ------------------------------------------------------------------------------
    def parse(self, text: str, **options: Any) -> Node[list[Segment]]:
        """The prompt's weighted segments as this front end reads it."""
        raise NotImplementedError

    def chunk(self, text: str, tokenizer: Tokenizer, **options: Any) -> Node[Chunked]:
        """The token ids, per-token weights and embedding slots this front end feeds the text encoder."""
        raise NotImplementedError

    def leaf(self, leaf: Any, tokenizer: Tokenizer, pad_id: int, embeddings: Embeddings, **options: Any) -> Chunked:
        """One leaf of ``tree`` chunked for one encoder (``options``: the ``Conditioner``'s)."""
        return self.chunk(leaf, tokenizer, pad_id=pad_id, embeddings=embeddings)  # type: ignore[return-value]

    def tree(self, prompt: str, **options: Any) -> Node[Any]:
        """ "blend" structure: the prompt's tree with unchunked leaves (for ``leaf``)."""
        raise NotImplementedError

    def pooled_leaf(self, prompt: str, tokenizer: Tokenizer, pad_id: int, embeddings: Embeddings) -> Chunked:
        """ "blend" structure: the chunk whose pooled output the U-Net reads."""
        raise NotImplementedError

    def parts(self, prompt: str, negative: bool) -> list[str]:
        """ "schedule" structure: the sub-prompts, each encoded with its own schedule."""
        raise NotImplementedError

    def timeline(self, text: str, **options: Any) -> list[str]:
        """ "schedule" structure: one sub-prompt's texts over the sampler steps, encoded together."""
        raise NotImplementedError

    def schedule_of(self, prompt: str, negative: bool, **options: Any) -> Schedule[str]:
        """ "schedule" structure: the prompt's schedule whose leaves are the texts of ``timeline``."""
        raise NotImplementedError

    # --- conditioning rules --------------------------------------------------------------------------------
    def check(self, **options: Any) -> None:
        """Refuse options this front end cannot take (``Conditioner``'s options, all of them)."""

    def skipped_layers(self, clip_skip: int, family: Family) -> int | None:
        """How many layers before the family's default this front end's clip-skip setting asks for (None: the
        setting is ignored).  Default: diffusers' and compel's ``clip_skip=k``, k layers skipped."""
        if clip_skip < 0:
            raise BadInput(f"{self.name} clip_skip counts skipped layers from 0, got {clip_skip}")
        return clip_skip

    def zero_negative(self, negative: str | None, family: Family) -> bool:
        """Whether this negative prompt is encoded as zeros."""
        return False


def last_layer_number(dialect: Dialect, clip_skip: int) -> int:
    """A1111's ``clip_skip=N`` and ComfyUI's ``CLIPSetLastLayer -N``: N counts from the end of the full tower
    (1 = last layer; a family's default sits at its ``clip_skip_base``)."""
    clip_skip = abs(clip_skip)  # ComfyUI writes CLIPSetLastLayer -2
    if clip_skip < 1:
        raise BadInput(f"{dialect.name} clip skip counts from 1 (the last layer), got {clip_skip}")
    return clip_skip
