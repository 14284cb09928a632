"""A1111 prompts: the emphasis parser, AND, prompt editing and the chunker.

Expected values are A1111's own: its doctests (modules/prompt_parser.py) verbatim, and a corpus whose
results were computed with A1111's code (prompt_parser.py at 28bd8e14) and checked by hand.
"""

import pytest
import torch

from sdclip import BadInput, Tokenizer
from sdclip.prompts import a1111
from sdclip.prompts.types import BREAK, PLACEHOLDER_ID, Conjunction, Schedule, Segment

TOK = Tokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id
A, B, C, COMMA = (TOK.tokenize(w)[0] for w in ("a", "b", "c", ","))


def segs(text):
    return [(s.text, s.weight) for s in a1111.parse(text)]


# --- parse_prompt_attention doctests ---------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_attention_doctests(text, expected):
    assert segs(text) == expected  # to the last bit: multipliers applied in A1111's order


PARSE = [
    ("", [("", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("[a]", [("a", 0.9090909090909091)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a: 2 )", [("a", 2.0)]),
    ("(a:+1.5)", [("a", 1.5)]),
    ("(a:1e5)", [("a:1e5", 1.1)]),  # the weight pattern has no exponent: text
    ("(a:nan)", [("a:nan", 1.1)]),
    ("(a:inf)", [("a:inf", 1.1)]),
    ("(a:1e309)", [("a:1e309", 1.1)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("[a", [("a", 0.9090909090909091)]),
    ("a]", [("a]", 1.0)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("(a))", [("a", 1.1), (")", 1.0)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),
    ("[(a:2)]", [("a", 1.8181818181818181)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash disappears
    ("a\\", [("a", 1.0)]),
    ("(a\\)", [("a)", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # weighted: no longer a BREAK
    ("(BREAK:-1)", [("", -1.0), ("BREAK", 1.0), ("", -1.0)]),
    ("((BREAK:-1):-1)", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(:1.5)", [("", 1.0)]),
    ("(a:1.5):2)", [("a", 1.5), (":2)", 1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", 0.9090909090909091)]),
    ("[a|b]", [("a|b", 0.9090909090909091)]),
    ("(((a:1.1):1.1):1.1)", [("a", 1.3310000000000004)]),
    (
        "masterpiece, (best quality:1.2), [[lowres]], (blue eyes:1.1), ((long hair))",
        [
            ("masterpiece, ", 1.0),
            ("best quality", 1.2),
            (", ", 1.0),
            ("lowres", 0.8264462809917354),
            (", ", 1.0),
            ("blue eyes", 1.1),
            (", ", 1.0),
            ("long hair", 1.2100000000000002),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", PARSE)
def test_attention_corpus(text, expected):
    assert segs(text) == expected


def test_break_marker():
    parsed = a1111.parse("a BREAK b")
    assert parsed[1] == BREAK and parsed[1].is_break
    assert not a1111.parse("(a BREAK b)")[1].is_break


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:+.)"])
def test_unreadable_weight_is_bad_input(text):
    with pytest.raises(BadInput, match="cannot read the weight"):  # A1111 raises ValueError
        a1111.parse(text)


def test_overflowing_weight_is_bad_input():
    with pytest.raises(BadInput, match="overflows"):
        a1111.parse("(a:" + "9" * 400 + ")")


def test_nesting_limit():
    assert segs("(" * 100 + "a" + ")" * 100)[0][0] == "a"
    with pytest.raises(BadInput, match="nested"):
        a1111.parse("(" * 101 + "a")
    assert segs("((((((((((" * 20)[0] == ("", 1.0)  # open brackets with no text inside cost nothing


# --- AND --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a AND b:0.5", [("a", 1.0), (" b", 0.5)]),
        ("a:1.5", [("a", 1.5)]),
        ("a : 2 ", [("a", 2.0)]),
        ("a AND", [("a", 1.0), ("", 1.0)]),
        ("ANDROID AND b", [("ANDROID", 1.0), (" b", 1.0)]),
        ("a AND b :-0.5 AND c:.5", [("a", 1.0), (" b", -0.5), (" c", 0.5)]),
        ("a:1.2.3", [("a:1.2.3", 1.0)]),
        ("a:x", [("a:x", 1.0)]),
        ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
    ],
)
def test_and(text, expected):
    assert a1111.split_and(text) == expected


# --- prompt editing: get_learned_conditioning_prompt_schedules doctests --------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        # A1111's doctest expects [[5, 'a  c'], [10, 'a {b|d{ c']] but its grammar rejects the stray "|"
        # since "|" left plain text; its code returns the prompt as it is, and so do we.
        ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ],
)
def test_schedule_doctests(text, expected):
    assert a1111.schedule_text(text, 10) == expected


@pytest.mark.parametrize(
    "text, expected", [("a [b:.5] c", [(10, "a b c")]), ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")])]
)
def test_schedule_hires_doctests(text, expected):
    assert a1111.schedule_text(text, 10, hires_steps=10) == expected


SCHEDULE = [
    ("a [b:c:5] d", 10, [(5, "a b d"), (10, "a c d")]),
    ("a [b:c:0.5] d", 10, [(5, "a b d"), (10, "a c d")]),
    ("a [b:c:1.0] d", 10, [(10, "a b d")]),  # with a dot it is a fraction: all steps
    ("[a:b:0.25][c:d:0.75]", 4, [(1, "ac"), (3, "bc"), (4, "bd")]),
    ("[a:b:3][c:d:3]", 10, [(3, "ac"), (10, "bd")]),
    ("[a:b:15]", 10, [(10, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:-1]", 10, [(10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
    ("[[a:b:2]:c:4]", 10, [(2, "a"), (4, "b"), (10, "c")]),
    ("[a|b|c]", 5, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
    ("x [a:b:2", 10, [(10, "x [a:b:2")]),
    ("x a:b:2]", 10, [(10, "x a:b:2]")]),
    ("[a:b:c:2]", 10, [(10, "[a:b:c:2]")]),
    ("[a:b:2x]", 10, [(10, "[a:b:2x]")]),
    ("(a [b:c:2])", 10, [(2, "(a b)"), (10, "(a c)")]),
    ("[(a:1.2):b:2]", 10, [(2, "(a:1.2)"), (10, "b")]),
    ("a | b", 10, [(10, "a | b")]),
    ("[a|b] c|", 10, [(10, "[a|b] c|")]),
    ("\\[a:b:2]", 10, [(10, "\\[a:b:2]")]),
    ("[a\\:b:2]", 10, [(2, ""), (10, "a\\:b")]),
    ("[a:b:2] \\", 10, [(10, "[a:b:2] \\")]),
    ("[a: b :  3  ]", 10, [(3, "a"), (10, " b ")]),
    (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[: in background:0.25] [shoddy:masterful:0.5]",
        100,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
]


@pytest.mark.parametrize("text, steps, expected", SCHEDULE)
def test_schedule_corpus(text, steps, expected):
    assert a1111.schedule_text(text, steps) == expected


def test_old_scheduling():
    assert a1111.schedule_text("[a:b:0.5] [c:d:3]", 10, old_scheduling=True) == [(3, "a c"), (5, "a d"), (10, "b d")]
    assert a1111.schedule_text("[a:b:1.0]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]


def test_schedule_edge_numbers():
    assert a1111.schedule_text("[a:b:1e400]", 10) == [(10, "a")]  # A1111 overflows in int(); we clamp
    assert a1111.schedule_text("[a:b:-1e400]", 10) == [(10, "b")]
    with pytest.raises(BadInput, match="steps"):
        a1111.schedule_text("a", 0)
    with pytest.raises(BadInput, match="nested"):
        a1111.schedule_text("[" * 101 + "a", 10)


def test_schedule_tree():
    sched = a1111.parse_prompt("a [cat:dog:0.5] AND b:0.5", steps=4)
    assert isinstance(sched, Schedule) and sched.steps == 4
    assert [t for t, _ in sched.entries] == [2, 4]
    first = sched.entries[0][1]
    assert first == Conjunction(([Segment("a cat", 1.0)], [Segment(" b", 1.0)]), (1.0, 0.5))
    assert sched.at(0) is first and sched.at(2) is first and sched.at(3) is sched.entries[1][1]
    assert a1111.parse_prompt("a (b)") == [Segment("a ", 1.0), Segment("b", 1.1)]
    assert isinstance(a1111.parse_prompt("a:0.5"), Schedule)  # one part, but its weight matters
    assert a1111.parse_prompt("a:1") == [Segment("a", 1.0)]


# --- chunking ---------------------------------------------------------------------------------------
def body(chunk):
    """The prompt tokens of each chunk (between BOS and the first EOS)."""
    return [list(ids[1 : 1 + sum(s >= 0 for s in src)]) for ids, src in zip(chunk.ids, chunk.sources)]


def test_short_prompt():
    c = a1111.chunk("a (b:1.5) c", TOK)
    assert c.ids == ((BOS, A, B, C, *[EOS] * 73),)
    assert c.weights == ((1.0, 1.0, 1.5, 1.0, *[1.0] * 73),)
    assert c.sources[0][:5] == (-1, 0, 1, 2, -1) and c.token_count == 3


def test_empty_prompt_is_one_chunk():
    c = a1111.chunk("", TOK)
    assert c.ids == ((BOS, *[EOS] * 76),) and c.token_count == 0


def test_long_prompt_chunks_of_75():
    c = a1111.chunk("a " * 160, TOK)
    assert [len(b) for b in body(c)] == [75, 75, 10] and c.token_count == 160
    assert all(len(r) == 77 and r[0] == BOS and r[76] == EOS for r in c.ids[:2])


def test_comma_backtrack():
    text = "a " * 70 + ", " + "b " * 10  # the chunk fills 4 tokens after the comma
    c = a1111.chunk(text, TOK)
    assert body(c) == [[A] * 70 + [COMMA], [B] * 10] and c.token_count == 85
    c = a1111.chunk(text, TOK, comma_backtrack=0)
    assert body(c) == [[A] * 70 + [COMMA] + [B] * 4, [B] * 6] and c.token_count == 81
    c = a1111.chunk(text, TOK, comma_backtrack=4)  # the comma is 5 back: too far
    assert body(c)[0][-1] == B


def test_comma_filling_the_chunk_starts_the_next():
    c = a1111.chunk("a " * 75 + ", b", TOK)
    assert body(c) == [[A] * 75, [COMMA, B]]


def test_break():
    c = a1111.chunk("a BREAK b", TOK)
    assert body(c) == [[A], [B]] and c.token_count == 76
    assert body(a1111.chunk("BREAK", TOK)) == [[]] and a1111.chunk("BREAK", TOK).token_count == 75
    assert body(a1111.chunk("a BREAK", TOK)) == [[A]]
    weighted = a1111.chunk("(a BREAK b)", TOK)  # a weighted BREAK is the word "break"
    assert len(weighted.ids) == 1 and weighted.weights[0][2] == -1.1
    assert body(a1111.chunk("a BREAK b", TOK, emphasis=False))[0] == TOK.tokenize("a BREAK b")


def test_segments_are_tokenized_apart():
    assert body(a1111.chunk("photograph", TOK))[0] == TOK.tokenize("photograph")
    split = body(a1111.chunk("(photo)graph", TOK))[0]
    assert split == TOK.tokenize("photo") + TOK.tokenize("graph") != TOK.tokenize("photograph")


def test_sd2_pads_with_zero_after_the_first_eos():
    c = a1111.chunk("a b", TOK, pad_id=0)
    assert c.ids[0][:5] == (BOS, A, B, EOS, 0) and set(c.ids[0][4:]) == {0}
    quirk = a1111.chunk("a <|endoftext|> b", TOK, pad_id=0)  # A1111 pads from the first EOS, even a typed one
    assert quirk.ids[0][:5] == (BOS, A, EOS, 0, 0)


EMB = {"emb": torch.zeros(3, 768)}


def test_embedding_placeholders():
    c = a1111.chunk("a emb b", TOK, embeddings=EMB)
    assert c.ids[0][:7] == (BOS, A, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, B, EOS)
    assert [(s.chunk, s.position, s.name, s.vector) for s in c.slots] == [
        (0, 2, "emb", 0),
        (0, 3, "emb", 1),
        (0, 4, "emb", 2),
    ]
    assert c.token_count == 5


def test_embedding_never_straddles_chunks():
    c = a1111.chunk("a " * 73 + "emb", TOK, embeddings=EMB)
    assert body(c) == [[A] * 73, [PLACEHOLDER_ID] * 3]
    assert [(s.chunk, s.position) for s in c.slots] == [(1, 1), (1, 2), (1, 3)]


def test_comma_backtrack_takes_embedding_slots_along():
    c = a1111.chunk("a " * 60 + ", emb " + "a " * 20, TOK, embeddings=EMB)
    assert body(c)[0] == [A] * 60 + [COMMA]
    assert [(s.chunk, s.position, s.vector) for s in c.slots] == [(1, 1, 0), (1, 2, 1), (1, 3, 2)]
    assert c.ids[1][1:4] == (PLACEHOLDER_ID,) * 3


def test_embedding_names_match_on_tokens_longest_first():
    emb = {"cat": 1, "cat girl": 2}
    c = a1111.chunk("a (Cat Girl) cat", TOK, embeddings=emb)  # matched on tokens: case does not matter
    assert [s.name for s in c.slots] == ["cat girl", "cat girl", "cat"]
    assert c.weights[0][2:4] == (1.1, 1.1)
    assert [s.name for s in a1111.chunk("cat, girl", TOK, embeddings=emb).slots] == ["cat"]


def test_embedding_too_long_for_a_chunk():
    with pytest.raises(BadInput, match="76 vectors"):
        a1111.chunk("emb", TOK, embeddings={"emb": 76})


def test_chunk_prompt_tree():
    tree = a1111.chunk_prompt("a [b:c:0.5] AND d", TOK, steps=10)
    assert isinstance(tree, Schedule)
    assert [body(part)[0] for part in tree.entries[0][1].parts] == [[A, B], TOK.tokenize(" d")]
    assert [body(part)[0] for part in tree.entries[1][1].parts] == [[A, C], TOK.tokenize(" d")]
    assert body(a1111.chunk_prompt("a b", TOK)) == [[A, B]]
