"""Images in, CLIP pixel values out: the preprocessing CLIP was trained with, with Pillow and numpy.

RGB conversion, a bicubic resize of the short side to the model's size, a centre crop, x / 255,
then (x - mean) / std with CLIP's mean and std: transformers' ``CLIPImageProcessor`` (the PIL one)
step for step, so pixel values agree with it to float rounding.  Two deliberate differences:
16-bit greyscale is scaled to 8 bits (Pillow's own conversion clips it to white), and an image
so elongated that its resized copy would be huge is resized through the crop window only.

Files are checked before they are decoded: a header that declares more than ``MAX_PIXELS``
pixels (a decompression bomb) is refused before any pixel is read, and only regular files are
read (``/dev/zero`` or a FIFO would never end).  ``png_text`` reads a PNG's text chunks without
decoding its pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import limits
from .errors import BadInput

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # 8000 x 8000; a larger declared size is refused before decoding
MAX_IMAGE_BYTES = 1 << 30  # a 64-megapixel image, even uncompressed 16-bit RGBA, is smaller
MAX_TEXT_CHUNK = 256 << 20  # one PNG text chunk, decompressed (a 10,000-vector embedding is ~200 MB)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

ImageLike = Union[str, Path, Image.Image]


def open_image(source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (or its bytes) to RGB, refusing what is not a whole, sane image.

    ``name`` is what error messages call the image (default: the path).  Raises ``BadInput`` for
    non-image bytes, empty or truncated files and declared sizes over ``max_pixels``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<image bytes>")
    if isinstance(source, (str, Path)):
        try:
            data = limits.read_regular(source, "image", MAX_IMAGE_BYTES)
        except OSError as e:
            raise BadInput(f"{label}: cannot read image ({e.strerror or e})") from None
    else:
        data = source
    if not data:
        raise BadInput(f"{label}: empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ``max_pixels`` decides
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise BadInput(
                    f"{label}: declares {width} x {height} pixels, more than the {max_pixels:,} "
                    f"allowed (a decompression bomb?); not decoded"
                )
            if width == 0 or height == 0:
                raise BadInput(f"{label}: has zero size ({width} x {height})")
            image.load()
    except BadInput:
        raise
    except Image.DecompressionBombError as e:
        raise BadInput(f"{label}: refused as a decompression bomb before decoding ({e})") from None
    except UnidentifiedImageError:
        raise BadInput(f"{label}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(f"{label}: truncated or corrupt image ({e})") from None
    return to_rgb(image, label)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """RGB as CLIP reads it: Pillow's conversion (alpha dropped, CMYK and palettes mapped), except
    16-bit greyscale, scaled to 8 bits instead of clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8), mode="L")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadInput(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size`` and the aspect kept, rounded down as CLIP does."""
    short, long = min(width, height), max(width, height)
    long = int(size * long / short)
    return (size, long) if width <= height else (long, size)


def resize_crop(image: Image.Image, size: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then the central ``size`` x ``size`` square."""
    w, h = resized_size(*image.size, size)
    left, top = (w - size) // 2, (h - size) // 2
    if w * h <= max_pixels:
        resized = image.resize((w, h), Image.Resampling.BICUBIC)
        return resized.crop((left, top, left + size, top + size))
    # a very elongated image: resample only the crop window (same kernels, no huge intermediate)
    sx, sy = image.width / w, image.height / h
    return image.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    )


def preprocess(image: ImageLike, size: int = 224) -> np.ndarray:
    """One image (PIL image or path) -> float32 [3, size, size] CLIP pixel values."""
    if not isinstance(image, Image.Image):
        image = open_image(image)
    rgb = np.asarray(resize_crop(to_rgb(image), size))
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pixel_values(images: Sequence[ImageLike], size: int = 224) -> torch.Tensor:
    """A batch of images (PIL images or paths) -> [B, 3, size, size] float32 pixel values."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if not images:
        raise BadInput("no images given")
    return torch.from_numpy(np.stack([preprocess(im, size) for im in images]))


def png_text(path: str | Path, key: str) -> str | None:
    """The text stored under ``key`` in a PNG's tEXt / zTXt / iTXt chunks (None: no such chunk), read chunk
    by chunk without decoding a pixel: a 144-megapixel picture costs no more than a small one.
    ``BadInput`` for a file that is not a PNG, is cut short, or whose text chunk is damaged or too big."""
    with limits.open_regular(path, "image") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise BadInput(f"{path}: not a PNG image")
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput(f"{path}: a PNG cut short (no IEND chunk)")
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return None
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                f.seek(length + 4, io.SEEK_CUR)  # the chunk and its CRC, unread
                continue
            if length > MAX_TEXT_CHUNK:
                raise BadInput(
                    f"{path}: a {kind.decode()} chunk of {length:,} bytes, more than the {MAX_TEXT_CHUNK:,} allowed"
                )
            body, crc = f.read(length), f.read(4)
            if len(body) < length or len(crc) < 4:
                raise BadInput(f"{path}: a PNG cut short (in a {kind.decode()} chunk)")
            if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
                raise BadInput(f"{path}: a {kind.decode()} chunk fails its CRC check (a damaged file)")
            name, _, rest = body.partition(b"\0")
            if name.decode("latin-1") == key:
                return _chunk_text(path, kind, rest)


def _chunk_text(path: str | Path, kind: bytes, rest: bytes) -> str:
    """The text of a tEXt (Latin-1), zTXt (compressed Latin-1) or iTXt (UTF-8, maybe compressed) chunk."""
    try:
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(rest[1:]).decode("latin-1")
        compressed, rest = rest[:1] == b"\1", rest[2:]
        _language, _, rest = rest.partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return (_inflate(text) if compressed else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{path}: a damaged {kind.decode()} chunk ({e})") from None


def _inflate(data: bytes) -> bytes:
    """zlib-decompressed ``data``, refused past ``MAX_TEXT_CHUNK`` bytes (a deflate bomb)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_TEXT_CHUNK)
    if inflater.unconsumed_tail:
        raise ValueError(f"it decompresses to more than {MAX_TEXT_CHUNK:,} bytes")
    return out
