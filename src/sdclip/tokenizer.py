"""CLIP's byte-level BPE tokenizer, exact to the three implementations Stable Diffusion users meet.

The three differ only in how text is cleaned before BPE (see ``Tokenizer.mode``):

* ``hf`` — transformers 4.x ``CLIPTokenizer`` (the slow one, with ftfy): what SD pipelines used
  for years.  Special-token strings are split off first, then ``ftfy.fix_text``, whitespace
  collapse, lower case.
* ``openai`` — OpenAI CLIP / open_clip ``SimpleTokenizer``: ftfy, ``html.unescape`` twice,
  whitespace collapse, lower case; its special strings are ``<start_of_text>``/``<end_of_text>``.
* ``nfc`` — the Rust ``CLIPTokenizerFast`` (and transformers 5.x): Unicode NFC, whitespace
  collapse, per-character lower case; no ftfy.
"""

from __future__ import annotations

import difflib
import gzip
import html
import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

from .errors import BadInput

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
MODES = ("hf", "openai", "nfc")

_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_OPENAI_SPECIALS = ("<start_of_text>", "<end_of_text>")
# Python's str.split()/re's \s: what the hf and openai cleaners collapse.
_PY_SPACE = regex.compile(r"[\s\x1c-\x1f\x85]+", regex.V0)
# Unicode White_Space: what the Rust normalizer collapses.
_UNICODE_SPACE = regex.compile(r"[\p{White_Space}]+")
# ASCII text ftfy and html.unescape leave as it is: printable, tab, newline, and no '&'.
_FTFY_INERT = regex.compile(r"[\x20-\x25\x27-\x7e\t\n]*")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _bundled_merges() -> list[tuple[str, str]]:
    data = resources.files("sdclip").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # line 0 is a header; 48894 merges follow (49152 - 256 bytes - 2 specials); the rest is unused
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # type: ignore[misc]


def _vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The CLIP vocabulary order: 256 byte chars, the same with </w>, one entry per merge, specials."""
    byte_chars = list(bytes_to_unicode().values())
    return [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), *_HF_SPECIALS]


@dataclass(frozen=True)
class Token:
    """One token of a prompt: its id, its text in the vocabulary and the characters it came from."""

    id: int
    text: str
    start: int
    end: int


class Tokenizer:
    """CLIP BPE tokenizer.  ``Tokenizer()`` uses the vocabulary bundled with sdclip.

    ``encode`` gives BOS + ids + EOS with no truncation; calling the tokenizer on a batch gives the
    fixed-length [B, 77] id tensor the text encoder reads (truncated to BOS + 75 + EOS, padded).
    """

    def __init__(self, merges: Sequence[tuple[str, str]] | None = None, mode: str = "hf",
                 vocab: dict[str, int] | None = None):
        if mode not in MODES:
            raise BadInput(f"unknown tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        merges = list(merges) if merges is not None else _bundled_merges()
        self.encoder = vocab if vocab is not None else {t: i for i, t in enumerate(_vocabulary(merges))}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id = self.encoder["<|startoftext|>"]
        self.eos_id = self.encoder["<|endoftext|>"]
        self.vocab_size = len(self.encoder)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # specials split off the raw text before cleaning (exact case) and, for the python
        # tokenizers, recognised again after lower-casing by the word pattern
        specials = _OPENAI_SPECIALS if mode == "openai" else _HF_SPECIALS
        self._special_ids = {specials[0]: self.bos_id, specials[1]: self.eos_id}
        self._split_specials = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        in_pattern = "" if mode == "nfc" else "|".join(regex.escape(s) for s in specials) + "|"
        self._words = regex.compile(in_pattern + _WORD_PATTERN, regex.IGNORECASE)
        self._bpe = lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, mode: str = "hf") -> "Tokenizer":
        """Load the ``vocab.json`` + ``merges.txt`` pair of a Hugging Face / diffusers tokenizer folder."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read tokenizer files {vocab_json}, {merges_txt}: {e}") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad or not isinstance(vocab, dict):
            raise BadInput(f"{merges_txt}: not a BPE merges file (line {bad[0]!r})" if bad
                           else f"{vocab_json}: not a token -> id mapping")
        for special in _HF_SPECIALS:
            if special not in vocab:
                raise BadInput(f"{vocab_json}: the vocabulary has no {special} token")
        return cls(merges, mode=mode, vocab=vocab)  # type: ignore[arg-type]

    @classmethod
    def from_folder(cls, folder: str | Path, mode: str = "hf") -> "Tokenizer":
        folder = Path(folder)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", mode=mode)

    def save_hf(self, folder: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` as Hugging Face tokenizer folders hold them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")

    # --- cleaning -------------------------------------------------------------------------
    def _fix(self, text: str) -> str:
        """The mode's character-level repair (ftfy / html / NFC), before whitespace and case."""
        if self.mode == "nfc":
            return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)
        if text.isascii() and _FTFY_INERT.fullmatch(text):
            return text  # ftfy and html.unescape leave such text unchanged (tested)
        text = ftfy.fix_text(text)
        if self.mode == "openai":
            text = html.unescape(html.unescape(text))
        return text

    def _lower(self, text: str) -> str:
        # the Rust normalizer lower-cases one character at a time (no final-sigma rule)
        return "".join(c.lower() for c in text) if self.mode == "nfc" and not text.isascii() else text.lower()

    def clean(self, text: str) -> str:
        """The text BPE sees: repaired, whitespace collapsed, lower case."""
        space = _UNICODE_SPACE if self.mode == "nfc" else _PY_SPACE
        return self._lower(space.sub(" ", self._fix(text)).strip(" "))

    # --- BPE ------------------------------------------------------------------------------
    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece (already mapped to byte characters)."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = -1, None
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            first, second = symbols[best], symbols[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unknown = self.eos_id  # CLIP's unk token; only reachable with a foreign, inconsistent vocabulary
        return tuple(self.encoder.get(s, unknown) for s in symbols)

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        special = self._special_ids.get(piece) if self.mode != "nfc" else None
        if special is not None:
            return (special,)
        return self._bpe("".join(self._byte_encoder[b] for b in piece.encode("utf-8")))

    def _parts(self, text: str, with_map: bool):
        """Cleaned text in the order the mode finds special strings, as (text, starts, ends) or,
        for a special string, (id, start, end).  ``starts``/``ends`` map each cleaned character to
        the original characters it came from (None unless ``with_map``).

        hf splits exact-case specials off the raw text and cleans each part (transformers' slow
        tokenizer); nfc cleans first and splits specials off the cleaned text (the Rust tokenizer);
        openai cleans everything and lets the word pattern find its specials (open_clip).
        """
        clean = self._clean_with_map if with_map else (lambda t: (self.clean(t), None, None))
        if self.mode == "openai" or "<" not in text:
            yield clean(text)
            return
        if self.mode == "hf":
            pos = 0
            for part in self._split_specials.split(text):
                if part in self._special_ids:
                    yield self._special_ids[part], pos, pos + len(part)
                elif part:
                    cleaned, starts, ends = clean(part)
                    if with_map:
                        starts, ends = [i + pos for i in starts], [i + pos for i in ends]
                    yield cleaned, starts, ends
                pos += len(part)
            return
        cleaned, starts, ends = clean(text)  # nfc
        pos = 0
        for part in self._split_specials.split(cleaned):
            if part in self._special_ids:
                yield self._special_ids[part], starts[pos] if with_map else 0, ends[pos + len(part) - 1] if with_map else 0
            elif part:
                yield part, starts[pos:pos + len(part)] if with_map else None, ends[pos:pos + len(part)] if with_map else None
            pos += len(part)

    # --- public API -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, padding or truncation."""
        if not isinstance(text, str):
            raise BadInput(f"a prompt must be a string, got {type(text).__name__}")
        ids: list[int] = []
        for part, _, _ in self._parts(text, with_map=False):
            if isinstance(part, int):
                ids.append(part)
                continue
            for piece in self._words.findall(part):
                ids.extend(self._piece_ids(piece))
        return ids

    def encode(self, text: str) -> list[int]:
        """BOS + token ids + EOS, no padding, no truncation."""
        return [self.bos_id, *self.tokenize(text), self.eos_id]

    def __call__(self, texts: str | Iterable[str], *, length: int = CONTEXT_LENGTH, pad_id: int | None = None,
                 truncate: bool = True) -> torch.Tensor:
        """[B, length] ids: BOS + tokens (truncated to length - 2) + EOS, padded with ``pad_id``
        (EOS by default, as CLIP-L; OpenCLIP H / bigG pad with 0)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pad = self.eos_id if pad_id is None else pad_id
        out = torch.full((len(texts), length), pad, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)
            if len(ids) > length - 2:
                if not truncate:
                    raise BadInput(f"prompt {row} has {len(ids)} tokens; at most {length - 2} fit")
                ids = ids[: length - 2]
            out[row, : len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (specials dropped), with word ends as spaces."""
        text = "".join(self.decoder[i] for i in ids if i not in (self.bos_id, self.eos_id))
        raw = bytearray(self._byte_decoder[c] for c in text.replace("</w>", " "))
        return raw.decode("utf-8", errors="replace").replace("  ", " ").strip()

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one id (byte characters, ``</w>`` at word ends)."""
        return self.decoder[token_id]

    def tokens(self, text: str) -> list[Token]:
        """Tokens of ``text`` (without BOS/EOS) with the span of the original text each came from.

        Used by the prompt inspector; slower than ``tokenize``.  Spans are character offsets into
        ``text``; where cleaning rewrote characters (ftfy, NFC, entities) a token's span covers
        the rewritten original characters.
        """
        out: list[Token] = []
        for cleaned, starts, ends in self._parts(text, with_map=True):
            if isinstance(cleaned, int):
                out.append(Token(cleaned, self.decoder[cleaned], starts, ends))
                continue
            for m in self._words.finditer(cleaned):
                piece = m.group()
                ids = self._piece_ids(piece)
                char_of_byte = [i for i, ch in enumerate(piece) for _ in ch.encode("utf-8")]
                byte_pos = 0
                for tid in ids:
                    nbytes = len(self._token_bytes(tid))
                    first = m.start() + char_of_byte[min(byte_pos, len(char_of_byte) - 1)]
                    last = m.start() + char_of_byte[min(byte_pos + nbytes, len(char_of_byte)) - 1]
                    out.append(Token(tid, self.decoder[tid], starts[first], ends[last]))
                    byte_pos += nbytes
        return out

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in (self.bos_id, self.eos_id):
            return b""
        return bytes(self._byte_decoder[c] for c in self.decoder[token_id].removesuffix("</w>"))

    def _clean_with_map(self, text: str) -> tuple[str, list[int], list[int]]:
        """``clean(text)`` plus, per cleaned character, the [start, end) of the original it came from."""
        fixed = self._fix(text)
        if fixed == text:
            starts = list(range(len(text)))
            ends = [i + 1 for i in starts]
        else:
            starts, ends = [], []
            matcher = difflib.SequenceMatcher(None, text, fixed, autojunk=False)
            for op, a0, a1, b0, b1 in matcher.get_opcodes():
                if op == "equal":
                    starts.extend(range(a0, a1))
                    ends.extend(range(a0 + 1, a1 + 1))
                elif b1 > b0:
                    starts.extend([a0] * (b1 - b0))
                    ends.extend([max(a1, a0 + 1)] * (b1 - b0))
        # whitespace collapse and strip, then case, keeping the map
        space = _UNICODE_SPACE if self.mode == "nfc" else _PY_SPACE
        chars: list[str] = []
        s2: list[int] = []
        e2: list[int] = []
        for m in regex.finditer(r"(?s).", fixed):
            i = m.start()
            c = m.group()
            if space.fullmatch(c):
                if not chars or chars[-1] == " ":
                    continue
                c = " "
            for lc in self._lower(c):
                chars.append(lc)
                s2.append(starts[i])
                e2.append(ends[i])
        while chars and chars[-1] == " ":
            chars.pop(), s2.pop(), e2.pop()
        return "".join(chars), s2, e2
