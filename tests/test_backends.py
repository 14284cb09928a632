"""Optional engines (``sdclip.load(..., backend=...)``): exact to transformers in float32, exact reuse
kept, exported once per model, clear errors when an engine is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import layouts
import pytest
import torch
from references import PROMPTS, TOLERANCE, Arch, assert_close, build, hidden_state, reference

import sdclip
from sdclip import backends
from sdclip.errors import BadInput, SdclipError

INSTALLED = [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b) and importlib.util.find_spec("onnx")]
ENGINES = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            b not in INSTALLED, reason=f"{b} is not installed (pip install 'sdclip[{backends._EXTRAS[b]}]')"
        ),
    )
    for b in ("onnxruntime", "openvino")
]
SOME = PROMPTS[:12]
# small enough to export in seconds; bench/bench_engines.py measures the full ViT-L/14 shape's fidelity
SMALL = Arch(128, 3, 2, 512, "quick_gelu", 96, 49407)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small CLIP-L-style tower with a projection, as an SD1 single file, and its transformers reference."""
    folder = tmp_path_factory.mktemp("engines")
    hf = build(SMALL, seed=5)
    path = layouts.write_sd1(hf, folder / "sd1.safetensors")
    return hf, path, folder / "cache"


@pytest.fixture
def cache(model, monkeypatch):
    monkeypatch.setenv("SDCLIP_CACHE", str(model[2]))
    return model[2]


@pytest.mark.parametrize("backend", ENGINES)
def test_exact_to_transformers(model, cache, backend):
    hf, path, _ = model
    te = sdclip.load(path, backend=backend)
    ids = te.tokenize(SOME)
    ref = reference(hf, ids)
    out = te.encode_ids(ids, layer=-1, final_norm=True)
    assert_close(
        {
            "last_hidden_state": (out.hidden - ref.last_hidden_state).abs().max().item(),
            "pooler_output": (out.pooled - ref.pooler_output).abs().max().item(),
        }
    )
    assert list(cache.glob("exports/*.onnx")), "the engine did not run: no export in the cache"
    for layer, final_norm in ((-2, False), (0, False)):
        got = te.encode_ids(ids, layer=layer, final_norm=final_norm).hidden
        assert (got - hidden_state(hf, ref, layer, final_norm)).abs().max().item() <= TOLERANCE, (layer, final_norm)
    pooled = te.encode_ids(ids, hidden=False)  # pooled-only: rows cut at their EOS, lengths vary
    assert (pooled.pooled - ref.pooler_output).abs().max().item() <= TOLERANCE
    assert te.fingerprint != sdclip.load(path).fingerprint  # caches never mix engine and torch outputs


@pytest.mark.parametrize("backend", ENGINES)
def test_reuse_and_conditioning_stay_exact(model, cache, backend):
    hf, path, _ = model
    te, plain = sdclip.load(path, backend=backend), sdclip.load(path)
    shared = "masterpiece, best quality, extremely detailed, intricate, sharp focus, award winning photograph, "
    prompts = [shared + tail for tail in ("a cat", "a dog on a mat", "a red fox", "a castle")] + ["a cat"] * 3
    ids = te.tokenize(prompts)
    out = te.encode_ids(ids)  # identical rows once; the shared prefix through torch, the rest on the engine
    assert te.reuse.stats.unique_rows < te.reuse.stats.rows
    ref = reference(hf, ids)
    assert (out.hidden - ref.last_hidden_state).abs().max().item() <= TOLERANCE
    a = sdclip.encode_prompts(te, ["a (red:1.3) fox, [blurry]"], negative="ugly", dialect="a1111")
    b = sdclip.encode_prompts(plain, ["a (red:1.3) fox, [blurry]"], negative="ugly", dialect="a1111")
    for x, y in ((a.hidden, b.hidden), (a.negative_hidden, b.negative_hidden)):  # A1111's weighting scales
        assert (x - y).abs().max().item() <= TOLERANCE * y.abs().max().item()  # rows: relative to their size


@pytest.mark.parametrize("backend", ENGINES)
def test_exported_once_per_model(model, cache, backend, monkeypatch):
    _, path, _ = model
    sdclip.load(path, backend=backend).encode("a cat")
    monkeypatch.setattr(backends, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    if backend == "onnxruntime":
        monkeypatch.setattr(backends, "optimize_for_ort", lambda *a, **k: pytest.fail("optimized again"))
    assert sdclip.load(path, backend=backend).encode("a dog").hidden.shape == (1, 77, 128)


@pytest.mark.parametrize("backend", ENGINES)
def test_cli_backend(model, cache, backend, tmp_path):
    from safetensors.torch import load_file

    _, path, _ = model
    for name in ("torch", backend):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sdclip.cli",
                "encode",
                "a photo of a cat",
                "--model",
                str(path),
                "--backend",
                name,
                "--out",
                str(tmp_path / f"{name}.safetensors"),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    a, b = load_file(tmp_path / "torch.safetensors"), load_file(tmp_path / f"{backend}.safetensors")
    assert (a["hidden"] - b["hidden"]).abs().max().item() <= TOLERANCE


def test_missing_engine_says_how_to_install(model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(SdclipError, match=r"pip install 'sdclip\[openvino\]'"):
        sdclip.load(model[1], backend="openvino")
    with pytest.raises(BadInput, match="unknown backend 'tensorrt'"):
        sdclip.load(model[1], backend="tensorrt")


def test_unwritable_cache_is_a_clear_error(model, monkeypatch, tmp_path):
    if not INSTALLED:
        pytest.skip("no engine installed")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SDCLIP_CACHE", str(blocker))
    te = sdclip.load(model[1], backend=INSTALLED[0])
    with pytest.raises(SdclipError, match="SDCLIP_CACHE"):
        te.encode("a cat")


def test_torch_fallbacks_are_exact(model, cache):
    """Injected vectors and masks run on the torch tower, so they equal the default backend's."""
    if not INSTALLED:
        pytest.skip("no engine installed")
    _, path, _ = model
    te, plain = sdclip.load(path, backend=INSTALLED[0]), sdclip.load(path)
    ids = te.tokenize(["a cat", "a dog"])
    mask = torch.ones_like(ids)
    mask[:, 2] = 0
    a = te.encode_ids(ids, attention_mask=mask)
    b = plain.encode_ids(ids, attention_mask=mask)
    assert torch.equal(a.hidden, b.hidden)


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime is not installed")
@pytest.mark.parametrize("threads,quantize", [(1, None), (3, None), (8, None), (1, "int8"), (8, "int8")])
def test_onnxruntime_rows_independent_of_their_batch(model, cache, threads, quantize):
    """The claim that lets exact reuse run a lone prompt unpadded (``EngineTower.rows_independent``): each row's
    outputs are the same bits alone, in any batch and in any company, at 1 thread and when ONNX Runtime splits
    the products across threads (8 threads on fewer cores still splits them); int8 too (one row per run)."""
    _, path, _ = model
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the engine's session takes torch's thread count
    try:
        te = sdclip.load(path, backend="onnxruntime", quantize=quantize)
        engine = te._engine(0)
        assert engine.rows_independent
        ids = te.tokenize(SOME)
        for length in (77, 16):  # full rows, and pooled-only rows cut short
            part = ids[:, :length]
            whole = engine(part)
            groups = [[i] for i in range(len(part))] + [[3, 0, 7], [11, 5, 2, 9, 1], [6, 6, 6, 4, 10, 8, 0, 1, 2]]
            for rows in groups:
                out = engine(part[rows])
                assert torch.equal(out.hidden, whole.hidden[rows]), (length, rows)
                assert torch.equal(out.pooled, whole.pooled[rows]), (length, rows)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime is not installed")
def test_one_prompt_costs_one_row_on_onnxruntime(model, cache):
    """Exact reuse pads a lone prompt to a full micro-batch on torch; on ONNX Runtime (float32) it runs the one
    row, and the answer is the same bits as that prompt's row in a full batch."""
    _, path, _ = model
    te = sdclip.load(path, backend="onnxruntime")
    alone = te.encode("a red fox")
    assert te.reuse.stats.positions_computed == 77
    batch = te.encode(["a cat", "a dog", "a red fox", "a castle", "a tree", "a boat", "a house", "a car"])
    assert torch.equal(alone.hidden[0], batch.hidden[2]) and torch.equal(alone.pooled[0], batch.pooled[2])
    torch_te = sdclip.load(path)
    torch_te.encode("a red fox")
    assert torch_te.reuse.stats.positions_computed == 8 * 77  # torch keeps the padded fixed shape
    int8 = sdclip.load(path, backend="onnxruntime", quantize="int8")
    int8.encode("a red fox")
    assert int8.reuse.stats.positions_computed == 77
    if "openvino" in INSTALLED:
        assert not sdclip.load(path, backend="openvino")._engine(0).rows_independent
