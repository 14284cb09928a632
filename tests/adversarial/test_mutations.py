"""The "stay fixed" suite: every kind of file sdclip reads, corrupted by hypothesis, must give ``BadInput`` or
the right numbers: never an unexpected exception, never silently changed weights, never memory past a cap.

Each case mutates a valid file (bytes replaced, the file cut short; for JSON, values swapped for values of
every type) and reads it as sdclip does.  The oracle: ``BadInput``; or exactly the tensors of the file before
the mutation; or, for formats without checksums (safetensors, legacy pickles), exactly what the format's own
reader (``safetensors``, ``torch.load``) reads from the mutated file, which is then a valid, different file.
Torch zips carry a CRC32 per member, so for them only ``BadInput`` or the original numbers will do.

The examples are derandomized (the same on every run) and bounded so that the suite runs in about two
minutes on two cores; while each test runs, the process's address space is capped (``RLIMIT_AS``) so that a
reader whose memory is unbounded fails with an allocation error instead of taking the machine down.
"""

from __future__ import annotations

import base64
import io
import json
import pickletools
import resource
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file
from test_tensorfile import HF, LAYERS, MLP, WIDTH, hf_state

import sdclip
from sdclip import BadInput
from sdclip.embeddings import read_embedding
from sdclip.images import open_image
from sdclip.tensorfile import open_tensor_file

HEADROOM = 1536 << 20  # address space a case may add on top of what the process holds when it starts
EXAMPLES = 50
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
PREFIX = HF


@pytest.fixture(autouse=True)
def memory_cap():
    """Cap the address space at what the process has now plus ``HEADROOM`` while the test runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = size + HEADROOM if hard == resource.RLIM_INFINITY else min(size + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def tower_state() -> dict[str, torch.Tensor]:
    """A tiny CLIP text tower in SD1 single-file names (CLIP's vocabulary, so the tokenizer fits)."""
    return hf_state()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_tensor_file(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def params(te: sdclip.TextEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in te.towers[0].state_dict().items()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, object]:
    """The valid files (bytes) and what sdclip reads from them."""
    d = tmp_path_factory.mktemp("valid")
    state = tower_state()
    save_file(state, d / "model.safetensors")
    torch.save({"state_dict": state}, d / "model.ckpt")
    torch.save(state, d / "model.bin", _use_new_zipfile_serialization=False)
    out: dict[str, object] = {
        name: (d / name).read_bytes() for name in ("model.safetensors", "model.ckpt", "model.bin")
    }
    out["tensors"] = read_all(d / "model.safetensors")
    out["params"] = params(sdclip.load(d / "model.safetensors"))
    return out


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, region: tuple[int, int]) -> bytes:
    """``data`` with bytes at positions inside ``region`` replaced, then cut to ``cut`` bytes."""
    raw = bytearray(data)
    lo, hi = region
    for at, value in edits:
        raw[lo + at % max(hi - lo, 1)] = value
    return bytes(raw[:cut] if cut is not None else raw)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=3)


def check_weights(path: Path, originals: dict, reference) -> None:
    """The oracle for a weights file: refused, or the original tensors, or the format reader's own reading
    of the mutated file; and ``sdclip.load`` refuses or builds exactly the original model."""
    try:
        got = read_all(path)
    except BadInput as e:
        assert str(path) in str(e)
        return
    if not same(got, originals["tensors"]):
        assert reference is not None, "a checksummed format read changed numbers"
        try:
            theirs = reference(path)
        except Exception:  # the format's reader refuses a file sdclip read differently: wrong
            pytest.fail(f"{path.name}: sdclip read changed tensors from a file its format's reader refuses")
        assert same(got, {k: theirs[k] for k in got}), "sdclip and the format's reader disagree"
        return
    try:
        te = sdclip.load(path)
    except BadInput as e:
        assert str(path) in str(e)
        return
    assert same(params(te), originals["params"])


def region_of_safetensors_header(data: bytes) -> tuple[int, int]:
    return 0, 8 + int.from_bytes(data[:8], "little")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def load_legacy(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@FUZZ
@given(edits=EDITS, cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
def test_safetensors_header(tmp_path_factory, originals, edits, cut):
    data = originals["model.safetensors"]
    lo, hi = region_of_safetensors_header(data)
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(mutate(data, edits, None if cut is None else cut % len(data), (lo, hi)))
    check_weights(path, originals, load_safetensors)


def zip_structure(data: bytes) -> list[tuple[int, int]]:
    """The byte ranges of a zip that are not tensor data: local headers, data.pkl, the central directory."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            n, extra = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + n + extra
            ranges.append((info.header_offset, start + (info.compress_size if "/data/" not in info.filename else 8)))
        ranges.append((z.start_dir, len(data)))
    return ranges


@FUZZ
@given(data=st.data())
def test_torch_zip(tmp_path_factory, originals, data):
    raw = originals["model.ckpt"]
    region = data.draw(st.sampled_from(zip_structure(raw) + [(0, len(raw))]), label="region")
    edits = data.draw(EDITS, label="edits")
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))), label="cut")
    path = tmp_path_factory.mktemp("zip") / "model.ckpt"
    path.write_bytes(mutate(raw, edits, cut, region))
    check_weights(path, originals, None)  # CRC32 on every member: the original numbers or a refusal


def legacy_pickles_end(raw: bytes) -> int:
    """Where a legacy torch file's five pickles (magic, protocol, system info, the object, storage keys) end and
    its raw storage data begins."""
    f = io.BytesIO(raw)
    for _ in range(5):
        for _ in pickletools.genops(f):
            pass
    return f.tell()


@FUZZ
@given(edits=EDITS, cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
def test_legacy_pickle(tmp_path_factory, originals, edits, cut):
    raw = originals["model.bin"]
    path = tmp_path_factory.mktemp("legacy") / "model.bin"
    path.write_bytes(mutate(raw, edits, None if cut is None else cut % len(raw), (0, legacy_pickles_end(raw) + 64)))
    check_weights(path, originals, load_legacy)


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    import layouts
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=WIDTH,
            intermediate_size=MLP,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            projection_dim=16,
            max_position_embeddings=77,
        )
    ).eval()
    path = layouts.write_openai_pt(model, tmp_path_factory.mktemp("ts") / "ViT.pt")
    return path.read_bytes(), read_all(path)


@FUZZ
@given(data=st.data())
def test_torchscript_archive(tmp_path_factory, torchscript, data):
    raw, tensors = torchscript
    region = data.draw(st.sampled_from(zip_structure(raw)), label="region")
    edits = data.draw(EDITS, label="edits")
    path = tmp_path_factory.mktemp("ts") / "ViT.pt"
    path.write_bytes(mutate(raw, edits, None, region))
    try:
        got = read_all(path)
    except BadInput as e:
        assert str(path) in str(e)
        return
    assert same(got, tensors)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "eos_token_id",
    "text_config",
    "max_position_embeddings",
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, originals) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "model"
    folder.mkdir()
    save_file({k.replace(PREFIX, "text_model."): v for k, v in tower_state().items()}, folder / "model.safetensors")
    return folder


@FUZZ
@given(
    values=st.dictionaries(st.sampled_from(CONFIG_FIELDS), JSON_VALUES, min_size=1, max_size=3),
    edits=st.one_of(st.none(), EDITS),
)
def test_hf_folder_config(hf_folder, originals, values, edits):
    config = {
        "hidden_size": WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "intermediate_size": MLP,
        "hidden_act": "quick_gelu",
        "eos_token_id": 49407,
        **values,
    }
    text = json.dumps(config).encode()
    (hf_folder / "config.json").write_bytes(text if edits is None else mutate(text, edits, None, (0, len(text))))
    try:
        te = sdclip.load(hf_folder)
    except BadInput as e:
        assert str(hf_folder) in str(e)
        return
    assert same(params(te), originals["params"])  # a config changes how weights are used, never the weights


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("ti")
    v = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3)) * 0.05
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "thing", "step": 5}, d / "a.pt")
    save_file({"emb_params": v}, d / "b.safetensors")
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "sd-ti-embedding",
        base64.b64encode(
            json.dumps({"string_to_param": {"*": {"TORCHTENSOR": v.tolist()}}, "name": "thing"}).encode()
        ).decode(),
    )
    Image.new("RGB", (8, 8), "red").save(d / "c.png", pnginfo=info)
    return {p.name: p.read_bytes() for p in d.iterdir()} | {"vectors": v}  # type: ignore[dict-item]


@FUZZ
@given(
    name=st.sampled_from(["a.pt", "b.safetensors", "c.png"]),
    edits=EDITS,
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_embedding_files(tmp_path_factory, embeddings, name, edits, cut):
    raw = embeddings[name]
    region = region_of_safetensors_header(raw) if name.endswith(".safetensors") else (0, len(raw))
    path = tmp_path_factory.mktemp("ti") / name
    path.write_bytes(mutate(raw, edits, None if cut is None else cut % len(raw), region))
    try:
        e = read_embedding(path)
    except BadInput as err:
        assert str(path) in str(err)
        return
    got = e.vectors["*"]
    if name.endswith(".safetensors") and not torch.equal(got, embeddings["vectors"]):
        theirs = load_file(path)  # a header renaming or retyping its tensor is a valid, different file
        assert torch.equal(got, next(iter(theirs.values())).to(torch.float32).reshape(got.shape))
        return
    # a PNG's float text round-trips through float64 JSON; pickles are checksummed
    assert torch.equal(got, embeddings["vectors"].double().float()), name


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    out = {}
    picture = Image.radial_gradient("L").convert("RGB").resize((32, 24))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        buf = io.BytesIO()
        picture.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


@FUZZ
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF"]),
    edits=EDITS,
    header=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_images(images, fmt, edits, header, cut):
    raw = images[fmt]
    data = mutate(raw, edits, None if cut is None else cut % len(raw), (0, 64) if header else (0, len(raw)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = open_image(data, name="fuzzed")
        except BadInput as e:
            assert "fuzzed" in str(e)
            return
    assert image.mode == "RGB" and image.width * image.height <= sdclip.images.MAX_PIXELS


def test_the_oracle_can_fail(tmp_path, originals):
    """A flipped weight in a safetensors file (no checksum) reads as different numbers, which the oracle
    accepts only because the format's own reader agrees: were sdclip to misread it, the check would fail."""
    raw = bytearray(originals["model.safetensors"])
    raw[-3] ^= 0x40
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(raw))
    assert not same(read_all(path), originals["tensors"])
    with pytest.raises(AssertionError):
        check_weights(path, originals, None)
    check_weights(path, originals, load_safetensors)
