"""Optional speed-ups: int8 stays close to float32 (stated, not exact); CUDA graphs replay exactly."""

from __future__ import annotations

import condfakes
import pytest
import torch

import sdclip
import sdclip.cli
from sdclip.accel import CudaGraphEncoder, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of an astronaut riding a horse on mars", "masterpiece, best quality, 1girl, solo", "", "a cat"]


def test_int8_is_close_to_float32_and_faster_path_is_taken():
    tower = condfakes.tower(width=256, layers=4)
    q = quantize_int8(tower)
    floats = [name for name, m in q.named_modules() if type(m) is torch.nn.Linear]
    assert floats and all(name.startswith("blocks.0.") for name in floats)  # the first block stays float
    assert len(floats) < sum(type(m) is torch.nn.Linear for m in tower.modules())  # the original untouched
    assert not any(type(m) is torch.nn.Linear for m in quantize_int8(tower, float_blocks=0).modules())
    ids = sdclip.Tokenizer()(PROMPTS)
    with torch.inference_mode():
        a, b = tower(ids), q(ids)
    cos = torch.nn.functional.cosine_similarity(a.hidden, b.hidden, dim=-1)
    assert cos.mean() > 0.995 and not torch.equal(a.hidden, b.hidden)
    assert torch.nn.functional.cosine_similarity(a.pooled, b.pooled, dim=-1).min() > 0.99


def test_int8_through_load_and_cli(tmp_path):
    from transformers import CLIPTextModel

    folder = tmp_path / "clip"
    CLIPTextModel(condfakes.hf_config(64, 2)).save_pretrained(folder)
    te = sdclip.load(folder, quantize="int8")
    plain = sdclip.load(folder)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(te.encode(PROMPTS).hidden, plain.encode(PROMPTS).hidden, dim=-1)
    assert cos.mean() > 0.99
    out = tmp_path / "c.safetensors"
    assert sdclip.cli.main(["encode", "a cat", "--model", str(folder), "--out", str(out), "--quantize", "int8"]) == 0
    with pytest.raises(sdclip.BadInput):
        sdclip.load(folder, quantize="int4")
    with pytest.raises(sdclip.BadInput):
        sdclip.load(folder, quantize="int8", dtype="bfloat16")


def test_compile_is_close_to_eager_and_keeps_the_module(tmp_path):
    """load(compile=True): torch.compile in place (the tower reuse and caches know stays the same object);
    within float32 rounding of the eager model, through reuse's varying shapes too."""
    from transformers import CLIPTextModel

    folder = tmp_path / "clip"
    CLIPTextModel(condfakes.hf_config(64, 2)).save_pretrained(folder)
    compiled, plain = sdclip.load(folder, compile=True), sdclip.load(folder)
    with torch.inference_mode():
        for prompts in (PROMPTS, PROMPTS[:1]):
            a, b = plain.encode(prompts), compiled.encode(prompts)
            assert (a.hidden - b.hidden).abs().max() <= 1e-5 and (a.pooled - b.pooled).abs().max() <= 1e-5
        assert (
            compiled.encode_ids(sdclip.Tokenizer()(PROMPTS), hidden=False).pooled - plain.encode(PROMPTS).pooled
        ).abs().max() <= 1e-5  # pooled-only: shorter rows
    assert compiled.towers[0]._compiled_call_impl is not None
    with pytest.raises(sdclip.BadInput, match="choose one"):
        sdclip.load(folder, compile=True, quantize="int8")


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(sdclip.BadInput):
        CudaGraphEncoder(condfakes.tower(), batch=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_exactly():
    tower = condfakes.tower().cuda().half()
    ids = sdclip.Tokenizer()(PROMPTS).cuda()
    graph = CudaGraphEncoder(tower, batch=len(PROMPTS))
    with torch.inference_mode():
        eager = tower(ids)
    replay = graph(ids)
    assert torch.equal(replay.hidden, eager.hidden) and torch.equal(replay.pooled, eager.pooled)


def test_int8_row_is_independent_of_its_batch():
    """Dynamic quantization's activation scale is one per call: the int8 tower runs one row per pass, so a row's
    output is the same bits alone or in any company, and exact reuse runs a lone prompt as one row."""
    tower = quantize_int8(condfakes.tower(width=256, layers=4))
    assert tower.rows_independent
    ids = sdclip.Tokenizer()(PROMPTS * 2)
    mask = torch.ones_like(ids)
    mask[:, 3] = 0
    with torch.inference_mode():
        whole = tower(ids, output_hidden_states=True, attention_mask=mask)
        for rows in ([0], [5], [2, 7, 1], [3, 3, 0]):
            part = tower(ids[rows], output_hidden_states=True, attention_mask=mask[rows])
            assert torch.equal(part.hidden, whole.hidden[rows]) and torch.equal(part.pooled, whole.pooled[rows])
            assert all(torch.equal(a, b[rows]) for a, b in zip(part.hidden_states, whole.hidden_states))
    from sdclip.reuse import ReusingRunner

    reuse = ReusingRunner()
    with torch.inference_mode():
        reuse(tower, ids[:1])
    assert reuse.stats.positions_computed == 77
