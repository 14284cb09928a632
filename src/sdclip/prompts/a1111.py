"""AUTOMATIC1111 stable-diffusion-webui prompts: emphasis, BREAK, ``AND``, prompt editing and alternation,
and its 75-token chunking with comma backtracking and textual-inversion placement.

Written from A1111's documented behaviour and doctests (modules/prompt_parser.py, sd_hijack_clip.py);
the structure here is our own.  Results match A1111 exactly, weights to the last bit (multipliers are
applied in the order A1111 applies them), in linear time where A1111 is quadratic, and without its
recursion limits (more than ``MAX_NESTING`` open brackets is refused; A1111 fails near 400).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BadInput
from ..families import Family
from ..tokenizer import Tokenizer
from .dialect import Dialect, Option, last_layer_number
from .plain import expand
from .types import (
    BREAK,
    CHUNK_LENGTH,
    MAX_NESTING,
    ChunkBuilder,
    Chunked,
    Conjunction,
    Embeddings,
    Entry,
    Node,
    Schedule,
    Segment,
    map_leaves,
    vector_count,
)

EMPHASIS = ("original", "no-norm", "ignore", "none")  # A1111's emphasis modes (conditioning applies them)

ROUND, SQUARE = 1.1, 1 / 1.1
BODY = CHUNK_LENGTH - 2  # prompt tokens per chunk
DEFAULT_STEPS = 20  # A1111's default sampling steps, used where a schedule needs a step count

# --- emphasis -------------------------------------------------------------------------------------
# One token per match: escapes, lone backslash, brackets, a weighted close ":1.2)", text, a colon.
_EMPHASIS_TOKEN = re.compile(
    r"""
    \\[()\[\]\\] | \\ | [(\[] | :\s*(?P<w>[+-]?[.\d]+)\s*\) | [)\]] | [^\\()\[\]:]+ | :
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class _Bracket:
    multiplier: float = 1.0
    closed_at: int = 0  # the order in which A1111 applies the multipliers


def parse(text: str) -> list[Segment]:
    """A1111's emphasis parse: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)`` xw, escapes, BREAK; equal weights merged.

    >>> parse("an (important) word")
    [Segment(text='an ', weight=1.0), Segment(text='important', weight=1.1), Segment(text=' word', weight=1.0)]
    """
    entries: list[tuple[str, float, int]] = []  # text, starting weight, run
    runs: list[tuple[_Bracket, ...]] = []  # the brackets open when each run of entries was added
    round_open: list[_Bracket] = []
    square_open: list[_Bracket] = []
    run_valid = False
    closes = 0

    def add(piece: str, weight: float = 1.0) -> None:
        nonlocal run_valid
        if not run_valid:
            if len(round_open) + len(square_open) > MAX_NESTING:
                raise BadInput(f"prompt brackets are nested more than {MAX_NESTING} deep")
            runs.append((*round_open, *square_open))
            run_valid = True
        entries.append((piece, weight, len(runs) - 1))

    def close(stack: list[_Bracket], multiplier: float) -> None:
        nonlocal run_valid, closes
        bracket = stack.pop()
        bracket.multiplier, bracket.closed_at = multiplier, closes
        closes += 1
        run_valid = False

    for m in _EMPHASIS_TOKEN.finditer(text):
        tok, w = m.group(), m.group("w")
        if tok[0] == "\\":
            add(tok[1:])
        elif tok in "([":
            (round_open if tok == "(" else square_open).append(_Bracket())
            run_valid = False
        elif w is not None and round_open:
            try:
                close(round_open, float(w))
            except ValueError:
                raise BadInput(f"A1111 cannot read the weight {w!r} in {tok!r}") from None
        elif tok == ")" and round_open:
            close(round_open, ROUND)
        elif tok == "]" and square_open:
            close(square_open, SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    add(BREAK.text, BREAK.weight)
                add(part)
    # brackets left open apply after all others: round ones first, each kind outermost first
    for n, b in enumerate(round_open):
        b.multiplier, b.closed_at = ROUND, closes + n
    for n, b in enumerate(square_open):
        b.multiplier, b.closed_at = SQUARE, closes + len(round_open) + n
    folded: dict[tuple[int, float], float] = {}

    out: list[Segment] = []
    texts: list[str] = []
    for piece, start, run in entries:
        weight = folded.get((run, start))
        if weight is None:
            weight = start
            for b in sorted(runs[run], key=lambda b: b.closed_at):
                weight *= b.multiplier
            folded[run, start] = weight
        if out and out[-1].weight == weight:
            texts.append(piece)
            continue
        if out:
            out[-1] = Segment("".join(texts), out[-1].weight)
        out.append(Segment(piece, weight))
        texts = [piece]
    if not out:
        return [Segment("", 1.0)]
    out[-1] = Segment("".join(texts), out[-1].weight)
    bad = next((s for s in out if not math.isfinite(s.weight)), None)
    if bad is not None:
        raise BadInput(f"the weight of {bad.text!r} overflows ({bad.weight})")
    return out


# --- AND --------------------------------------------------------------------------------------------
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion sub-prompts and their weights: ``a AND b :0.5`` -> [("a", 1.0), (" b", 0.5)]."""
    out = []
    for sub in _AND.split(prompt):
        text, weight = sub.rstrip(), 1.0
        colon = text.rfind(":")
        if colon >= 0 and _AND_WEIGHT.fullmatch(text[colon + 1 :].lstrip()):
            text, weight = text[:colon].rstrip(), float(text[colon + 1 :])
        out.append((text, weight))
    return out


# --- prompt editing and alternation ----------------------------------------------------------------
# lark's SIGNED_NUMBER, which A1111's grammar uses for the step
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")


@dataclass
class _Group:
    """A bracket group of the schedule grammar: its pieces (split at its own ``:`` or ``|``) hold text and
    nested groups."""

    open: str
    pieces: list[list] = field(default_factory=lambda: [[]])
    seps: str = ""
    ok: bool = True
    kind: str = ""  # "emphasis", "scheduled", "alternate"
    number: str = ""
    when: int = 0


def _schedule_tree(text: str) -> list | None:
    """The prompt as text and valid bracket groups, or None where A1111's grammar rejects it (the
    prompt is then used as it is).

    A group is valid when everything inside is text or valid groups and its own separators fit one
    rule: ``(a)``, ``(a:b)``, ``[a]``, ``[a|b|...]``, ``[a:when]``, ``[a:b:when]``.  Groups that are
    not valid are literal text; a ``|`` outside an alternation, or a backslash before a newline or at
    the end, makes the whole prompt invalid.

    One known difference: A1111's grammar is ambiguous where a valid ``[...]`` group is directly
    followed by two or more stray brackets or colons (``[a:b:3]::``); its Earley parser then sometimes
    reads the group as text, depending on lark's internal ordering.  We always read it as a group.
    """
    top: list = []
    stack: list[_Group] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            (stack[-1].pieces[-1] if stack else top).append("".join(buf))
            buf.clear()

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return None
            buf.append(text[i : i + 2])
            i += 2
            continue
        if c in "([":
            flush()
            if len(stack) >= MAX_NESTING:
                raise BadInput(f"prompt brackets are nested more than {MAX_NESTING} deep")
            stack.append(_Group(c))
        elif c in ")]":
            flush()
            if stack and stack[-1].open == "([)]"[")]".index(c)]:
                g = stack.pop()
                g.ok = g.ok and _classify(g)
                if stack:
                    stack[-1].pieces[-1].append(g)
                    stack[-1].ok = stack[-1].ok and g.ok
                else:
                    top.append(g)
            elif stack:
                stack[-1].ok = False
                stack[-1].pieces[-1].append(c)
            else:
                top.append(c)
        elif c in ":|":
            flush()
            if stack:
                stack[-1].seps += c
                stack[-1].pieces.append([])
            elif c == "|":
                return None
            else:
                top.append(c)
        else:
            buf.append(c)
        i += 1
    flush()
    while stack:  # never closed: the bracket is text, its valid inner groups stay groups
        g = stack.pop()
        (stack[-1].pieces[-1] if stack else top).extend(_as_text(g, open_only=True))
        if stack:
            stack[-1].ok = False
    return _resolve(top)


def _classify(g: _Group) -> bool:
    """Whether a closed group fits one of the grammar's rules (and which)."""
    colons, pipes = g.seps.count(":"), g.seps.count("|")
    if g.open == "(":
        g.kind = "emphasis"
        return pipes == 0 and colons <= 1
    if not g.seps:
        g.kind = "emphasis"
        return True
    if colons == 0:
        g.kind = "alternate"
        return True
    if pipes or colons > 2:
        return False
    last = g.pieces[-1]
    if len(last) > 1 or (last and not isinstance(last[0], str)):
        return False
    s = last[0] if last else ""
    m = _NUMBER.match(s, _SPACE.match(s).end())
    if m is None or _SPACE.fullmatch(s, m.end()) is None:
        return False
    g.kind, g.number = "scheduled", m.group()
    return True


def _as_text(g: _Group, open_only: bool = False) -> list:
    """An invalid group as literal text around its pieces (whose valid groups stay groups)."""
    out: list = [g.open]
    for k, piece in enumerate(g.pieces):
        if k:
            out.append(g.seps[k - 1])
        out.extend(piece)
    if not open_only:
        out.append(")" if g.open == "(" else "]")
    return out


def _resolve(nodes: list) -> list | None:
    """Replace invalid groups by their text, recursively; None if a ``|`` ends up outside an alternation."""
    out: list = []
    work = list(reversed(nodes))
    while work:
        node = work.pop()
        if isinstance(node, str):
            if node == "|":
                return None
            out.append(node)
        elif node.ok:
            for k, piece in enumerate(node.pieces):
                resolved = _resolve(piece)
                if resolved is None:
                    return None
                node.pieces[k] = resolved
            out.append(node)
        else:
            work.extend(reversed(_as_text(node)))
    return out


def _when(number: str, steps: int, base_steps: int, hires: bool, old: bool) -> int:
    """The step after which a ``[a:b:number]`` switches (A1111 clamps to ``steps``; an infinite number too)."""
    v = float(number)
    if old:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = (v - (1.0 if hires else 0.0)) * steps
    else:
        v = v - (base_steps if hires else 0)
    return steps if v >= steps else (int(v) if math.isfinite(v) else -1)


def _render(nodes: list, step: int, out: list[str]) -> None:
    """The text at ``step``: groups replaced by the piece in force, emphasis kept as written."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node.kind == "scheduled":
            if step <= node.when:
                if len(node.pieces) == 3:
                    _render(node.pieces[0], step, out)
            else:
                _render(node.pieces[-2], step, out)
        elif node.kind == "alternate":
            _render(node.pieces[(step - 1) % len(node.pieces)], step, out)
        else:
            out.append(node.open)
            for k, piece in enumerate(node.pieces):
                if k:
                    out.append(":")
                _render(piece, step, out)
            out.append(")" if node.open == "(" else "]")


def _boundaries(nodes: list, steps: int, when: Callable[[str], int]) -> set[int]:
    """The steps at which the prompt changes (and store each scheduled group's switch step)."""
    out = {steps}
    work = list(nodes)
    while work:
        node = work.pop()
        if isinstance(node, str):
            continue
        if node.kind == "scheduled":
            node.when = when(node.number)
            if node.when >= 1:
                out.add(node.when)
        elif node.kind == "alternate":
            out.update(range(1, steps + 1))
        for piece in node.pieces:
            work.extend(piece)
    return out


def schedule_text(
    text: str, steps: int, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """Prompt editing and alternation of one sub-prompt: ``[(until_step, text), ...]`` as A1111 computes it.

    ``[a:b:when]`` switches from a to b after ``when`` (with a ``.``: a fraction of the steps; without:
    a step number; ``old_scheduling``: below 1 a fraction); ``[a:when]`` adds, ``[a::when]`` removes;
    ``[a|b]`` alternates every step.  With ``hires_steps`` the numbers refer to the second pass (A1111's
    hires-fix rule: ``1.5`` is half way through it, an integer counts on from ``steps``).
    """
    if steps < 1 or (hires_steps is not None and hires_steps < 1):
        raise BadInput(f"steps must be at least 1 (got {steps}, hires {hires_steps})")
    hires = hires_steps is not None and not old_scheduling
    total = hires_steps if hires else steps
    tree = _schedule_tree(text) if "[" in text else None
    if tree is None:
        return [(total, text)]
    bounds = _boundaries(tree, total, lambda s: _when(s, total, steps, hires, old_scheduling))
    out = []
    for t in sorted(bounds):
        parts: list[str] = []
        _render(tree, t, parts)
        out.append((t, "".join(parts)))
    return out


def schedule(
    prompt: str, steps: int = DEFAULT_STEPS, hires_steps: int | None = None, old_scheduling: bool = False
) -> Schedule[str]:
    """The whole prompt's timeline: ``AND`` sub-prompts with their weights, each scheduled; the leaves
    are the texts A1111 hands to its emphasis parser at each step range."""
    subs = split_and(prompt)
    per_sub = [schedule_text(text, steps, hires_steps, old_scheduling) for text, _ in subs]
    weights = tuple(w for _, w in subs)
    entries = []
    for t in sorted({t for s in per_sub for t, _ in s}):
        texts = tuple(next(txt for until, txt in s if until >= t) for s in per_sub)
        entries.append((t, Conjunction(texts, weights)))
    return Schedule(per_sub[0][-1][0], tuple(entries))


def parse_prompt(
    prompt: str, steps: int = DEFAULT_STEPS, hires_steps: int | None = None, old_scheduling: bool = False
) -> Node[list[Segment]]:
    """Segments for a simple prompt; a ``Schedule`` of segment lists where ``AND``, a sub-prompt
    weight, prompt editing or alternation is used."""
    sched = schedule(prompt, steps, hires_steps, old_scheduling)
    if len(sched.entries) == 1 and sched.entries[0][1].weights == (1.0,):
        return parse(sched.entries[0][1].parts[0])
    return map_leaves(sched, parse)


# --- chunking ---------------------------------------------------------------------------------------
def _ti_table(embeddings: Embeddings | None, tokenizer: Tokenizer) -> dict[int, list[tuple[list[int], str]]]:
    """Embedding names as token sequences, by first token, longest first (A1111 matches names on tokens)."""
    table: dict[int, list[tuple[list[int], str]]] = {}
    for name, value in (embeddings or {}).items():
        ids = tokenizer.tokenize(name)
        if not ids:
            continue
        if vector_count(value) > BODY:
            raise BadInput(f"embedding {name!r} has {vector_count(value)} vectors; at most {BODY} fit in a chunk")
        table.setdefault(ids[0], []).append((ids, name))
    for entries in table.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return table


def chunk(
    text: str,
    tokenizer: Tokenizer,
    *,
    pad_id: int | None = None,
    embeddings: Embeddings | None = None,
    comma_backtrack: int = 20,
    emphasis: bool = True,
) -> Chunked:
    """Token ids and weights of one scheduled sub-prompt, chunked as A1111's ``tokenize_line`` does.

    Each weighted segment is tokenized on its own; chunks take 75 tokens; when a chunk fills and the
    last comma is at most ``comma_backtrack`` tokens back, what follows the comma moves to the next
    chunk (0 disables); BREAK starts a new chunk; an embedding's vectors never straddle chunks.  Chunks
    are padded with EOS; with ``pad_id`` (SD2, SDXL bigG: 0) everything after the first EOS becomes
    ``pad_id``.  ``emphasis=False`` is A1111's emphasis "None": the text is taken literally, no BREAK.

    Unlike A1111 (whose fixes stay behind, a bug), an embedding moved by comma backtracking takes its
    slots along.
    """
    segments = parse(text) if emphasis else [Segment(text, 1.0)]
    comma = tokenizer.encoder.get(",</w>")
    table = _ti_table(embeddings, tokenizer)
    out = ChunkBuilder(tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_id)
    body: list[Entry] = []
    last_comma = -1
    token_count = 0

    def next_chunk(is_last: bool = False) -> None:
        nonlocal body, last_comma, token_count
        token_count += len(body) if is_last else BODY
        out.add(body)
        body, last_comma = [], -1

    for si, seg in enumerate(segments):
        if seg.is_break:
            next_chunk()
            continue
        toks = tokenizer.tokenize(seg.text)
        pos = 0
        while pos < len(toks):
            tok = toks[pos]
            if tok == comma:
                last_comma = len(body)
            elif comma_backtrack and len(body) == BODY and last_comma != -1 and BODY - last_comma <= comma_backtrack:
                moved = body[last_comma + 1 :]
                body = body[: last_comma + 1]
                next_chunk()
                body = moved
            if len(body) == BODY:
                next_chunk()
            match = next(((m, name) for m, name in table.get(tok, ()) if toks[pos : pos + len(m)] == m), None)
            if match is None:
                body.append(Entry(tok, seg.weight, si))
                pos += 1
                continue
            m, name = match
            vectors = expand([name], embeddings, seg.weight, si)
            if len(body) + len(vectors) > BODY:
                next_chunk()
            body += vectors
            pos += len(m)
    if body or not out.ids:
        next_chunk(is_last=True)
    if pad_id is not None and pad_id != tokenizer.eos_id:
        for row in out.ids:
            first = row.index(tokenizer.eos_id)
            row[first + 1 :] = [pad_id] * (len(row) - first - 1)
    return out.result(segments, token_count)


def chunk_prompt(
    prompt: str,
    tokenizer: Tokenizer,
    *,
    steps: int = DEFAULT_STEPS,
    hires_steps: int | None = None,
    old_scheduling: bool = False,
    **options,
) -> Node[Chunked]:
    """``chunk`` applied to every leaf of ``parse_prompt``'s tree (``options`` go to ``chunk``)."""
    sched = schedule(prompt, steps, hires_steps, old_scheduling)
    if len(sched.entries) == 1 and sched.entries[0][1].weights == (1.0,):
        return chunk(sched.entries[0][1].parts[0], tokenizer, **options)
    return map_leaves(sched, lambda text: chunk(text, tokenizer, **options))


# --- the front end ------------------------------------------------------------------------------------
EMPHASIS = ("original", "no-norm", "ignore", "none")  # A1111's emphasis settings


class A1111(Dialect):
    """AUTOMATIC1111: ``AND`` and prompt editing (each sub-prompt's texts encoded together); emphasis multiplies
    and restores the mean; a batch's prompts filled with their last vector, prompts and negatives with empty
    chunks; ``clip_skip=N`` counts from the last layer (SD1 only); embeddings by file name, skipped unless they
    fit every encoder; SDXL's empty negative is zeros."""

    name = "a1111"
    title = "A1111"
    clip_skip_help = "N, 1 = last layer"
    options = (
        Option(
            "steps",
            "--steps",
            "parse",
            "sampling steps for AND / prompt editing (default 20)",
            {"type": int, "default": DEFAULT_STEPS},
        ),
        Option(
            "emphasis",
            "--emphasis",
            "encode",
            "emphasis mode (default original)",
            {"choices": EMPHASIS},
            value=lambda args: args.emphasis or "original",
        ),
        Option(
            "step",
            "--step",
            "encode",
            "the sampler step whose prompt editing to encode (default 0)",
            {"type": int, "default": 0},
        ),
        Option(
            "comma_backtrack",
            "--comma-backtrack",
            "chunk",
            "comma padding backtrack (default 20, 0 = off)",
            {"type": int, "default": 20},
        ),
    )
    structure = "schedule"
    weighting = "emphasis"
    batch_fill = "last"
    unfit_embedding = "skip"

    def parse(self, text: str, **options: Any) -> Node[list[Segment]]:
        """``options``: the schedule's (steps, hires_steps, old_scheduling); the others are the chunker's."""
        return parse_prompt(text, **{k: options[k] for k in ("steps", "hires_steps", "old_scheduling") if k in options})

    def chunk(self, text: str, tokenizer: Tokenizer, **options: Any) -> Node[Chunked]:
        return chunk_prompt(text, tokenizer, **options)

    def leaf(
        self,
        leaf: str,
        tokenizer: Tokenizer,
        pad_id: int,
        embeddings: Embeddings,
        *,
        emphasis: str = "original",
        comma_backtrack: int = 20,
        **options: Any,
    ) -> Chunked:
        return chunk(
            leaf,
            tokenizer,
            pad_id=pad_id,
            embeddings=embeddings,
            emphasis=emphasis != "none",
            comma_backtrack=comma_backtrack,
        )

    def check(self, emphasis: str = "original", **options: Any) -> None:
        """Refuse an unknown emphasis setting."""
        if emphasis not in EMPHASIS:
            raise BadInput(f"unknown emphasis {emphasis!r}; choose one of {', '.join(EMPHASIS)}")

    def parts(self, prompt: str, negative: bool) -> list[str]:
        """The ``AND`` sub-prompts (negative prompts are not split)."""
        return [text for text, _ in split_and(prompt)] if not negative else [prompt]

    def timeline(
        self,
        text: str,
        *,
        steps: int = DEFAULT_STEPS,
        hires_steps: int | None = None,
        old_scheduling: bool = False,
        **options: Any,
    ) -> list[str]:
        """One sub-prompt's texts over the sampler steps: A1111 encodes them together."""
        return [t for _, t in schedule_text(text, steps, hires_steps, old_scheduling)]

    def schedule_of(
        self,
        prompt: str,
        negative: bool,
        *,
        steps: int = DEFAULT_STEPS,
        hires_steps: int | None = None,
        old_scheduling: bool = False,
        **options: Any,
    ) -> Schedule[str]:
        """The prompt's schedule of sub-prompt texts (a negative prompt: one part)."""
        if not negative:
            return schedule(prompt, steps, hires_steps, old_scheduling)
        timeline = schedule_text(prompt, steps, hires_steps, old_scheduling)
        return Schedule(timeline[-1][0], tuple((until, Conjunction((text,), (1.0,))) for until, text in timeline))

    def skipped_layers(self, clip_skip: int, family: Family) -> int | None:
        n = last_layer_number(self, clip_skip)
        if not family.a1111_clip_skip:
            if n != 1:
                warnings.warn(f"A1111 ignores clip skip for {family.name} models", stacklevel=4)
            return None
        return n - family.clip_skip_base

    def zero_negative(self, negative: str | None, family: Family) -> bool:
        return not negative and family.a1111_zero_negative


DIALECT = A1111()
