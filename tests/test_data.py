"""Folder and webdataset-tar data sets."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from sdclip.data import FolderDataset, TarDataset, open_dataset
from sdclip.errors import BadInput
from sdclip.shapes import Shapes


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_folder_pairs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "a.txt").write_text("a  red\ncircle ")
    (tmp_path / "sub" / "b.PNG").write_bytes(_png(1))
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "lonely.png").write_bytes(_png(2))  # no caption: skipped
    data = open_dataset(str(tmp_path))
    assert isinstance(data, FolderDataset) and len(data) == 2
    image, caption = data[0]
    assert caption == "a red circle" and image.size == (30, 20) and image.mode == "RGB"
    (tmp_path / "c.png").write_bytes(b"not a png")
    (tmp_path / "c.txt").write_text("broken")
    data = FolderDataset(tmp_path)
    with pytest.raises(BadInput, match="c.png"):
        data[[p.name for p, _ in data.pairs].index("c.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no image"):
        FolderDataset(tmp_path / "empty")


def test_webdataset_tar(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("0001.jpg", _png(0)),
            ("0001.txt", b"first"),
            ("0002.png", _png(1)),
            ("0002.txt", "zweite \u00fcber".encode()),
            ("0003.png", _png(2)),
            ("0004.txt", b"x"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = open_dataset(str(path))
    assert isinstance(data, TarDataset) and len(data) == 2
    assert data[1][1] == "zweite \u00fcber" and data[0][0].size == (30, 20)
    (tmp_path / "junk.tar").write_bytes(b"\0" * 10)
    with pytest.raises(BadInput):
        open_dataset(str(tmp_path / "junk.tar"))
    assert isinstance(open_dataset("shapes", 32), Shapes)
