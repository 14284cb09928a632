"""The ``sdclip`` command: data on stdout, one-line messages on stderr, exit 0 / 1 / 2.

Most tests call ``sdclip.cli.main`` in-process (fast); a few run the installed console script.
Models are tiny random towers (width 64, 2 layers) in the layouts users hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdclip
from sdclip import BadInput, SdclipError
from sdclip.cli import main, read_prompts

WIDTH, LAYERS, MLP, VOCAB, PROJ = 64, 2, 128, 49408, 32
SCRIPT = Path(sys.executable).with_name("sdclip")


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.05


def hf_tower(prefix: str, width: int = WIDTH, seed: int = 0, proj: int = 0) -> dict[str, torch.Tensor]:
    """A random CLIP text tower in Hugging Face naming (``proj``: add text_projection.weight)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{prefix}text_model.embeddings.token_embedding.weight": rand(g, VOCAB, width),
        f"{prefix}text_model.embeddings.position_embedding.weight": rand(g, 77, width),
        f"{prefix}text_model.final_layer_norm.weight": 1 + rand(g, width),
        f"{prefix}text_model.final_layer_norm.bias": rand(g, width),
    }
    for i in range(LAYERS):
        b = f"{prefix}text_model.encoder.layers.{i}."
        for x in ("q", "k", "v", "out"):
            sd[f"{b}self_attn.{x}_proj.weight"], sd[f"{b}self_attn.{x}_proj.bias"] = (
                rand(g, width, width),
                rand(g, width),
            )
        for n in (1, 2):
            sd[f"{b}layer_norm{n}.weight"], sd[f"{b}layer_norm{n}.bias"] = 1 + rand(g, width), rand(g, width)
        sd[f"{b}mlp.fc1.weight"], sd[f"{b}mlp.fc1.bias"] = rand(g, 2 * width, width), rand(g, 2 * width)
        sd[f"{b}mlp.fc2.weight"], sd[f"{b}mlp.fc2.bias"] = rand(g, width, 2 * width), rand(g, width)
    if proj:
        sd[f"{prefix}text_projection.weight"] = rand(g, proj, width)
    return sd


def openclip_tower(prefix: str, width: int, seed: int = 1, proj: int = PROJ) -> dict[str, torch.Tensor]:
    """A random text tower in OpenCLIP naming (fused in_proj, text_projection [width, proj])."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{prefix}token_embedding.weight": rand(g, VOCAB, width),
        f"{prefix}positional_embedding": rand(g, 77, width),
        f"{prefix}ln_final.weight": 1 + rand(g, width),
        f"{prefix}ln_final.bias": rand(g, width),
        f"{prefix}text_projection": rand(g, width, proj),
        f"{prefix}logit_scale": torch.tensor(4.6),
    }
    for i in range(LAYERS):
        b = f"{prefix}transformer.resblocks.{i}."
        sd[f"{b}attn.in_proj_weight"], sd[f"{b}attn.in_proj_bias"] = rand(g, 3 * width, width), rand(g, 3 * width)
        sd[f"{b}attn.out_proj.weight"], sd[f"{b}attn.out_proj.bias"] = rand(g, width, width), rand(g, width)
        for n in (1, 2):
            sd[f"{b}ln_{n}.weight"], sd[f"{b}ln_{n}.bias"] = 1 + rand(g, width), rand(g, width)
        sd[f"{b}mlp.c_fc.weight"], sd[f"{b}mlp.c_fc.bias"] = rand(g, 4 * width, width), rand(g, 4 * width)
        sd[f"{b}mlp.c_proj.weight"], sd[f"{b}mlp.c_proj.bias"] = rand(g, width, 4 * width), rand(g, width)
    return sd


def hf_config(proj: int = 0) -> dict:
    config = {
        "architectures": ["CLIPTextModelWithProjection" if proj else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    return {**config, "projection_dim": proj} if proj else config


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """hf: a transformers-style folder; proj: the same with a projection; single: an SD1-style file
    with a U-Net tensor beside; two: a two-encoder file (HF tower + wider OpenCLIP tower)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, proj in (("hf", 0), ("proj", PROJ)):
        folder = root / name
        folder.mkdir()
        save_file(hf_tower("", proj=proj), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(hf_config(proj)))
        out[name] = folder
    out["single"] = root / "sd1.safetensors"
    save_file(
        {
            **hf_tower("cond_stage_model.transformer."),
            "model.diffusion_model.out.0.weight": torch.ones(4),
            "model.diffusion_model.out.2.weight": torch.ones(4),
            "first_stage_model.encoder.w": torch.ones(2),
        },
        out["single"],
    )
    out["two"] = root / "two.safetensors"
    save_file(
        {
            **hf_tower("conditioner.embedders.0.transformer.", seed=2),
            **openclip_tower("conditioner.embedders.1.model.", 128),
        },
        out["two"],
    )
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad(capsys, code_wanted: int, *argv: str, words: tuple[str, ...] = ()) -> str:
    """The command fails with ``code_wanted``, nothing on stdout and one line on stderr."""
    code, out, err = run(capsys, *argv)
    assert code == code_wanted, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("sdclip"), err
    for w in words:
        assert w in err, err
    return err


def read_out(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["tokenize"], ["encode"], ["info"]])
def test_help(capsys, command):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: sdclip")
    expected = {
        (): ["tokenize", "encode", "info", "Exit status"],
        ("tokenize",): ["--file", "--mode", ".jsonl"],
        ("encode",): [
            "--out",
            "--layer",
            "--final-norm",
            "--no-final-norm",
            "--encoder",
            "--dtype",
            "--device",
            "pooled_projected",
        ],
        ("info",): ["layout", "--json"],
    }[tuple(command)]
    for word in expected:
        assert word in out, word


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"sdclip {sdclip.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["encode", "a cat"],
        ["tokenize", "--mode", "xx", "a"],
        ["encode", "a", "-m", "x", "-o", "y", "--layer", "two"],
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv):
    assert_bad(capsys, 2, *argv, words=("--help",))


# --- tokenize --------------------------------------------------------------------------------


def test_tokenize_arguments(capsys):
    code, out, err = run(capsys, "tokenize", "a photo of a cat", "")
    assert code == 0 and err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        [49406, 320, 1125, 539, 320, 2368, 49407],
        [49406, 49407],
    ]


def test_tokenize_no_truncation_no_padding(capsys):
    code, out, _ = run(capsys, "tokenize", "cat " * 100)
    ids = json.loads(out)
    assert code == 0 and len(ids) == 102 and ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1] == [2368] * 100


def test_tokenize_txt_file(capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffa cat\r\na dog\n".encode())  # a BOM and Windows line ends, as Notepad writes
    assert read_prompts(["first"], str(f)) == ["first", "a cat", "a dog"]
    code, out, _ = run(capsys, "tokenize", "first", "--file", f)
    assert code == 0
    assert out.splitlines() == [json.dumps(sdclip.Tokenizer().encode(p)) for p in ("first", "a cat", "a dog")]


def test_tokenize_jsonl_prompt_with_newline(capsys, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps("a cat\non a mat") + "\n\n" + json.dumps("dog") + "\n")
    code, out, _ = run(capsys, "tokenize", "--file", f)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    tok = sdclip.Tokenizer()
    assert json.loads(lines[0]) == tok.encode("a cat\non a mat") and json.loads(lines[1]) == tok.encode("dog")


def test_tokenize_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\na dog\n"))
    code, out, _ = run(capsys, "tokenize", "--file", "-")
    assert code == 0 and len(out.splitlines()) == 2


def test_tokenize_modes_differ_where_documented(capsys):
    """hf lower-cases specials too; openai keeps the exact-case special token."""
    outs = {}
    for mode in ("hf", "openai", "nfc"):
        code, out, _ = run(capsys, "tokenize", "--mode", mode, "A <|endoftext|> b")
        assert code == 0
        outs[mode] = json.loads(out)
    for mode, ids in outs.items():
        assert ids == sdclip.Tokenizer(mode=mode).encode("A <|endoftext|> b")


def test_tokenize_with_model(capsys, models):
    code, out, _ = run(capsys, "tokenize", "--model", models["hf"], "a cat")
    assert code == 0 and json.loads(out) == [49406, 320, 2368, 49407]


@pytest.mark.parametrize(
    "content,words",
    [
        ('"ok"\n{"prompt": "x"}\n', ("prompts.jsonl:2", "JSON string")),
        ('"ok"\nnot json\n', ("prompts.jsonl:2",)),
        ("", ("no prompts",)),
    ],
)
def test_bad_prompt_files(capsys, tmp_path, content, words):
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    assert_bad(capsys, 2, "tokenize", "--file", f, words=words)


def test_no_prompts(capsys):
    assert_bad(capsys, 2, "tokenize", words=("no prompts",))


def test_missing_prompt_file(capsys, tmp_path):
    assert_bad(capsys, 2, "tokenize", "--file", tmp_path / "nope.txt", words=("nope.txt",))


def test_prompt_file_not_utf8(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"caf\xe9\n")
    assert_bad(capsys, 2, "tokenize", "--file", f, words=("p.txt",))


# --- encode ----------------------------------------------------------------------------------


def test_encode_hf_folder(capsys, models, tmp_path):
    out_file = tmp_path / "sub" / "out.safetensors"
    code, out, err = run(capsys, "encode", "a photo of a cat", "a dog", "--model", models["hf"], "--out", out_file)
    assert code == 0 and out == "" and "out.safetensors" in err
    tensors, meta = read_out(out_file)
    assert set(tensors) == {"hidden", "pooled"}
    assert tensors["hidden"].shape == (2, 77, WIDTH) and tensors["pooled"].shape == (2, WIDTH)
    assert tensors["hidden"].dtype == torch.float32
    assert json.loads(meta["prompts"]) == ["a photo of a cat", "a dog"]
    assert (meta["family"], meta["encoder"], meta["layer"], meta["final_norm"]) == ("clip", "1", "-1", "True")
    ref = sdclip.load(models["hf"]).encode(["a photo of a cat", "a dog"])
    torch.testing.assert_close(tensors["hidden"], ref.hidden, rtol=0, atol=0)
    torch.testing.assert_close(tensors["pooled"], ref.pooled, rtol=0, atol=0)


def test_encode_matches_transformers(capsys, models, tmp_path):
    """The written tensors are what transformers' CLIPTextModelWithProjection computes."""
    transformers = pytest.importorskip("transformers")
    prompts = ["a photo of a cat", "an oil painting, (masterpiece)"]
    model = transformers.CLIPTextModelWithProjection.from_pretrained(models["proj"]).eval()
    ids = sdclip.Tokenizer()(prompts)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    runs = {"default": [], "penultimate raw": ["--layer", "-2", "--no-final-norm"], "layer 1 + LN": ["--layer", "1"]}
    for name, extra in runs.items():
        out_file = tmp_path / f"{name}.safetensors"
        code, _, err = run(capsys, "encode", *prompts, "-m", models["proj"], "-o", out_file, *extra)
        assert code == 0, err
        tensors, meta = read_out(out_file)
        assert set(tensors) == {"hidden", "pooled", "pooled_projected"}
        assert tensors["pooled_projected"].shape == (2, PROJ)
        expected = {
            "default": ref.last_hidden_state,
            "penultimate raw": ref.hidden_states[-2],
            "layer 1 + LN": model.text_model.final_layer_norm(ref.hidden_states[1]),
        }[name]
        torch.testing.assert_close(tensors["hidden"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tensors["pooled_projected"], ref.text_embeds, rtol=1e-5, atol=1e-5)
    assert (meta["layer"], meta["final_norm"]) == ("1", "True")


def test_encode_two_encoder_file(capsys, models, tmp_path):
    te = sdclip.load(models["two"])
    for encoder, width in ((1, WIDTH), (2, 128)):
        out_file = tmp_path / f"e{encoder}.safetensors"
        code, _, err = run(
            capsys,
            "encode",
            "a cat",
            "-m",
            models["two"],
            "-o",
            out_file,
            "--encoder",
            encoder,
            "--layer",
            "-2",
            "--no-final-norm",
        )
        assert code == 0, err
        tensors, meta = read_out(out_file)
        assert tensors["hidden"].shape == (1, 77, width) and meta["encoder"] == str(encoder)
        assert ("pooled_projected" in tensors) == (encoder == 2)
        ref = te.encode(["a cat"], encoder=encoder, layer=-2, final_norm=False)
        torch.testing.assert_close(tensors["hidden"], ref.hidden, rtol=0, atol=0)
        if encoder == 2:
            assert tensors["pooled_projected"].shape == (1, PROJ)
            torch.testing.assert_close(tensors["pooled_projected"], ref.pooled_projected, rtol=0, atol=0)
    assert_bad(
        capsys,
        2,
        "encode",
        "a",
        "-m",
        models["two"],
        "-o",
        tmp_path / "x.safetensors",
        "--encoder",
        "3",
        words=("encoder 3",),
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_encode_dtype(capsys, models, tmp_path, dtype):
    out_file = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "encode", "a cat", "-m", models["single"], "-o", out_file, "--dtype", dtype)
    assert code == 0, err
    tensors, _ = read_out(out_file)
    assert tensors["hidden"].dtype == getattr(torch, dtype)
    ref = sdclip.load(models["single"]).encode(["a cat"]).hidden
    torch.testing.assert_close(tensors["hidden"].float(), ref, rtol=0.05, atol=0.05)


def test_encode_prompts_from_jsonl(capsys, models, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in ["a\nb", "c", ""]) + "\n")
    out_file = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "encode", "--file", f, "-m", models["single"], "-o", out_file)
    assert code == 0, err
    tensors, meta = read_out(out_file)
    assert tensors["hidden"].shape[0] == 3 and json.loads(meta["prompts"]) == ["a\nb", "c", ""]


@pytest.mark.parametrize(
    "argv,code,words",
    [
        (["--layer", "5"], 2, ("layer 5",)),
        (["--layer", "-4"], 2, ("layer -4",)),
        (["--encoder", "2"], 2, ("encoder 2",)),
        (["--encoder", "0"], 2, ("encoder 0",)),
        (["--device", "nonsense"], 2, ("nonsense",)),
    ],
)
def test_encode_bad_options(capsys, models, tmp_path, argv, code, words):
    out_file = tmp_path / "out.safetensors"
    assert_bad(capsys, code, "encode", "a cat", "-m", models["single"], "-o", out_file, *argv, words=words)
    assert not out_file.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_encode_on_a_missing_gpu_is_a_failure(capsys, models, tmp_path):
    assert_bad(
        capsys,
        1,
        "encode",
        "a",
        "-m",
        models["single"],
        "-o",
        tmp_path / "o.safetensors",
        "--device",
        "cuda",
        words=("CUDA",),
    )


def test_encode_out_is_a_folder(capsys, models, tmp_path):
    assert_bad(capsys, 2, "encode", "a", "-m", models["single"], "-o", tmp_path, words=("--out",))


def test_encode_bad_model_files(capsys, tmp_path):
    out_file = tmp_path / "out.safetensors"
    evil = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'marker'}",)

    torch.save({"state_dict": {"x": torch.ones(1)}, "p": Payload()}, evil)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        evil: "posix.system",
        truncated: "truncated",
        empty_dir: "no weights",
    }
    for model, word in cases.items():
        err = assert_bad(capsys, 2, "encode", "a cat", "-m", model, "-o", out_file, words=(word, str(model)))
        assert "Traceback" not in err
    assert not (tmp_path / "marker").exists() and not out_file.exists()


def test_sdclip_error_exits_1(capsys, monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise SdclipError("org/model is not in the Hugging Face cache\nand the hub cannot be reached")

    monkeypatch.setattr(sdclip, "load", fail)
    err = assert_bad(capsys, 1, "info", "org/model", words=("not in the Hugging Face cache",))
    assert "cache and the hub" in err  # folded onto one line


def test_internal_error_exits_1_without_traceback(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(sdclip, "load", bug)
    err = assert_bad(capsys, 1, "info", "whatever", words=("internal error", "ZeroDivisionError", "SDCLIP_DEBUG"))
    assert "Traceback" not in err


def test_bad_input_class_is_exit_2_everywhere(capsys, monkeypatch):
    monkeypatch.setattr(sdclip, "load", lambda *a, **k: (_ for _ in ()).throw(BadInput("x.ckpt: broken")))
    assert_bad(capsys, 2, "info", "x.ckpt", words=("x.ckpt: broken",))


# --- info ------------------------------------------------------------------------------------


def test_info_single_file(capsys, models):
    code, out, err = run(capsys, "info", models["single"])
    assert code == 0 and err == ""
    te = sdclip.load(models["single"])
    params = sum(p.numel() for p in te.towers[0].parameters())
    for text in (
        "layout:",
        "family:",
        "layers 2",
        f"width {WIDTH}",
        "heads 1",
        "activation quick_gelu",
        "dtype float32",
        f"{params:,} parameters",
        "ignored: 3 tensors",
        "model.diffusion_model.*",
        "first_stage_model.encoder.*",
    ):
        assert text in out, (text, out)


def test_info_two_encoders_and_json(capsys, models):
    code, out, _ = run(capsys, "info", models["two"], "--json")
    info = json.loads(out)
    assert code == 0 and [e["width"] for e in info["encoders"]] == [WIDTH, 128]
    assert info["encoders"][1]["projection_dim"] == PROJ and info["encoders"][1]["naming"] == "openclip"
    assert sum(info["ignored"].values()) == 1  # logit_scale


def test_info_folder_without_ignored(capsys, models):
    code, out, _ = run(capsys, "info", models["hf"])
    assert code == 0 and "heads 2" in out and "ignored: none" in out


def test_broken_pipe_is_quiet(models):
    """`sdclip tokenize ... | head -1`: no BrokenPipeError noise."""
    proc = subprocess.run(
        f"'{SCRIPT}' tokenize --file - | head -1", shell=True, capture_output=True, text=True, input="a cat\n" * 20_000
    )  # 500 kB: far more than a pipe holds
    assert proc.stdout.strip() == "[49406, 320, 2368, 49407]"
    assert "Error" not in proc.stderr, proc.stderr


# --- the installed console script ------------------------------------------------------------


def test_console_script(models, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out_file = tmp_path / "out.safetensors"
    ok = subprocess.run(
        [SCRIPT, "encode", "a cat", "-m", models["proj"], "-o", out_file], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    assert read_out(out_file)[0]["pooled_projected"].shape == (1, PROJ)

    bad = subprocess.run([SCRIPT, "info", tmp_path / "nope.ckpt"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1 and "nope.ckpt" in bad.stderr
