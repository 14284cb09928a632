"""The one atomic writer: old file whole on failure, no partial file, umask honoured, links followed."""

import os
import stat

import pytest

from sdclip.atomic import atomic_path, write_bytes, write_text
from sdclip.errors import BadInput, SdclipError


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_honours_umask_and_keeps_existing_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes(tmp_path / "new.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640
    (tmp_path / "kept.bin").write_bytes(b"x")
    os.chmod(tmp_path / "kept.bin", 0o604)
    write_bytes(tmp_path / "kept.bin", b"y")
    assert stat.S_IMODE((tmp_path / "kept.bin").stat().st_mode) == 0o604


def test_follows_symlink(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_text() == "new"


@pytest.mark.parametrize("target", ["/dev/null", "folder"])
def test_refuses_non_regular_targets(tmp_path, target):
    if target == "folder":
        target = tmp_path
    with pytest.raises(BadInput, match="folder|not a regular file"):
        write_bytes(target, b"x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_names_the_file(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(SdclipError, match="a.bin: cannot write"):
            write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.chmod(tmp_path, 0o700)


def test_safetensors_bytes_do_not_depend_on_the_writer_s_hash_order(tmp_path):
    """The safetensors writer orders metadata by its hash map; sdclip's files sort it: same input, same bytes."""
    import json

    import numpy as np
    import torch

    from sdclip.atomic import write_safetensors

    metadata = {f"key {n}": f"välue\n{n}\x01 \u2028" for n in range(12)}
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, dtype=np.float16)}
    files = []
    for n in range(4):
        write_safetensors(tmp_path / f"{n}.safetensors", tensors, metadata)
        files.append((tmp_path / f"{n}.safetensors").read_bytes())
    write_safetensors(tmp_path / "torch.safetensors", {k: torch.from_numpy(v) for k, v in tensors.items()}, metadata)
    assert all(f == files[0] for f in files) and (tmp_path / "torch.safetensors").read_bytes() == files[0]
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert list(header["__metadata__"].items()) == sorted(metadata.items())
