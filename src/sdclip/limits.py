"""Bounds on what sdclip reads from untrusted input, and the checks that enforce them.

Weights, embeddings, images and prompts come from strangers.  Every reader keeps its memory and time
proportional to the real size of its input, and refuses, with one ``BadInput`` naming the file or the
prompt, what would break that: device files and FIFOs (endless, or blocking), pickles that are too big
or whose object graph explodes when walked, prompts far longer than any front end can use.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import BadInput

# a prompt past this is refused before it is parsed: far beyond the 75-token chunks any front end
# encodes (A1111 and compel concatenate chunks; 100k characters are ~300 of them), yet cheap to parse
MAX_PROMPT_CHARS = 100_000
# a torch archive's data.pkl holds names and shapes, not tensor data: an SDXL checkpoint's is ~0.4 MB,
# a Lightning checkpoint with optimizer state a few MB
MAX_PICKLE_BYTES = 64 << 20
MAX_PICKLE_OPS = 4_000_000  # opcodes (each builds at most one object): ~130k tensors
MAX_TREE_NODES = 1_000_000  # containers and tensors visited while naming a checkpoint's tensors
MAX_TREE_DEPTH = 100  # nested containers (TorchScript module trees nest ~10 deep)
MAX_SAFETENSORS_HEADER = 100_000_000  # what the safetensors library itself accepts
# deflate cannot expand data more than 1032-fold: a record that claims more is not what it says
MAX_DEFLATE_RATIO = 1032
# a pickled tensor may repeat its storage (stride 0) to this many elements; past it, a view that is
# far bigger than the data behind it is refused rather than materialised
MAX_REPEATED_ELEMENTS = 1 << 16


def check_prompt(prompt: str, limit: int | None = MAX_PROMPT_CHARS, where: str = "") -> str:
    """``prompt`` unchanged, or ``BadInput`` when it is longer than ``limit`` characters (None: no limit);
    ``where`` names it in the message (``prompts.txt:3``, ``prompt 2``)."""
    if limit is not None and len(prompt) > limit:
        start = prompt[:40].replace("\n", " ")
        raise BadInput(
            f"{where + ': ' if where else ''}prompt {start!r}... has {len(prompt):,} characters, more "
            f"than the limit of {limit:,} (max_prompt_chars; --max-prompt-chars on the command line)"
        )
    return prompt


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it is a regular file (links followed); ``BadInput`` for a missing path, a folder, a device
    (``/dev/zero`` never ends), a FIFO or a socket (reading blocks)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadInput(f"{path}: cannot read {what}: no such file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise BadInput(f"{path}: a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise BadInput(f"{path}: not a regular file (a device, FIFO or socket); refused as a {what}")
    return path


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading, refused as ``regular_file`` refuses it, and with a ``BadInput``
    for a file sdclip may not read.  The check is made on the opened file, so a path swapped for a FIFO
    in between cannot make it block."""
    path = regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise BadInput(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{path}: not a regular file (a device, FIFO or socket); refused as a {what}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of a regular file (see ``open_regular``); ``BadInput`` past ``limit`` bytes."""
    with open_regular(path, what) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BadInput(f"{path}: larger than the {limit:,} bytes a {what} may have")
    return data
