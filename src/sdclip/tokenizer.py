"""CLIP's byte-level BPE tokenizer, exact to the three implementations Stable Diffusion users meet.

The three differ only in how text is cleaned before BPE (see ``Tokenizer.mode``):

* ``hf`` — transformers 4.x ``CLIPTokenizer`` (the slow one, with ftfy): what SD pipelines used
  for years.  Special-token strings are split off first, then ``ftfy.fix_text``, whitespace
  collapse, lower case.
* ``openai`` — OpenAI CLIP / open_clip ``SimpleTokenizer``: ftfy, ``html.unescape`` twice,
  whitespace collapse, lower case; its special strings are ``<start_of_text>``/``<end_of_text>``.
* ``nfc`` — the Rust ``CLIPTokenizerFast`` (and transformers 5.x): Unicode NFC, whitespace
  collapse, per-character lower case; no ftfy.  Its regex engine (Oniguruma), its lower case
  (Rust's) and its NFC tables each know a different Unicode version; the tables below make the
  characters those versions disagree on come out as tokenizers 0.22 gives them, whatever the
  Python or ``regex`` version here (tested code point by code point).

Speed: a prompt is cleaned, split at spaces (no BPE piece spans a space) and each space-separated
chunk is looked up in a cache of chunk -> ids; misses run the word regex and byte-level BPE
(itself cached per piece).  Both caches are bounded and can be emptied with ``clear_cache``.
"""

from __future__ import annotations

import difflib
import html
import json
import unicodedata
import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import regex

from .atomic import write_text
from .errors import BadInput

if TYPE_CHECKING:
    import torch

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
MODES = ("hf", "openai", "nfc")
_CACHE_SIZE = 1 << 17  # entries per cache; a full cache is emptied (prompts repeat words, not text)

_HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_OPENAI_SPECIALS = ("<start_of_text>", "<end_of_text>")
# The pre-tokenizer of all three, case-insensitive in the python ones (so "'ſ" is one piece there).
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Letters and numbers assigned in Unicode 16.0 and 17.0: the regex module knows them, the Oniguruma
# in the Rust tokenizer (tables up to Unicode 15.1) does not and puts them with the punctuation.
_NEWER_THAN_ONIG = (
    r"\u0558\u058b-\u058c\u088f\u0c5c\u0cdc\u208f\u209d-\u209f\ua7ce-\ua7cf\ua7d2\ua7d4\ua7dd\ua7e2\ua7f1"
    r"\uab6c-\uab6d\U000107bb-\U000107bf\U00010940-\U00010959\U00010ec5-\U00010ec7\U00010ed9-\U00010eee"
    r"\U00011b0a\U00011db0-\U00011ddb\U00011de0-\U00011de9\U00011df1\U0001246f\U00012475-\U0001247f"
    r"\U00012550-\U00012686\U00016ea0-\U00016eb8\U00016ebb-\U00016ed3\U00016ff2-\U00016ff6"
    r"\U000187f8-\U000187ff\U00018cd6-\U00018cda\U00018d09-\U00018d20\U00018d80-\U00018df2"
    r"\U00018e00-\U00019191\U000191a0-\U000191d2\U0001b123-\U0001b128\U0001b168\U0001d6a6"
    r"\U0001df1f-\U0001df24\U0001df2b-\U0001df81\U0001df90-\U0001df96\U0001dfcd-\U0001dfff"
    r"\U0001e6c0-\U0001e6de\U0001e6e0-\U0001e6e2\U0001e6e4-\U0001e6e5\U0001e6e7-\U0001e6ed"
    r"\U0001e6f0-\U0001e6f4\U0001e6fe-\U0001e6ff\U0002b73a-\U0002b73f\U0002b81e\U0002cea2-\U0002cead"
    r"\U000323b0-\U00033479\U0003d000-\U0003fc3f"
)
_ONIG_WORD_PATTERN = (
    rf"(?V1)'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}--[{_NEWER_THAN_ONIG}]]+|[\p{{N}}--[{_NEWER_THAN_ONIG}]]"
    rf"|[^\s[[\p{{L}}\p{{N}}]--[{_NEWER_THAN_ONIG}]]]+"
)


def _case_pairs(*spans: tuple[int, int, int]) -> dict[int, int]:
    """``{upper: lower}`` for (first, last, lower - upper) runs of code points."""
    return {cp: cp + delta for first, last, delta in spans for cp in range(first, last + 1)}


# Case pairs Unicode added in 14.0-17.0, which Rust's to_lowercase knows and Python 3.10-3.14's
# str.lower may not: applied before str.lower in nfc mode.
_NEWER_LOWER = _case_pairs(
    (0x1C89, 0x1C89, 1),
    (0x2C2F, 0x2C2F, 0x30),
    (0xA7C0, 0xA7C0, 1),
    (0xA7CB, 0xA7CB, 0x264 - 0xA7CB),
    (0xA7CC, 0xA7CC, 1),
    (0xA7CE, 0xA7CE, 1),
    (0xA7D0, 0xA7D0, 1),
    (0xA7D2, 0xA7D2, 1),
    (0xA7D4, 0xA7D4, 1),
    (0xA7D6, 0xA7D6, 1),
    (0xA7D8, 0xA7D8, 1),
    (0xA7DA, 0xA7DA, 1),
    (0xA7DC, 0xA7DC, 0x19B - 0xA7DC),
    (0x10570, 0x1057A, 0x27),
    (0x1057C, 0x1058A, 0x27),
    (0x1058C, 0x10592, 0x27),
    (0x10594, 0x10595, 0x27),
    (0x10D50, 0x10D65, 0x20),
    (0x16EA0, 0x16EB8, 0x1B),
)
# Combining marks (non-zero combining class in Unicode 17) and canonical composites that the Rust
# tokenizer's NFC tables (older than Unicode 10) do not know: there they are plain starters that
# nothing is reordered past, composed with or decomposed into.
_RUST_UNKNOWN_MARKS = (
    r"\u05c8-\u05c9\u07fd\u0897-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1af0"
    r"\u1df6-\u1dfa\ua82c\U00010d24-\U00010d27\U00010d69-\U00010d6d\U00010eab-\U00010eac"
    r"\U00010ecb-\U00010ecf\U00010ef0-\U00010efb\U00010efd-\U00010eff\U00010f46-\U00010f50"
    r"\U00010f82-\U00010f85\U00011070\U0001133b\U000113ce-\U000113d0\U0001145e\U00011839-\U0001183a"
    r"\U0001193d-\U0001193e\U00011943\U000119e0\U00011a34\U00011a47\U00011a99\U00011d42"
    r"\U00011d44-\U00011d45\U00011d97\U00011f41-\U00011f42\U0001612f\U00016ff0-\U00016ff1"
    r"\U0001d127-\U0001d128\U0001d250-\U0001d252\U0001d25b-\U0001d25c\U0001d25f\U0001d280-\U0001d281"
    r"\U0001e08f\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef\U0001e4ec-\U0001e4ef"
    r"\U0001e5ee-\U0001e5ef\U0001e6e3\U0001e6e6\U0001e6ee-\U0001e6ef\U0001e6f5"
)
_RUST_UNKNOWN_COMPOSITES = (
    0x105C9,
    0x105E4,
    0x11383,
    0x11385,
    0x1138E,
    0x11391,
    0x113C5,
    0x113C7,
    0x113C8,
    0x11938,
    *range(0x16121, 0x16129),
    0x16D68,
    0x16D69,
    0x16D6A,
)


def _nfc_barriers() -> regex.Pattern:
    """Characters to keep out of Python's NFC in nfc mode: the unknown marks and composites above
    and the starters those composites are made of (as far as this Python's Unicode knows them;
    every composite Unicode added after 3.1 has at least one new component)."""
    cps = [*_RUST_UNKNOWN_COMPOSITES]
    cps += [
        int(h, 16)
        for cp in _RUST_UNKNOWN_COMPOSITES
        for h in unicodedata.decomposition(chr(cp)).split()
        if unicodedata.combining(chr(int(h, 16))) == 0
    ]
    return regex.compile("([" + _RUST_UNKNOWN_MARKS + "".join(f"\\U{cp:08x}" for cp in cps) + "])")


_NFC_BARRIERS = _nfc_barriers()

# ASCII text ftfy and html.unescape leave as it is: printable, tab, newline, and '&' only where
# no entity can start (before whitespace or at the end, as in "black & white").
_FTFY_INERT = regex.compile(r"[\x20-\x25\x27-\x7e\t\n]*(?:&(?=[ \t\n]|\Z)[\x20-\x25\x27-\x7e\t\n]*)*")
# ASCII text NFC leaves as it is and where str.split() splits at Unicode White_Space only.
_NFC_INERT = regex.compile(r"[\x00-\x1b\x20-\x7f]*")
# regex's \s: Unicode White_Space, what transformers and the Rust normalizer collapse.
_SPACES = regex.compile(r"\s+")
_SPACE_RUN_OR_CHAR = regex.compile(r"(?s)(\s+)|.")


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


# UTF-8 bytes -> byte characters in one str.translate (of the text decoded as latin-1)
_BYTE_CHARS = {b: c for b, c in bytes_to_unicode().items() if chr(b) != c}


@lru_cache(maxsize=1)
def _bundled_merges() -> tuple[tuple[str, str], ...]:
    # line 0 is a header; 48894 merges follow (49152 - 256 bytes - 2 specials); the rest is unused, so
    # decompression stops once they are in (a fifth of the file: a faster start)
    wanted = 49152 - 256 - 2 + 1
    data = resources.files("sdclip").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    text, step = b"", 1 << 16
    for start in range(0, len(data), step):
        text += inflate.decompress(data[start : start + step])
        if text.count(b"\n") > wanted:
            break
    lines = text.decode("utf-8", errors="replace").split("\n")
    return tuple(map(tuple, map(str.split, lines[1:wanted])))  # type: ignore[arg-type]


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


class _Cache(dict):
    """A dict that computes missing entries and empties itself when full."""

    def __init__(self, compute: Callable[[str], tuple[int, ...]]):
        super().__init__()
        self._compute = compute

    def __missing__(self, key: str) -> tuple[int, ...]:
        value = self._compute(key)
        if len(self) >= _CACHE_SIZE:
            self.clear()
        self[key] = value
        return value


class Tokenizer:
    """CLIP BPE tokenizer.  ``Tokenizer()`` uses the vocabulary bundled with sdclip.

    ``encode`` gives BOS + ids + EOS with no truncation; calling the tokenizer on a batch gives the
    fixed-length [B, 77] id tensor the text encoder reads (truncated to BOS + 75 + EOS, padded).
    """

    def __init__(
        self, merges: Sequence[tuple[str, str]] | None = None, mode: str = "hf", vocab: dict[str, int] | None = None
    ):
        if mode not in MODES:
            raise BadInput(f"unknown tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        merges = _bundled_merges() if merges is None else merges
        self.encoder = dict(vocab) if vocab is not None else {t: i for i, t in enumerate(_vocabulary(merges))}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id = self.encoder["<|startoftext|>"]
        self.eos_id = self.encoder["<|endoftext|>"]
        self.vocab_size = len(self.encoder)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._byte_chars = str.maketrans(_BYTE_CHARS)
        specials = _OPENAI_SPECIALS if mode == "openai" else _HF_SPECIALS
        self._special_ids = {specials[0]: self.bos_id, specials[1]: self.eos_id}
        self._split_specials = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        if mode == "nfc":
            # the Rust tokenizer splits specials off the normalized text before its case-sensitive regex
            self._words = regex.compile(_ONIG_WORD_PATTERN)
            self._inert = _NFC_INERT
        else:
            # the python ones find specials with the word regex, after cleaning
            in_pattern = "|".join(regex.escape(s) for s in specials)
            self._words = regex.compile(in_pattern + "|" + _WORD_PATTERN, regex.IGNORECASE)
            self._inert = _FTFY_INERT
        self._lower_table = str.maketrans(_NEWER_LOWER)
        self._bpe_cache = _Cache(self._bpe)
        self._chunk_cache = _Cache(self._chunk_ids)

    @cached_property
    def decoder(self) -> dict[int, str]:
        """id -> token text; built on first use (only decoding and offsets need it)."""
        return {i: t for t, i in self.encoder.items()}

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, mode: str = "hf") -> Tokenizer:
        """Load the ``vocab.json`` + ``merges.txt`` pair of a Hugging Face / diffusers tokenizer folder."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read tokenizer files {vocab_json}, {merges_txt}: {e}") from None
        if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()
        ):
            raise BadInput(f"{vocab_json}: not a token -> id mapping")
        for special in _HF_SPECIALS:
            if special not in vocab:
                raise BadInput(f"{vocab_json}: the vocabulary has no {special} token")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad or not merges:
            raise BadInput(f"{merges_txt}: not a BPE merges file" + (f" (line {' '.join(bad[0])!r})" if bad else ""))
        return cls(merges, mode=mode, vocab=vocab)  # type: ignore[arg-type]

    @classmethod
    def from_folder(cls, folder: str | Path, mode: str = "hf") -> Tokenizer:
        """Load a Hugging Face / diffusers tokenizer folder (its ``vocab.json`` and ``merges.txt``)."""
        folder = Path(folder)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", mode=mode)

    def save_hf(self, folder: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` as Hugging Face tokenizer folders hold them."""
        folder = Path(folder)
        write_text(folder / "vocab.json", json.dumps(self.encoder, ensure_ascii=False))
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__)
        write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    # --- cleaning -------------------------------------------------------------------------
    def _fix(self, text: str) -> str:
        """The mode's character-level repair (ftfy / html / NFC), before whitespace and case."""
        if self.mode == "nfc":
            if unicodedata.is_normalized("NFC", text):
                return text
            parts = _NFC_BARRIERS.split(text)  # odd places: characters Rust leaves alone
            return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))
        if text.isascii() and _FTFY_INERT.fullmatch(text):
            return text  # ftfy and html.unescape leave such text unchanged (tested)
        import ftfy  # here: its import (~0.1 s) is paid only by text that needs it, not by every start

        text = ftfy.fix_text(text)
        if self.mode == "openai":
            text = html.unescape(html.unescape(text))
        return text

    def _lower(self, text: str) -> str:
        """Lower case as the mode does: str.lower, or Rust's per-character lower case for nfc (no
        final-sigma rule, which is the only context str.lower uses)."""
        if self.mode != "nfc" or text.isascii():
            return text.lower()
        return text.translate(self._lower_table).replace("Σ", "σ").lower()

    def clean(self, text: str) -> str:
        """The text BPE sees: repaired, whitespace collapsed, lower case, words split by one space."""
        return " ".join(self._chunks(text))

    def _chunks(self, text: str) -> list[str]:
        """The cleaned text split at its spaces (no BPE piece spans a space)."""
        if text.isascii() and self._inert.fullmatch(text):
            return text.lower().split()  # only \t \n \v \f \r and space to collapse here
        if self.mode == "nfc":
            self._check_encodable(text)
        text = self._fix(text)
        if self.mode == "openai":
            text = " ".join(text.split())  # open_clip collapses str.split()'s whitespace
        else:  # transformers and the Rust normalizer collapse regex's \s
            text = _SPACES.sub(" ", text).strip(" " if self.mode == "nfc" else None)
        return self._lower(text).split(" ") if text else []

    @staticmethod
    def _check_encodable(text: str) -> None:
        # ftfy repairs lone surrogates; without it they cannot become UTF-8 (the Rust tokenizer refuses too)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadInput(f"prompt has a lone surrogate U+{ord(text[e.start]):04X} at {e.start}") from None

    # --- BPE ------------------------------------------------------------------------------
    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece: its UTF-8 bytes as byte characters, merged by rank."""
        special = self._special_ids.get(piece)
        if special is not None:
            return (special,)
        word = piece.encode("utf-8").decode("latin-1").translate(self._byte_chars)
        symbols = [*word[:-1], word[-1] + "</w>"]
        unknown = self.eos_id  # CLIP's unk token; only reachable with a foreign, inconsistent vocabulary
        return tuple(self.encoder.get(s, unknown) for s in self._merge(symbols))

    def _merge(self, symbols: list[str]) -> list[str]:
        """BPE as the references do it: each round merges every occurrence of the lowest-ranked
        adjacent pair, left to right, until no adjacent pair is a merge.  Each round is a few
        C-level passes (map, min, index), which beats a heap even for long repetitive pieces."""
        rank = self.bpe_ranks.get
        missing = len(self.bpe_ranks)
        while len(symbols) > 1:
            pair_ranks = list(map(rank, zip(symbols, symbols[1:]), repeat(missing)))
            best = min(pair_ranks)
            if best == missing:
                break
            i = pair_ranks.index(best)
            merged = symbols[:i]
            while True:
                merged.append(symbols[i] + symbols[i + 1])
                try:
                    j = pair_ranks.index(best, i + 2)
                except ValueError:
                    break
                merged += symbols[i + 2 : j]
                i = j
            merged += symbols[i + 2 :]
            symbols = merged
        return symbols

    def _pieces(self, cleaned: str) -> Iterator[tuple[int, str]]:
        """(offset, piece) of the pre-tokenizer over cleaned text; nfc splits specials off first."""
        if self.mode != "nfc" or "<|" not in cleaned:
            for m in self._words.finditer(cleaned):
                yield m.start(), m.group()
            return
        pos = 0
        for part in self._split_specials.split(cleaned):
            if part in self._special_ids:
                yield pos, part
            else:
                for m in self._words.finditer(part):
                    yield pos + m.start(), m.group()
            pos += len(part)

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        """Ids of one space-free chunk of cleaned text."""
        if self.mode == "nfc" and "<|" in chunk:
            pieces = [piece for _, piece in self._pieces(chunk)]
        else:
            pieces = self._words.findall(chunk)
        return tuple(chain.from_iterable(map(self._bpe_cache.__getitem__, pieces)))

    def _ids(self, text: str) -> list[int]:
        """Token ids of raw text without special strings to split off first."""
        return list(chain.from_iterable(map(self._chunk_cache.__getitem__, self._chunks(text))))

    def clear_cache(self) -> None:
        """Forget cached chunk and BPE results (for cold-start timing; they refill as prompts come)."""
        self._bpe_cache.clear()
        self._chunk_cache.clear()

    # --- public API -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, padding or truncation."""
        if not isinstance(text, str):
            raise BadInput(f"a prompt must be a string, got {type(text).__name__}")
        if self.mode != "hf" or "<|" not in text:
            return self._ids(text)
        # transformers splits exact special strings off the raw text and cleans each part alone
        ids: list[int] = []
        for part in self._split_specials.split(text):
            special = self._special_ids.get(part)
            if special is not None:
                ids.append(special)
            elif part:
                ids += self._ids(part)
        return ids

    def tokenize_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``tokenize`` of each text."""
        return [self.tokenize(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        """BOS + token ids + EOS, no padding, no truncation."""
        return [self.bos_id, *self.tokenize(text), self.eos_id]

    def __call__(
        self,
        texts: str | Iterable[str],
        *,
        length: int = CONTEXT_LENGTH,
        pad_id: int | None = None,
        truncate: bool = True,
    ) -> torch.Tensor:
        """[B, length] ids: BOS + tokens (truncated to length - 2) + EOS, padded with ``pad_id``
        (EOS by default, as CLIP-L; OpenCLIP H / bigG pad with 0)."""
        import torch  # here, not at the top: tokenizing alone never imports torch

        rows = self.rows(texts, length=length, pad_id=pad_id, truncate=truncate)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def rows(
        self,
        texts: str | Iterable[str],
        *,
        length: int = CONTEXT_LENGTH,
        pad_id: int | None = None,
        truncate: bool = True,
    ) -> list[list[int]]:
        """What ``__call__`` returns, as lists (no torch: the torch-free encode path feeds them to numpy)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if length < 2:
            raise BadInput(f"length {length} leaves no room for BOS and EOS")
        pad = self.eos_id if pad_id is None else pad_id
        room = length - 2
        rows = []
        for row, ids in enumerate(map(self.tokenize, texts)):
            if len(ids) > room:
                if not truncate:
                    raise BadInput(f"prompt {row} has {len(ids)} tokens; at most {room} fit")
                ids = ids[:room]
            rows.append([self.bos_id, *ids, self.eos_id, *[pad] * (room - len(ids))])
        return rows

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (specials dropped), word ends as spaces, as transformers' ``decode``."""
        try:
            text = "".join(self.decoder[i] for i in ids if i not in (self.bos_id, self.eos_id))
        except KeyError as e:
            raise BadInput(f"token id {e.args[0]!r} is not in the vocabulary") from None
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one id (byte characters, ``</w>`` at word ends)."""
        return self.decoder[token_id]

    # --- tokens with spans ----------------------------------------------------------------
    def tokens(self, text: str) -> list[Token]:
        """Tokens of ``text`` (without BOS/EOS) with the span of the original text each came from.

        Used by the prompt inspector; slower than ``tokenize``.  Spans are character offsets into
        ``text``; where cleaning rewrote characters (ftfy, NFC, entities) a token's span covers
        the rewritten original characters.
        """
        if not isinstance(text, str):
            raise BadInput(f"a prompt must be a string, got {type(text).__name__}")
        if self.mode == "hf" and "<|" in text:
            parts, pos = [], 0
            for part in self._split_specials.split(text):
                parts.append((part, pos))
                pos += len(part)
        else:
            parts = [(text, 0)]
        out: list[Token] = []
        for part, offset in parts:
            special = self._special_ids.get(part) if self.mode == "hf" else None
            if special is not None:
                out.append(Token(special, self.decoder[special], offset, offset + len(part)))
            elif part:
                out += self._tokens_of_part(part, offset)
        return out

    def _tokens_of_part(self, text: str, offset: int) -> list[Token]:
        cleaned, starts, ends = self._clean_with_map(text)
        out = []
        for pos, piece in self._pieces(cleaned):
            ids = self._bpe_cache[piece]
            # each id covers some of the piece's UTF-8 bytes; map them back to its characters
            char_of_byte = [i for i, ch in enumerate(piece) for _ in ch.encode("utf-8")]
            byte_pos = 0
            for tid in ids:
                nbytes = len(self._token_bytes(tid)) or len(char_of_byte)  # a special covers the piece
                first = pos + char_of_byte[min(byte_pos, len(char_of_byte) - 1)]
                last = pos + char_of_byte[min(byte_pos + nbytes, len(char_of_byte)) - 1]
                out.append(Token(tid, self.decoder[tid], offset + starts[first], offset + ends[last]))
                byte_pos += nbytes
        return out

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in (self.bos_id, self.eos_id):
            return b""
        return bytes(self._byte_decoder[c] for c in self.decoder[token_id].removesuffix("</w>"))

    def _clean_with_map(self, text: str) -> tuple[str, list[int], list[int]]:
        """``clean(text)`` plus, per cleaned character, the [start, end) of the original it came from."""
        if self.mode == "nfc":
            self._check_encodable(text)
        fixed = self._fix(text)
        starts, ends = _align(text, fixed)
        # collapse White_Space runs to one space and strip, keeping the map (after ftfy and
        # html.unescape, str.split()'s whitespace is the same set: \x1c-\x1f are gone)
        chars: list[str] = []
        src: list[int] = []
        for m in _SPACE_RUN_OR_CHAR.finditer(fixed):
            if m.group(1) is None:
                chars.append(m.group())
                src.append(m.start())
            elif chars and m.end() < len(fixed):
                chars.append(" ")
                src.append(m.start())
        collapsed = "".join(chars)
        # lower case may lengthen a character (İ -> i̇); map each output character to its source
        lowered = self._lower(collapsed)
        if len(lowered) == len(collapsed):
            owner = src
        else:
            owner = [s for s, c in zip(src, collapsed) for _ in self._lower(c)]
        return lowered, [starts[i] for i in owner], [ends[i] for i in owner]


def _align(text: str, fixed: str) -> tuple[list[int], list[int]]:
    """Per character of ``fixed``, the [start, end) of ``text`` it came from.  Rewritten runs map
    to the whole original run; removed characters join the span of the character before them
    (or, at the start, the one after)."""
    if fixed == text:
        return list(range(len(text))), list(range(1, len(text) + 1))
    starts: list[int] = []
    ends: list[int] = []
    pending = None  # start of characters removed before any output character
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, text, fixed, autojunk=False).get_opcodes():
        if op == "equal":
            starts.extend(range(a0, a1))
            ends.extend(range(a0 + 1, a1 + 1))
        elif b1 > b0:
            first = min(a0, len(text) - 1)  # an insertion takes the character it stands at
            starts.extend([first] * (b1 - b0))
            ends.extend([max(a1, first + 1)] * (b1 - b0))
        elif ends:
            ends[-1] = a1
        else:
            pending = a0
        if pending is not None and starts:
            starts[0], pending = pending, None
    return starts, ends
