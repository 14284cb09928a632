"""Every file sdclip writes goes through ``sdclip.atomic``: a write that fails half-way (disk full, here a file size
limit that makes the write fail mid-file, in C, Rust and Python writers alike) leaves the old file whole and no
partial file; ``--out`` follows a symlink and refuses a device; the umask is honoured."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdclip
from sdclip.cli import main
from sdclip.embeddings import Embedding, read_embedding, save_embedding

LIMIT = 6000  # bytes a file may reach in the "full disk" runs; every new file below is larger

# Runs in a child process: each case writes a large new file over a valid old one with writes capped at LIMIT
# bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so the write fails with EFBIG half-way as on a full disk).
FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    import sdclip
    from sdclip.cli import main
    from sdclip.clip import CLIPModel

    folder, limit = Path(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def capped(run, limit=limit):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return run()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    clip = CLIPModel.load()
    results = {
        "encode": capped(lambda: main(["encode", "a cat", "a dog", "--out", str(folder / "cond.safetensors")])),
        "convert_pt": capped(lambda: main(["ti", "convert", str(folder / "big.safetensors"), str(folder / "old.pt")])),
        "convert_bin": capped(lambda: main(["ti", "convert", str(folder / "big.safetensors"),
                                            str(folder / "learned_embeds.bin")])),
        "convert_new": capped(lambda: main(["ti", "convert", str(folder / "big.safetensors"), str(folder / "new.pt")])),
        "shapes": capped(lambda: main(["shapes", "--out", str(folder / "pictures"), "--n", "2"]), 100),
        "clip_save": capped(lambda: clip.save(folder / "model")),
        "tokenizer": capped(lambda: sdclip.Tokenizer().save_hf(folder / "tok")),
    }
    print(json.dumps(results))
""")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_disk_keeps_every_old_file_and_leaves_no_partial_file(tmp_path, capsys):
    small = Embedding("old", "old", {"clip_l": torch.randn(1, 128)})
    big = Embedding("big", "big", {"clip_l": torch.randn(16, 768)})  # 48 kB
    save_embedding(small, tmp_path / "old.pt")
    save_embedding(small, tmp_path / "learned_embeds.bin", "diffusers")
    save_embedding(big, tmp_path / "big.safetensors")
    assert main(["encode", "old", "--out", str(tmp_path / "cond.safetensors")]) == 0
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "00000.txt").write_text("an old caption\n")
    sdclip.CLIPModel.load().save(tmp_path / "model")
    sdclip.Tokenizer().save_hf(tmp_path / "tok")
    before = snapshot(tmp_path)
    assert any(len(data) > LIMIT for name, data in before.items() if name.startswith("model/"))

    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path), str(LIMIT)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for cli_case in ("encode", "convert_pt", "convert_bin", "convert_new", "shapes"):
        assert results[cli_case] == 1, (cli_case, results[cli_case])
    assert "cannot write" in results["clip_save"] and "model.safetensors" in results["clip_save"]
    assert "cannot write" in results["tokenizer"] and "vocab.json" in results["tokenizer"]
    for name in ("cond.safetensors", "old.pt", "learned_embeds.bin", "new.pt", "00000.png"):
        assert f"{name}: cannot write (File too large)" in child.stderr, (name, child.stderr[-3000:])

    after = snapshot(tmp_path)
    assert after == before  # every old file whole, nothing new, no temp file left behind
    assert read_embedding(tmp_path / "old.pt").count == 1


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_outputs_honour_the_umask(tmp_path, umask_027):
    assert main(["encode", "a cat", "--out", str(tmp_path / "c.safetensors")]) == 0
    save_embedding(Embedding("e", "e", {"clip_l": torch.randn(1, 128)}), tmp_path / "e.pt")
    assert main(["shapes", "--out", str(tmp_path / "pics"), "--n", "1"]) == 0
    sdclip.Tokenizer().save_hf(tmp_path / "tok")
    for path in (
        tmp_path / "c.safetensors",
        tmp_path / "e.pt",
        tmp_path / "pics" / "00000.png",
        tmp_path / "pics" / "00000.txt",
        tmp_path / "tok" / "vocab.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_out_symlink_is_followed(tmp_path):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert main(["encode", "a cat", "--out", str(link)]) == 0
    assert link.is_symlink() and "hidden" in load_file(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "real.safetensors"]


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_out_device_is_refused(tmp_path, capsys):
    link = tmp_path / "to-null.safetensors"
    link.symlink_to("/dev/null")
    for target in ("/dev/null", str(link)):
        assert main(["encode", "a cat", "--out", target]) == 2
        assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert main(["ti", "convert", "x.pt", "/dev/null"]) == 2


def test_unwritable_places_are_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["encode", "a cat", "--out", str(tmp_path / "file" / "c.safetensors")]) == 1
    assert "c.safetensors: cannot write (" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            assert main(["encode", "a cat", "--out", str(folder / "c.safetensors")]) == 1
            assert "c.safetensors: cannot write (Permission denied)" in capsys.readouterr().err
        finally:
            folder.chmod(0o755)
