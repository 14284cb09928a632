"""ComfyUI prompts: token_weights / parse_parentheses and tokenize_with_weights.

ComfyUI is not installed here: the expected parses were computed with ComfyUI's own functions
(comfy/sd1_clip.py, 2025) and checked by hand; the chunk layouts are worked out by hand from its rules.
"""

import pytest
import torch

from sdclip import BadInput, Tokenizer
from sdclip.prompts import comfy
from sdclip.prompts.types import PLACEHOLDER_ID

TOK = Tokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id
A, B, COMMA = (TOK.tokenize(w)[0] for w in ("a", "b", ","))

PARSE = [
    ("", []),
    ("a", [("a", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("((a:1.5))", [("a", 1.5)]),  # (x:w) sets the weight
    ("(a (b:1.5))", [("a ", 1.1), ("b", 1.5)]),
    ("(a:1.2 (b))", [("a:1.2 ", 1.1), ("b", 1.2100000000000002)]),
    ("((a:1.2):1.3)", [("a", 1.2)]),
    ("[a]", [("[a]", 1.0)]),  # square brackets are text
    ("[(a)]", [("[", 1.0), ("a", 1.1), ("]", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\((a)\\)", [("(", 1.0), ("a", 1.1), (")", 1.0)]),
    ("(a", [("(a", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),  # a stray ")" leaves the level negative
    ("a) ((c))", [("a) (", 1.0), ("c", 1.1), (")", 1.0)]),
    ("((a)", [("(a", 1.1)]),  # an open group ending in ")" is read as a group of its inside
    ("(((a))", [("(a", 1.2100000000000002)]),
    ("((((a:1.5)", [("(((a", 1.5)]),
    ("(a:)", [("a:", 1.1)]),
    ("(:1.5)", [(":1.5", 1.1)]),
    ("( :1.5)", [(" ", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:1_000)", [("a", 1000.0)]),  # whatever Python's float() reads
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("(a:1.2:b)", [("a:1.2:b", 1.1)]),
    ("()", []),
    ("(())", []),
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("(a)(b)", [("a", 1.1), ("b", 1.1)]),  # pieces are not merged: each is tokenized on its own
    ("(a)b(c)", [("a", 1.1), ("b", 1.0), ("c", 1.1)]),
    ("(a\\):1.5)", [("a)", 1.5)]),
    ("a\\", [("a\\", 1.0)]),
    ("\\\\(a)", [("\\(a)", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:1e2)", [("a", 100.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:5.)", [("a", 5.0)]),
    ("(a:+2)", [("a", 2.0)]),
    (
        "masterpiece, (best quality:1.2), (blue eyes:1.1), ((long hair))",
        [
            ("masterpiece, ", 1.0),
            ("best quality", 1.2),
            (", ", 1.0),
            ("blue eyes", 1.1),
            (", ", 1.0),
            ("long hair", 1.2100000000000002),
        ],
    ),
    ("a (b [c] d) e", [("a ", 1.0), ("b [c] d", 1.1), (" e", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSE)
def test_parse(text, expected):
    assert [(s.text, s.weight) for s in comfy.parse(text)] == expected


@pytest.mark.parametrize("text", ["(a:nan)", "(a:inf)", "(a:1e309)", "(a:-infinity)"])
def test_non_finite_weight_is_bad_input(text):
    with pytest.raises(BadInput, match="NaN"):  # ComfyUI would encode NaN
        comfy.parse(text)


def test_deep_nesting():
    assert comfy.parse("(" * 100 + "a" + ")" * 100)[0].text == "a"
    assert comfy.parse(")" * 10000 + "a")[0].text.endswith("a")
    with pytest.raises(BadInput, match="nested"):
        comfy.parse("(" * 10000 + "a" + ")" * 10000)


def body(chunk):
    return [list(ids[1 : 1 + sum(s >= 0 for s in src)]) for ids, src in zip(chunk.ids, chunk.sources)]


def test_short_prompt():
    c = comfy.chunk("a (b:1.5)", TOK)
    assert c.ids == ((BOS, A, B, *[EOS] * 74),)
    assert c.weights[0][:4] == (1.0, 1.0, 1.5, 1.0) and c.token_count == 2


def test_empty_prompt():
    assert comfy.chunk("", TOK).ids == ((BOS, *[EOS] * 76),)


def test_short_group_moves_whole():
    c = comfy.chunk("(" + "a " * 70 + ":1.1) b b b b b b b", TOK)  # 70 + 7: the 7 move on
    assert body(c) == [[A] * 70, [B] * 7]
    assert c.ids[0][71:] == (EOS,) * 6


def test_long_group_is_cut():
    c = comfy.chunk("(" + "a " * 70 + ":1.1) " + "b " * 8, TOK)  # 8 tokens: a large word
    assert body(c) == [[A] * 70 + [B] * 5, [B] * 3]
    assert body(comfy.chunk("a " * 200, TOK)) == [[A] * 75, [A] * 75, [A] * 50]


def test_pad_id():
    c = comfy.chunk("a", TOK, pad_id=0)
    assert c.ids[0][:4] == (BOS, A, EOS, 0) and set(c.ids[0][3:]) == {0}


EMB = {"emb": torch.zeros(3, 768), "big": torch.zeros(10, 768), "one": torch.zeros(768)}


def slots(c):
    return [(s.chunk, s.position, s.name, s.vector) for s in c.slots]


def test_embedding():
    c = comfy.chunk("a embedding:emb b", TOK, embeddings=EMB)
    assert body(c) == [[A, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, B]]
    assert slots(c) == [(0, 2, "emb", 0), (0, 3, "emb", 1), (0, 4, "emb", 2)]
    assert slots(comfy.chunk("embedding:one.pt", TOK, embeddings=EMB)) == [(0, 1, "one", 0)]  # extension optional


def test_embedding_name_endings():
    c = comfy.chunk("embedding:emb, b", TOK, embeddings=EMB)  # "emb," is retried without the comma
    assert body(c) == [[PLACEHOLDER_ID] * 3 + [COMMA, B]]
    c = comfy.chunk("embedding:emb<lora:x:1>", TOK, embeddings=EMB)  # ComfyUI ends a name at whitespace only
    assert body(c) == [[]] and c.warnings == ("embedding:emb<lora:x:1> does not exist, ignoring",)
    c = comfy.chunk("embedding:emb[x]", TOK, embeddings=EMB)
    assert body(c) == [[]] and not c.slots
    c = comfy.chunk("(embedding:emb:1.2)", TOK, embeddings=EMB)
    assert c.weights[0][1:4] == (1.2,) * 3


def test_embedding_split_after_a_space_or_newline_only():
    """ComfyUI splits a piece before ``embedding:`` after " " or "\\n" (re.split(' embedding:|\\nembedding:'))."""
    assert slots(comfy.chunk("a\nembedding:emb b", TOK, embeddings=EMB)) == [(0, 2 + v, "emb", v) for v in range(3)]
    for text in ("a\tembedding:emb b", "a\rembedding:emb b", "a,embedding:emb b", "a\u3000embedding:emb b"):
        c = comfy.chunk(text, TOK, embeddings=EMB)  # no split: "embedding:emb" stays text
        assert not c.slots and body(c) == [TOK.tokenize(text)], repr(text)


def test_unknown_embedding_is_dropped_with_a_warning():
    c = comfy.chunk("a embedding:nope b", TOK, embeddings=EMB)
    assert body(c) == [[A, B]] and c.warnings == ("embedding:nope does not exist, ignoring",)


def test_embedding_text_without_a_lookup():
    text = "a embedding:emb b"
    assert body(comfy.chunk(text, TOK)) == [TOK.tokenize(text)]


def test_embedding_without_a_name():
    with pytest.raises(BadInput, match="without a name"):  # ComfyUI raises IndexError
        comfy.chunk("a embedding:", TOK, embeddings=EMB)


# an embeddings folder as sdclip hands it to the comfy dialect: each file by its path there, extension included
FOLDER = {
    "emb.safetensors": torch.zeros(3, 768),
    "emb.pt": torch.zeros(2, 768),
    "two.pt": torch.zeros(2, 768),
    "sub/deep.bin": torch.zeros(1, 768),
    "sub/two.pt": torch.zeros(4, 768),
}


@pytest.mark.parametrize(
    "name, file",
    [
        ("emb", "emb.safetensors"),  # the exact name is no file: .safetensors is tried before .pt and .bin
        ("emb.pt", "emb.pt"),  # the exact file
        ("emb.safetensors", "emb.safetensors"),
        ("two", "two.pt"),  # the top folder before the sub-folder (ComfyUI's order between folders is a set's)
        ("two.safetensors", None),  # no such file: only .safetensors, .pt, .bin are appended, nothing taken off
        ("two.bin", None),
        ("TWO", None),  # case-sensitive, as on Linux
        ("deep", "sub/deep.bin"),  # every sub-folder is searched
        ("sub/deep", "sub/deep.bin"),  # and the name is a path
        ("sub/two", "sub/two.pt"),
        ("./two", "two.pt"),  # the joined path is normalised (os.path.abspath)
        ("two/", "two.pt"),
        ("sub/../two", "two.pt"),
        ("sub//deep.bin", "sub/deep.bin"),
        ("../two", None),  # ComfyUI's guard: a path leaving the folder it is joined to is not looked at
        ("sub/../../two", None),
        ("../sub/deep", "sub/deep.bin"),  # joined to sub/, this stays in sub/
        ("/two", None),
        ("sub", None),  # a folder is no file, and no sub.pt exists
    ],
)
def test_embedding_file_lookup(name, file):
    """``embedding:name`` finds the file ComfyUI's comfy/sd1_clip.py ``load_embed`` finds: for the embeddings
    folder and each sub-folder (``expand_directory_list``), ``os.path.abspath(os.path.join(folder, name))``,
    skipped unless ``os.path.commonpath`` keeps it in that folder; that file if it exists, else the first of
    name + ".safetensors", ".pt", ".bin" that does."""
    c = comfy.chunk(f"a embedding:{name}", TOK, embeddings=FOLDER)
    if file is None:
        assert not c.slots and body(c) == [[A]] and c.warnings == (f"embedding:{name} does not exist, ignoring",)
    else:
        assert slots(c) == [(0, 2 + v, file, v) for v in range(len(FOLDER[file]))] and not c.warnings


def test_embedding_in_memory_takes_any_extension():
    """An embedding given in memory (no file) stands for a file with one of ComfyUI's three extensions."""
    for name in ("one", "one.pt", "one.safetensors", "one.bin", "./one"):
        assert slots(comfy.chunk(f"embedding:{name}", TOK, embeddings=EMB)) == [(0, 1, "one", 0)], name
    assert not comfy.chunk("embedding:one.png", TOK, embeddings=EMB).slots


def test_long_embedding_may_be_cut():
    c = comfy.chunk("(" + "a " * 70 + ":1.1) embedding:big", TOK, embeddings=EMB)  # 10 vectors: a large word
    assert [(s.chunk, s.vector) for s in c.slots] == [(0, v) for v in range(5)] + [(1, v) for v in range(5, 10)]
