"""What the prompt inspector shows: a dialect's chunks token by token, and two prompts compared layer by layer."""

from __future__ import annotations

from typing import Any

import torch

import sdclip
from sdclip.prompts import Blend, Chunked, Conjunction, Node, Schedule
from sdclip.tokenizer import Tokenizer


def _token_text(tokenizer: Tokenizer, tid: int) -> str:
    if tid == tokenizer.bos_id:
        return "<start>"
    if tid == tokenizer.eos_id:
        return "<end>"
    return tokenizer.decode([tid]) + (" " if tokenizer.token_text(tid).endswith("</w>") else "")


def _leaf(c: Chunked, tokenizer: Tokenizer) -> dict[str, Any]:
    """One chunked prompt: per chunk the used positions (BOS, prompt tokens, EOS) with text, weight and the
    segment each came from, the token count, what was truncated, embeddings and warnings."""
    slot_at = {(s.chunk, s.position): s for s in c.slots}
    chunks = []
    for k, (ids, weights, sources) in enumerate(zip(c.ids, c.weights, c.sources)):
        end = 1 + sum(1 for s in sources if s >= 0)  # the chunk's EOS
        tokens = []
        for p in range(end + 1):
            slot = slot_at.get((k, p))
            text = f"<{slot.name}#{slot.vector}>" if slot else _token_text(tokenizer, ids[p])
            tokens.append({"position": p, "id": ids[p], "text": text, "weight": weights[p], "segment": sources[p]})
        chunks.append({"ids": list(ids), "weights": list(weights), "tokens": tokens, "used": end - 1})
    return {
        "chunks": chunks,
        "token_count": c.token_count,
        "segments": [["BREAK", -1] if s.is_break else [s.text, s.weight] for s in c.segments],
        "truncated": tokenizer.decode([tid for _, tid in c.lost]) if c.lost else "",
        "truncated_tokens": len(c.lost),
        "warnings": list(c.warnings),
    }


def describe_chunks(node: Node[Chunked], tokenizer: Tokenizer) -> Any:
    """The chunk tree as JSON: leaves as ``_leaf``; compel blends / ands and A1111 schedules keep their shape
    (``until_step`` as ``sdclip.prompts.render.to_json`` writes it)."""
    if isinstance(node, Schedule):
        return {
            "steps": node.steps,
            "schedule": [{"until_step": t, "prompt": describe_chunks(c, tokenizer)} for t, c in node.entries],
        }
    if isinstance(node, Conjunction):
        return {"and": [describe_chunks(p, tokenizer) for p in node.parts], "weights": list(node.weights)}
    if isinstance(node, Blend):
        return {
            "blend": [describe_chunks(p, tokenizer) for p in node.parts],
            "weights": list(node.weights),
            "normalize": node.normalize,
        }
    return _leaf(node, tokenizer)


def compare_layers(te: sdclip.TextEncoder, a: str, b: str, encoder: int = 1) -> dict[str, Any]:
    """Cosine similarity of ``a``'s and ``b``'s hidden state at each position (BOS .. the longer EOS) for
    every hidden state, 0 = embeddings to the last layer (before the final LayerNorm)."""
    tokenizer = te.tokenizers[encoder - 1]
    ids = [tokenizer.encode(t)[:77] for t in (a, b)]
    n = max(len(i) for i in ids)
    layers = te.tower(encoder).config.layers
    rows = []
    for layer in range(layers + 1):
        out = te.encode([a, b], encoder=encoder, layer=layer, final_norm=False, pooled=False).hidden[:, :n].float()
        rows.append([round(v, 6) for v in torch.nn.functional.cosine_similarity(out[0], out[1], dim=-1).tolist()])
    return {
        "layers": list(range(layers + 1)),
        "positions": n,
        "cosine": rows,
        "tokens": [[_token_text(tokenizer, t) for t in i] for i in ids],
    }
