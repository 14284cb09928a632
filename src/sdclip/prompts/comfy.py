"""ComfyUI prompts (CLIPTextEncode): ``(x)`` x1.1, ``(x:w)`` sets the weight to w, ``\\(`` ``\\)`` escapes,
``embedding:name`` textual inversion, and its 77-token chunks that keep short token groups whole.

Written from ComfyUI's behaviour (comfy/sd1_clip.py: token_weights, parse_parentheses, escape_important,
SDTokenizer.tokenize_with_weights as of 2025); the structure here is our own.  ComfyUI re-scans the text
once per nesting level and recurses; this parser reads it in linear time without recursion, with the
same results.  Note that current ComfyUI tokenizes each weighted piece whole (it split at spaces and
looked each word up in the vocabulary in older versions), so its 8-token rule applies to pieces.

How ComfyUI reads brackets, which this reproduces: a ``(`` at nesting level 0 starts a group that ends
at the ``)`` bringing the level back to 0; inside, the text after the last ``:`` sets the weight when
Python's ``float`` reads it, otherwise the group multiplies by 1.1.  A stray ``)`` makes the level
negative, so brackets after it are text until the level is back at 0.  A group left open is text, unless
it ends with ``)``: then its first and last characters are dropped as if they matched, repeatedly.
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from ..families import Family
from ..tokenizer import Tokenizer
from .dialect import Dialect, last_layer_number
from .plain import expand
from .types import CHUNK_LENGTH, MAX_NESTING, ChunkBuilder, Chunked, Embeddings, Entry, Segment

if TYPE_CHECKING:
    from ..embeddings import Embedding

_CLOSE, _OPEN = "\0\1", "\0\2"  # ComfyUI's stand-ins for \) and \( while brackets are read
EMBEDDING = "embedding:"
# ComfyUI splits before "embedding:" after a space or a newline only (the space or newline goes)
_EMBEDDING_SPLIT = re.compile("[ \n]" + re.escape(EMBEDDING))
_EXTENSIONS = (".safetensors", ".pt", ".bin")
MAX_WORD = 8  # token groups shorter than this move whole to the next chunk


def parse(text: str) -> list[Segment]:
    """ComfyUI's weighted pieces, with its boundaries (each piece is tokenized on its own).

    >>> [(s.text, s.weight) for s in parse("a (b:1.5) (c)")]
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 1.1)]
    """
    s = text.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    n = len(s)
    level = [0] * (n + 1)  # level[i]: nesting before character i, counted as ComfyUI counts
    match = [-1] * n  # the ")" closing each "(" (stack matching agrees with ComfyUI's counting)
    last_colon = [-1] * (n + 1)  # last ":" before i
    last_paren = [-1] * (n + 1)  # last "(" or ")" before i
    stack: list[int] = []
    for i, c in enumerate(s):
        level[i + 1] = level[i] + (c == "(") - (c == ")")
        last_colon[i + 1] = i if c == ":" else last_colon[i]
        last_paren[i + 1] = i if c in "()" else last_paren[i]
        if c == "(":
            stack.append(i)
            if level[i + 1] > MAX_NESTING:
                raise BadInput(f"prompt brackets are nested more than {MAX_NESTING} deep")
        elif c == ")" and stack:
            match[stack.pop()] = i
    out: list[Segment] = []

    def emit(a: int, b: int, weight: float) -> None:
        if a < b:
            out.append(Segment(s[a:b].replace(_CLOSE, ")").replace(_OPEN, "("), weight))

    def group_weight(inner: int, end: int, weight: float) -> tuple[float, int]:
        """The weight of a group whose text is s[inner:end], and where its text ends."""
        colon = last_colon[end]
        if colon > inner and last_paren[end] < colon:  # float() never reads brackets: skip those
            try:
                return float(s[colon + 1 : end]), colon
            except ValueError:
                pass
        return weight * 1.1, end

    def groups(work: list) -> None:
        """Emit balanced groups and everything in them, in text order, without recursion."""
        while work:
            kind, a, b, w = work.pop()
            if kind == "text":
                emit(a, b, w)
                continue
            w, stop = group_weight(a + 1, b, w)
            pieces = []
            pos = text_from = a + 1
            while pos < stop:
                if s[pos] == "(":
                    pieces += [("text", text_from, pos, w), ("group", pos, match[pos], w)]
                    pos = text_from = match[pos] + 1
                else:
                    pos += 1
            pieces.append(("text", text_from, stop, w))
            work.extend(reversed(pieces))

    def span(a: int, b: int, weight: float) -> int:
        """Emit s[a:b]; return where a group left open starts (b if none)."""
        base = level[a]
        pos = text_from = a
        while pos < b:
            if s[pos] == "(" and level[pos] == base:
                emit(text_from, pos, weight)
                if not pos < match[pos] < b:
                    return pos
                groups([("group", pos, match[pos], weight)])
                pos = text_from = match[pos] + 1
            else:
                pos += 1
        emit(text_from, b, weight)
        return b

    # a group left open is text unless it ends with ")": then it is read as a group of its inside
    # (first and last characters dropped), which may leave a group open again, one level deeper
    start, end, weight = span(0, n, 1.0), n, 1.0
    while start < end:
        if end - start < 2 or s[end - 1] != ")":
            emit(start, end, weight)
            break
        weight, stop = group_weight(start + 1, end - 1, weight)
        start, end = span(start + 1, stop, weight), stop
    bad = next((seg for seg in out if not math.isfinite(seg.weight)), None)
    if bad is not None:
        raise BadInput(f"the weight of {bad.text!r} is {bad.weight}; ComfyUI would encode NaN")
    return out


def _folders(embeddings: Embeddings) -> list[str]:
    """The embeddings folder ("") and every sub-folder holding an embedding, top first: ComfyUI looks in each."""
    found = {posixpath.dirname(k) for k in embeddings if "/" in k}
    for folder in list(found):
        while folder:
            found.add(folder)
            folder = posixpath.dirname(folder)
    return ["", *sorted(found - {""}, key=lambda f: (f.count("/"), f))]


def _inside(folder: str, name: str) -> str | None:
    """``name`` joined to ``folder`` and normalised, or None where it leaves the folder (ComfyUI's ``..`` guard)."""
    if name.startswith("/"):
        return None
    path = posixpath.normpath(posixpath.join(folder, name))
    if not folder:
        return None if path in (".", "..") or path.startswith("../") else path
    return path if path == folder or path.startswith(folder + "/") else None


def _lookup(embeddings: Embeddings, folders: list[str], name: str) -> str | None:
    """The embedding ``embedding:name`` loads, as ComfyUI's ``load_embed`` finds its file: in each of ``folders``
    (``_folders``), the path joined and normalised (never leaving that folder), the file of exactly that name,
    else that name + .safetensors, .pt, .bin; case-sensitive.  A key with one of these extensions is a file
    path in the folder ('/'-separated); a key without (an embedding given in memory) stands for a file with one
    of them, so ``embedding:x.pt`` finds it too.  ComfyUI's order between sub-folders is arbitrary (a set); here
    the top folder comes first, then sub-folders by depth and name."""
    for folder in folders:
        path = _inside(folder, name)
        if path is None:
            continue
        for candidate in (path, *(path + ext for ext in _EXTENSIONS)):
            if candidate in embeddings:
                return candidate
        ext = next((e for e in _EXTENSIONS if path.endswith(e)), None)
        if ext is not None and path[: -len(ext)] in embeddings and not _is_file(path[: -len(ext)]):
            return path[: -len(ext)]
    return None


def _is_file(key: str) -> bool:
    """Whether a lookup key names a file (with the extension ComfyUI reads it by), not an in-memory embedding."""
    return key.endswith(_EXTENSIONS)


def _find_embedding(embeddings: Embeddings, folders: list[str], text: str) -> tuple[str | None, str, str]:
    """ComfyUI's reading of the text after ``embedding:``: (found name or None, name as written, text left).  The
    name is the first whitespace-separated word, whatever it holds (``embedding:x<lora:y:1>`` names
    ``x<lora:y:1>``); one ending in commas is retried without them."""
    words = text.split()
    if not words:
        raise BadInput("'embedding:' without a name (ComfyUI fails on this)")
    name, rest = words[0], " ".join(words[1:])
    found = _lookup(embeddings, folders, name)
    if found is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            return _lookup(embeddings, folders, stripped), name, f"{name[len(stripped) :]} {rest}"
    return found, name, rest


def chunk(
    text: str, tokenizer: Tokenizer, *, pad_id: int | None = None, embeddings: Embeddings | None = None
) -> Chunked:
    """Token ids and weights as ComfyUI's ``SDTokenizer.tokenize_with_weights`` builds them.

    Each weighted piece is tokenized on its own (split before every ``embedding:`` that follows a
    space or a newline, not other whitespace, as ComfyUI splits); a group of tokens shorter than 8 that does
    not fit in the current chunk moves whole to the next one, longer groups are cut.  Chunks are BOS + up to
    75 tokens + EOS, padded with ``pad_id`` (EOS by default as for CLIP-L; SD2 and SDXL bigG pad with 0).
    With ``embeddings``, ``embedding:name`` (a path in the embeddings folder, extension optional: ``_lookup``)
    takes the embedding's vectors; an unknown name is dropped with a warning, as ComfyUI does; without
    ``embeddings`` the text stays text.
    """
    segments = parse(text)
    folders: list[str] | None = None  # where _lookup looks, found at the first embedding: word
    groups: list[list[Entry]] = []
    warnings: list[str] = []
    for si, seg in enumerate(segments):
        pieces = _EMBEDDING_SPLIT.split(seg.text)
        for word in [w for w in [pieces[0], *(EMBEDDING + p for p in pieces[1:])] if w]:
            if word.startswith(EMBEDDING) and embeddings is not None:
                folders = _folders(embeddings) if folders is None else folders
                found, name, rest = _find_embedding(embeddings, folders, word[len(EMBEDDING) :].strip("\n"))
                if found is None:
                    warnings.append(f"embedding:{name} does not exist, ignoring")
                else:
                    groups.append(expand([found], embeddings, seg.weight, si))
                if not rest:
                    continue
                word = rest
            groups.append(expand(tokenizer.tokenize(word), None, seg.weight, si))

    out = ChunkBuilder(tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_id if pad_id is None else pad_id)
    room = CHUNK_LENGTH - 2
    body: list[Entry] = []
    for group in groups:
        large = len(group) >= MAX_WORD
        i = 0
        while i < len(group):
            if len(body) + len(group) - i <= room:
                body += group[i:]
                break
            if large:
                cut = room - len(body)
                body += group[i : i + cut]
                i += cut
            out.add(body)
            body = []
    out.add(body)
    return out.result(segments, sum(map(len, groups)), warnings=warnings)


class Comfy(Dialect):
    """ComfyUI (CLIPTextEncode): weights lerp from the empty prompt; ``CLIPSetLastLayer -N`` counts from the last
    layer; ``embedding:name`` by its path in the embeddings folder, the vectors an encoder has no width for left
    out; encoders that chunk a prompt to different lengths are cut to the shorter; prompts and negatives tiled to
    a common length by the sampler."""

    name = "comfy"
    title = "ComfyUI"
    clip_skip_help = "CLIPSetLastLayer -N"
    weighting = "lerp"
    negative_fill = "lcm"
    unfit_embedding = "drop"
    cut_to_shorter_encoder = True

    def embedding_key(self, embedding: Embedding) -> str | None:
        """Its path in the embeddings folder (``_lookup`` finds it as ComfyUI finds the file); ComfyUI reads no
        A1111 image; an embedding given in memory goes by its name."""
        if embedding.location is None:
            return embedding.name
        return embedding.location if embedding.location.lower().endswith(_EXTENSIONS) else None

    def parse(self, text: str, **options: Any) -> list[Segment]:
        return parse(text)

    def chunk(self, text: str, tokenizer: Tokenizer, **options: Any) -> Chunked:
        return chunk(text, tokenizer, **options)

    def skipped_layers(self, clip_skip: int, family: Family) -> int | None:
        return last_layer_number(self, clip_skip) - family.clip_skip_base


DIALECT = Comfy()
