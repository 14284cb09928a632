"""The roofline benchmark's FLOP model against what the transformers CLIP text tower actually runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_roofline import tower_flops

transformers = pytest.importorskip("transformers")


def small_tower():
    """Eager attention: its QKᵀ and AV are plain matmuls, which the FLOP counter sees (sdpa's CPU kernel it
    does not)."""
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"
    )
    torch.manual_seed(0)
    return config, transformers.CLIPTextModel._from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_tower_flops_match_torch_flop_counter(batch):
    from torch.utils.flop_counter import FlopCounterMode

    config, model = small_tower()
    ids = torch.randint(0, config.vocab_size - 2, (batch, config.max_position_embeddings))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(ids)
    assert tower_flops(batch, config)["total"] == counter.get_total_flops()


def test_bos_column_and_tail_q_k_v_do_not_depend_on_the_prompt():
    """The savings counted as exact: position 0's hidden states are the same for every prompt (causal mask),
    and layer 0's q/k/v at a position depend only on the token there."""
    config, model = small_tower()
    n = config.max_position_embeddings
    a = torch.randint(1, 1000, (1, n))
    b = torch.randint(1000, 2000, (1, n))
    a[:, 0] = b[:, 0] = 49406
    a[:, 40:] = b[:, 40:] = 49407
    with torch.inference_mode():
        ha = model(a, output_hidden_states=True).hidden_states
        hb = model(b, output_hidden_states=True).hidden_states
        layer0 = model.text_model.encoder.layers[0]
        qa, qb = (layer0.self_attn.q_proj(layer0.layer_norm1(h[0])) for h in (ha, hb))
    assert all(torch.equal(x[:, 0], y[:, 0]) for x, y in zip(ha, hb))
    assert not torch.equal(ha[-1][:, 1], hb[-1][:, 1])
    assert torch.equal(qa[:, 40:], qb[:, 40:]) and not torch.equal(qa[:, 39], qb[:, 39])
