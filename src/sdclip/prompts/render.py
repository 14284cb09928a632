"""Prompts for people and pipes: the JSON the CLI prints and the plain-text token view.

JSON (one object per prompt):

* segments: ``[[text, weight], ...]``; A1111's BREAK is ``["BREAK", -1]``;
* chunks: ``{"tokens": [[77 ids], ...], "weights": [[77 floats], ...], "token_count": n}``, plus
  ``"embeddings": [[chunk, position, name, vector], ...]``, ``"truncated": [[segment, id], ...]`` and
  ``"warnings": [...]`` when there are any;
* compel ``.blend()``: ``{"blend": [leaf, ...], "weights": [...], "normalize": bool}``;
* compel ``.and()``: ``{"and": [leaf or blend, ...], "weights": [...]}``;
* A1111 ``AND`` / prompt editing: ``{"steps": n, "schedule": [{"until_step": t, "prompt": {"and": ...}}, ...]}``
  where an entry holds for 0-based sampler steps up to ``until_step`` (A1111's rule).
"""

from __future__ import annotations

from ..tokenizer import Tokenizer
from .types import Blend, Chunked, Conjunction, Node, Schedule, Segment


def to_json(node: Node) -> object:
    """A parsed or chunked prompt tree as JSON-ready lists and dicts."""
    if isinstance(node, Schedule):
        return {"steps": node.steps, "schedule": [{"until_step": t, "prompt": to_json(c)} for t, c in node.entries]}
    if isinstance(node, Conjunction):
        return {"and": [to_json(p) for p in node.parts], "weights": list(node.weights)}
    if isinstance(node, Blend):
        return {"blend": [to_json(p) for p in node.parts], "weights": list(node.weights), "normalize": node.normalize}
    if isinstance(node, Chunked):
        out: dict = {
            "tokens": [list(r) for r in node.ids],
            "weights": [list(r) for r in node.weights],
            "token_count": node.token_count,
        }
        if node.slots:
            out["embeddings"] = [[s.chunk, s.position, s.name, s.vector] for s in node.slots]
        if node.lost:
            out["truncated"] = [list(x) for x in node.lost]
        if node.warnings:
            out["warnings"] = list(node.warnings)
        return out
    return [["BREAK", -1] if s.is_break else [s.text, s.weight] for s in node]


def _weight(w: float) -> str:
    return f"{w:g}" if w == 1.0 else f"x{w:.4g}"


def _token(tokenizer: Tokenizer, tid: int) -> str:
    """A token as text, quoted so a word end shows as a trailing space."""
    if tid in (tokenizer.bos_id, tokenizer.eos_id):
        return "<start>" if tid == tokenizer.bos_id else "<end>"
    text = tokenizer.decode([tid]) + (" " if tokenizer.token_text(tid).endswith("</w>") else "")
    return repr(text)


def _chunks(c: Chunked, tokenizer: Tokenizer, lines: list[str], indent: str) -> None:
    slot_at = {(s.chunk, s.position): s for s in c.slots}
    total = len(c.ids)
    for k, (ids, weights, sources) in enumerate(zip(c.ids, c.weights, c.sources)):
        end = 1 + sum(1 for src in sources if src >= 0)  # the chunk's EOS
        lines.append(f"{indent}chunk {k + 1}/{total}: {end - 1} of 75 tokens")
        for p in range(1, end):
            slot = slot_at.get((k, p))
            text = f"<{slot.name}#{slot.vector}>" if slot else _token(tokenizer, ids[p])
            mark = "" if weights[p] == 1.0 else f"  {_weight(weights[p])}"
            lines.append(f"{indent}  {p:3d}  {text}{mark}")
        rest = ids[end + 1 :]
        filler = "<end>" if rest and rest[0] == tokenizer.eos_id else f"id {rest[0]}" if rest else ""
        pad = f", then {len(rest)} x {filler}" if rest else ""
        lines.append(f"{indent}  {end:3d}  <end>{pad}")
    if c.lost:
        lines.append(f"{indent}truncated, {len(c.lost)} tokens lost: {tokenizer.decode([tid for _, tid in c.lost])!r}")
    lines.append(f"{indent}token count: {c.token_count}")
    lines.extend(f"{indent}warning: {w}" for w in c.warnings)


def _steps(node: Schedule) -> list[tuple[str, object]]:
    """Each schedule entry with the 0-based sampler steps it covers."""
    out, start = [], 0
    for until, conj in node.entries:
        out.append((f"sampler steps {start}-{min(until, node.steps - 1)}", conj))
        start = until + 1
    return out


def describe(node: Node[Chunked], tokenizer: Tokenizer, indent: str = "") -> str:
    """A plain-text view: each token with its weight (when not 1), chunk boundaries, what truncation
    cut off and the token count; blends, AND parts and schedule steps as headed sections."""
    lines: list[str] = []
    if isinstance(node, Schedule):
        for title, conj in _steps(node):
            lines.append(f"{indent}{title}:")
            lines.append(describe(conj, tokenizer, indent + "  "))
    elif isinstance(node, (Conjunction, Blend)):
        kind = "AND part" if isinstance(node, Conjunction) else "blend part"
        for k, (part, w) in enumerate(zip(node.parts, node.weights)):
            lines.append(f"{indent}{kind} {k + 1}/{len(node.parts)}, weight {w:g}:")
            lines.append(describe(part, tokenizer, indent + "  "))
    else:
        _chunks(node, tokenizer, lines, indent)
    return "\n".join(lines)


def describe_segments(node: Node[list[Segment]], indent: str = "") -> str:
    """Parsed segments, one per line: weight and text."""
    if isinstance(node, Schedule):
        return "\n".join(f"{indent}{title}:\n{describe_segments(c, indent + '  ')}" for title, c in _steps(node))
    if isinstance(node, (Conjunction, Blend)):
        kind = "AND part" if isinstance(node, Conjunction) else "blend part"
        return "\n".join(
            f"{indent}{kind} {k + 1}, weight {w:g}:\n{describe_segments(p, indent + '  ')}"
            for k, (p, w) in enumerate(zip(node.parts, node.weights))
        )
    return "\n".join(f"{indent}BREAK" if s.is_break else f"{indent}{s.weight:<8.4g} {s.text!r}" for s in node)
