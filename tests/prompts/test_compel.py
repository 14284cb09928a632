"""compel prompts: our parser against compel's own (compel 2.3.1 is installed), and our chunks against
compel's EmbeddingsProvider tokenization."""

import importlib.util
import random
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdclip import BadInput, Tokenizer
from sdclip.prompts import compel
from sdclip.prompts.types import PLACEHOLDER_ID, Blend, Conjunction, Segment


def _load_compel_parser():
    """compel's prompt_parser module alone: importing the compel package pulls in transformers (seconds)."""
    spec = importlib.util.find_spec("compel")
    if spec is None:
        pytest.skip("compel is not installed", allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / "prompt_parser.py"
    module_spec = importlib.util.spec_from_file_location("compel_prompt_parser", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


cp = _load_compel_parser()
TOK = Tokenizer()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # compel's use of pyparsing
    PARSER = cp.PromptParser()
BOS, EOS = TOK.bos_id, TOK.eos_id

CORPUS = [
    "",
    "   ",
    "a cat",
    "a cat+",
    "a cat++ dog-",
    "a (cat)1.3",
    "a (cat)-",
    "a (cat)+++",
    "(a (b)++)0.5",
    "(a (b (c)1.5)0.5)2",
    "cat.attend(1.5)",
    "(cat, dog).attend(0.8)",
    '"a cat".attend(++)',
    "cat.attend(-0.5)",
    '("a", "b").blend(0.7, 0.3)',
    '("a cat", "b").blend(1,2,no_normalize)',
    "(a, b).blend(1,1)",
    '("a (b)1.5", "c").blend(1,1)',
    '("a", "b").blend()',
    '("a").blend(1)',
    '("a" "b").blend(1,1)',
    '("a", "b").and()',
    '("a", "b").and(1, 0.5)',
    '("a", "b").add(1,2)',
    "(a, b).and()",
    '("a").and(0.5)',
    '("a", "b").and() tail',
    "a (x:1.2) [y]",
    "(masterpiece:1.2), best quality",
    "a\\(b\\) \\\"q\\\"",
    '"a b"+ c',
    "a,b",
    "a ,b",
    "a , , b",
    "a. b.",
    "a..b",
    "(a.b)1.2",
    "(a, b)1.2",
    "cat+++dog",
    "(cat)1.2dog",
    "(cat)++ ++",
    "(a) +",
    "(a)-0.5",
    "(b)1e3",
    "(b)nan",
    "(b)1.",
    "(b).5",
    "a+b",
    "a-b",
    "1.5 c",
    "-1 c",
    "(a",
    "a)",
    '"a',
    'a "b',
    "(a)(b)",
    "(a) (b)",
    "(a)+ (b)+",
    "((a)+)+",
    "(a)0.5 b",
    "a\tb\nc",
    "a cat.swap(dog)",
    "a cat.swap(dog, t_start=0.3)",
    "(a cat).swap(a dog)",
    "a (cat.swap(dog))1.2",
    "withLora(foo, 0.5) a cat",
    "a cat useLora(bar)",
    "withLora(x)",
    "()",
    "( )1.2",
    "(  )0.5 a",
    '("")',
    '"" a',
    'a \\\\ b',
    "a\\b",
    "\\+a",
    "a\\",
    "(a)\\+",
    "a \\, b",
    "x=1",
    "a=b c",
    "a photo of a cat, (highly detailed)1.2, (blurry)0.5, trending on artstation",
    "portrait of a woman, (red hair)++, (freckles)-, soft light",
    '("a castle on a hill", "a watercolor painting").blend(0.6, 0.4)',
    '("a forest", "fog").and(1, 0.3)',
    "beautiful landscape, mountains+, (river)0.8, sunset---",
    "a cat. a dog. a bird.",
    "émoji ✨ test (ünïcode)1.2",
    "ＦＵＬＬ width",
    "a\u00a0b",
    "a\u3000b",
]
ATOMS = list("ab (),.+-\"\\1") + [
    "0.5",
    ")1.3",
    ")+",
    "++",
    ".blend(",
    ".and(",
    ".swap(",
    ".attend(",
    "withLora(",
    ", ",
    "\\(",
    ":",
    "cat",
    "no_normalize",
    "=",
]


def generated(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = "".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 8)))
        if p.count("(") <= 3:  # compel's pyparsing grammar is exponential in the nesting depth
            out.append(p)
    return out


def reference(prompt):
    """compel's parse in our shape (a .swap() contributes its original side, as compel encodes it)."""
    try:
        conj = PARSER.parse_conjunction(prompt)
    except Exception:
        return "error"

    def leaf(fp):
        out = []
        for c in fp.children:
            fragments = c.original if isinstance(c, cp.CrossAttentionControlSubstitute) else [c]
            out += [Segment(f.text, f.weight) for f in fragments]
        return out

    parts = [
        Blend(tuple(leaf(p) for p in part.prompts), tuple(part.weights), part.normalize_weights)
        if isinstance(part, cp.Blend)
        else leaf(part)
        for part in conj.prompts
    ]
    if not parts:
        return [Segment("", 1.0)]
    if len(parts) == 1 and conj.weights[0] == 1.0:
        return parts[0]
    return Conjunction(tuple(parts), tuple(conj.weights))


def ours(prompt):
    try:
        return compel.parse(prompt)
    except BadInput:
        return "error"


@pytest.mark.parametrize("prompt", CORPUS + generated(60))
def test_parse_equals_compel(prompt):
    assert ours(prompt) == reference(prompt)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), max_size=8).map("".join).filter(lambda p: p.count("(") <= 3))
def test_parse_equals_compel_fuzz(prompt):
    assert ours(prompt) == reference(prompt)


def test_corpus_size():
    assert len(CORPUS) + 60 >= 100


def test_shapes():
    assert compel.parse("a (b)1.5") == [Segment("a", 1.0), Segment("b", 1.5)]
    blend = compel.parse('("a", "b").blend(0.7, 0.3)')
    assert blend == Blend(([Segment("a", 1.0)], [Segment("b", 1.0)]), (0.7, 0.3), True)
    conj = compel.parse('("a", "b").and(1, 0.5)')
    assert conj == Conjunction(([Segment("a", 1.0)], [Segment("b", 1.0)]), (1.0, 0.5))


@pytest.mark.parametrize(
    "prompt, message",
    [
        ('("a", "b").blend(1)', "2 prompts but 1 weights"),
        ('("a", "b").and(0.5)', "2 prompts but 1 weights"),
        ('("a.swap(b)", "c").blend(1, 1)', "swap"),
        ('("a", "b").blend(x, y)', "weights"),
        ("a\x0bb", "cannot read"),
    ],
)
def test_compel_errors_are_bad_input(prompt, message):
    with pytest.raises(BadInput, match=message):
        compel.parse(prompt)


def test_nothing_to_encode_is_the_empty_prompt():
    assert compel.parse("()") == compel.parse("withLora(x)") == [Segment("", 1.0)]


def test_nesting_limit():
    assert compel.parse("(" * 50 + "a" + ")+" * 50)[0].text == "a"
    with pytest.raises(BadInput, match="nested"):
        compel.parse("(" * 51 + "a" + ")" * 51)


# --- chunking against compel's EmbeddingsProvider ----------------------------------------------------
@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from compel.embeddings_provider import EmbeddingsProvider, SplitLongTextMode

    folder = tmp_path_factory.mktemp("tok")
    TOK.save_hf(folder)

    def make(truncate, pad_token="<|endoftext|>", mode=SplitLongTextMode.SENTENCES):
        hf = transformers.CLIPTokenizer(
            str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad_token
        )
        return EmbeddingsProvider(hf, object(), truncate=truncate, split_long_text_mode=mode, device="cpu")

    return make


LONG = [
    "a cat",
    "",
    "a (red)1.3 cat, (blurry)0.5",
    "a photo of a cat sitting on a mat. " * 6,
    "a photo, of a cat, sitting on a mat, " * 8,
    "many words without any punctuation at all " * 14,
    "supercalifragilisticexpialidocious" * 12,
    "(a long weighted fragment of many words)1.2 " * 12 + "and the rest. " * 3,
    '("a", "b").blend(1, 1)',
]


def flat(chunked):
    return [t for row in chunked.ids for t in row], [w for row in chunked.weights for w in row]


def leaves(node):
    if isinstance(node, (Blend, Conjunction)):
        return [leaf for part in node.parts for leaf in leaves(part)]
    return [node]


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("prompt", LONG)
def test_chunks_equal_compel(provider, prompt, truncate):
    ep = provider(truncate)
    for segs in leaves(compel.parse(prompt)):
        ids, weights, _ = ep.get_token_ids_and_expand_weights([s.text for s in segs], [s.weight for s in segs], "cpu")
        mine = compel.chunk_segments(segs, TOK, truncate=truncate)
        assert flat(mine)[0] == ids.tolist()
        assert torch.equal(torch.tensor(flat(mine)[1], dtype=weights.dtype), weights)


@pytest.mark.parametrize("mode", ["phrases", "words", "brutal"])
def test_split_modes_equal_compel(provider, mode):
    from compel.embeddings_provider import SplitLongTextMode

    ep = provider(False, mode=getattr(SplitLongTextMode, mode.upper()))
    text = "a photo of a cat sitting on a mat, in the sun. " * 8
    ids, _, _ = ep.get_token_ids_and_expand_weights([text], [1.0], "cpu")
    assert flat(compel.chunk_segments([Segment(text, 1.0)], TOK, truncate=False, split=mode))[0] == ids.tolist()


def test_pad_token_zero_equals_compel(provider):
    ep = provider(True, pad_token="!")
    ids, _, _ = ep.get_token_ids_and_expand_weights(["a cat"], [1.0], "cpu")
    assert flat(compel.chunk_segments([Segment("a cat", 1.0)], TOK, pad_id=0))[0] == ids.tolist()


def test_truncation_reports_what_is_lost():
    c = compel.chunk_segments([Segment("a " * 80, 1.0), Segment("b", 1.2)], TOK)
    assert len(c.ids) == 1 and c.token_count == 81
    assert c.lost == tuple([(0, TOK.tokenize("a")[0])] * 5 + [(1, TOK.tokenize("b")[0])])


def test_textual_inversion_tokens():
    c = compel.chunk("a <cat-toy>+ b", TOK, embeddings={"<cat-toy>": torch.zeros(2, 768)})
    assert c.ids[0][:6] == (BOS, TOK.tokenize("a")[0], PLACEHOLDER_ID, PLACEHOLDER_ID, TOK.tokenize("b")[0], EOS)
    assert [(s.position, s.name, s.vector) for s in c.slots] == [(2, "<cat-toy>", 0), (3, "<cat-toy>", 1)]
    assert c.weights[0][2:4] == (1.1, 1.1)


def test_unknown_split_mode():
    with pytest.raises(BadInput, match="split mode"):
        compel.chunk_segments([Segment("a", 1.0)], TOK, split="paragraphs")
