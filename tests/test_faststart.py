"""The torch-free ``encode`` (``sdclip.faststart``): once the normal ``--backend onnxruntime`` path has cached a
checkpoint file's graph, ``sdclip encode`` answers with numpy and onnxruntime only, bit-identical to the
normal path; anything it cannot answer (a changed file, options never cached) takes the normal path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import layouts
import numpy as np
import pytest
from references import TOLERANCE, Arch, build

import sdclip
from sdclip import faststart
from sdclip.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnxruntime is not installed (pip install 'sdclip[onnx]')",
)
SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = Arch(128, 3, 2, 512, "quick_gelu", 96, 49407)
# 9 unique rows and a repeat: two passes of 8, the second padded
PROMPTS = ["a photo of a cat", "a dog", "a photo of a cat", *(f"a painting of {n} foxes" for n in range(7))]
# runs the command line in-process, then says whether torch got imported
PROBE = """
import json, sys
from sdclip.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.fixture
def model(tmp_path, monkeypatch):
    path = layouts.write_sd1(build(SMALL, seed=5), tmp_path / "sd1.safetensors")
    monkeypatch.setenv("SDCLIP_CACHE", str(tmp_path / "cache"))
    return path


def fresh(path: Path, out: Path, *options: str) -> bool:
    """``sdclip encode PROMPTS`` in a fresh process; whether it imported torch."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["encode", *PROMPTS, "--model", str(path), "--out", str(out), *options]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0, done.stderr
    return result["torch"]


def encode(path: Path, out: Path, *options: str) -> None:
    """``sdclip encode PROMPTS`` in this process."""
    assert main(["encode", *PROMPTS, "--model", str(path), "--out", str(out), *options]) == 0


def test_cached_encode_is_torch_free_and_bit_identical(model, tmp_path):
    from safetensors.numpy import load_file

    assert faststart.encode(model, PROMPTS) is None  # nothing cached yet
    encode(model, tmp_path / "normal.safetensors", "--backend", "onnxruntime")  # exports, runs, indexes the graph
    torch_imported = fresh(model, tmp_path / "fast.safetensors", "--backend", "onnxruntime")
    assert not torch_imported, "the cached encode imported torch"
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "normal.safetensors").read_bytes()
    encode(model, tmp_path / "torch.safetensors")
    a, b = load_file(tmp_path / "fast.safetensors"), load_file(tmp_path / "torch.safetensors")
    assert a.keys() == b.keys() == {"hidden", "pooled"}
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= TOLERANCE, name


def test_library_call_equals_the_normal_path(model):
    te = sdclip.load(model, backend="onnxruntime")
    out = te.encode(PROMPTS, layer=-2, final_norm=False)
    assert faststart.encode(model, PROMPTS) is None  # another layer choice was cached
    fast = faststart.encode(model, PROMPTS, layer=-2, final_norm=False)
    assert fast is not None and (fast.layer, fast.final_norm) == (-2, False)
    assert np.array_equal(fast.hidden, out.hidden.numpy()) and np.array_equal(fast.pooled, out.pooled.numpy())
    assert faststart.encode(model, PROMPTS, layer=-2, final_norm=False, micro_batch=1) is None
    assert faststart.encode(model, PROMPTS, layer=-2, final_norm=False, tokenizer_mode="openai") is None


def test_a_changed_file_takes_the_normal_path(model, tmp_path):
    from safetensors.numpy import load_file

    encode(model, tmp_path / "old.safetensors", "--backend", "onnxruntime")
    assert faststart.encode(model, PROMPTS) is not None
    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 1))  # touched only
    assert faststart.encode(model, PROMPTS) is None
    layouts.write_sd1(build(SMALL, seed=6), model)  # other weights under the same name
    assert faststart.encode(model, PROMPTS) is None
    assert fresh(model, tmp_path / "new.safetensors", "--backend", "onnxruntime")  # the normal path
    encode(model, tmp_path / "torch.safetensors")
    new, old = load_file(tmp_path / "new.safetensors"), load_file(tmp_path / "old.safetensors")
    assert np.abs(new["hidden"] - load_file(tmp_path / "torch.safetensors")["hidden"]).max() <= TOLERANCE
    assert np.abs(new["hidden"] - old["hidden"]).max() > 1e-2
    assert not fresh(model, tmp_path / "again.safetensors", "--backend", "onnxruntime")  # re-indexed


def test_what_the_cache_cannot_answer_is_not_answered(model, tmp_path, monkeypatch):
    rounded = sdclip.load(model, backend="onnxruntime").to(dtype="float16").to(dtype="float32")
    rounded.encode("a cat")  # weights that went through float16 are not the file's: never indexed
    assert not (tmp_path / "cache" / "fast").exists()
    te = sdclip.load(model, backend="onnxruntime")
    te.encode("a cat")
    assert faststart.encode(model, ["a cat"]) is not None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch would run another thread count
    assert faststart.encode(model, ["a cat"]) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    index = next((tmp_path / "cache" / "fast").glob("*.json"))
    graph = Path(next(iter(json.loads(index.read_text())["runs"].values()))["graph"])
    graph.write_bytes(b"not a graph")
    assert faststart.encode(model, ["a cat"]) is None
    index.write_text("{")
    assert faststart.encode(model, ["a cat"]) is None


def test_identity_of_what_is_not_a_safetensors_file(tmp_path):
    """A FIFO is not opened (that would block), nor is a device read: no identity, the normal path says why."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 a torch zip")
    for path in (tmp_path / "fifo", tmp_path, Path("/dev/zero"), tmp_path / "model.ckpt", tmp_path / "missing"):
        assert faststart.file_identity(path) is None, path
    with pytest.raises(sdclip.BadInput, match="not a regular file"):
        sdclip.load(tmp_path / "fifo", backend="onnxruntime")
