"""compel prompts (damian0815/compel 2.x): ``word+`` / ``word-``, ``(words)++`` / ``(words)0.8``,
``.attend()``, ``("a", "b").blend(0.7, 0.3)``, ``("a", "b").and()``, ``.swap()``, ``withLora()``, and
compel's chunking: truncated to 77 by default, or split at sentence / phrase / word ends.

compel parses with pyparsing; this is our own recursive-descent parser that reads the same language the
same way (ordered choice, the same whitespace rules, the same quirks: words are joined with single
spaces, ``a,b`` becomes ``a, b``, A1111's ``(x:1.2)`` is plain text ``x:1 . 2``).  Where pyparsing
backtracks exponentially in the nesting depth (compel takes seconds at 5 levels), results here are
memoised: linear time.  Prompts compel cannot parse, or on which it raises, give ``BadInput``; prompts
with nothing to encode (``()``, where compel fails later) are the empty prompt.
"""

from __future__ import annotations

import re
import string
from typing import Any

from ..errors import BadInput
from ..tokenizer import Tokenizer
from .dialect import Dialect, Option
from .plain import chunk as plain_chunk
from .plain import expand, name_pattern, units
from .types import (
    CHUNK_LENGTH,
    MAX_NESTING,
    Blend,
    ChunkBuilder,
    Chunked,
    Conjunction,
    Embeddings,
    Entry,
    Node,
    Segment,
    map_leaves,
)

_SKIP = " \n\t\r"  # whitespace pyparsing skips before a token
_SPACE = frozenset(string.whitespace)  # what ends a word
_SYNTAX = '()",.+-='
_ESCAPES = frozenset("\\" + c for c in _SYNTAX)
_WHITE = " \t\r\n"  # what pyparsing's White() matches ...
_WHITE_LEAD = "\x0c\xa0\u1680\u180e\u200b\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))  # ... after
_KEYWORD = frozenset(string.ascii_letters + string.digits + "_-")  # LoRA and option names
_DIGITS = frozenset(string.digits)
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_QUOTED = re.compile(r'"(?:\\"|[^"\n\r])*"')
# pyparsing's unquoting of "..." (with its octal/hex/unicode patterns exactly as it compiles them)
_UNQUOTE = re.compile(r"(\\[tnfr])|(\\[0-7]3|\\0|\\x[0-9a-fA-F]2|\\u[0-9a-fA-F]4)|(.)", re.S)
_WS_ESCAPES = {"\\t": "\t", "\\n": "\n", "\\f": "\f", "\\r": "\r"}
_BACKSLASHES = re.compile(r'(?<!\\)\\+(?=[()"])')
PLUS, MINUS = 1.1, 0.9
# compel itself needs seconds at 5 nested brackets and hours at 10; this parser recurses ~7 frames per
# level, so it stops well inside Python's recursion limit.
MAX_DEPTH = MAX_NESTING // 2
SPLIT_MODES = ("sentences", "phrases", "words", "brutal")


def _unescape(text: str, times: int = 1) -> str:
    """What compel's Fragment does to every text it is given (so, several times over): each time, a run
    of backslashes before ``(``, ``)`` or ``"`` loses one backslash."""
    if "\\" not in text:
        return text
    return _BACKSLASHES.sub(lambda m: m.group()[: max(0, len(m.group()) - times)], text)


def _unquote(body: str) -> str:
    """The text of a ``"..."`` as pyparsing's QuotedString hands it over (escapes converted)."""

    def one(m: re.Match) -> str:
        if m[1]:
            return _WS_ESCAPES[m[1]]
        if m[2]:
            s = m[2][1:]
            return "\0" if s == "0" else chr(int(s[1:], 16)) if s[0] in "ux" else s
        return m[3]

    return _UNQUOTE.sub(one, body).replace('\\"', '"')


class _Fail(Exception):
    """compel raises on this prompt."""


class _Parser:
    """compel's grammar over one string.  Methods take a position and return (end, value) or None."""

    def __init__(self, s: str):
        self.s, self.n = s, len(s)
        self.memo: dict[tuple, tuple | None] = {}

    def skip(self, i: int) -> int:
        s, n = self.s, self.n
        while i < n and s[i] in _SKIP:
            i += 1
        return i

    def lit(self, i: int | None, word: str) -> int | None:
        if i is None:
            return None
        j = self.skip(i)
        return j + len(word) if self.s.startswith(word, j) else None

    def memoised(self, rule, i: int, *args):
        key = (rule.__name__, i, *args)
        if key not in self.memo:
            self.memo[key] = rule(i, *args)
        return self.memo[key]

    # --- words ---------------------------------------------------------------------------------
    def word(self, i: int):
        """A word without syntax: escaped symbols, ``+``/``-`` inside a word, other non-space characters."""
        s, n = self.s, self.n
        j = k = self.skip(i)
        while k < n:
            if s[k] == "\\" and s[k : k + 2] in _ESCAPES:
                k += 2
            elif s[k] in "+-":
                if k + 1 >= n or s[k + 1] in _WHITE or s[k + 1] in _SYNTAX:
                    break
                k += 1
            elif s[k] in _SPACE or s[k] in _SYNTAX:
                break
            else:
                k += 1
        return (k, [("f", _unescape(s[j:k]))]) if k > j else None

    def free_word(self, i: int):
        s, n = self.s, self.n
        k = i
        while k < n and s[k] not in _SPACE:
            k += 1
        return (k, [("f", _unescape(s[i:k]))]) if k > i else None

    def white(self, i: int):
        s, n = self.s, self.n
        while i < n and s[i] in _WHITE_LEAD:
            i += 1
        k = i
        while k < n and s[k] in _WHITE:
            k += 1
        return (k, []) if k > i else None

    def run(self, i: int, chars: str, value=None):
        j = k = self.skip(i)
        while k < self.n and self.s[k] in chars:
            k += 1
        return (k, self.s[j:k] if value is None else value(self.s[j:k])) if k > j else None

    def number(self, i: int):
        """A float (``1.5``, ``.5``, ``1.``) or an integer; the value is the matched text."""
        j = self.skip(i)
        m = _REAL.match(self.s, j)
        if m:
            return m.end(), m.group()
        k = j + (self.s.startswith("-", j))
        e = k
        while e < self.n and self.s[e] in _DIGITS:
            e += 1
        return (e, self.s[j:e]) if e > k else None

    # --- bracketed and quoted fragments ----------------------------------------------------------
    def quoted(self, i: int, inner: str):
        j = self.skip(i)
        m = _QUOTED.match(self.s, j) if j < self.n and self.s[j] == '"' else None
        if m is None:
            return None
        body = _unquote(m.group()[1:-1])
        if not body.strip():
            return m.end(), [("f", "")]
        sub = _Parser(body.replace('"', '\\"').expandtabs())
        end, value = sub.fragments(0, True) if inner == "fragments" else sub.prompt(0)
        return (m.end(), value) if sub.skip(end) == sub.n else None

    def paren(self, i: int):
        j = self.lit(i, "(")
        if j is None:
            return None
        k, items = self.fragments(j, True)
        e = self.lit(k, ")")
        return (e, items) if e is not None else None

    def fragments(self, i: int, commas: bool):
        """Words, groups and operators (and, if ``commas``, ``,`` and ``.``) until none matches."""
        items: list = []
        while True:
            r = (
                self.memoised(self.lora, i)
                or self.memoised(self.attention, i)
                or self.memoised(self.swap, i)
                or self.memoised(self.paren, i)
                or self.memoised(self.quoted, i, "fragments")
                or self.memoised(self.word, i)
            )
            if r is None and commas:
                j = self.skip(i)
                r = (j + 1, [("f", self.s[j])]) if j < self.n and self.s[j] in ",." else None
            if r is None:
                return i, items
            i = r[0]
            items += r[1]

    def target(self, i: int):
        """What an operator applies to: a quoted fragment, a bracketed fragment or a word."""
        return self.memoised(self.quoted, i, "fragments") or self.memoised(self.paren, i) or self.memoised(self.word, i)

    # --- operators -------------------------------------------------------------------------------
    def weight(self, i: int):
        j = self.skip(i)
        if j < self.n and self.s[j] in "+-":
            return self.run(j, self.s[j], lambda r: (PLUS if r[0] == "+" else MINUS) ** len(r))
        r = self.number(i)
        return (r[0], float(r[1])) if r else None

    def attention(self, i: int):
        t = self.target(i)
        if t is not None:  # target.attend(weight)
            k = self.lit(self.lit(t[0], ".attend"), "(")
            w = self.weight(k) if k is not None else None
            e = self.lit(w[0], ")") if w else None
            if e is not None:
                return e, [("a", w[1], t[1])]
        t = self.memoised(self.quoted, i, "fragments") or self.memoised(self.paren, i)
        if t is not None and self.white(t[0]) is None:  # (words)weight, "words"weight
            w = self.weight(t[0])
            return (w[0], [("a", w[1], t[1])]) if w else None
        t = self.memoised(self.word, i)
        if t is not None and self.white(t[0]) is None:  # word+++ / word--
            j = self.skip(t[0])
            if j < self.n and self.s[j] in "+-":
                w = self.run(j, self.s[j], lambda r: (PLUS if r[0] == "+" else MINUS) ** len(r))
                return w[0], [("a", w[1], t[1])]
        return None

    def swap(self, i: int):
        t = self.target(i)
        k = self.lit(self.lit(t[0], ".swap"), "(") if t else None
        if k is None:
            return None
        k, edited = self.fragments(k, False)
        opts: list = []
        c = self.lit(k, ",")
        if c is not None:
            k, opts = self.options(c)
        e = self.lit(k, ")")
        if e is None:
            return None
        if any(g[0] == "shape_freedom" and not isinstance(g[-1], float) for g in opts):
            raise _Fail("shape_freedom must be a number")
        return e, [("s", t[1], edited)]

    def lora(self, i: int):
        j = self.skip(i)
        k = j + 7 if self.s.startswith("useLora", j) else j + 8 if self.s.startswith("withLora", j) else None
        k = self.lit(k, "(")
        name = self.run(k, _KEYWORD) if k is not None else None
        if name is None:
            return None
        k = name[0]
        c = self.lit(k, ",")
        num = self.number(c) if c is not None else None
        e = self.lit(num[0] if num else k, ")")
        return (e, []) if e is not None else None

    def option(self, i: int):
        kw = self.run(i, _KEYWORD)
        if kw is not None:
            e = self.lit(kw[0], "=")
            if e is not None:
                num = self.number(e)
                if num is not None:
                    return num[0], (kw[1], float(num[1]))
                v = self.run(e, _KEYWORD)
                if v is not None:
                    return v[0], (kw[1], v[1])
        num = self.number(i)
        if num is not None:
            return num[0], (num[1],)
        return (kw[0], (kw[1],)) if kw else None

    def options(self, i: int):
        groups: list = []
        r = self.option(i)
        while r is not None:
            i = r[0]
            groups.append(r[1])
            c = self.lit(i, ",")
            r = self.option(c) if c is not None else None
        return i, groups

    # --- whole prompts -------------------------------------------------------------------------
    def prompt(self, i: int):
        items: list = []
        while True:
            r = (
                self.memoised(self.swap, i)
                or self.memoised(self.lora, i)
                or self.memoised(self.attention, i)
                or self.memoised(self.quoted, i, "fragments")
                or self.memoised(self.paren, i)
                or self.free_word(i)
                or self.white(i)
            )
            if r is None:
                return i, items
            i = r[0]
            items += r[1]

    def combination(self, i: int, operators: tuple[str, ...]):
        """``(a, b, ...).blend(weights)`` / ``.and(weights)``: (end, parts, option groups, operator)."""
        k = self.lit(i, "(")
        parts = []
        while k is not None:
            r = self.target(k) or self.memoised(self.quoted, k, "prompt")
            if r is None:
                break
            k = r[0]
            parts.append(r[1])
            c = self.lit(k, ",")
            if c is None or (self.target(c) or self.memoised(self.quoted, c, "prompt")) is None:
                break
            k = c
        if not parts:
            return None
        k = self.lit(k, ")")
        op = next((o for o in operators if self.lit(k, o) is not None), None)
        k = self.lit(self.lit(k, op), "(") if op else None
        if k is None:
            return None
        k, opts = self.options(k)
        e = self.lit(k, ")")
        return (e, parts, opts, op) if e is not None else None

    def loras(self, i: int) -> int:
        r = self.lora(i)
        while r is not None:
            i = r[0]
            r = self.lora(i)
        return i


def _weights(opts: list, count: int, what: str) -> list[float]:
    try:
        weights = [float(g[0]) for g in opts]
    except ValueError as e:
        raise _Fail(f"{what} weights: {e}") from None
    if weights and len(weights) != count:
        raise _Fail(f"{what}: {count} prompts but {len(weights)} weights")
    return weights or [1.0] * count


def _flatten(nodes: list, scale: float, out: list) -> list:
    """Fragments with their weights (products from the outside in, as compel multiplies)."""
    for node in nodes:
        if node[0] == "f":
            out.append(Segment(_unescape(node[1]), 1.0 * scale))
        elif node[0] == "a":
            _flatten(node[2], scale * node[1], out)
        elif node[0] == "s":
            out.append(_fuse(_flatten(node[1], scale, [])) or [Segment("", 1.0)])
    return out


def _fuse(items: list) -> list:
    """Join neighbouring fragments of equal weight with a space (a ``.swap`` keeps its own fragments).

    compel joins them pairwise, unescaping the growing text each time: the first two parts of a run of
    m are unescaped m - 1 more times, part i (from 2) m - i + 1 times; spaces keep the parts apart.
    """
    out: list = []
    run: list[Segment] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            m = len(run)
            texts = [_unescape(x.text, m - max(i, 2) + 1) for i, x in enumerate(run, 1)]
            out.append(Segment(" ".join(texts), run[0].weight))
        run.clear()

    for x in items:
        if not isinstance(x, Segment):
            flush()
            out.append(x)
        elif run and run[-1].weight != x.weight:
            flush()
            run.append(x)
        else:
            run.append(x)
    flush()
    return out


def _leaf(nodes: list) -> list[Segment]:
    """The fragments compel encodes for one prompt: a ``.swap`` contributes its original side."""
    out: list[Segment] = []
    for x in _fuse(_flatten(nodes, 1.0, [])):
        out.extend(x if isinstance(x, list) else [x])
    return out


def _has_swap(nodes: list) -> bool:
    """Whether a ``.swap()`` is anywhere in the nodes (compel refuses one inside a blend)."""
    return any(n[0] == "s" or (n[0] == "a" and _has_swap(n[2])) for n in nodes)


def _depth(text: str) -> int:
    """The deepest bracket nesting, escapes skipped."""
    depth = top = 0
    for c in re.findall(r"\\.|[()]", text):
        depth += (c == "(") - (c == ")")
        top = max(top, depth)
    return top


def parse(prompt: str) -> Node[list[Segment]]:
    """compel's parse: segments, or a ``Blend`` / ``Conjunction`` of segment lists."""
    prompt = re.sub(r",(\S)", r", \1", prompt)  # compel puts a space after every comma
    if not prompt.strip():
        return [Segment("", 1.0)]
    if _depth(prompt) > MAX_DEPTH:
        raise BadInput(f"prompt brackets are nested more than {MAX_DEPTH} deep")
    p = _Parser(prompt.expandtabs())
    try:
        parts, weights = _parse(p)
    except _Fail as e:
        raise BadInput(f"compel rejects this prompt: {e}") from None
    if not parts:
        return [Segment("", 1.0)]
    if len(parts) == 1 and weights[0] == 1.0:
        return parts[0]
    return Conjunction(tuple(parts), tuple(weights))


def _parse(p: _Parser) -> tuple[list, list[float]]:
    """(parts, weights) of the top-level conjunction; an explicit ``.and()`` ignores text after it."""
    conj = p.combination(p.skip(0), (".and", ".add"))
    if conj is not None:
        _, groups, opts, _ = conj
        weights = _weights(opts, len(groups), "and")
        return _parts([(g, w) for g, w in zip(groups, weights)])
    i = p.loras(0)
    blend = p.combination(i, (".blend",))
    if blend is not None:
        i, groups, opts, _ = blend
        normalize = not (opts and opts[-1][0] == "no_normalize")
        weights = _weights(opts[:-1] if not normalize else opts, len(groups), "blend")
        if any(_has_swap(g) for g in groups):
            raise _Fail("a .swap() cannot be part of a blend")
        leaves = [_leaf(g) for g in groups if _leaf(g)]
        if len(leaves) != len(weights):
            raise _Fail(f"blend: {len(leaves)} prompts but {len(weights)} weights")
        value: object = Blend(tuple(leaves), tuple(weights), normalize)
    else:
        i, items = p.prompt(i)
        value = _leaf(items) or None
    if p.skip(p.loras(i)) != p.n:
        raise _Fail(f"cannot read {p.s[p.skip(p.loras(i)) :][:20]!r}")
    return ([value], [1.0]) if value is not None else ([], [])


def _parts(groups: list) -> tuple[list, list[float]]:
    parts, weights = [], []
    for g, w in groups:
        leaf = _leaf(g)
        if leaf:
            parts.append(leaf)
            weights.append(w)
    return parts, weights


# --- chunking ---------------------------------------------------------------------------------------
def _split_point(body: list[Entry], tokenizer: Tokenizer, mode: str, room: int) -> int:
    """Where compel ends a chunk of a long prompt: after the last sentence end, else phrase end, else
    word end within the first 75 tokens (from ``mode`` down), else at 75."""
    if len(body) <= room or mode == "brutal":
        return room
    texts = [tokenizer.token_text(e.id) if e.embedding is None else "" for e in body[:room]]
    tests = {
        "sentences": lambda t: t == ".</w>",
        "phrases": lambda t: t in (".</w>", ",</w>", ";</w>", ":</w>"),
        "words": lambda t: t.endswith("</w>"),
    }
    for m in SPLIT_MODES[SPLIT_MODES.index(mode) : -1]:
        for k in range(len(texts) - 1, -1, -1):
            if tests[m](texts[k]):
                return k + 1
    return room


def chunk_segments(
    segments: list[Segment],
    tokenizer: Tokenizer,
    *,
    pad_id: int | None = None,
    embeddings: Embeddings | None = None,
    truncate: bool = True,
    split: str = "sentences",
) -> Chunked:
    """compel's token ids and weights for one prompt's fragments (``EmbeddingsProvider``).

    Each fragment is tokenized on its own.  ``truncate`` (compel's default): each fragment, then the
    whole, is cut to 75 tokens: one chunk.  ``truncate=False`` (``truncate_long_prompts=False``): chunks
    of up to 75 tokens ending after the last ``.`` (``split="sentences"``, compel's default), else
    ``, ; : .`` (``"phrases"``), else a word end (``"words"``), else at 75 (``"brutal"``: always).
    Textual inversion uses diffusers' ``<name>`` tokens.  Padding: ``pad_id`` (the tokenizer's pad token:
    EOS for SD1, 0 for SD2 and SDXL).
    """
    if split not in SPLIT_MODES:
        raise BadInput(f"unknown split mode {split!r}; choose one of {', '.join(SPLIT_MODES)}")
    room = CHUNK_LENGTH - 2
    pattern = name_pattern(embeddings)
    body: list[Entry] = []
    lost: list[Entry] = []
    token_count = 0
    for si, seg in enumerate(segments):
        items = units(tokenizer, seg.text, pattern)
        full = expand(items, embeddings, seg.weight, si)
        token_count += len(full)
        kept = len(expand(items[:room], embeddings)[:room]) if truncate else len(full)
        body += full[:kept]
        lost += full[kept:]
    out = ChunkBuilder(tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_id if pad_id is None else pad_id)
    start = 0
    while True:
        # truncation cuts at 75 whatever the split mode, as compel does
        cut = _split_point(body[start : start + room + 1], tokenizer, "brutal" if truncate else split, room)
        out.add(body[start : start + cut])
        start += cut
        if truncate or start >= len(body):
            break
    return out.result(segments, token_count, lost=[(e.segment, e.id) for e in lost + body[start:]])


def chunk(prompt: str, tokenizer: Tokenizer, **options) -> Node[Chunked]:
    """``chunk_segments`` for every prompt in ``parse(prompt)``'s tree."""
    return map_leaves(parse(prompt), lambda segs: chunk_segments(segs, tokenizer, **options))


class Compel(Dialect):
    """compel: ``.blend()`` and ``.and()`` trees; weights lerp from the empty prompt and a fragment below 1 is
    also down-weighted by masking it out; ``clip_skip`` skips layers; embeddings by token, refused when they do
    not fit every encoder; padded with empty-prompt chunks; pooled output from the raw prompt text."""

    name = "compel"
    title = "compel"
    options = (
        Option(
            "truncate",
            "--no-truncate",
            "chunk",
            "truncate_long_prompts=False (split long prompts into chunks at sentence, phrase or word ends)",
            {"action": "store_true"},
            value=lambda args: not args.no_truncate,
        ),
    )
    structure = "blend"
    weighting = "lerp"
    embeddings_by_token = True

    def parse(self, text: str, **options: Any) -> Node[list[Segment]]:
        return parse(text)

    def chunk(self, text: str, tokenizer: Tokenizer, **options: Any) -> Node[Chunked]:
        return chunk(text, tokenizer, **options)

    def tree(self, prompt: str, **options: Any) -> Node[list[Segment]]:
        return parse(prompt)

    def leaf(
        self,
        leaf: list[Segment],
        tokenizer: Tokenizer,
        pad_id: int,
        embeddings: Embeddings,
        *,
        truncate: bool = True,
        split: str = "sentences",
        **options: Any,
    ) -> Chunked:
        return chunk_segments(leaf, tokenizer, pad_id=pad_id, embeddings=embeddings, truncate=truncate, split=split)

    def pooled_leaf(self, prompt: str, tokenizer: Tokenizer, pad_id: int, embeddings: Embeddings) -> Chunked:
        """compel pools the raw prompt text, truncated to 77 tokens."""
        return plain_chunk(prompt, tokenizer, pad_id=pad_id, embeddings=embeddings)


DIALECT = Compel()
