"""diffusers prompts: no syntax, one tokenization, cut at 77; textual inversion by <token> names."""

import pytest
import torch

from sdclip import Tokenizer
from sdclip.prompts import chunk, parse, plain
from sdclip.prompts.types import PLACEHOLDER_ID, Segment

TOK = Tokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id
PROMPTS = ["", "a cat", "a (cat:1.2) [dog] BREAK AND", "a photo of a cat, " * 20, "x" * 500, "a\u00a0b\tc\n"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tok")
    TOK.save_hf(folder)

    def make(**kw):
        files = str(folder / "vocab.json"), str(folder / "merges.txt")
        return transformers.CLIPTokenizer(*files, model_max_length=77, **kw)

    return make


def test_parse_is_one_segment():
    assert parse("a (b:1.2)", "diffusers") == parse("a (b:1.2)", "plain") == [Segment("a (b:1.2)", 1.0)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_a_pipeline_tokenizer(hf, prompt):
    expected = hf()(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    c = plain.chunk(prompt, TOK)
    assert list(c.ids[0]) == expected and len(c.ids) == 1
    assert c.token_count == len(TOK.tokenize(prompt)) and len(c.lost) == max(0, c.token_count - 75)


def test_pad_zero_equals_sd2_tokenizer(hf):
    expected = hf(pad_token="!")("a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert list(plain.chunk("a cat", TOK, pad_id=0).ids[0]) == expected


def test_textual_inversion_equals_diffusers_expansion(hf):
    tok = hf()
    names = ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    tok.add_tokens(names)
    prompt = "a <cat-toy> on a<cat-toy>mat"
    expanded = prompt.replace("<cat-toy>", " ".join(names))  # diffusers' maybe_convert_prompt
    expected = tok(expanded, padding="max_length", max_length=77, truncation=True)["input_ids"]
    c = plain.chunk(prompt, TOK, embeddings={"<cat-toy>": torch.zeros(3, 768)})
    added = {tok.convert_tokens_to_ids(n): v for v, n in enumerate(names)}
    assert list(c.ids[0]) == [PLACEHOLDER_ID if t in added else t for t in expected]
    assert [s.vector for s in c.slots] == [added[t] for t in expected if t in added]
    assert [s.position for s in c.slots] == [p for p, t in enumerate(expected) if t in added]


def test_longest_name_first():
    c = chunk("<a><ab>", "diffusers", TOK, embeddings={"<a>": 1, "<a><ab>": 2})
    assert [s.name for s in c.slots] == ["<a><ab>", "<a><ab>"]
