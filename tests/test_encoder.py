"""``TextEncoder``: layer selection, the second encoder, pooling rules, pad ids, dtypes, no
autograd, configuration overrides — each against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import layouts
import pytest
import torch
from references import ARCHS, PROMPTS, TOLERANCE, Arch, assert_close, build, hidden_state, max_diffs, reference
from safetensors.torch import save_file

import sdclip

SOME = PROMPTS[:16]
TINY = Arch(128, 2, 2, 256, "quick_gelu", 96, 49407)


@pytest.fixture
def out(tmp_path: Path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """An SDXL single file of a CLIP-L-width and a bigG-width tower, with their transformers references."""
    folder = tmp_path_factory.mktemp("sdxl")
    l, g = build(ARCHS["L2"], seed=11), build(ARCHS["G"], seed=12)
    path = layouts.write_sdxl(l, g, folder / "sdxl.safetensors")
    refs = [reference(m, sdclip.Tokenizer()(SOME, pad_id=ARCHS[a].pad)) for m, a in ((l, "L2"), (g, "G"))]
    yield sdclip.load(path), (l, g), refs, path
    shutil.rmtree(folder, ignore_errors=True)


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    return a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("encoder", [1, 2])
def test_every_layer_with_and_without_final_norm(sdxl, encoder: int):
    te, models, refs, _ = sdxl
    model, ref = models[encoder - 1], refs[encoder - 1]
    n = len(ref.hidden_states)
    for layer in range(-n, n):
        for final_norm in (True, False):
            got = te.encode(SOME, encoder=encoder, layer=layer, final_norm=final_norm, pooled=False)
            assert _close(got.hidden, hidden_state(model, ref, layer, final_norm)), (layer, final_norm)
            assert got.pooled is None
    got = te.encode(SOME, encoder=encoder, layer=0)
    assert _close(got.pooled, ref.pooler_output)  # the pooled output does not follow `layer`
    for layer in (-n - 1, n):
        with pytest.raises(sdclip.BadInput, match="out of range"):
            te.encode(SOME, encoder=encoder, layer=layer)


def test_sdxl_defaults_and_second_encoder(sdxl):
    """SDXL: both encoders default to hidden_states[-2] without the final LN; bigG's projected pooled
    output is transformers' text_embeds; CLIP-L's file has no projection."""
    te, (l, g), (ref_l, ref_g), _ = sdxl
    first, second = te.encode(SOME), te.encode(SOME, encoder=2)
    assert _close(first.hidden, ref_l.hidden_states[-2]) and first.pooled_projected is None
    assert _close(second.hidden, ref_g.hidden_states[-2])
    assert _close(second.pooled, ref_g.pooler_output) and _close(second.pooled_projected, ref_g.text_embeds)
    assert not _close(first.hidden, ref_l.last_hidden_state)  # the default is not the last layer
    assert second.hidden.shape == (len(SOME), 77, 1280) and first.hidden.shape == (len(SOME), 77, 768)
    for bad in (0, 3):
        with pytest.raises(sdclip.BadInput, match="encoder"):
            te.encode(SOME, encoder=bad)


def test_pooling_first_eos_and_legacy_argmax(out: Path):
    """With textual-inversion ids above 49407, transformers pools at the first EOS when its config's
    eos_token_id is 49407 and at the largest id (legacy, eos_token_id 2): ``pooling`` picks either."""
    new = build(TINY, seed=3, vocab_size=49410)
    legacy = build(TINY, seed=3, vocab_size=49410, eos_token_id=2)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), legacy.state_dict().values()))
    ids = sdclip.Tokenizer()(PROMPTS)
    added = ids[:, 1] != 49407
    ids[added, 1] = torch.tensor([49408, 49409]).repeat(len(ids))[: int(added.sum())]
    tower = sdclip.load(layouts.write_hf_folder(new, out / "clip")).tower()
    ref_new, ref_legacy = reference(new, ids), reference(legacy, ids)
    assert not _close(ref_new.pooler_output[added], ref_legacy.pooler_output[added], 1e-3)  # the rules differ
    with torch.inference_mode():
        first_eos, argmax = tower(ids), tower(ids, pooling="argmax")
    assert _close(first_eos.pooled, ref_new.pooler_output) and _close(first_eos.pooled_projected, ref_new.text_embeds)
    assert _close(argmax.pooled, ref_legacy.pooler_output) and _close(argmax.pooled_projected, ref_legacy.text_embeds)
    # a folder whose config.json selects the legacy rule gets it by default, as transformers does
    legacy_tower = sdclip.load(layouts.write_hf_folder(legacy, out / "legacy")).tower()
    assert legacy_tower.config.pooling == "argmax" and tower.config.pooling == "first_eos"
    with torch.inference_mode():
        assert _close(legacy_tower(ids).pooled, ref_legacy.pooler_output)


@pytest.mark.parametrize("pad_token, pad_id", [(None, 49407), ("!", 0), ("<|endoftext|>", 49407)])
def test_pad_id_from_the_tokenizer_folder(out: Path, pad_token: str | None, pad_id: int):
    """A folder's special_tokens_map.json names the pad token; without one, CLIP-L-like towers pad with EOS."""
    model = build(TINY, seed=4)
    folder = layouts.write_hf_folder(model, out / "clip")
    if pad_token is not None:
        layouts.write_tokenizer(folder, pad_token)
    te = sdclip.load(folder)
    assert te.towers[0].config.pad_id == pad_id
    ids = te.tokenize(SOME)
    assert ids[0, -1] == pad_id and torch.equal(ids, sdclip.Tokenizer()(SOME, pad_id=pad_id))
    assert_close(max_diffs(te.tower(), reference(model, ids)))


@pytest.mark.parametrize("dtype, bound", [("float16", 2 * 2.0**-10), ("bfloat16", 2 * 2.0**-7)])
def test_half_precision_is_close_to_fp32(sdxl, dtype: str, bound: float):
    """fp16 / bf16 runs of both SDXL encoders stay within twice the dtype's unit roundoff of
    transformers' fp32 outputs, relative in Frobenius norm (measured: fp16 ~7e-4, bf16 ~8e-3)."""
    _, models, refs, path = sdxl
    te = sdclip.load(path, dtype=dtype)
    assert te.dtype == getattr(torch, dtype)
    for encoder, (_model, ref) in enumerate(zip(models, refs), 1):
        got = te.encode(SOME, encoder=encoder, layer=-1, final_norm=True)
        pairs = [(got.hidden, ref.last_hidden_state), (got.pooled, ref.pooler_output)]
        if encoder == 2:
            pairs.append((got.pooled_projected, ref.text_embeds))
        for ours, theirs in pairs:
            assert ours.dtype == te.dtype
            assert ((ours.float() - theirs).norm() / theirs.norm()).item() <= bound


def test_frozen_and_no_autograd(out: Path):
    te = sdclip.load(layouts.write_hf_folder(build(TINY, seed=6), out / "clip"))
    assert not any(p.requires_grad for tower in te.towers for p in tower.parameters())
    with torch.enable_grad():
        got = te.encode(SOME)
    for t in (got.hidden, got.pooled, got.pooled_projected):
        assert not t.requires_grad and t.grad_fn is None and torch.is_inference(t)


def test_activation_override(out: Path):
    """``activation=`` replaces what the layout implies (a single file says nothing about it)."""
    quick = build(TINY, seed=9)
    exact = build(TINY, seed=9, hidden_act="gelu")
    path = out / "clip_l.safetensors"
    save_file(layouts.hf_tensors(quick), str(path))
    ids = sdclip.Tokenizer()(SOME)
    ref_quick, ref_exact = reference(quick, ids), reference(exact, ids)
    assert not _close(ref_quick.last_hidden_state, ref_exact.last_hidden_state, 1e-3)
    assert_close(max_diffs(sdclip.load(path).tower(), ref_quick))
    overridden = sdclip.load(path, activation="gelu")
    assert overridden.towers[0].config.activation == "gelu"
    assert_close(max_diffs(overridden.tower(), ref_exact))
    with pytest.raises(sdclip.BadInput, match="activation"):
        sdclip.load(path, activation="gelu_tanh")
    with pytest.raises(sdclip.BadInput, match="override"):
        sdclip.load(path, no_such_field=1)


def test_tiny_width_takes_heads_from_config_json(out: Path):
    """64 wide with 4 heads: config.json says so; the same tensors without it would get 64 / 64 = 1
    head, and ``heads=`` fixes that."""
    model = build(Arch(64, 2, 4, 96, "quick_gelu", 32, 49407), seed=10)
    ref = reference(model, sdclip.Tokenizer()(SOME))
    folder = layouts.write_hf_folder(model, out / "clip")
    assert json.loads((folder / "config.json").read_text())["num_attention_heads"] == 4
    te = sdclip.load(folder)
    assert te.towers[0].config.heads == 4
    assert_close(max_diffs(te.tower(), ref))
    (folder / "config.json").unlink()
    guessed = sdclip.load(folder)
    assert guessed.towers[0].config.heads == 1
    assert max_diffs(guessed.tower(), ref)["last_hidden_state"] > 1e-3
    assert_close(max_diffs(sdclip.load(folder, heads=4).tower(), ref))
