"""Preprocessing against transformers' CLIPImageProcessor (the PIL one), and bad image files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from sdclip.errors import BadInput
from sdclip.images import MAX_PIXELS, open_image, pixel_values, preprocess, resize_crop

PROCESSOR = CLIPImageProcessor()  # openai/clip-vit-*'s settings are the class defaults


def _reference(image: Image.Image, size: int = 224) -> np.ndarray:
    out = PROCESSOR(
        images=image,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        return_tensors="np",
        input_data_format="channels_last",
    )
    return out["pixel_values"][0]


def _picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise and a sharp edge: resampling errors show on all three."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 64 * 4], -1)
    base[: height // 2, : width // 3] = [250, 10, 120]
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _png(width: int, height: int, color_type: int, depth: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "width,height", [(224, 224), (300, 200), (200, 300), (640, 480), (97, 1203), (50, 37), (1, 1), (3, 500), (225, 224)]
)
def test_rgb_sizes_match_clip_image_processor(width, height):
    image = Image.fromarray(_picture(width, height, width + height))
    assert np.abs(preprocess(image) - _reference(image)).max() <= 1e-5


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1", "I;16"])
def test_modes_match_clip_image_processor(mode):
    rgb = Image.fromarray(_picture(160, 120, 7))
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "LA":
        image = rgb.convert("LA")
    elif mode == "I;16":
        wide = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # 8-bit values spread over 16 bits
        image = Image.fromarray(wide)
        assert image.mode == "I;16"
        # Pillow (and so CLIPImageProcessor) clips 16-bit to white; sdclip scales it
        assert np.abs(preprocess(image) - _reference(rgb.convert("L"))).max() <= 1e-5
        return
    else:
        image = rgb.convert(mode)
    assert np.abs(preprocess(image) - _reference(image)).max() <= 1e-5


def test_files_of_every_kind_decode_like_pillow(tmp_path):
    rgb = Image.fromarray(_picture(90, 70, 3))
    cases = {
        "a.jpg": rgb,
        "b.png": rgb.convert("RGBA"),
        "c.gif": rgb.convert("P"),
        "d.webp": rgb,
        "e.tiff": rgb.convert("CMYK"),
        "f.bmp": rgb.convert("L"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        ref = Image.open(tmp_path / name)
        assert np.abs(preprocess(tmp_path / name) - _reference(ref)).max() <= 1e-5, name
    # a 16-bit-per-channel RGB PNG: Pillow keeps the high bytes
    wide = (np.asarray(rgb, dtype=np.uint16) * 257).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in wide)
    (tmp_path / "g.png").write_bytes(_png(90, 70, 2, 16, raw))
    assert np.abs(preprocess(tmp_path / "g.png") - _reference(rgb)).max() <= 1e-5


def test_elongated_image_is_resized_through_the_crop_window():
    image = Image.fromarray(_picture(2000, 40, 11))  # full resize: 11200 x 224
    full = np.asarray(resize_crop(image, 224), dtype=int)
    windowed = np.asarray(resize_crop(image, 224, max_pixels=1), dtype=int)
    assert np.abs(full - windowed).max() <= 1 and (full == windowed).mean() > 0.99


def test_batch_shape_and_small_size():
    images = [Image.fromarray(_picture(80, 60, s)) for s in range(3)]
    batch = pixel_values(images, size=64)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    assert np.abs(batch[1].numpy() - _reference(images[1], 64)).max() <= 1e-5


def test_bad_files_raise_bad_input_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_picture(200, 200)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    # a valid PNG header declaring 20000 x 20000 pixels (with 50 bytes of data): never decoded
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000, 2, 8, b"\x00" * 50))
    (tmp_path / "wide.png").write_bytes(_png(9000, 8000, 0, 8, b"\x00" * 50))
    for name, message in [
        ("truncated.png", "truncated or corrupt"),
        ("empty.jpg", "empty file"),
        ("text.png", "not an image"),
        ("bomb.png", "decompression bomb"),
        ("wide.png", "9000 x 8000 pixels"),
        ("missing.png", "cannot read"),
    ]:
        with pytest.raises(BadInput, match=message) as info:
            open_image(tmp_path / name)
        assert name in str(info.value)
    assert 9000 * 8000 > MAX_PIXELS
    with pytest.raises(BadInput, match="<image bytes>"):
        open_image(b"\x89PNG garbage")
