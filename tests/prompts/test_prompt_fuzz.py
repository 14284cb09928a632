"""Every dialect on hostile input: random text, huge prompts, deep nesting, control characters, bad
weights.  The rule: a result or ``BadInput``, never another exception, a hang or superlinear time."""

import gc
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdclip import BadInput, Tokenizer
from sdclip.prompts import DIALECTS, chunk, parse
from sdclip.prompts.types import CHUNK_LENGTH, PLACEHOLDER_ID, Blend, Chunked, Conjunction, Schedule

TOK = Tokenizer()
EMB = {"emb": torch.zeros(2, 768), "<tok>": torch.zeros(3, 768)}
SYNTAX = list("()[]{}:|\\\"'.,+-=!<> \n\t") + [
    "BREAK",
    "AND",
    "embedding:",
    "emb",
    "<tok>",
    ".blend(",
    ".and(",
    ".swap(",
    ":1.5)",
    ")1.2",
    "++",
    "nan",
    "1e309",
    "\x00",
    "\x0b",
    "\x1f",
    "\u202e",
    "\u00a0",
    "é",
    "字",
    "👍",
]
prompts = st.lists(st.sampled_from(SYNTAX) | st.text(max_size=3), max_size=40).map("".join)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(node):
    if isinstance(node, Schedule):
        return [leaf for _, c in node.entries for leaf in leaves(c)]
    if isinstance(node, (Blend, Conjunction)):
        return [leaf for p in node.parts for leaf in leaves(p)]
    return [node]


def check(c: Chunked, pad: int):
    assert c.ids and len(c.ids) == len(c.weights) == len(c.sources)
    for ids, weights, sources in zip(c.ids, c.weights, c.sources):
        assert len(ids) == len(weights) == len(sources) == CHUNK_LENGTH
        n = sum(s >= 0 for s in sources)
        assert ids[0] == TOK.bos_id and ids[n + 1] == TOK.eos_id and n <= 75
        assert all(s >= 0 for s in sources[1 : n + 1]) and all(s == -1 for s in sources[n + 1 :])
        assert all(w == 1.0 for w in weights[n + 1 :]) and all(t == pad for t in ids[n + 2 :])
        assert all(s < len(c.segments) for s in sources)
    for slot in c.slots:
        assert c.ids[slot.chunk][slot.position] == PLACEHOLDER_ID and slot.name in EMB


@pytest.mark.parametrize("dialect", DIALECTS)
@FUZZ
@given(prompt=prompts)
def test_parse_and_chunk_anything(dialect, prompt):
    try:
        parse(prompt, dialect)
        node = chunk(prompt, dialect, TOK, pad_id=0, embeddings=EMB)
    except BadInput:
        return
    for leaf in leaves(node):
        check(leaf, 0)


@FUZZ
@given(prompt=prompts)
def test_a1111_token_count(prompt):
    try:
        c = chunk(prompt.replace("AND", ""), "a1111", TOK, steps=1)
    except BadInput:
        return
    for leaf in leaves(c):
        last = sum(s >= 0 for s in leaf.sources[-1])
        assert leaf.token_count in (75 * (len(leaf.ids) - 1) + last, 75 * len(leaf.ids))


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    "prompt", ["(" * 10000 + "a" + ")" * 10000, "[" * 10000 + "a", "(a" * 10000, '"(' * 5000, "((a:1.2)" * 5000]
)
def test_deep_nesting_is_bad_input_or_fine(dialect, prompt):
    try:
        chunk(prompt, dialect, TOK)
    except BadInput as e:
        assert "nested" in str(e)


@pytest.mark.parametrize(
    "dialect, prompt",
    [
        ("a1111", "(a:" + "9" * 400 + ")"),
        ("comfy", "(a:nan)"),
        ("comfy", "(a:1e309)"),
        ("compel", '("a", "b").blend(1)'),
    ],
)
def test_bad_weights(dialect, prompt):
    with pytest.raises(BadInput):
        chunk(prompt, dialect, TOK)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_control_characters(dialect):
    prompt = "".join(map(chr, range(32))) + "a (b) \x7f\u2028\u202e c"
    try:
        for leaf in leaves(chunk(prompt, dialect, TOK)):
            check(leaf, TOK.eos_id)
    except BadInput:
        assert dialect == "compel"  # compel cannot read a vertical tab


@pytest.mark.parametrize("dialect", DIALECTS)
def test_unknown_embedding_names_are_text_or_dropped(dialect):
    node = chunk("a embedding:nothing <nothing> nothing", dialect, TOK, embeddings={"known": 2})
    assert not leaves(node)[0].slots


def _seconds(fn, *args, repeat=2):
    best = float("inf")
    gc.collect()
    gc.disable()  # complexity, not the collector, is under test
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t)
    finally:
        gc.enable()
    return best


def _run(dialect, prompt):
    try:
        chunk(prompt, dialect, TOK, embeddings=EMB, **({"steps": 4} if dialect == "a1111" else {}))
    except BadInput:
        pass


PATTERNS = [
    "a photo of a cat, ",
    "(a (b [c (d:1.1) e] f) g, ",
    ")]:[(|",
    '"a (b)1.2" c+ ',
    "[a:b:0.5] [c|d] ",
    "embedding:emb <tok> ",
    "(" * 40 + "a" + ")" * 40,
]


def _calls(fn, *args) -> int:
    """Function calls (Python and C) made by fn(*args): an operation count, the same on a busy machine."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_work(dialect, pattern):
    small = (pattern * (4000 // len(pattern) + 1))[:4000]
    big = (pattern * (16000 // len(pattern) + 1))[:16000]
    _run(dialect, small)  # caches warm, as for the second call
    ratio = _calls(_run, dialect, big) / _calls(_run, dialect, small)
    assert ratio < 6, f"4x the text made {ratio:.1f}x the calls"  # linear: ~4, quadratic: ~16


@pytest.mark.parametrize("dialect", DIALECTS)
def test_100k_characters(dialect):
    prompt = ("a (photo:1.2) of [a cat], " * 5000)[:100_000]
    assert _seconds(_run, dialect, prompt, repeat=1) < 10
