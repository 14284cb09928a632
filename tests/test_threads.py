"""Shared objects under threads: a ``ConditioningCache``, a ``TextEncoder`` (its reuse counters and prefix cache),
a ``Conditioner`` and a ``Tokenizer`` serve 8 threads switching every microsecond with no exception, exact
counters and every result equal to the single-threaded one."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import condfakes
import pytest
import torch

import sdclip
from sdclip.cache import ConditioningCache, _nbytes
from sdclip.reuse import PrefixCache

pytestmark = pytest.mark.usefixtures("one_thread")

THREADS = 8


@pytest.fixture(autouse=True)
def switch_often():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def hammer(work, n: int = THREADS) -> list:
    """Run ``work(k)`` on n threads that start together; every exception is re-raised."""
    start = threading.Barrier(n)

    def run(k):
        start.wait()
        return work(k)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_conditioning_cache_direct_race():
    """get / put / eviction from 8 threads on a cache far smaller than the data: counters add up exactly and the
    byte count stays the sum of what it holds."""
    cache = ConditioningCache(max_bytes=40 * 4 * 16)  # room for 16 of the 40 values
    values = [torch.full((40,), float(i)) for i in range(40)]
    rounds = 600

    def work(k):
        for i in range(rounds):
            key = (k * 7 + i) % 40
            got = cache.get(key)
            if got is not None:
                assert got[0].item() == key
            else:
                cache.put(key, values[key])

    hammer(work)
    assert cache.hits + cache.misses == THREADS * rounds
    assert cache.nbytes == sum(size for _, size in cache.entries.values()) <= cache.max_bytes
    assert all(size == _nbytes(v) for v, size in cache.entries.values())


def test_prefix_cache_direct_race():
    tower = condfakes.tower(32, 1)
    with torch.inference_mode():
        prefixes = [tower.compute_prefix(torch.tensor([49406, *range(100 + k, 110 + k)])) for k in range(20)]
    cache = PrefixCache(max_bytes=prefixes[0].nbytes * 5)

    def work(k):
        for i in range(300):
            p = prefixes[(k + i) % 20]
            cache.store(tower, p)
            found = cache.lookup(tower, tuple(p.ids.tolist()) + (1, 2), 20)
            assert found is None or found.ids.tolist() == p.ids.tolist()[: found.length]

    hammer(work)
    assert cache.nbytes == sum(p.nbytes for p in cache.entries.values()) <= cache.max_bytes


PROMPTS = [
    f"a ({colour}:1.{k}) {shape}"
    for k, colour in enumerate(["red", "blue", "green", "purple"])
    for shape in ("cat", "star", "square")
]


@pytest.mark.parametrize("dialect", ["a1111", "comfy", "compel"])
@pytest.mark.parametrize("prefixes", [False, True])
def test_shared_conditioner_and_cache(dialect, prefixes):
    """One encoder, one conditioner and one small cache shared by 8 threads: the results equal the single-threaded
    ones bit for bit (with the opt-in shared prefixes, whose rounding depends on what the prefix cache holds:
    to float32 rounding as magnified by A1111's emphasis)."""
    te = condfakes.encoder("sdxl", widths=(64, 96), layers=2)
    te.reuse.prefixes, te.reuse.min_prefix, te.reuse.min_saving = prefixes, 2, 1
    with torch.inference_mode():
        expected = {p: sdclip.Conditioner(te, dialect, cache=None).encode([p]) for p in PROMPTS}
    cache = ConditioningCache(max_bytes=6 * 77 * 160 * 4)  # a few prompts: constant eviction
    shared = sdclip.Conditioner(te, dialect, cache=cache)
    calls = 12

    def work(k):
        with torch.inference_mode():
            for i in range(calls):
                batch = [PROMPTS[(k + i) % len(PROMPTS)], PROMPTS[(3 * k + i) % len(PROMPTS)]]
                out = shared.encode(batch)
                for j, p in enumerate(batch):
                    for got, want in ((out.hidden[j], expected[p].hidden[0]), (out.pooled[j], expected[p].pooled[0])):
                        if prefixes:
                            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                        else:
                            assert torch.equal(got, want), p
        return calls

    hammer(work)
    assert cache.nbytes == sum(size for _, size in cache.entries.values()) <= cache.max_bytes
    # per call: its distinct prompts, the (absent) negative and the empty prompt
    assert cache.hits + cache.misses == THREADS * calls * 4 - sum(
        1 for k in range(THREADS) for i in range(calls) if (k + i) % 12 == (3 * k + i) % 12
    )


def test_shared_encoder_counters_and_results():
    """``TextEncoder.encode`` from 8 threads: each result equals the single-threaded one, the counters are exact."""
    te = condfakes.encoder("sd1", widths=(64,), layers=2)
    with torch.inference_mode():
        expected = te.encode(PROMPTS)
    te.reuse.stats = type(te.reuse.stats)()
    calls = 10

    def work(k):
        with torch.inference_mode():
            for i in range(calls):
                pick = [(k + i) % len(PROMPTS), (k * i) % len(PROMPTS), (k + i) % len(PROMPTS)]
                out = te.encode([PROMPTS[j] for j in pick])
                assert torch.equal(out.hidden, expected.hidden[pick])
                assert torch.equal(out.pooled, expected.pooled[pick])

    hammer(work)
    distinct = sum(len({(k + i) % 12, (k * i) % 12}) for k in range(THREADS) for i in range(calls))
    stats = te.reuse.stats
    assert (stats.rows, stats.unique_rows, stats.positions) == (THREADS * calls * 3, distinct, THREADS * calls * 3 * 77)
    assert stats.positions_computed == THREADS * calls * te.reuse.micro_batch * 77


def test_shared_tokenizer():
    tok = sdclip.Tokenizer()
    texts = [f"prompt number {i}, with some words, café {i * 7}" for i in range(200)]
    expected = [sdclip.Tokenizer().encode(t) for t in texts]

    def work(k):
        for i in range(len(texts)):
            j = (i * (k + 1)) % len(texts)
            assert tok.encode(texts[j]) == expected[j]
            if i % 50 == k:
                tok.clear_cache()

    hammer(work)
