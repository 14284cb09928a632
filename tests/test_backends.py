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
