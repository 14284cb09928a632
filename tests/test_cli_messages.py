"""The command's messages for bad prompt files and options: each names the file (and line) or the option, with
exit 2; a closed stdout is a failure (exit 1), never a silent success."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sdclip
from sdclip.cli import main, read_prompts
from sdclip.embeddings import Embedding, save_embedding


def err(capsys) -> str:
    return capsys.readouterr().err


def test_json_lines_split_at_newlines_only(tmp_path):
    """U+2028, U+2029, U+0085, form feeds and lone \\r are valid inside a JSON string; \\r\\n ends a line."""
    held = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch", "i\rj"]
    f = tmp_path / "p.jsonl"
    f.write_text("\r\n".join(json.dumps(p, ensure_ascii=False) for p in held) + "\r\n", encoding="utf-8")
    assert read_prompts([], str(f)) == held
    t = tmp_path / "p.txt"
    t.write_text("one\u2028still one\r\ntwo\n", encoding="utf-8")
    assert read_prompts([], str(t)) == ["one\u2028still one", "two"]


@pytest.mark.parametrize("content, said", [("", "the file is empty"), ("\n\n", "no prompts in it (only blank lines)")])
def test_empty_prompt_files_are_named(tmp_path, capsys, content, said):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    assert main(["tokenize", "--file", str(f)]) == 2
    assert f"{f}: {said}" in err(capsys)
    empty = tmp_path / "neg.txt"
    empty.write_text("")
    assert (
        main(
            [
                "encode",
                "a",
                "--dialect",
                "a1111",
                "--negative-file",
                str(empty),
                "--out",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 2
    )
    assert f"{empty}: the file is empty: no negative prompts" in err(capsys)


def test_prompt_errors_name_file_and_line(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text('a cat\na dog\n("a", "b").blend(1, -1)\n')
    out = str(tmp_path / "c.safetensors")
    assert main(["encode", "--file", str(f), "--dialect", "compel", "--out", out]) == 2
    assert f"{f}:3: compel prompt" in err(capsys)
    assert main(["encode", "a", "b", "c", "--dialect", "compel", "--negative-file", str(f), "--out", out]) == 2
    assert f"{f}:3: compel prompt" in err(capsys)
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps("fine") + "\n" + json.dumps("a (x:1e39)") + "\n")
    assert main(["parse", "--file", str(j), "--dialect", "compel", "--json"]) == 0
    capsys.readouterr()
    assert main(["encode", "--file", str(j), "--dialect", "comfy", "--out", out]) == 2
    assert f"{j}:2: comfy prompt 'a (x:1e39)'" in err(capsys)
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n\"unclosed.blend(\n")
    assert main(["parse", "--file", str(bad), "--dialect", "compel"]) in (0, 2)  # compel reads it as text or not
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["zeroshot", "x.png", "--labels", "a,b", "--template", "{} {}"], "must hold exactly one '{}'"),
        (["zeroshot", "x.png", "--labels", "a,b", "--template", "a {label}"], "must hold exactly one '{}'"),
        (["zeroshot", "x.png", "--labels", "a,b", "--template", "a {"], "template 'a {'"),
        (
            ["ti", "train", "x/", "--token", "<t>", "--init-word", "a", "--template", "{} {}", "--out", "o"],
            "must hold exactly one '{}'",
        ),
        (["train-clip", "--out", "run", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
        (["train-clip", "--out", "run", "--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
        (["shapes", "--size", "100000", "--out", "pics"], "too large"),
        (["encode", "a", "--device", "meta", "--out", "c.safetensors"], "meta device only tracks shapes"),
        (["tokenize", "--pad-id", "-1", "--chunks", "a"], "--pad-id -1 is not a token id"),
        (["tokenize", "--pad-id", "49408", "--dialect", "a1111", "a"], "--pad-id 49408 is not a token id"),
    ],
)
def test_bad_options_exit_2(tmp_path, monkeypatch, capsys, argv, said):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert said in err(capsys)
    assert not list(tmp_path.iterdir())


def test_a_bad_file_in_an_embeddings_folder_is_skipped_or_strict(tmp_path, capsys):
    folder = tmp_path / "emb"
    save_embedding(Embedding("good", "good", {"clip_l": torch.randn(1, 128)}), folder / "good.pt")
    (folder / "broken.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    out = str(tmp_path / "c.safetensors")
    args = ["encode", "a good cat", "--dialect", "a1111", "--embeddings", str(folder), "--out", out]
    assert main(args) == 0
    message = err(capsys)
    assert "warning: skipping embedding" in message and "broken.pt" in message and "--strict-embeddings" in message
    assert main(args + ["--strict-embeddings"]) == 2
    assert "broken.pt" in err(capsys)
    with pytest.raises(sdclip.BadInput, match="broken.pt"):
        sdclip.load_embeddings(folder, strict=True)


def test_closed_stdout_is_a_failure(tmp_path):
    """`sdclip tokenize ... >&-`: nothing can be written, so exit 1 with a message (not 0); a command that writes
    a file needs no stdout."""

    def run(argv):
        code = f"import sys; from sdclip.cli import main; sys.stdout = None; sys.exit(main({argv!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    closed = run(["tokenize", "a cat"])
    assert closed.returncode == 1 and "standard output is closed" in closed.stderr
    assert run(["encode", "a cat", "--out", str(tmp_path / "c.safetensors")]).returncode == 0
