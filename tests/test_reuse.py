"""Exact reuse: dedup and pooled-only give each row the same bits whatever its companions (the default);
shared prefixes (opt-in) agree with the plain path to fp32 rounding."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import sdclip
from sdclip.model import TextConfig, TextTransformer
from sdclip.reuse import MIN_PASS_POSITIONS, ReusingRunner, plan_prefixes

# A matrix product's rounding depends on how many rows it multiplies, so the plain path itself
# moves by ~1e-7 relative between batch sizes; reuse must stay within that class of error.
REL = 2e-6

PROMPTS = [
    "masterpiece, best quality, ultra detailed, a red cat in a field",
    "masterpiece, best quality, ultra detailed, a blue dog on a hill",
    "masterpiece, best quality, ultra detailed, a blue dog on a hill",  # duplicate
    "masterpiece, best quality, a fox",
    "lowres, bad anatomy, bad hands, text, error",
    "lowres, bad anatomy, bad hands, text, error",
    "a photo of a cat",
    "",
    "a photo of a cat, " * 30,  # truncated: no padding at all
]


@pytest.fixture(scope="module")
def tower() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(width=128, layers=4, heads=2, mlp_width=512, projection_dim=64)).init_weights()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return sdclip.Tokenizer()(PROMPTS)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= REL * max(scale, 1.0), (a - b).abs().max().item()


def test_plain_path_itself_moves_with_batch_size(tower, ids):
    """The yardstick: the same row alone vs in a batch differs at fp32 rounding, not more."""
    with torch.inference_mode():
        batch = tower(ids).hidden
        alone = torch.cat([tower(ids[i : i + 1]).hidden for i in range(len(ids))])
    close(alone, batch)


@pytest.mark.parametrize("layer,final_norm", [(-1, True), (-2, False), (0, False), (2, True)])
def test_default_reuse_is_the_fixed_shape_pass(tower, ids, layer, final_norm):
    """Default: identical rows once, every pass [micro_batch, 77]: each row is bit for bit what a pass of that
    shape gives it, wherever it sits among any companions."""
    reuse = ReusingRunner(micro_batch=4)
    with torch.inference_mode():
        out = reuse(tower, ids, layer=layer, final_norm=final_norm)
        for i in range(len(ids)):
            for position in (0, 3):
                batch = ids[torch.randperm(len(ids))[:4]]
                batch[position] = ids[i]
                alone = tower(batch, layer=layer, final_norm=final_norm)
                assert torch.equal(out.hidden[i], alone.hidden[position])
                assert torch.equal(out.pooled[i], alone.pooled[position])
                assert torch.equal(out.pooled_projected[i], tower.projection(alone.pooled[position][None])[0])
    assert reuse.stats.unique_rows == len(set(PROMPTS))
    assert reuse.stats.positions_computed == 8 * 77  # 7 distinct rows in two passes of 4


@pytest.mark.parametrize("layer,final_norm", [(-1, True), (-2, False), (0, False), (2, True)])
def test_prefix_reuse_matches_plain(tower, ids, layer, final_norm):
    reuse = ReusingRunner(prefixes=True, min_prefix=4, min_saving=1)
    with torch.inference_mode():
        plain = tower(ids, layer=layer, final_norm=final_norm)
        out = reuse(tower, ids, layer=layer, final_norm=final_norm)
    close(out.hidden, plain.hidden)
    close(out.pooled, plain.pooled)
    close(out.pooled_projected, plain.pooled_projected)
    assert reuse.stats.unique_rows == len(set(PROMPTS))
    assert reuse.stats.positions_computed < ids.numel()


def test_prefix_cache_across_calls(tower, ids):
    reuse = ReusingRunner(prefixes=True, min_prefix=4, min_saving=1)
    with torch.inference_mode():
        reuse(tower, ids[:2])  # computes and caches the shared quality prefix
        assert reuse.stats.prefix_cache_misses == 1
        out = reuse(tower, ids[3:4])  # shares part of that prefix only: no valid cached prefix
        out = reuse(tower, ids[1:2])  # a lone row starting with the cached prefix
        assert reuse.stats.prefix_cache_hits >= 1
        close(out.hidden, tower(ids[1:2]).hidden)


def test_prefix_cache_is_bounded(tower, ids):
    reuse = ReusingRunner(prefixes=True, min_prefix=4, min_saving=1, cache_bytes=1)
    with torch.inference_mode():
        reuse(tower, ids)
    assert reuse.cache.nbytes <= 1 and not reuse.cache.entries


def test_pooled_only_stops_at_eos(tower, ids):
    reuse = ReusingRunner()
    with torch.inference_mode():
        plain = tower(ids)
        out = reuse(tower, ids, hidden=False)
    assert out.hidden is None
    close(out.pooled, plain.pooled)
    close(out.pooled_projected, plain.pooled_projected)
    lengths = Counter(min(77, (int(row.tolist().index(49407)) // 8 + 1) * 8) for row in ids)
    # each length's rows in passes of micro_batch (8) rows of that length, at least MIN_PASS_POSITIONS positions
    rows = {n: max(8, MIN_PASS_POSITIONS // n) for n in lengths}
    assert reuse.stats.positions_computed == sum(math.ceil(c / rows[n]) * rows[n] * n for n, c in lengths.items())


def test_pooled_only_is_independent_of_companions(tower, ids):
    """A row's pooled output depends on the row alone: its length is its own EOS rounded up to 8."""
    with torch.inference_mode():
        alone = [ReusingRunner()(tower, ids[i : i + 1], hidden=False).pooled for i in range(len(ids))]
        together = ReusingRunner()(tower, ids, hidden=False).pooled
    for i in range(len(ids)):
        assert torch.equal(alone[i][0], together[i])


def test_prefix_cache_keys_are_not_reused_by_a_later_tower(ids):
    """A prefix of a tower that is gone never serves a new tower that happens to get the same id()."""
    reuse = ReusingRunner(prefixes=True, min_prefix=4, min_saving=1)
    with torch.inference_mode():
        first = TextTransformer(TextConfig(width=64, layers=1, heads=2, mlp_width=128)).init_weights()
        reuse(first, ids[:2])
        del first
        second = TextTransformer(TextConfig(width=64, layers=1, heads=2, mlp_width=128)).init_weights()
        assert reuse.cache.lookup(second, tuple(ids[1].tolist()), 76) is None


def test_argmax_pooling_with_reuse(tower, ids):
    reuse = ReusingRunner()
    with torch.inference_mode():
        close(reuse(tower, ids, hidden=False, pooling="argmax").pooled, tower(ids, pooling="argmax").pooled)


def test_prefix_rows_must_start_with_prefix(tower, ids):
    with torch.inference_mode():
        prefix = tower.compute_prefix(ids[0, :5])
        with pytest.raises(sdclip.BadInput):
            tower(ids[4:5], prefix=prefix)


def test_plan_groups_sorted_rows():
    rows = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 9, 9], [7, 7, 7, 7, 7]])
    assert plan_prefixes(rows, 4) == [(4, [0, 1]), (0, [2]), (0, [3])]
    assert plan_prefixes(rows, 3) == [(3, [0, 1, 2]), (0, [3])]
    assert plan_prefixes(rows[:1], 3) == [(0, [0])]
