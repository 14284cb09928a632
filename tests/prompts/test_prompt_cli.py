"""The prompt commands: ``sdclip parse``, ``sdclip tokenize --chunks``, ``sdclip tokens``; and the JSON shapes."""

import json

import pytest

from sdclip import Tokenizer
from sdclip.cli import main
from sdclip.prompts import chunk, parse
from sdclip.prompts.render import describe, to_json

TOK = Tokenizer()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_json(capsys):
    code, out, _ = run(capsys, "parse", "--dialect", "a1111", "--json", "a (b:1.2) BREAK c", "plain")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        [["a ", 1.0], ["b", 1.2], ["", 1.0], ["BREAK", -1], ["c", 1.0]],
        [["plain", 1.0]],
    ]


def test_parse_trees_json(capsys):
    _, out, _ = run(capsys, "parse", "-d", "compel", "--json", '("a", "b").blend(0.7, 0.3)', '("a", "b").and(1, 0.5)')
    blend, conj = map(json.loads, out.splitlines())
    assert blend == {"blend": [[["a", 1.0]], [["b", 1.0]]], "weights": [0.7, 0.3], "normalize": True}
    assert conj == {"and": [[["a", 1.0]], [["b", 1.0]]], "weights": [1.0, 0.5]}
    _, out, _ = run(capsys, "parse", "-d", "a1111", "--json", "--steps", "10", "[a:b:0.5] AND c:0.5")
    assert json.loads(out) == {
        "steps": 10,
        "schedule": [
            {"until_step": 5, "prompt": {"and": [[["a", 1.0]], [[" c", 1.0]]], "weights": [1.0, 0.5]}},
            {"until_step": 10, "prompt": {"and": [[["b", 1.0]], [[" c", 1.0]]], "weights": [1.0, 0.5]}},
        ],
    }


def test_parse_readable(capsys):
    code, out, _ = run(capsys, "parse", "-d", "comfy", "a (b:1.5)")
    assert code == 0 and out.splitlines() == ["1        'a '", "1.5      'b'"]


def test_tokenize_chunks(capsys):
    code, out, _ = run(capsys, "tokenize", "--dialect", "a1111", "--chunks", "--json", "a (cat:1.2)", "a " * 80)
    first, second = map(json.loads, out.splitlines())
    assert code == 0 and set(first) == {"tokens", "weights", "token_count"}
    a, cat = TOK.tokenize("a cat")
    assert first["tokens"][0][:4] == [TOK.bos_id, a, cat, TOK.eos_id] and len(first["tokens"][0]) == 77
    assert first["weights"][0][:4] == [1.0, 1.0, 1.2, 1.0] and first["token_count"] == 2
    assert len(second["tokens"]) == 2 and second["token_count"] == 80


def test_tokenize_chunk_options(capsys):
    _, out, _ = run(capsys, "tokenize", "-d", "diffusers", "--pad-id", "0", "a " * 80)
    obj = json.loads(out)
    assert obj["tokens"][0][-1] == TOK.eos_id and len(obj["truncated"]) == 5
    _, out, _ = run(capsys, "tokenize", "-d", "compel", "--no-truncate", "a " * 80)
    assert len(json.loads(out)["tokens"]) == 2
    _, out, _ = run(capsys, "tokenize", "--chunks", "--pad-id", "0", "a")
    assert json.loads(out)["tokens"][0][3] == 0
    _, out, _ = run(capsys, "tokenize", "a")  # without --chunks: unchanged
    assert json.loads(out) == [TOK.bos_id, TOK.tokenize("a")[0], TOK.eos_id]


def test_tokens_view(capsys):
    code, out, _ = run(capsys, "tokens", "-d", "a1111", "a (cat:1.2), dog BREAK x")
    assert code == 0
    assert out.splitlines()[:3] == ["chunk 1/2: 4 of 75 tokens", "    1  'a '", "    2  'cat '  x1.2"]
    assert "token count: 76" in out and "then 71 x <end>" in out


def test_tokens_view_truncation(capsys):
    _, out, _ = run(capsys, "tokens", "-d", "diffusers", "--pad-id", "0", "a photo of a cat " * 20)
    assert "truncated, 25 tokens lost: 'a photo of a cat a photo" in out and "token count: 100" in out


def test_bad_prompt_exit_status(capsys):
    code, _, err = run(capsys, "parse", "-d", "a1111", "(x:1.2.3)")
    assert code == 2 and "cannot read the weight" in err
    code, _, err = run(capsys, "tokens", "-d", "compel", '("a", "b").blend(1)')
    assert code == 2 and "compel rejects" in err


def test_describe_sections():
    text = describe(chunk("a [b:c:0.5] AND d:0.5", "a1111", TOK, steps=4), TOK)
    assert text.splitlines()[0] == "sampler steps 0-2:" and "sampler steps 3-3:" in text
    assert "AND part 2/2, weight 0.5:" in text
    text = describe(chunk("a emb", "a1111", TOK, embeddings={"emb": 2}), TOK)
    assert "<emb#0>" in text and "<emb#1>" in text


def test_json_extras():
    obj = to_json(chunk("a embedding:emb embedding:nope", "comfy", TOK, embeddings={"emb": 1}))
    assert obj["embeddings"] == [[0, 2, "emb", 0]] and obj["warnings"] == ["embedding:nope does not exist, ignoring"]
    assert to_json(parse("x", "diffusers")) == [["x", 1.0]]


def test_tensors():
    ids, weights = chunk("a (b:1.5)", "a1111", TOK).tensors()
    assert ids.shape == weights.shape == (1, 77) and weights[0, 2].item() == 1.5


@pytest.mark.parametrize("dialect", ["nope", "A1111"])
def test_unknown_dialect(dialect):
    from sdclip import BadInput

    with pytest.raises(BadInput, match="unknown prompt dialect"):
        parse("a", dialect)
