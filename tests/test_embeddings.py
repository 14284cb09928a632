"""Textual-inversion embeddings: every file format, folder scans, refusals, and injection into prompts —
an embedding's vectors must give exactly what a model whose token-embedding rows hold them gives."""

from __future__ import annotations

import base64
import copy
import json
import warnings
from pathlib import Path

import condfakes
import layouts
import pytest
import torch
from clipfakes import randomize
from condfakes import TOK
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import sdclip
from sdclip import BadInput, Conditioner, encode_prompts, load_embeddings, read_embedding

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64


def vectors(n: int = 2, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


def a1111_data(vec: torch.Tensor, name: str = "stored-name") -> dict:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": name,
        "step": 500,
        "sd_checkpoint": "a1b2c3",
        "sd_checkpoint_name": "model",
    }


def write_png(path: Path, data: dict) -> Path:
    """An A1111 embedding image: the embedding as base64 JSON in a tEXt chunk, tensors as TORCHTENSOR lists."""

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.tolist()}
        return {k: encode(v) for k, v in obj.items()} if isinstance(obj, dict) else obj

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(encode(data)).encode()).decode())
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ti")
    v = vectors()
    torch.save(a1111_data(v), d / "a1111.pt")
    torch.save(a1111_data(v), d / "a1111.bin")
    torch.save(
        {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": v.clone().requires_grad_()}},
        d / "original.pt",
    )  # rinongal's textual_inversion, a Parameter and a token tensor
    save_file({"emb_params": v}, d / "kohya.safetensors")
    save_file({"clip_l": vectors(3, 768, 1), "clip_g": vectors(3, 1280, 2)}, d / "xl.safetensors")
    torch.save({"<cat-toy>": v}, d / "learned_embeds.bin")
    save_file({"<cat-toy>": v[0]}, d / "learned_embeds.safetensors")  # one vector, stored [C]
    write_png(d / "image.png", a1111_data(v, "from-png"))
    return {p.name: p for p in d.iterdir()}


# --- reading ------------------------------------------------------------------------------------------------


def test_every_format(files):
    v = vectors()
    expected = {  # file: (name as A1111 / ComfyUI call it, diffusers token, vectors)
        "a1111.pt": ("a1111", "stored-name", v),
        "a1111.bin": ("a1111", "stored-name", v),
        "original.pt": ("original", "original", v),
        "kohya.safetensors": ("kohya", "emb_params", v),
        "learned_embeds.bin": ("learned_embeds", "<cat-toy>", v),
        "learned_embeds.safetensors": ("learned_embeds", "<cat-toy>", v[:1]),
        "image.png": ("from-png", "from-png", v),
    }
    for file, (name, token, vec) in expected.items():
        e = read_embedding(files[file])
        assert (e.name, e.token, e.count) == (name, token, len(vec)), file
        assert torch.allclose(e.for_encoder(WIDTH), vec, atol=1e-7, rtol=0), file  # the PNG went through JSON
        assert e.for_encoder(32) is None
    xl = read_embedding(files["xl.safetensors"])
    assert xl.count == 3 and xl.describe_widths() == "clip_l 768 + clip_g 1280"
    assert torch.equal(xl.for_encoder(768), vectors(3, 768, 1))
    assert torch.equal(xl.for_encoder(1280), vectors(3, 1280, 2))
    assert xl.for_encoder(1024) is None


def test_sdxl_pair_beside_other_tensors(tmp_path):
    """An SDXL file is read by its clip_l and clip_g tensors whatever else it holds: ComfyUI (comfy/sd1_clip.py
    ``load_embed``: ``embed[embed_key]``) and A1111 (``'clip_g' in data and 'clip_l' in data``) take those two."""
    save_file(
        {"clip_l": vectors(2, 768, 1), "clip_g": vectors(2, 1280, 2), "emb_params": vectors(2, 768, 3)},
        tmp_path / "extra.safetensors",
    )
    e = read_embedding(tmp_path / "extra.safetensors")
    assert set(e.vectors) == {"clip_l", "clip_g"} and e.name == "extra"
    assert torch.equal(e.for_encoder(768), vectors(2, 768, 1)) and torch.equal(e.for_encoder(1280), vectors(2, 1280, 2))


def test_folder_scan(tmp_path, files):
    (tmp_path / "sub").mkdir()
    for name in ("a1111.pt", "kohya.safetensors"):
        (tmp_path / name).write_bytes(files[name].read_bytes())
    (tmp_path / "sub" / "image.png").write_bytes(files["image.png"].read_bytes())
    Image.new("RGB", (4, 4)).save(tmp_path / "a1111.preview.png")  # preview pictures, no embedding: passed over
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.warns(UserWarning, match="broken.safetensors"):
        found = load_embeddings(tmp_path)
    assert sorted(e.name for e in found) == ["a1111", "from-png", "kohya"]
    renamed = load_embeddings({"mine": found[0]})
    assert (renamed[0].name, renamed[0].token) == ("mine", "mine")


def test_folder_scan_follows_linked_folders(tmp_path, files):
    """A1111 (``load_from_dir``) and ComfyUI (comfy/sd1_clip.py ``expand_directory_list``) walk the embeddings
    folder with ``os.walk(followlinks=True)``: a linked sub-folder is searched; a link back up is walked once."""
    shared, folder = tmp_path / "shared", tmp_path / "embeddings"
    shared.mkdir()
    folder.mkdir()
    (shared / "kohya.safetensors").write_bytes(files["kohya.safetensors"].read_bytes())
    (folder / "linked").symlink_to(shared, target_is_directory=True)
    (shared / "up").symlink_to(folder, target_is_directory=True)  # a loop: embeddings/linked/up/linked/...
    found = load_embeddings(folder)
    assert [(e.name, e.location) for e in found] == [("kohya", "linked/kohya.safetensors")]
    te = condfakes.encoder("sd1", (WIDTH,))
    by_path = encode_prompts(te, "a embedding:linked/kohya cat", dialect="comfy", embeddings=folder).hidden
    by_name = encode_prompts(te, "a embedding:kohya cat", dialect="comfy", embeddings=files["kohya.safetensors"])
    assert torch.equal(by_path, by_name.hidden)
    assert torch.equal(encode_prompts(te, "a kohya cat", dialect="a1111", embeddings=folder).hidden, by_path)


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/sdclip-ti-pwned",))


@pytest.mark.parametrize(
    "case, words",
    [
        ("nan", "NaN"),
        ("empty", "shape"),
        ("cube", "shape"),
        ("int", "floating-point"),
        ("two_terms", "2 terms"),
        ("xl_counts", "as many"),
        ("code", "refused"),
        ("zero_bytes", "empty"),
        ("many", "not an embedding"),
        ("png_plain", "without an embedding"),
        ("png_garbage", "base64"),
    ],
)
def test_bad_files(tmp_path, case, words):
    path = tmp_path / f"{case}.pt"
    v = vectors()
    if case == "nan":
        save_file({"emb_params": torch.tensor([[float("nan")] * 4])}, path)
    elif case == "empty":
        save_file({"emb_params": torch.zeros(0, 4)}, path)
    elif case == "cube":
        save_file({"emb_params": torch.zeros(2, 2, 4)}, path)
    elif case == "int":
        save_file({"emb_params": torch.zeros(2, 4, dtype=torch.int32)}, path)
    elif case == "two_terms":
        torch.save({"string_to_param": {"*": v, "+": v}}, path)
    elif case == "xl_counts":
        save_file({"clip_l": vectors(2, 8), "clip_g": vectors(3, 8)}, path)
    elif case == "code":
        torch.save({"string_to_param": {"*": v}, "x": Boom()}, path)
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "many":
        save_file({"a": v, "b": v.clone(), "c": v.clone()}, path)
    elif case == "png_plain":
        path = tmp_path / "plain.png"
        Image.new("RGB", (4, 4)).save(path)
    elif case == "png_garbage":
        path = tmp_path / "garbage.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-ti-embedding", "%%% not base64 %%%")
        Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    with pytest.raises(BadInput, match=words):
        read_embedding(path)
    assert not Path("/tmp/sdclip-ti-pwned").exists()


# --- injection ----------------------------------------------------------------------------------------------------

WORDS = ("cat", "dog", "bird")  # single tokens whose embedding rows the reference model overwrites


@pytest.fixture(scope="module")
def models():
    """The encoder, and a copy whose rows for WORDS hold three vectors (as if the embedding were vocabulary)."""
    te = condfakes.encoder("sd1", (WIDTH,))
    v = vectors(3, WIDTH, 5)
    changed = copy.deepcopy(te.towers[0])
    with torch.no_grad():
        for word, row in zip(WORDS, v):
            (tid,) = TOK.tokenize(word)
            changed.token_embedding.weight[tid] = row
    reference = sdclip.TextEncoder([changed], te.usages, te.tokenizers, "sd1")
    one = sdclip.Embedding("ember", "<ember>", {"*": v[:1]})
    three = sdclip.Embedding("tri", "<tri>", {"*": v})
    return te, reference, [one, three]


CASES = {  # dialect: (prompt with the embeddings, the same prompt with the reference's words)
    "a1111": ("a photo of an (ember:1.3), tri on a hill", "a photo of an (cat:1.3), cat dog bird on a hill"),
    "comfy": (
        "a photo of an (embedding:ember:1.3), embedding:tri on a hill",
        "a photo of an (cat:1.3), cat dog bird on a hill",
    ),
    "compel": ("a photo of an (<ember>)1.3, <tri> on a hill", "a photo of an (cat)1.3, cat dog bird on a hill"),
    "diffusers": ("a photo of an <ember>, <tri> on a hill", "a photo of an cat, cat dog bird on a hill"),
}


@pytest.mark.parametrize("dialect", list(CASES))
def test_injection_equals_replaced_rows(models, dialect):
    te, reference, embeddings = models
    before = {k: v.clone() for k, v in te.towers[0].state_dict().items()}
    with_ti, with_words = CASES[dialect]
    got = encode_prompts(te, with_ti, negative="blurry", dialect=dialect, embeddings=embeddings)
    ref = encode_prompts(reference, with_words, negative="blurry", dialect=dialect)
    assert (got.hidden - ref.hidden).abs().max() <= 1e-6
    assert torch.equal(got.negative_hidden, ref.negative_hidden)
    assert all(torch.equal(v, te.towers[0].state_dict()[k]) for k, v in before.items())  # weights untouched


def test_width_mismatch(models):
    te, _, _ = models
    narrow = sdclip.Embedding("slim", "<slim>", {"*": vectors(1, 32)})
    # A1111: skipped with a warning, the name is then plain text
    with pytest.warns(UserWarning, match="skipped"):
        got = encode_prompts(te, "a slim cat", dialect="a1111", embeddings=[narrow])
    assert torch.equal(got.hidden, encode_prompts(te, "a slim cat", dialect="a1111").hidden)
    # ComfyUI: the vector is dropped at encode time, the row closes up, the weights stay where they were
    with pytest.warns(UserWarning, match="left out"):
        got = encode_prompts(te, "a (embedding:slim:1.5) cat", dialect="comfy", embeddings=[narrow])
    c = sdclip.prompts.chunk("a cat", "comfy", TOK)
    ids, _ = c.tensors()
    z = te.encode_ids(ids).hidden[0].clone()
    e = te.encode_ids(sdclip.prompts.chunk("", "comfy", TOK).tensors()[0]).hidden[0]
    z[2] = (z[2] - e[2]) * 1.5 + e[2]  # "cat" moved into the embedding's place and weight
    assert (got.hidden[0] - z).abs().max() <= 1e-6
    # diffusers and compel refuse it, but only where a prompt uses it
    for dialect in ("diffusers", "compel"):
        with pytest.raises(BadInput, match="width 32"):
            encode_prompts(te, "a <slim> cat", dialect=dialect, embeddings=[narrow])
        encode_prompts(te, "a cat", dialect=dialect, embeddings=[narrow])


def test_comfy_calls_files_by_their_path(tmp_path, files):
    """ComfyUI (comfy/sd1_clip.py ``load_embed``) finds ``embedding:name`` as a file in the embeddings folder or a
    sub-folder, the name as written, else + .safetensors, .pt, .bin in that order; it reads no A1111 image."""
    te = condfakes.encoder("sd1", (WIDTH,))
    (tmp_path / "sub").mkdir()
    torch.save(a1111_data(vectors(2, WIDTH, 7)), tmp_path / "same.pt")
    save_file({"emb_params": vectors(3, WIDTH, 8)}, tmp_path / "same.safetensors")
    save_file({"emb_params": vectors(1, WIDTH, 9)}, tmp_path / "sub" / "deep.safetensors")
    (tmp_path / "sub" / "image.png").write_bytes(files["image.png"].read_bytes())

    def encode(prompt: str, embeddings: object) -> torch.Tensor:
        return encode_prompts(te, prompt, dialect="comfy", embeddings=embeddings).hidden

    def alone(seed: int, n: int) -> torch.Tensor:  # the same vectors given in memory
        return encode("a embedding:x cat", [sdclip.Embedding("x", "x", {"*": vectors(n, WIDTH, seed)})])

    assert torch.equal(encode("a embedding:same cat", tmp_path), alone(8, 3))  # .safetensors before .pt
    assert torch.equal(encode("a embedding:same.pt cat", tmp_path), alone(7, 2))
    assert torch.equal(encode("a embedding:sub/deep cat", tmp_path), alone(9, 1))
    assert torch.equal(encode("a embedding:deep cat", tmp_path), alone(9, 1))
    assert torch.equal(encode("a embedding:deep cat", tmp_path / "sub" / "deep.safetensors"), alone(9, 1))
    for prompt in ("a embedding:from-png cat", "a embedding:sub/image.png cat", "a embedding:same.bin cat"):
        with pytest.warns(UserWarning, match="does not exist"):
            assert torch.equal(encode(prompt, tmp_path), encode("a cat", None)), prompt
    with pytest.warns(UserWarning, match="does not exist"):  # a file read alone: as if alone in its folder
        encode("a embedding:same.pt cat", tmp_path / "same.safetensors")


def test_sdxl_pairs_go_to_their_encoders(files):
    l_tower = sdclip.TextTransformer(sdclip.TextConfig(width=768, layers=1, heads=12, mlp_width=8))
    g_tower = sdclip.TextTransformer(sdclip.TextConfig(width=1280, layers=1, heads=20, mlp_width=8, pad_id=0))
    te = sdclip.TextEncoder([l_tower, g_tower], [sdclip.Usage(-2, False)] * 2, [TOK, TOK], "sdxl")
    xl = read_embedding(files["xl.safetensors"])
    sd1_only = sdclip.Embedding("old", "old", {"*": vectors(1, 768)})
    for dialect in ("a1111", "comfy", "diffusers"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cond = Conditioner(te, dialect, embeddings=[xl, sd1_only])
        l_table, g_table = (e.table for e in cond.uses)
        assert torch.equal(l_table["xl"], vectors(3, 768, 1)) and torch.equal(g_table["xl"], vectors(3, 1280, 2))
        if dialect == "a1111":  # A1111 skips a 768-wide file on SDXL (it expects 768 + 1280)
            assert "old" not in l_table and any("old" in str(w.message) for w in caught)
        elif dialect == "comfy":  # ComfyUI gives it to CLIP-L and drops it on bigG when encoding
            assert l_table["old"].shape == (1, 768) and g_table["old"] == 1
        else:
            assert "old" in cond.unfit


def test_cli_embeddings(tmp_path, files, capsys):
    from sdclip.cli import main

    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "kohya.safetensors").write_bytes(files["kohya.safetensors"].read_bytes())
    model = tmp_path / "model"
    layouts.write_hf_folder(randomize(CLIPTextModel(condfakes.hf_config(WIDTH, 2)).eval()), model)
    layouts.write_tokenizer(model)
    out = tmp_path / "out.safetensors"
    code = main(
        [
            "encode",
            "a kohya cat",
            "--model",
            str(model),
            "--dialect",
            "a1111",
            "--embeddings",
            str(folder),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    got = load_file(out)["hidden"]
    te = sdclip.load(model)
    want = encode_prompts(te, "a kohya cat", dialect="a1111", embeddings=folder).hidden
    assert torch.equal(got, want)
    assert not torch.equal(got, encode_prompts(te, "a kohya cat", dialect="a1111").hidden)


def test_pickles_keep_their_text_fields(files):
    with sdclip.tensorfile.open_tensor_file(files["a1111.pt"]) as f:
        assert f.metadata["name"] == "stored-name" and f.metadata["sd_checkpoint"] == "a1b2c3"
