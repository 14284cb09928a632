"""The same answer whatever ran before: a prompt's conditioning is bit-identical alone, among any companions,
after unrelated calls that fill the prefix and conditioning caches, and with the caches cleared.

The history dependence this guards against: a prefix cached by an earlier call made the positions after it run
in another shape (different matrix-product rounding, ~1e-7), and A1111's mean restoration magnified that to
1.96e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch
from condfakes import encoder as fake_encoder

import sdclip
from sdclip.cache import ConditioningCache
from sdclip.checkpoint import Usage
from sdclip.model import TextConfig, TextTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

QUALITY = (
    "masterpiece, best quality, ultra detailed, highres, sharp focus, intricate, beautiful lighting, "
    "cinematic, 8k, professional photo, award winning, trending on artstation, "
)
PROMPT = QUALITY + "a (red star:1.2) above a blue square"
COMPANIONS = [
    QUALITY + "a cat",
    "a (blue:0.8) dog",
    QUALITY + "a bird",
    "lowres, bad anatomy",
    "",
    QUALITY + "a fish on a plate, " * 6,
]  # the last one is three chunks long
FILLERS = [QUALITY + w for w in ("a cow", "a hen", "a fox", "a pig", "an owl", "a bee")]
DIALECTS = ["a1111", "comfy", "compel", "diffusers"]


@pytest.fixture(scope="module")
def bundled() -> sdclip.TextEncoder:
    return sdclip.load()


@pytest.fixture(scope="module")
def vit_l() -> sdclip.TextEncoder:
    """ViT-L's width, heads and MLP (the shapes whose matrix products matter), 2 layers."""
    tower = TextTransformer(TextConfig(layers=2)).init_weights(torch.Generator().manual_seed(0))
    return sdclip.TextEncoder([tower], [Usage(-1, True)], [sdclip.Tokenizer()], "sd1")


@pytest.fixture(scope="module")
def vit_l_onnx(vit_l, tmp_path_factory) -> sdclip.TextEncoder:
    """The same tower on ONNX Runtime, whose passes are not padded (``rows_independent``): that a row's bits do
    not depend on its batch there is what these tests check."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDCLIP_CACHE", str(tmp_path_factory.mktemp("engine-cache")))
        te = sdclip.TextEncoder(vit_l.towers, vit_l.usages, vit_l.tokenizers, "sd1", backend="onnxruntime")
        te.encode("a cat")  # exports while the cache folder is set
        yield te


def histories(te: sdclip.TextEncoder, dialect: str):
    """(what ran, the prompt's hidden states [77 k, C] and pooled output) for each history."""
    length = None

    def take(cond, i):
        nonlocal length
        length = length or cond.hidden.shape[1]
        return cond.hidden[i, :length], None if cond.pooled is None else cond.pooled[i]

    plain = sdclip.Conditioner(te, dialect, cache=None)
    yield "alone", take(plain.encode([PROMPT]), 0)
    yield "among companions", take(plain.encode(COMPANIONS[:3] + [PROMPT] + COMPANIONS[3:]), 3)
    yield "repeated in its batch", take(plain.encode([PROMPT, COMPANIONS[1], PROMPT], negative="blurry"), 2)
    cache = ConditioningCache()
    cached = sdclip.Conditioner(te, dialect, cache=cache)
    cached.encode(FILLERS)  # fills the conditioning cache and, with prefixes on, the prefix cache
    cached.encode(FILLERS[:2] + COMPANIONS)
    yield "after unrelated calls (cache miss)", take(cached.encode([PROMPT]), 0)
    yield "from the conditioning cache", take(cached.encode([COMPANIONS[0], PROMPT]), 1)
    cache.clear()
    te.reuse.cache.clear()
    yield "caches cleared", take(cached.encode([PROMPT, COMPANIONS[2]]), 0)


def assert_history_free(te: sdclip.TextEncoder, dialect: str) -> None:
    with torch.inference_mode():
        runs = list(histories(te, dialect))
    (_, (hidden, pooled)), rest = runs[0], runs[1:]
    assert torch.isfinite(hidden).all()
    for what, (h, p) in rest:
        assert torch.equal(h, hidden), f"{dialect}, {what}: max |diff| {(h - hidden).abs().max().item():.3g}"
        if pooled is not None:
            assert torch.equal(p, pooled), f"{dialect}, {what}: pooled differs"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_bundled_model_is_history_free(bundled, dialect):
    assert_history_free(bundled, dialect)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_vit_l_shaped_tower_is_history_free(vit_l, dialect):
    assert_history_free(vit_l, dialect)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_onnxruntime_engine_is_history_free(vit_l_onnx, dialect):
    assert_history_free(vit_l_onnx, dialect)


@pytest.mark.parametrize("dialect", ["a1111", "compel"])
def test_sdxl_pooled_is_history_free(dialect):
    """The projected pooled output too (it used to be projected over the whole batch at once)."""
    assert_history_free(fake_encoder("sdxl", widths=(64, 96), layers=2), dialect)


@pytest.mark.parametrize("model", ["vit_l", "vit_l_onnx"])
def test_encode_is_history_free(model, request):
    """``TextEncoder.encode`` itself: alone, among companions, after other calls, pooled-only."""
    vit_l = request.getfixturevalue(model)
    with torch.inference_mode():
        alone = vit_l.encode([PROMPT])
        among = vit_l.encode(COMPANIONS[:2] + [PROMPT] + FILLERS)
        pooled_alone = vit_l.encode([PROMPT], hidden=False).pooled
        pooled_among = vit_l.encode(FILLERS + [PROMPT], hidden=False).pooled
    assert torch.equal(alone.hidden[0], among.hidden[2])
    assert torch.equal(alone.pooled[0], among.pooled[2])
    assert torch.equal(pooled_alone[0], pooled_among[-1])


def test_shared_prefixes_are_an_opt_in_with_their_own_cache_key(bundled):
    """``share_prefixes=True`` may round differently, so its results never share cache entries with the
    default's; the default's key names its micro-batch shape."""
    fast = sdclip.load(share_prefixes=True)
    assert fast.fingerprint != bundled.fingerprint
    assert "micro_batch=8" in bundled.fingerprint
    with pytest.raises(sdclip.BadInput, match="micro_batch"):
        sdclip.load(micro_batch=0)


def test_weights_fingerprint_does_not_depend_on_the_thread_count():
    """The fingerprint that caches and exported graphs key on summed the weights as floats, and torch's threads
    split that sum differently: the bundled model loaded under 2 threads and under 1 got two fingerprints."""
    fingerprints = set()
    for threads in (2, 1, 3):
        torch.set_num_threads(threads)
        fingerprints.add(sdclip.load().weights_fingerprint)
    torch.set_num_threads(1)
    assert len(fingerprints) == 1
