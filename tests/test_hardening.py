"""Regression tests for the hardening of every reader (issues 15 and 16): silently wrong weights are refused,
resource bombs stay bounded (each run in a child under a memory cap and a timeout, see ``bounded``), input
errors name their file and field, and prompts have a documented maximum length."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from bounded import run_cli, run_python
from safetensors.torch import save_file
from test_tensorfile import HF, LAYERS, WIDTH, bad_input, hf_state, params, torch_zip

import sdclip
from sdclip import BadInput, limits
from sdclip.embeddings import load_embeddings, read_embedding
from sdclip.images import open_image
from sdclip.tensorfile import PickleFile, open_tensor_file


@pytest.fixture(scope="module", name="state")
def tiny_tower() -> dict[str, torch.Tensor]:
    return hf_state()


def raw_safetensors(path: Path, header: str, data: bytes) -> Path:
    """A safetensors file with a hand-written JSON header (duplicates and all)."""
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(key: str, begin: int, end: int, shape: list[int]) -> str:
    return f'"{key}": {{"dtype": "F32", "shape": {json.dumps(shape)}, "data_offsets": [{begin}, {end}]}}'


# --- A: silently wrong weights -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries, words",
    [
        ([entry("a", 0, 16, [4]), entry("a", 16, 32, [4])], ["'a' twice"]),  # json keeps the last: silently wrong
        ([entry("a", 0, 16, [4]), entry("b", 0, 16, [4])], ["overlaps", "a"]),
        ([entry("a", 0, 16, [4]), entry("b", 8, 24, [4])], ["overlaps"]),
        ([entry("a", 0, 16, [4]), entry("b", 20, 32, [3])], ["gap"]),
        ([entry("a", 0, 16, [4])], ["trailing data"]),
        ([entry("a", 0, 12, [4]), entry("b", 12, 32, [5])], ["tensor a has 12 bytes"]),
        ([entry("a", 0, 16, [4]), entry("b", 16, 48, [8])], ["past the end"]),
        (['"a": {"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}'], ["shape"]),
        (['"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}'], ["data_offsets"]),
        (['"a": [1, 2]'], ["tensor a"]),
        (['"__metadata__": [1]', entry("a", 0, 32, [8])], ["__metadata__"]),
    ],
)
def test_safetensors_header_is_validated_fully(tmp_path, entries, words):
    path = raw_safetensors(tmp_path / "model.safetensors", "{" + ", ".join(entries) + "}", bytes(32))
    with pytest.raises(BadInput) as info:
        open_tensor_file(path)
    message = str(info.value)
    assert str(path) in message and all(w in message for w in words), message


def test_a_valid_handwritten_header_still_reads(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    path = raw_safetensors(
        tmp_path / "ok.safetensors", "{" + entry("b", 16, 32, [4]) + ", " + entry("a", 0, 16, [4]) + "}", data
    )
    with open_tensor_file(path) as f:
        assert f.get("a").tolist() == [0, 1, 2, 3] and f.get("b").tolist() == [4, 5, 6, 7]


def _member(path: Path, name: str) -> tuple[int, int, int]:
    """(local header offset, data offset, size) of a stored zip member."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    raw = path.read_bytes()
    n, extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset, info.header_offset + 30 + n + extra, info.file_size


def _token_record(path: Path) -> str:
    with PickleFile(path) as f:
        return f"{f._root}/data/{f._tensors[HF + 'embeddings.token_embedding.weight'].storage.key}"


def flip_a_weight_bit(raw: bytearray, header: int, start: int, size: int) -> None:
    raw[start + size // 2] ^= 0x10  # one bit of one weight: a silently different model before


def shift_the_record(raw: bytearray, header: int, start: int, size: int) -> None:
    """The local header's extra length points 4 bytes into the record's data."""
    extra = struct.unpack("<H", raw[header + 28 : header + 30])[0]
    raw[header + 28 : header + 30] = struct.pack("<H", extra + 4)


@pytest.mark.parametrize("damage", [flip_a_weight_bit, shift_the_record])
def test_damaged_torch_record_is_refused(tmp_path, state, damage):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    record = _token_record(path)
    raw = bytearray(path.read_bytes())
    damage(raw, *_member(path, record))
    path.write_bytes(bytes(raw))
    bad_input(path, record, "CRC32")


def test_flipped_bit_in_data_pkl_is_refused(tmp_path, state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    _, start, size = _member(path, "model/data.pkl")
    raw = bytearray(path.read_bytes())
    raw[start + size - 20] ^= 0x01
    path.write_bytes(bytes(raw))
    bad_input(path)


def test_deflated_records_are_read_as_torch_load_reads_them(tmp_path, state):
    plain, packed = tmp_path / "plain.ckpt", tmp_path / "packed.ckpt"
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert torch.load(packed, weights_only=True).keys() == state.keys()
    got, reference = params(sdclip.load(packed)), params(sdclip.load(plain))
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_member_claiming_more_than_the_archive_holds(tmp_path, state):
    """A central directory entry claiming ~4 GB for a record (zip64 would allow 400 GB: the same check)."""
    path = tmp_path / "model.ckpt"
    torch.save(state, path)
    record = _token_record(path).encode()
    raw = bytearray(path.read_bytes())
    at = next(
        i for i in range(len(raw)) if raw[i : i + 4] == b"PK\x01\x02" and raw[i + 46 : i + 46 + len(record)] == record
    )
    raw[at + 20 : at + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    bad_input(path, record.decode(), "past the end")


def openclip_state(layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = 64
    sd = {
        "token_embedding.weight": torch.randn(49408, w, generator=g) * 0.02,
        "positional_embedding": torch.randn(77, w, generator=g) * 0.01,
        "ln_final.weight": torch.ones(w),
        "ln_final.bias": torch.zeros(w),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes = {
            "ln_1.weight": (w,),
            "ln_1.bias": (w,),
            "ln_2.weight": (w,),
            "ln_2.bias": (w,),
            "attn.in_proj_weight": (3 * w, w),
            "attn.in_proj_bias": (3 * w,),
            "attn.out_proj.weight": (w, w),
            "attn.out_proj.bias": (w,),
            "mlp.c_fc.weight": (2 * w, w),
            "mlp.c_fc.bias": (2 * w,),
            "mlp.c_proj.weight": (w, 2 * w),
            "mlp.c_proj.bias": (w,),
        }
        sd.update({b + k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()})
    return sd


@pytest.mark.parametrize("style", ["hf", "openclip"])
def test_partially_present_layer_is_refused(tmp_path, state, style):
    """Layers 0 and 1 whole, layer 2 with some of its tensors (for OpenCLIP, a copy of layer 1's MLP: what
    kohya's placeholder block looks like in part) is a damaged file, not a 2-layer model."""
    if style == "hf":
        sd = dict(state)
        for name in ("layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight"):
            sd[f"{HF}encoder.layers.{LAYERS}.{name}"] = sd[f"{HF}encoder.layers.{LAYERS - 1}.{name}"].clone()
        words = [f"layer {LAYERS}", "incomplete"]
    else:
        sd = openclip_state()
        for name in ("mlp.c_fc.weight", "mlp.c_fc.bias"):
            sd[f"transformer.resblocks.2.{name}"] = sd[f"transformer.resblocks.1.{name}"].clone()
        words = ["layer 2", "incomplete", "resblocks.2"]
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    bad_input(path, *words)


def test_openclip_file_still_loads(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(openclip_state(), path)
    assert sdclip.load(path).towers[0].config.layers == 2


# --- B: resource bombs, bounded ------------------------------------------------------------------------------


def dag(depth: int, leaf: object) -> dict:
    """A dict graph ``depth`` levels deep whose two children are one object: 2^depth paths, a few hundred bytes."""
    node: object = leaf
    for _ in range(depth):
        node = {"a": node, "b": node}
    return node  # type: ignore[return-value]


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, state) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    out = {}
    torch.save({"state_dict": dag(40, torch.ones(2))}, d / "dag.ckpt")
    torch.save({"state_dict": dag(40, torch.ones(2))}, d / "dag_legacy.bin", _use_new_zipfile_serialization=False)
    loop: dict = {"w": torch.ones(2)}
    loop["again"] = loop
    torch.save(loop, d / "loop.ckpt")
    torch.save(loop, d / "loop_legacy.bin", _use_new_zipfile_serialization=False)
    # a pickle of a 100 MB bytes object (past the 64 MB limit), deflated to ~100 kB
    big = pickle.dumps(b"\0" * (100 << 20), protocol=4)
    with zipfile.ZipFile(d / "bytes.ckpt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", big)
        z.writestr("archive/byteorder", "little")
    del big
    # 64 floats as a [4e7, 64] token embedding (stride 0): 10 GB once materialised
    sd = dict(state)
    sd[HF + "embeddings.token_embedding.weight"] = torch.randn(64).expand(40_000_000, 64)
    torch.save(sd, d / "stride0.ckpt")
    torch.save(sd, d / "stride0_legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("dag.ckpt", "loop.ckpt"):  # the same inside an --embeddings folder
        (d / "ti").mkdir(exist_ok=True)
        (d / "ti" / name.replace(".ckpt", ".pt")).write_bytes((d / name).read_bytes())
    return {**{p.name: p for p in d.iterdir()}, **out}


BOMBS = {  # file -> words its refusal must hold
    "dag.ckpt": ["1,000,000"],
    "dag_legacy.bin": ["1,000,000"],
    "loop.ckpt": ["holds itself"],
    "loop_legacy.bin": ["holds itself"],
    "bytes.ckpt": ["data.pkl", "67,108,864"],
    "stride0.ckpt": ["token_embedding", "stride 0"],
    "stride0_legacy.bin": ["token_embedding", "stride 0"],
}


def test_pickle_bombs_are_refused_within_bounds(bombs):
    """Each would take 8 GB or more (or the stack) unbounded; one capped child runs them all."""
    outcomes = run_cli([["info", str(bombs[name])] for name in BOMBS], timeout=180)
    for (name, words), outcome in zip(BOMBS.items(), outcomes):
        assert outcome.rc == 2 and str(bombs[name]) in outcome.stderr, (name, outcome.stderr)
        assert all(w in outcome.stderr for w in words), (name, outcome.stderr)


def test_pickle_bombs_in_an_embeddings_folder_are_skipped_within_bounds(bombs):
    out = run_python(
        f"""
import warnings
from sdclip.embeddings import load_embeddings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    found = load_embeddings({str(bombs['ti'])!r})
print(len(found), "|".join(str(w.message) for w in caught))
""",
        timeout=120,
    )
    count, messages = out.strip().split(" ", 1)
    assert count == "0" and "dag.pt" in messages and "loop.pt" in messages, out


def test_pickle_opcode_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PICKLE_OPS", 50)
    path = torch_zip(tmp_path / "many.ckpt", pickle.dumps({str(i): i for i in range(100)}, protocol=2))
    bad_input(path, "opcodes")


def test_tree_depth_limit(tmp_path):
    nested: dict = {"w": torch.ones(1)}
    for _ in range(limits.MAX_TREE_DEPTH + 5):
        nested = {"x": nested}
    path = tmp_path / "deep.ckpt"
    torch.save(nested, path)
    bad_input(path, "nest")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_devices_and_fifos_are_refused_never_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    prompt_fifo = tmp_path / "prompts.txt"
    os.mkfifo(prompt_fifo)
    calls = [
        ["info", "/dev/zero"],
        ["tokenize", "--file", "/dev/zero"],
        ["tokenize", "--file", str(prompt_fifo)],
        ["ti", "inspect", str(fifo)],
        ["info", str(fifo)],
    ]
    outcomes = run_cli(calls, timeout=60)
    for call, outcome in zip(calls, outcomes):
        assert outcome.rc == 2 and "not a regular file" in outcome.stderr, (call, outcome.stderr)
    for source in ("/dev/zero", "/dev/urandom", fifo):
        with pytest.raises(BadInput, match="not a regular file"):
            open_image(source)
        with pytest.raises(BadInput, match="not a regular file"):
            read_embedding(source)


def test_unreadable_weights_file_names_the_file(tmp_path, state, monkeypatch):
    """A file sdclip may not read (CI runs as root, where chmod 000 does not stop a read: the refusal
    is simulated where the file is opened)."""
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    real_open = os.open

    def denied(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(limits.os, "open", denied)
    bad_input(path, "permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights_file_for_real(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    path.chmod(0)
    bad_input(path, "permission denied")


def png(width: int, height: int, chunks: list[tuple[bytes, bytes]], idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", idat)
        + b"".join(chunk(k, b) for k, b in chunks)
        + chunk(b"IEND", b"")
    )


def embedding_text(n: int = 2, width: int = WIDTH) -> bytes:
    import base64

    vec = (torch.arange(n * width, dtype=torch.float32).reshape(n, width) / 1000).tolist()
    data = {"string_to_param": {"*": {"TORCHTENSOR": vec}}, "name": "huge-picture"}
    return base64.b64encode(json.dumps(data).encode())


def test_huge_png_embedding_is_read_without_decoding_pixels(tmp_path):
    """12000 x 12000 pixels (144 MP, 432 MB decoded) whose zTXt chunk, after the pixels, holds an embedding."""
    deflater = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * 12000)
    idat = b"".join(deflater.compress(row * 400) for _ in range(30)) + deflater.flush()
    folder = tmp_path / "ti"
    folder.mkdir()
    path = folder / "picture.png"
    path.write_bytes(png(12000, 12000, [(b"zTXt", b"sd-ti-embedding\0\0" + zlib.compress(embedding_text()))], idat))
    out = run_python(
        f"""
from sdclip.embeddings import load_embeddings
[e] = load_embeddings({str(folder)!r})
print(e.name, tuple(e.vectors["*"].shape), float(e.vectors["*"][1, 3]))
""",
        memory=1 << 30,
        timeout=60,
    )
    assert out.split() == ["huge-picture", "(2,", f"{WIDTH})", str(float(torch.tensor((WIDTH + 3) / 1000)))], out


def test_embedding_png_pixels_are_never_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    path = tmp_path / "e.png"
    path.write_bytes(png(4, 4, [(b"tEXt", b"sd-ti-embedding\0" + embedding_text())], zlib.compress(b"\0" * 52)))
    assert read_embedding(path).vectors["*"].shape == (2, WIDTH)
    assert len(load_embeddings(tmp_path)) == 1


@pytest.mark.parametrize("kind", [b"tEXt", b"iTXt"])
def test_png_text_chunks(tmp_path, kind):
    text = embedding_text()
    body = b"sd-ti-embedding\0" + (text if kind == b"tEXt" else b"\0\0\0\0" + text)
    path = tmp_path / "e.png"
    path.write_bytes(png(4, 4, [(kind, body)], zlib.compress(b"\0" * 13 * 4)))
    assert read_embedding(path).vectors["*"].shape == (2, WIDTH)
    broken = bytearray(path.read_bytes())
    broken[broken.index(kind) + 10] ^= 1
    path.write_bytes(bytes(broken))
    with pytest.raises(BadInput, match="CRC"):
        read_embedding(path)


def test_ti_inspect_of_a_10000_vector_embedding_is_bounded(tmp_path):
    path = tmp_path / "many.safetensors"
    save_file({"emb_params": torch.randn(10_000, 128) * 0.02}, path)  # the bundled model's width
    [outcome] = run_cli([["ti", "inspect", str(path), "--top", "1"]], memory=2 << 30, timeout=300)
    assert outcome.rc == 0, outcome.stderr
    assert "9999: norm" in outcome.stdout, outcome.stdout[-500:]


# --- C: prompt length ----------------------------------------------------------------------------------------


def test_prompt_length_limit_everywhere():
    from sdclip.prompts import chunk, parse

    long = "a" * (limits.MAX_PROMPT_CHARS + 1)
    for call in (lambda: parse(long, "a1111"), lambda: chunk(long, "compel", sdclip.Tokenizer())):
        with pytest.raises(BadInput, match="100,000"):
            call()
    te = sdclip.load()
    with pytest.raises(BadInput, match="max_prompt_chars"):
        sdclip.encode_prompts(te, ["fine", long], dialect="comfy")
    assert parse(long, "a1111", max_prompt_chars=None)[0].text == long
    with pytest.raises(BadInput, match="limit of 100"):
        sdclip.Conditioner(te, "a1111", max_prompt_chars=100, cache=None).encode("a" * 101)


def test_ten_megabyte_prompt_is_refused_within_bounds(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short one\n" + "(a:1.1) " * 1_300_000 + "\n")
    out = tmp_path / "out.safetensors"
    outcomes = run_cli(
        [
            ["encode", "--dialect", "a1111", "--file", str(prompts), "-o", str(out)],
            ["encode", "--dialect", "compel", "--file", str(prompts), "-o", str(out)],
            ["parse", "--dialect", "a1111", "--max-prompt-chars", "20", "(a:1.1) (b:1.2) (c:0.9)"],
        ],
        timeout=120,
    )
    for outcome in outcomes[:2]:
        assert (
            outcome.rc == 2 and f"{prompts}:2: prompt" in outcome.stderr and "--max-prompt-chars" in outcome.stderr
        ), outcome.stderr
    assert outcomes[2].rc == 2 and "limit of 20" in outcomes[2].stderr
    assert not out.exists()


def test_max_prompt_chars_raises_the_limit(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat, " * 20_000)  # 140k characters
    call = ["tokenize", "--chunks", "--dialect", "a1111", "--file", str(prompts)]
    outcomes = run_cli([call, [*call, "--max-prompt-chars", "200000"], [*call, "--max-prompt-chars", "0"]], timeout=300)
    assert outcomes[0].rc == 2 and "prompts.txt:1: prompt" in outcomes[0].stderr
    assert outcomes[1].rc == 0 and outcomes[2].rc == 0, (outcomes[1].stderr, outcomes[2].stderr)


# --- D: input errors name the file and the field -------------------------------------------------------------


def hf_folder(tmp_path: Path, state: dict, config: dict | None = None, **replace: torch.Tensor) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    sd = {k.replace(HF, "text_model."): v for k, v in state.items()}
    sd.update({f"text_model.{k}": v for k, v in replace.items()})
    save_file(sd, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config, words",
    [
        ({"num_attention_heads": -2}, ["num_attention_heads", "-2"]),
        ({"num_attention_heads": 2.5}, ["num_attention_heads", "2.5"]),
        ({"num_attention_heads": "8"}, ["num_attention_heads", "'8'"]),
        ({"hidden_act": ["gelu"]}, ["hidden_act"]),
        ({"num_hidden_layers": True}, ["num_hidden_layers"]),
        ({"num_attention_heads": 3}, ["width 64 is not divisible by 3 heads"]),
        ({"hidden_act": "relu"}, ["unknown activation 'relu'"]),
    ],
)
def test_config_json_values(tmp_path, state, config, words):
    folder = hf_folder(tmp_path, state, config)
    with pytest.raises(BadInput) as info:
        sdclip.load(folder)
    message = str(info.value)
    assert type(info.value) is BadInput and str(folder) in message, message
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("embeddings.position_embedding.weight", torch.tensor(1.0), ["position_embedding", "2 dimensions"]),
        ("encoder.layers.0.mlp.fc1.weight", torch.tensor(1.0), ["fc1.weight", "2 dimensions"]),
        ("embeddings.position_embedding.weight", torch.zeros(1, WIDTH), ["no room for BOS and EOS"]),
        ("embeddings.token_embedding.weight", torch.zeros(1000, WIDTH), ["token_embedding", "1000"]),
    ],
)
def test_tensor_shapes_that_cannot_be_a_model(tmp_path, state, key, value, words):
    folder = hf_folder(tmp_path, state, **{key: value})
    with pytest.raises(BadInput) as info:
        sdclip.load(folder)
    message = str(info.value)
    assert type(info.value) is BadInput and str(folder) in message and all(w in message for w in words), message


def test_model_index_class_name_of_the_wrong_type(tmp_path, state):
    folder = tmp_path / "pipe"
    (folder / "text_encoder").mkdir(parents=True)
    save_file(
        {k.replace(HF, "text_model."): v for k, v in state.items()}, folder / "text_encoder" / "model.safetensors"
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": 5}))
    with pytest.raises(BadInput) as info:
        sdclip.load(folder)
    assert "model_index.json" in str(info.value) and "_class_name" in str(info.value)


def test_overrides_name_the_file(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    with pytest.raises(BadInput) as info:
        sdclip.load(path, heads=3)
    assert str(path) in str(info.value) and "3 heads" in str(info.value)
