"""Image-caption data sets for training: a folder of pairs, a webdataset-style tar, the shapes.

Every data set is a sequence of (PIL image, caption).  A folder holds ``name.jpg`` (or .png,
.webp, ...) beside ``name.txt``; a tar holds members ``key.jpg`` / ``key.png`` and ``key.txt``,
webdataset's convention (the key is the name up to its first dot).  Images are decoded, with the
checks of ``sdclip.images.open_image``, only when an item is read.
"""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path
from typing import Protocol

from PIL import Image

from .errors import BadInput
from .images import open_image
from .shapes import Shapes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_CAPTION_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Image.Image, str]: ...


def _caption(data: bytes, name: str) -> str:
    if len(data) > MAX_CAPTION_BYTES:
        raise BadInput(f"{name}: a caption of {len(data):,} bytes; captions are short texts")
    try:
        return " ".join(data.decode("utf-8").split())
    except UnicodeDecodeError as e:
        raise BadInput(f"{name}: caption is not UTF-8 ({e})") from None


class FolderDataset:
    """Every image in ``folder`` (recursively) that has a ``.txt`` caption beside it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise BadInput(f"{folder}: not a folder")
        self.pairs = sorted(
            (p, p.with_suffix(".txt"))
            for p in self.folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()
        )
        if not self.pairs:
            raise BadInput(f"{folder}: no image + .txt caption pairs (e.g. cat.jpg and cat.txt)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image, text = self.pairs[index]
        try:
            caption = text.read_bytes()
        except OSError as e:
            raise BadInput(f"{text}: cannot read caption ({e.strerror or e})") from None
        return open_image(image), _caption(caption, str(text))


class TarDataset:
    """The (image, caption) samples of a webdataset-style tar, read in place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadInput(f"{path}: not a readable tar file ({e})") from None
        images: dict[str, tarfile.TarInfo] = {}
        texts: dict[str, tarfile.TarInfo] = {}
        for m in members:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if "." + ext.lower() in IMAGE_SUFFIXES:
                images.setdefault(key, m)
            elif ext.lower() == "txt":
                texts[key] = m
        self.samples = [(images[k], texts[k]) for k in sorted(images) if k in texts]
        if not self.samples:
            raise BadInput(f"{path}: no samples with both an image (key.jpg / key.png) and a caption (key.txt)")
        self._lock = threading.Lock()  # one file position: reads take turns

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise BadInput(f"{self.path}:{member.name}: {member.size:,} bytes, more than the {limit:,} allowed")
        with self._lock:
            f = self._tar.extractfile(member)
            data = f.read() if f is not None else b""
        if len(data) != member.size:
            raise BadInput(f"{self.path}:{member.name}: truncated ({len(data)} of {member.size} bytes)")
        return data

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image, text = self.samples[index]
        caption = _caption(self._read(text, MAX_CAPTION_BYTES), f"{self.path}:{text.name}")
        return open_image(self._read(image, MAX_IMAGE_BYTES), name=f"{self.path}:{image.name}"), caption


def open_dataset(source: str, image_size: int = 64, seed: int = 0, partial_captions: float = 0.0) -> Dataset:
    """``"shapes"`` (the built-in generator at ``image_size``, with ``partial_captions`` as its
    ``partial_p``), a folder of pairs, or a .tar."""
    if source == "shapes":
        return Shapes(size=image_size, seed=seed, partial_p=partial_captions)
    if partial_captions:
        raise BadInput("partial_captions applies to the built-in shapes data only")
    path = Path(source)
    if path.is_dir():
        return FolderDataset(path)
    if path.is_file() and tarfile.is_tarfile(path):
        return TarDataset(path)
    raise BadInput(f"{source}: training data must be 'shapes', a folder of image + .txt pairs, or a .tar of them")
