"""The conditioning cache: same results as without it, keyed by model, dialect, options and prompt, bounded."""

from __future__ import annotations

import condfakes
import pytest
import torch

from sdclip import Conditioner
from sdclip.cache import ConditioningCache

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a (red:1.3) fox", "masterpiece, best quality, a cat", "a (red:1.3) fox"]


@pytest.mark.parametrize("dialect", ["a1111", "comfy", "compel", "diffusers"])
def test_cached_equals_uncached(dialect: str):
    te = condfakes.encoder("sdxl", widths=(64, 96))
    cache = ConditioningCache()
    plain = Conditioner(te, dialect, cache=None).encode(PROMPTS, negative="blurry")
    first = Conditioner(te, dialect, cache=cache).encode(PROMPTS, negative="blurry")
    assert cache.misses and not cache.hits
    second = Conditioner(te, dialect, cache=cache).encode(PROMPTS, negative="blurry")
    assert cache.hits == cache.misses  # every lookup of the second call hit
    for a, b, c in (
        (plain.hidden, first.hidden, second.hidden),
        (plain.pooled, first.pooled, second.pooled),
        (plain.negative_hidden, first.negative_hidden, second.negative_hidden),
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_keys_separate_models_options_and_roles():
    cache = ConditioningCache()
    a, b = condfakes.encoder("sd1", seed=0), condfakes.encoder("sd1", seed=1)
    assert a.fingerprint != b.fingerprint and a.fingerprint == condfakes.encoder("sd1", seed=0).fingerprint
    out_a = Conditioner(a, "a1111", cache=cache).encode("a cat")
    out_b = Conditioner(b, "a1111", cache=cache).encode("a cat")
    assert not torch.equal(out_a.hidden, out_b.hidden)  # another model: no stale hit
    skip = Conditioner(a, "a1111", cache=cache, clip_skip=2).encode("a cat")
    assert not torch.equal(out_a.hidden, skip.hidden)  # other options: no stale hit
    emphasis = Conditioner(a, "a1111", cache=cache, emphasis="ignore").encode("a (cat:1.5)")
    assert not torch.equal(emphasis.hidden, Conditioner(a, "a1111", cache=cache).encode("a (cat:1.5)").hidden)
    uncached = Conditioner(a, "a1111", cache=None, clip_skip=2).encode("a cat")
    assert torch.equal(skip.hidden, uncached.hidden)
    # the same text as prompt and as negative is one entry each: diffusers' negative ignores clip_skip
    out = Conditioner(a, "diffusers", cache=cache, clip_skip=1).encode("a cat", negative="a cat")
    assert not torch.equal(out.hidden, out.negative_hidden)


def test_bounded_in_bytes():
    te = condfakes.encoder("sd1")
    one_prompt = 77 * 64 * 4
    cache = ConditioningCache(max_bytes=3 * one_prompt)
    conditioner = Conditioner(te, "diffusers", cache=cache)  # entries: each prompt and the (empty) negative
    for i in range(6):
        conditioner.encode(f"prompt number {i}")
    assert cache.nbytes <= cache.max_bytes and len(cache) == 3
    hits, misses = cache.hits, cache.misses
    conditioner.encode("prompt number 5")  # recent: still there
    assert (cache.hits - hits, cache.misses - misses) == (2, 0)
    conditioner.encode("prompt number 0")  # the oldest was dropped
    assert (cache.hits - hits, cache.misses - misses) == (3, 1)


def test_model_changes_change_the_fingerprint():
    te = condfakes.encoder("sd1")
    before = te.fingerprint
    te.to(dtype="bfloat16")
    assert te.fingerprint != before
