"""Prompts to conditioning: the tensors a U-Net reads, computed the way A1111, ComfyUI, compel and diffusers
compute them from the same prompt text.

    >>> te = sdclip.load("sd_xl_base_1.0.safetensors")
    >>> cond = sdclip.encode_prompts(te, ["a (red:1.2) fox"], negative="blurry", dialect="a1111")
    >>> cond.hidden.shape, cond.pooled.shape          # CLIP-L | bigG penultimate, bigG projected pooled
    (torch.Size([1, 77, 2048]), torch.Size([1, 1280]))
    >>> pipe(**cond.to_diffusers(), ...)               # or cond.to_comfy() for ComfyUI nodes

One pipeline serves every dialect:

1. each prompt is chunked by its dialect (``sdclip.prompts``), once per text encoder (own tokenizer, pad id,
   textual-inversion vectors);
2. every distinct row is encoded once per call (``TextEncoder.encode_ids``: identical rows and shared
   prefixes are computed once); embedding vectors replace the token embeddings at their slots;
3. weighting: A1111 multiplies each token by its weight and restores the mean of each chunk tensor
   ("original"; "no-norm", "ignore", "none"); ComfyUI and compel move weighted tokens along the line from
   the empty prompt's encoding (compel blends a masked encoding in for weights below 1); diffusers has none;
4. the encoders are joined on the channel axis (SDXL: CLIP-L | bigG = 2048), chunks on the token axis;
   pooled = bigG's projected pooled of the first chunk (A1111, ComfyUI), of the raw text (compel);
5. prompts and negatives are brought to one length as each front end does it.

Layers: one definition (``Usage``: a Python-style hidden-state index, final LayerNorm or not) onto which
``layer_for`` maps each front end's clip-skip numbering.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, TypeVar

import torch

from .cache import ConditioningCache, default_cache
from .embeddings import EmbeddingSource, by_name, load_embeddings, put_vectors
from .encoder import TextEncoder
from .errors import BadInput
from .families import CLIP, FAMILIES, Family, Usage
from .limits import MAX_PROMPT_CHARS, check_prompt
from .model import TextTransformer
from .prompts import Dialect, check_options
from .prompts import get as get_dialect
from .prompts.a1111 import EMPHASIS  # noqa: F401 (kept importable from here)
from .prompts.types import CHUNK_LENGTH, Blend, Chunked, Conjunction, Node, Schedule, empty_prompt, map_leaves
from .tokenizer import Tokenizer

_T = TypeVar("_T")
Deferred = Callable[[], _T]  # a result that exists once the encoding call has run


# --- families and layers ---------------------------------------------------------------------------


def family_of(te: TextEncoder) -> Family:
    """The family table's row for this text encoder (a family sdclip does not know: plain CLIP's)."""
    return FAMILIES.get(te.family, CLIP)


def unet_encoders(te: TextEncoder) -> tuple[int, ...]:
    """The encoders whose hidden states a family's U-Net reads (joined on the channel axis)."""
    return tuple(n for n in family_of(te).unet if n <= len(te.towers))


def pooled_encoders(te: TextEncoder) -> tuple[int, ...]:
    """The encoders whose projected pooled output the U-Net reads (SD1 and SD2 read none)."""
    return family_of(te).pooled


def layer_for(te: TextEncoder, encoder: int, dialect: str | Dialect, clip_skip: int | None) -> Usage:
    """The hidden state a front end feeds the U-Net from ``encoder`` with its clip-skip setting, as sdclip's one
    definition: a Python-style index into this tower's hidden states, and whether the final LayerNorm follows.

    Numbering: A1111 ``clip_skip=N`` and ComfyUI ``CLIPSetLastLayer -N`` count from the end of the full tower
    (1 = last layer); SD1's default is 1, SD2's and SDXL's 2 (A1111 applies the setting to SD1 only; SD2 and
    SDXL ignore it).  diffusers' and compel's ``clip_skip=k`` skip k layers back from the family default of the
    tower as loaded (SD1/2: final LN of hidden_states[-(k+1)]; SDXL: hidden_states[-(k+2)], no LN) -- so SD2's
    23-layer diffusers folders and 24-block single files agree.
    """
    usage = te.usages[encoder - 1]
    front = dialect if isinstance(dialect, Dialect) else get_dialect(dialect)
    if clip_skip is None:
        return usage
    skipped = front.skipped_layers(clip_skip, family_of(te))
    if skipped is None:
        return usage
    layer = usage.layer - skipped
    layers = te.tower(encoder).config.layers
    if not -layers - 1 <= layer < 0:
        raise BadInput(
            f"clip skip {abs(clip_skip)} ({front.name}) asks for hidden state {layer} of encoder {encoder}, "
            f"which this {layers}-layer tower does not have"
        )
    return Usage(layer, usage.final_norm)


# --- results -----------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One prompt's conditioning: ``hidden`` [77 k, C] and, where the family's U-Net reads one (SDXL, SD3),
    ``pooled`` [P]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class _Leaf:
    """A prompt's conditioning before the pooled projection, which runs per prompt (as diffusers runs it for one
    prompt; one row at a time, so that a prompt's value does not depend on its batch)."""

    hidden: torch.Tensor
    pooled: list[torch.Tensor]  # per pooled encoder: final-LN'd at EOS, not yet projected
    zeros: bool = False  # an all-zero negative (A1111 / diffusers SDXL)


@dataclass
class Conditioning:
    """A batch of prompts and their negatives, one length: ``hidden`` / ``negative_hidden`` [B, 77 k, C],
    ``pooled`` / ``negative_pooled`` [B, P] for SDXL and SD3 (None for SD1 and SD2).  SD3: the CLIP-L | CLIP-G
    part only; the T5 encoder is not sdclip's."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    negative_hidden: torch.Tensor
    negative_pooled: torch.Tensor | None

    def to_diffusers(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.__call__``."""
        out = {"prompt_embeds": self.hidden, "negative_prompt_embeds": self.negative_hidden}
        if self.pooled is not None:
            out.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=self.negative_pooled)
        return out

    def to_comfy(self) -> tuple[list, list]:
        """ComfyUI's (positive, negative) conditioning: ``[[tensor, {"pooled_output": pooled}]]`` each."""

        def one(hidden: torch.Tensor, pooled: torch.Tensor | None) -> list:
            return [[hidden, {} if pooled is None else {"pooled_output": pooled}]]

        return one(self.hidden, self.pooled), one(self.negative_hidden, self.negative_pooled)


# --- the shared arithmetic ----------------------------------------------------------------------------


def lerp_from_empty(z: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ComfyUI and compel weighting: a token of weight w moves to e + (z - e) * w, e being the empty prompt's
    encoding at the same position; tokens of weight 1 stay exactly as they are."""
    w = weights[..., None].to(z.dtype)
    return torch.where(w == 1, z, empty + (z - empty) * w)


def emphasize(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """A1111 emphasis of one chunk tensor [R, 77, C] (the rows encoded together): z * m per token; "original"
    then rescales the whole tensor to its mean before weighting (where that mean is exactly 0, A1111's 0 / 0
    would give NaN: the tensor is left as it is)."""
    if mode in ("ignore", "none"):
        return z
    before = z.mean()
    z = z * multipliers[..., None].to(z.dtype).expand(z.shape)
    if mode != "original":
        return z
    after = z.mean()
    return z * torch.where(after != 0, before / after, torch.ones_like(after))


def _fill(tensors: list[torch.Tensor], how: str, empty: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Bring [L_i, C] tensors to one length: "empty" appends empty-prompt chunks (A1111 cond/uncond, compel),
    "last" repeats the last vector (A1111's batch of prompts), "lcm" tiles each to the least common multiple
    (ComfyUI's sampler)."""
    lengths = {t.shape[0] for t in tensors}
    if len(lengths) < 2:
        return tensors
    if how == "lcm":
        target = math.lcm(*lengths)
        return [t.repeat(target // t.shape[0], 1) for t in tensors]
    target = max(lengths)
    if how == "last":
        return [torch.cat([t, t[-1:].expand(target - t.shape[0], -1)]) for t in tensors]
    assert empty is not None
    return [torch.cat([t, *[empty] * ((target - t.shape[0]) // CHUNK_LENGTH)]) for t in tensors]


# --- rows to encode -----------------------------------------------------------------------------------


@dataclass
class _EncoderUse:
    """One encoder (by its number) as a dialect uses it; ``table`` is the chunker's textual-inversion lookup: name ->
    vectors [n, C], or a vector count where the file has none of this width (ComfyUI drops those)."""

    number: int
    tokenizer: Tokenizer
    pad: int
    table: dict[str, object]
    pooled: bool


class Row(NamedTuple):
    """One row of 77 ids to encode: embedding vectors to put in, and an attention mask (None: attend to all)."""

    ids: tuple[int, ...]
    slots: tuple[tuple[int, str, int], ...]  # (position, embedding name, vector)
    mask: tuple[int, ...] | None


class _Rows:
    """The distinct rows to encode on one encoder at one layer in one call, each computed once."""

    def __init__(self, te: TextEncoder, use: _EncoderUse, usage: Usage):
        self.te, self.use, self.usage = te, use, usage
        self.index: dict[Row, int] = {}
        self.hidden = self.pooled = torch.empty(0)

    def add(
        self, ids: Sequence[int], slots: Sequence[tuple[int, str, int]] = (), mask: Sequence[int] | None = None
    ) -> int:
        """Row number of [77] ids with (position, embedding, vector) slots and an attention mask (1 = attend)."""
        key = Row(tuple(ids), tuple(slots), None if mask is None or all(mask) else tuple(mask))
        return self.index.setdefault(key, len(self.index))

    def run(self) -> None:
        rows = list(self.index)
        ids = torch.tensor([r.ids for r in rows], dtype=torch.long)
        kw = dict(
            encoder=self.use.number, layer=self.usage.layer, final_norm=self.usage.final_norm, pooled=self.use.pooled
        )
        simple = [i for i, r in enumerate(rows) if not r.slots and r.mask is None]
        special = [i for i, r in enumerate(rows) if r.slots or r.mask is not None]
        parts = []
        if simple:
            parts.append((simple, self.te.encode_ids(ids[simple], **kw)))
        if special:
            embeds = put_vectors(
                self.te.tower(self.use.number).token_embedding(ids[special].to(self.te.device)),
                [
                    (n, position, self.use.table[name][vector])  # type: ignore[index]
                    for n, i in enumerate(special)
                    for position, name, vector in rows[i].slots
                ],
            )
            masks = [rows[i].mask for i in special]
            mask = (
                None
                if all(m is None for m in masks)
                else torch.tensor([m if m is not None else [1] * CHUNK_LENGTH for m in masks])
            )
            parts.append((special, self.te.encode_ids(ids[special], token_embeds=embeds, attention_mask=mask, **kw)))
        width = parts[0][1].hidden.shape[-1]
        self.hidden = parts[0][1].hidden.new_empty(len(rows), CHUNK_LENGTH, width)
        for members, out in parts:
            self.hidden[members] = out.hidden
        if self.use.pooled:
            self.pooled = parts[0][1].pooled.new_empty(len(rows), width)
            for members, out in parts:
                self.pooled[members] = out.pooled


class _Call:
    """Everything one ``encode`` call (or ``encode_many``) needs encoded, gathered first so that each encoder runs
    once per layer."""

    def __init__(self, te: TextEncoder):
        self.te = te
        self.rows: dict[tuple[int, int, bool], _Rows] = {}

    def rows_for(self, use: _EncoderUse, usage: Usage) -> _Rows:
        """The rows of one encoder at one layer; conditioners sharing the call (``encode_many``) share them, unless
        a textual-inversion table (looked up by name in ``_Rows.run``) sets one conditioner's rows apart."""
        key = (use.number, usage.layer, usage.final_norm, id(use) if use.table else None)
        if key not in self.rows:
            self.rows[key] = _Rows(self.te, use, usage)
        return self.rows[key]

    def run(self) -> None:
        for rows in self.rows.values():
            rows.run()


def _chunk_rows(rows: _Rows, chunked: Chunked, masks: Sequence[Sequence[int] | None] | None = None) -> list[int]:
    """Row numbers of a chunked prompt's chunks.  A slot whose embedding has no vectors of this encoder's width
    is dropped and the row closes up, padded at the end, the weights staying where they were (ComfyUI)."""
    use = rows.use
    out = []
    for c, ids in enumerate(chunked.ids):
        slots = [(s.position, s.name, s.vector) for s in chunked.slots if s.chunk == c]
        drop = {p for p, name, _ in slots if not isinstance(use.table.get(name), torch.Tensor)}
        if drop:
            warnings.warn(
                f"{len(drop)} embedding vector(s) do not fit encoder {use.number}'s width and are "
                f"left out, as ComfyUI does",
                stacklevel=5,
            )
            keep = [p for p in range(len(ids)) if p not in drop]
            moved = {p: n for n, p in enumerate(keep)}
            ids = tuple(ids[p] for p in keep) + (use.pad,) * len(drop)
            slots = [(moved[p], name, v) for p, name, v in slots if p not in drop]
        out.append(rows.add(ids, slots, None if masks is None else masks[c]))
    return out


# --- compel's down-weighting ----------------------------------------------------------------------------


def _compel_mask(chunked: Chunked, segment: int, truncate: bool) -> list[list[int]] | None:
    """compel's attention mask hiding one fragment (None when it has no tokens): its token range from first to
    last position, the chunks' BOS and final positions kept in long mode; a fragment that truncation cut off
    also hides the EOS at 76 (compel's range search runs into it)."""
    where = [(c, p) for c, row in enumerate(chunked.sources) for p, s in enumerate(row) if s == segment]
    if not where:
        return None
    first = where[0][0] * CHUNK_LENGTH + where[0][1]
    last = where[-1][0] * CHUNK_LENGTH + where[-1][1]
    lost = sum(1 for s, _ in chunked.lost if s == segment)
    if truncate and len(where) < min(len(where) + lost, CHUNK_LENGTH - 2):
        last = CHUNK_LENGTH - 1
    mask = [1] * (len(chunked.ids) * CHUNK_LENGTH)
    for i in range(first, last + 1):
        if truncate or i % CHUNK_LENGTH not in (0, CHUNK_LENGTH - 1):
            mask[i] = 0
    return [mask[c * CHUNK_LENGTH : (c + 1) * CHUNK_LENGTH] for c in range(len(chunked.ids))]


def _downweight_factor(weight: float) -> float:
    """How strongly compel pulls towards the encoding without a fragment of weight < 1: tan((1 - w) pi / 2)."""
    return math.tan((1.0 - max(1e-5, weight)) * math.pi / 2)


# --- the conditioner ----------------------------------------------------------------------------------------


class Conditioner:
    """Turns prompts into conditioning for one model's text encoders the way one front end (``dialect``) does.

    ``clip_skip`` in the dialect's numbering (see ``layer_for``); ``emphasis`` is A1111's setting;
    ``embeddings`` a textual-inversion file, folder, list or name -> ``Embedding`` mapping.  Dialect options:
    a1111 ``steps``, ``hires_steps``, ``old_scheduling`` (prompt editing), ``comma_backtrack``; compel
    ``truncate`` (``truncate_long_prompts``), ``split``.  ``cache``: per-prompt results kept across calls,
    keyed by the model's fingerprint, the dialect, these options and the prompt (``None``: no cache).
    ``max_prompt_chars``: longer prompts are refused before they are parsed (``sdclip.limits``; None: no limit).
    """

    def __init__(
        self,
        te: TextEncoder,
        dialect: str = "diffusers",
        *,
        clip_skip: int | None = None,
        emphasis: str = "original",
        embeddings: EmbeddingSource | None = None,
        steps: int = 20,
        hires_steps: int | None = None,
        old_scheduling: bool = False,
        comma_backtrack: int = 20,
        truncate: bool = True,
        split: str = "sentences",
        cache: ConditioningCache | None = default_cache,
        max_prompt_chars: int | None = MAX_PROMPT_CHARS,
    ):
        self.te = te
        self.max_prompt_chars = max_prompt_chars
        self.cache = cache
        self.front_end = get_dialect(dialect)  # every rule in which front ends differ
        self.dialect = self.front_end.name
        self.options = dict(
            emphasis=emphasis,
            steps=steps,
            hires_steps=hires_steps,
            old_scheduling=old_scheduling,
            comma_backtrack=comma_backtrack,
            truncate=truncate,
            split=split,
        )
        check_options(**self.options)
        numbers = unet_encoders(te)
        self.usages = [layer_for(te, n, self.front_end, clip_skip) for n in numbers]
        self.negative_usages = (
            self.usages if self.front_end.clip_skip_on_negative else [te.usages[n - 1] for n in numbers]
        )
        self.unfit: dict[str, str] = {}  # diffusers / compel names whose vectors do not fit: an error if used
        tables = self._tables(load_embeddings(embeddings) if embeddings is not None else [], numbers)
        self.uses = [
            _EncoderUse(n, te.tokenizers[n - 1], te.towers[n - 1].config.pad_id, table, n in pooled_encoders(te))
            for n, table in zip(numbers, tables)
        ]
        self._options = (
            self.dialect,
            tuple(self.usages),
            tuple(self.negative_usages),
            tuple(self.options.items()),
            tuple(tuple(sorted((k, _digest(v)) for k, v in t.items())) for t in tables),
        )

    def _tables(self, embeddings: list, numbers: tuple[int, ...]) -> list[dict[str, object]]:
        """Each encoder's textual-inversion lookup.  A file that does not fit every encoder is skipped with a
        warning (A1111), its vectors dropped per encoder at encode time (ComfyUI) or refused once a prompt uses it
        (diffusers, compel): the front end's ``unfit_embedding``."""
        widths = [self.te.tower(n).config.width for n in numbers]
        tables: list[dict[str, object]] = [{} for _ in numbers]
        unfit = self.front_end.unfit_embedding
        for name, e in by_name(embeddings, self.front_end.embedding_key).items():
            vectors = [e.for_encoder(w) for w in widths]
            vectors = [None if v is None else v.to(self.te.device, self.te.dtype) for v in vectors]
            if unfit == "drop" or all(v is not None for v in vectors):
                for table, v in zip(tables, vectors):
                    table[name] = v if v is not None else e.count
            else:
                message = (
                    f"embedding {name!r} ({e.path}) has vectors of width {e.describe_widths()}; this "
                    f"{self.te.family} model's text encoders take {' + '.join(map(str, widths))}"
                )
                if unfit == "skip":
                    warnings.warn(message + f"; skipped, as {self.front_end.title} skips it", stacklevel=3)
                else:
                    self.unfit[name] = message
        return tables

    # --- public -------------------------------------------------------------------------------------------
    def encode(
        self, prompts: str | Sequence[str], negative: str | Sequence[str] | None = None, *, step: int = 0
    ) -> Conditioning:
        """Conditioning for ``prompts`` and their negatives (one for all, or one per prompt; None: no negative
        prompt, which is the empty prompt, or zeros where the front end uses zeros: A1111 and diffusers SDXL).
        A1111 prompt editing is taken at sampler ``step``; ``AND`` has no single tensor (see ``encode_tree``).

        One length for all: A1111 repeats a short prompt's last vector within the batch and pads prompts against
        negatives with empty-prompt chunks (its "pad prompt/negative prompt" setting; without it A1111 runs them
        in separate U-Net calls); compel pads with empty-prompt chunks; ComfyUI tiles each to the least common
        multiple of the lengths, as its sampler does."""
        call = _Call(self.te)
        finish = self._prepare(call, prompts, negative, step)
        with torch.no_grad():
            call.run()
            return finish()

    def _prepare(
        self, call: _Call, prompts: str | Sequence[str], negative: str | Sequence[str] | None, step: int
    ) -> Deferred[Conditioning]:
        """Plan ``encode``'s rows into ``call`` (the prompts found in the cache need none); the result once it has
        run."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise BadInput("no prompts to encode")
        negatives = [negative] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise BadInput(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        wanted = [("+", p) for p in dict.fromkeys(prompts)] + [("-", n) for n in dict.fromkeys(negatives)]
        if self.front_end.uses_empty_prompt:
            wanted.append(("empty", ""))
        key = lambda role, text: (self.te.fingerprint, self._options, role, text, step)
        done = {w: self.cache.get(key(*w)) for w in wanted} if self.cache is not None else dict.fromkeys(wanted)
        plans = {}
        for role, text in (w for w in wanted if done[w] is None):
            if role == "empty":
                plans[role, text] = self._plan_empty(call, self.usages)
            else:
                plans[role, text] = self._plan(
                    call, text, self.usages if role == "+" else self.negative_usages, negative=role == "-"
                )

        def finish() -> Conditioning:
            for w, plan in plans.items():
                done[w] = self._at(plan(), step)
                if self.cache is not None:
                    self.cache.put(key(*w), done[w])
            padding = done["empty", ""].hidden if ("empty", "") in done else None
            pos = [done["+", p] for p in prompts]
            neg = [done["-", n] for n in negatives]
            hidden = [e.hidden for e in pos]
            if self.front_end.batch_fill is not None:
                hidden = _fill(hidden, self.front_end.batch_fill)
            both = _fill(hidden + [e.hidden for e in neg], self.front_end.negative_fill, padding)
            pooled, negative_pooled = self._project(pos), self._project(neg)
            return Conditioning(torch.stack(both[: len(pos)]), pooled, torch.stack(both[len(pos) :]), negative_pooled)

        return finish

    def encode_tree(self, prompt: str) -> Node[Encoded]:
        """One prompt's conditioning with its structure: for A1111 ``AND`` and prompt editing a ``Schedule`` of
        ``Conjunction``\\ s (composable diffusion combines their parts in the sampler), else one ``Encoded``."""
        call = _Call(self.te)
        plan = self._plan(call, prompt, self.usages, negative=False)
        with torch.no_grad():
            call.run()
            tree = plan()

            def finish(leaf: _Leaf) -> Encoded:
                pooled = self._project([leaf])
                return Encoded(leaf.hidden, None if pooled is None else pooled[0])

            return map_leaves(tree, finish)

    def _project(self, leaves: list[_Leaf]) -> torch.Tensor | None:
        """The batch's pooled outputs [B, P]: each pooled encoder's projection of each prompt on its own (a
        one-row product: the same bits whatever the batch), the encoders side by side (None where the family's
        U-Net reads no pooled output)."""
        towers = [self.te.tower(e.number) for e in self.uses if e.pooled]
        if not towers:
            return None
        width = sum(t.config.projection_dim or t.config.width for t in towers)
        zeros = torch.zeros(width, dtype=self.te.dtype, device=self.te.device)

        def project(tower: TextTransformer, x: torch.Tensor) -> torch.Tensor:
            return tower.projection(x[None])[0] if tower.projection is not None else x

        return torch.stack(
            [
                zeros if leaf.zeros else torch.cat([project(t, p) for t, p in zip(towers, leaf.pooled)])
                for leaf in leaves
            ]
        )

    # --- planning ---------------------------------------------------------------------------------------------
    def _plan(self, call: _Call, prompt: str, usages: list[Usage], negative: bool) -> Deferred[Node[_Leaf]]:
        """Every prompt's conditioning, checked finite (``check_finite``) before anyone sees it."""
        plan = self._plan_prompt(call, prompt, usages, negative)
        return lambda: map_leaves(plan(), lambda leaf: check_finite(leaf, prompt, self.front_end, self.options))

    def _plan_prompt(self, call: _Call, prompt: str, usages: list[Usage], negative: bool) -> Deferred[Node[_Leaf]]:
        if not isinstance(prompt, str) and not (negative and prompt is None):
            raise BadInput(f"a prompt must be a string, got {type(prompt).__name__}")
        if negative and self.front_end.zero_negative(prompt, family_of(self.te)):
            width = sum(self.te.tower(e.number).config.width for e in self.uses)
            return lambda: _Leaf(torch.zeros(CHUNK_LENGTH, width, dtype=self.te.dtype, device=self.te.device), [], True)
        prompt = check_prompt(prompt or "", self.max_prompt_chars)
        for name, message in self.unfit.items():
            if name in prompt:
                raise BadInput(message + f"; {self.dialect} cannot use it")
        if self.front_end.structure == "schedule":
            return self._plan_schedule(call, prompt, usages, negative)
        if self.front_end.structure == "blend":
            return self._plan_blend(call, prompt, usages)
        leaf = [self._checked(self._leaf(prompt, e), prompt) for e in self.uses]
        group = self._plan_group(call, [leaf], usages)
        return lambda: self._join(*group()[0])

    def _leaf(self, leaf: object, use: _EncoderUse) -> Chunked:
        """One leaf of a prompt chunked by the front end for one encoder."""
        return self.front_end.leaf(leaf, use.tokenizer, use.pad, use.table, **self.options)

    def _checked(self, chunked: Chunked, prompt: str) -> Chunked:
        """Pass on what the front end would log: unknown embeddings, text cut off."""
        for w in chunked.warnings:
            warnings.warn(w, stacklevel=5)
        if chunked.lost and self.front_end.warn_truncation:
            warnings.warn(
                f"{len(chunked.lost)} tokens of {prompt[:40]!r}... were truncated: CLIP reads 77 "
                f"({self.dialect} truncates too)",
                stacklevel=5,
            )
        return chunked

    @staticmethod
    def _empty_chunk(use: _EncoderUse) -> Chunked:
        return empty_prompt(use.tokenizer.bos_id, use.tokenizer.eos_id, use.pad)

    def _plan_empty(self, call: _Call, usages: list[Usage]) -> Deferred[_Leaf]:
        """The empty prompt (BOS, EOS, padding): what weights lerp from and short prompts are padded with."""
        group = self._plan_group(call, [[self._empty_chunk(e) for e in self.uses]], usages)
        return lambda: self._join(*group()[0])

    def _plan_group(
        self, call: _Call, group: list[list[Chunked]], usages: list[Usage]
    ) -> Deferred[list[tuple[list[torch.Tensor], list]]]:
        """Prompts encoded together (A1111: one sub-prompt's schedule; otherwise one prompt), each given as one
        ``Chunked`` per encoder.  Per prompt: each encoder's weighted hidden states [77 k, C] and the (unprojected)
        pooled output of its first chunk.  Prompts with fewer chunks get empty chunks (A1111's batch rule)."""
        plans = []
        for e, (use, usage) in enumerate(zip(self.uses, usages)):
            rows = call.rows_for(use, usage)
            empty = self._empty_row(rows)
            indices = [_chunk_rows(rows, leaf[e]) for leaf in group]
            k = max(map(len, indices))
            indices = [i + [empty] * (k - len(i)) for i in indices]  # type: ignore[list-item]
            weights = torch.tensor(
                [list(leaf[e].weights) + [(1.0,) * CHUNK_LENGTH] * (k - len(leaf[e].weights)) for leaf in group],
                dtype=torch.float32,
            )
            plans.append((rows, torch.tensor(indices), weights, empty))

        def build() -> list[tuple[list[torch.Tensor], list]]:
            out: list[tuple[list[torch.Tensor], list]] = [([], []) for _ in group]
            for rows, indices, weights, empty in plans:
                z = self._weight(
                    rows.hidden[indices], weights.to(rows.hidden.device), None if empty is None else rows.hidden[empty]
                )
                for r, (hidden, pooled) in enumerate(out):
                    hidden.append(z[r].flatten(0, 1))
                    pooled.append(rows.pooled[indices[r, 0]] if rows.use.pooled else None)
            return out

        return build

    def _empty_row(self, rows: _Rows) -> int | None:
        """The empty prompt's row on this encoder, for front ends that weight or pad with it."""
        if not self.front_end.uses_empty_prompt:
            return None
        return rows.add(self._empty_chunk(rows.use).ids[0])

    def _weight(self, z: torch.Tensor, weights: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
        """The front end's weighting of encoded chunks z [R, k, 77, C] with per-token weights [R, k, 77]."""
        if self.front_end.weighting == "emphasis":
            # each chunk index on its own, contiguous as A1111 holds it: its mean is then summed in A1111's order
            return torch.stack(
                [emphasize(z[:, c].contiguous(), weights[:, c], self.options["emphasis"]) for c in range(z.shape[1])], 1
            )
        if self.front_end.weighting == "lerp":
            return lerp_from_empty(z, empty, weights)
        return z

    def _join(self, hidden: list[torch.Tensor], pooled: list[torch.Tensor | None]) -> _Leaf:
        """The encoders side by side on the channel axis; the pooled outputs of those the U-Net reads."""
        lengths = {h.shape[0] for h in hidden}
        if len(lengths) > 1:
            if not self.front_end.cut_to_shorter_encoder:
                raise BadInput(
                    f"the encoders' tokenizers chunk this prompt into {sorted(lengths)} tokens; "
                    f"{self.dialect} fails on such a prompt too"
                )
            hidden = [h[: min(lengths)] for h in hidden]  # ComfyUI cuts to the shorter
        return _Leaf(torch.cat(hidden, -1), [p for p in pooled if p is not None])

    def _plan_schedule(self, call: _Call, prompt: str, usages: list[Usage], negative: bool) -> Deferred[Node[_Leaf]]:
        """A1111's structure: each ``AND`` sub-prompt's schedule texts are encoded together (emphasis restores the
        mean over all of them); negative prompts are not split at ``AND``."""
        front, o = self.front_end, self.options
        subs = front.parts(prompt, negative)
        groups = {}
        for text in dict.fromkeys(subs):
            texts = front.timeline(text, **o)
            leaves = [[self._leaf(t, e) for e in self.uses] for t in texts]
            groups[text] = (texts, self._plan_group(call, leaves, usages))
        tree = front.schedule_of(prompt, negative, **o)

        def build() -> Node[_Leaf]:
            done = {sub: {t: self._join(*r) for t, r in zip(texts, group())} for sub, (texts, group) in groups.items()}
            entries = tuple(
                (until, Conjunction(tuple(done[subs[j]][part] for j, part in enumerate(conj.parts)), conj.weights))
                for until, conj in tree.entries
            )
            if len(entries) == 1 and entries[0][1].weights == (1.0,):
                return entries[0][1].parts[0]
            return Schedule(tree.steps, entries)

        return build

    def _plan_blend(self, call: _Call, prompt: str, usages: list[Usage]) -> Deferred[_Leaf]:
        """compel's structure: weighted leaves, ``.blend()`` (weighted sum) and ``.and()`` (concatenation, each
        part lerped from the empty prompt by its weight); pooled from the front end's ``pooled_leaf``."""
        front = self.front_end
        tree = map_leaves(
            front.tree(prompt, **self.options),
            lambda segments: [self._checked(self._leaf(segments, e), prompt) for e in self.uses],
        )
        empty = self._plan_empty(call, usages)

        def plan(node: object) -> Deferred[torch.Tensor]:
            if isinstance(node, (Blend, Conjunction)):
                parts = [plan(p) for p in node.parts]
                combine = _blend if isinstance(node, Blend) else _concatenate
                return lambda: combine([p() for p in parts], node, empty().hidden)  # type: ignore[arg-type]
            return self._plan_blend_leaf(call, node, usages)  # type: ignore[arg-type]

        hidden = plan(tree)
        if not any(e.pooled for e in self.uses):
            return lambda: _Leaf(hidden(), [])
        raw = [front.pooled_leaf(prompt, e.tokenizer, e.pad, e.table) for e in self.uses]
        pooled = self._plan_group(call, [raw], usages)
        return lambda: _Leaf(hidden(), self._join(*pooled()[0]).pooled)

    def _plan_blend_leaf(self, call: _Call, leaf: list[Chunked], usages: list[Usage]) -> Deferred[torch.Tensor]:
        """One compel prompt: weights lerp from the empty prompt; each fragment of weight w < 1 also encodes the
        prompt with that fragment masked out, and the encodings are averaged with weights 1 and tan((1-w) pi/2)."""
        base = self._plan_group(call, [leaf], usages)
        rows = [call.rows_for(e, u) for e, u in zip(self.uses, usages)]
        empties = [self._empty_row(r) for r in rows]
        masked = []  # per fragment: its pull, and per encoder the masked rows
        for s, segment in enumerate(leaf[0].segments):
            masks = [_compel_mask(c, s, self.options["truncate"]) for c in leaf]
            if segment.weight >= 1 or any(m is None for m in masks):
                continue
            masked.append(
                (
                    _downweight_factor(segment.weight),
                    [torch.tensor(_chunk_rows(r, c, m)) for r, c, m in zip(rows, leaf, masks)],
                )
            )

        def build() -> torch.Tensor:
            hidden, pooled = base()[0]
            if masked:
                for e, (r, empty) in enumerate(zip(rows, empties)):
                    weights = torch.tensor(leaf[e].weights, dtype=torch.float32, device=r.hidden.device)
                    variants = [hidden[e]] + [
                        lerp_from_empty(r.hidden[idx[e]], r.hidden[empty], weights).flatten(0, 1) for _, idx in masked
                    ]
                    pull = torch.tensor([1.0] + [f for f, _ in masked], dtype=hidden[e].dtype, device=hidden[e].device)
                    pull = pull / pull.sum()
                    hidden[e] = (torch.stack(variants) * pull[:, None, None]).sum(0)
            return self._join(hidden, pooled).hidden

        return build

    @staticmethod
    def _at(node: Node[_Leaf], step: int) -> _Leaf:
        """The conditioning in force at sampler ``step`` (A1111 prompt editing)."""
        if isinstance(node, Schedule):
            node = node.at(step)
        if isinstance(node, Conjunction):
            if len(node.parts) != 1 or node.weights != (1.0,):
                raise BadInput(
                    "A1111 AND / sub-prompt weights are composable diffusion: the sampler combines "
                    "the parts, so there is no single conditioning tensor (use Conditioner.encode_tree)"
                )
            node = node.parts[0]
        return node  # type: ignore[return-value]


def check_finite(leaf: _Leaf, prompt: str | None, front_end: Dialect, options: dict) -> _Leaf:
    """sdclip never hands on a NaN or infinite conditioning: a clear error naming the prompt and what made it (a
    weight beyond float32, one whose product overflows, or a compel ``.blend()`` whose weights sum to 0)."""
    if all(torch.isfinite(t).all() for t in (leaf.hidden, *leaf.pooled)):
        return leaf
    weights: list[float] = []
    zero_blends: list[tuple[float, ...]] = []

    def walk(node: object) -> None:
        if isinstance(node, Schedule):
            for _, conj in node.entries:
                walk(conj)
        elif isinstance(node, (Blend, Conjunction)):
            weights.extend(node.weights)
            if isinstance(node, Blend) and node.normalize and sum(node.weights) == 0:
                zero_blends.append(node.weights)
            for part in node.parts:
                walk(part)
        else:
            weights.extend(s.weight for s in node)  # type: ignore[attr-defined]

    walk(front_end.parse(prompt or "", **options))
    limit = torch.finfo(torch.float32).max
    beyond = [w for w in weights if not abs(w) <= limit]
    if zero_blends:
        why = (
            f".blend() weights {', '.join(f'{w:g}' for w in zero_blends[0])} sum to 0 and compel divides by "
            f"their sum: compel itself gives NaN for this prompt"
        )
    elif beyond:
        why = f"weight {beyond[0]:g} is beyond float32's range (±{limit:.3g})"
    elif weights and max(map(abs, weights)) > 1:
        why = f"weight {max(weights, key=abs):g} makes the conditioning overflow float32"
    else:
        why = "the text encoder's output is not finite (NaN or infinite values in the model's weights?)"
    shown = prompt if prompt is None or len(prompt) <= 120 else prompt[:120] + "..."
    raise BadInput(
        f"{front_end.name} prompt {shown!r}: the conditioning would be NaN or infinite: {why}; weights must "
        f"be finite numbers whose weighted conditioning stays within float32"
    )


def _digest(value: object) -> object:
    """A textual-inversion table entry as a cache-key part: the vectors' bytes, or the vector count."""
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(value.detach().float().cpu().numpy().tobytes()).hexdigest()[:16], tuple(value.shape)
    return value


def _blend(parts: list[torch.Tensor], node: Blend, empty: torch.Tensor) -> torch.Tensor:
    """compel ``.blend()``: the parts padded with empty chunks to one length, summed with their weights
    (divided by their sum unless ``no_normalize``)."""
    parts = _fill(parts, "empty", empty)
    weights = torch.tensor(node.weights, dtype=parts[0].dtype, device=parts[0].device)
    if node.normalize:
        weights = weights / weights.sum()
    return (torch.stack(parts) * weights[:, None, None]).sum(0)


def _concatenate(parts: list[torch.Tensor], node: Conjunction, empty: torch.Tensor) -> torch.Tensor:
    """compel ``.and()``: each part of weight w != 1 lerped from the (repeated) empty prompt, then concatenated."""
    out = []
    for part, w in zip(parts, node.weights):
        if w != 1:
            e = empty.repeat(part.shape[0] // CHUNK_LENGTH, 1)
            part = lerp_from_empty(part, e, torch.full(part.shape[:1], w, device=part.device))
        out.append(part)
    return torch.cat(out)


def encode_many(
    requests: Sequence[tuple[Conditioner, str | Sequence[str], str | Sequence[str] | None, int]],
) -> list[Conditioning | BadInput]:
    """Several ``Conditioner.encode`` calls, (conditioner, prompts, negative, step) each, whose rows run as one:
    conditioners of one ``TextEncoder`` (any dialects and options) share each encoder's forward passes, so a
    server's mixed batch pays the fixed-shape micro-batches' padding once, not once per request.  Each result is
    the bits of that request's own ``encode`` (a row's output is a function of the row alone: ``sdclip.reuse``);
    a request with bad input gets its ``BadInput`` in its place and fails alone."""
    tes = {id(conditioner.te) for conditioner, *_ in requests}
    if len(tes) > 1:
        raise ValueError("encode_many: every conditioner must use the same TextEncoder")
    if not requests:
        return []
    call = _Call(requests[0][0].te)
    finishes: list[Deferred[Conditioning] | BadInput] = []
    for conditioner, prompts, negative, step in requests:
        try:
            finishes.append(conditioner._prepare(call, prompts, negative, step))
        except BadInput as e:  # rows it planned before the error are computed and dropped
            finishes.append(e)
    results: list[Conditioning | BadInput] = []
    with torch.no_grad():
        call.run()
        for finish in finishes:
            try:
                results.append(finish if isinstance(finish, BadInput) else finish())
            except BadInput as e:
                results.append(e)
    return results


def encode_prompts(
    te: TextEncoder,
    prompts: str | Sequence[str],
    negative: str | Sequence[str] | None = None,
    *,
    dialect: str = "diffusers",
    step: int = 0,
    **options,
) -> Conditioning:
    """``Conditioner(te, dialect, **options).encode(prompts, negative, step=step)``: the conditioning a front
    end computes for these prompts (options: ``clip_skip``, ``emphasis``, ``embeddings``, dialect options)."""
    return Conditioner(te, dialect, **options).encode(prompts, negative, step=step)
