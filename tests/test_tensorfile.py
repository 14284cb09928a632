"""Safety and bad input for weights files: pickles never run code, every broken file is one BadInput.

Each broken file must raise exactly ``BadInput`` (not a KeyError or a torch error from deep inside)
whose message names the file and what is wrong; nothing may load silently wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdclip
from sdclip import BadInput, tensorfile
from sdclip.tensorfile import PickleFile, SafetensorsFile, open_tensor_file

WIDTH, LAYERS, MLP, VOCAB = 64, 2, 128, 49408
HF = "cond_stage_model.transformer.text_model."  # an SD1 single file's prefix


def hf_state(prefix: str = HF, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny random CLIP text tower in Hugging Face naming."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    sd = {
        f"{prefix}embeddings.token_embedding.weight": r(VOCAB, WIDTH),
        f"{prefix}embeddings.position_embedding.weight": r(77, WIDTH),
        f"{prefix}final_layer_norm.weight": 1 + r(WIDTH),
        f"{prefix}final_layer_norm.bias": r(WIDTH),
    }
    for i in range(LAYERS):
        b = f"{prefix}encoder.layers.{i}."
        for x in ("q", "k", "v", "out"):
            sd[f"{b}self_attn.{x}_proj.weight"], sd[f"{b}self_attn.{x}_proj.bias"] = r(WIDTH, WIDTH), r(WIDTH)
        for n in (1, 2):
            sd[f"{b}layer_norm{n}.weight"], sd[f"{b}layer_norm{n}.bias"] = 1 + r(WIDTH), r(WIDTH)
        sd[f"{b}mlp.fc1.weight"], sd[f"{b}mlp.fc1.bias"] = r(MLP, WIDTH), r(MLP)
        sd[f"{b}mlp.fc2.weight"], sd[f"{b}mlp.fc2.bias"] = r(WIDTH, MLP), r(WIDTH)
    return sd


def bad_input(path: Path, *words: str) -> str:
    """Load ``path`` expecting one BadInput naming the file and containing ``words``; return the message."""
    with pytest.raises(BadInput) as info:
        sdclip.load(path)
    assert type(info.value) is BadInput
    message = str(info.value)
    assert str(path) in message, message
    for w in words:
        assert w.lower() in message.lower(), message
    return message


def params(te: sdclip.TextEncoder) -> dict[str, torch.Tensor]:
    return dict(te.towers[0].state_dict())


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return hf_state()


@pytest.fixture(scope="module")
def reference(state, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny tower's parameters as sdclip reads them from a clean safetensors file."""
    path = tmp_path_factory.mktemp("ref") / "model.safetensors"
    save_file(state, path)
    return params(sdclip.load(path))


# --- code-running pickles --------------------------------------------------------------------


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, object]:
    """Refused global -> an object whose unpickling would create ``marker``."""
    return {
        "posix.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "io.open": Payload(open, str(marker), "w"),
    }


def raw_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)``, written opcode by opcode."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(arg)) + arg.encode() + b"\x85R."


def torch_zip(path: Path, data_pkl: bytes, root: str = "archive", torchscript: bool = False) -> Path:
    """A zip laid out as torch.save (or torch.jit.save) writes it, with our own data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", data_pkl)
        z.writestr(f"{root}/byteorder", "little")
        z.writestr(f"{root}/version", "3\n")
        if torchscript:
            z.writestr(f"{root}/constants.pkl", pickle.dumps(()))
            z.writestr(f"{root}/code/__torch__/model.py", "class Model(Module):\n  pass\n")
    return path


def assert_refused(path: Path, global_name: str, marker: Path) -> None:
    with pytest.raises(BadInput) as info:
        open_tensor_file(path)
    message = str(info.value)
    assert str(path) in message and global_name in message and "refused" in message, message
    assert not marker.exists(), "the pickle ran code"


@pytest.mark.parametrize(
    "global_name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "io.open"]
)
def test_malicious_torch_save_is_refused(tmp_path, state, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    small = {k: v for k, v in list(state.items())[:3]}
    torch.save({"state_dict": small, "x": payloads(marker)[global_name]}, path)
    assert zipfile.is_zipfile(path)
    assert_refused(path, global_name, marker)
    with pytest.raises(BadInput):
        sdclip.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_malicious_legacy_pickle_is_refused(tmp_path, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": payloads(marker)[global_name]}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_refused(path, global_name, marker)


@pytest.mark.parametrize(
    "module,name",
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("subprocess", "getoutput"),
        ("torch.serialization", "load"),
        ("torch", "load"),
        ("builtins", "getattr"),
    ],
)
@pytest.mark.parametrize("container", ["zip", "torchscript", "legacy"])
def test_handwritten_malicious_pickle_is_refused(tmp_path, module, name, container):
    marker = tmp_path / "marker"
    code = f"touch {marker}" if name in ("system", "getoutput") else f"open({str(marker)!r}, 'w')"
    data = raw_pickle(module, name, code)
    if container == "legacy":
        path = tmp_path / "evil.pt"
        path.write_bytes(data)
    else:
        path = torch_zip(tmp_path / "evil.pt", data, root="ViT-L-14", torchscript=container == "torchscript")
    assert_refused(path, f"{module}.{name}", marker)


def test_malicious_global_hidden_in_tensor_rebuild_is_refused(tmp_path):
    """The backward-hooks slot of _rebuild_tensor_v2 is a REDUCE like any other."""
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    with zipfile.ZipFile(buf) as z:
        data = z.read("archive/data.pkl")
    evil = data.replace(b"ccollections\nOrderedDict\n", b"cposix\nsystem\n")
    evil = evil.replace(
        b")R", b"X" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"\x85R", 1
    )
    assert evil != data
    path = torch_zip(tmp_path / "hooked.pt", evil)
    assert_refused(path, "posix.system", marker)


def test_corrupt_pickle_is_not_reported_as_refused(tmp_path):
    """Garbage inside data.pkl is a corrupt file, not a code-running one."""
    path = torch_zip(tmp_path / "garbage.pt", b"\x80\x02\xff\xff\xff")
    with pytest.raises(BadInput) as info:
        open_tensor_file(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "refused" not in message, message


# --- what real checkpoints hold --------------------------------------------------------------


def test_sd1_era_lightning_checkpoint_loads(tmp_path, monkeypatch, state, reference):
    """SD1 .ckpt files hold a Lightning ModelCheckpoint (class and instance), numpy scalars,
    versions and a U-Net beside the weights: all harmless, all must load."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = None, torch.tensor(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module)
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}
    ckpt = {
        "state_dict": {**unet, **state},
        "global_step": 470000,
        "epoch": 6,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {ModelCheckpoint: {"monitor": None}},
        "checkpoint": ModelCheckpoint(),
        "step": np.int64(5),
        "lr": np.float32(1e-4),
        "shape": torch.Size([2, 3]),
        "flags": {1, 2},
    }
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save(ckpt, path)
    monkeypatch.undo()  # sdclip must not need the class
    assert b"pytorch_lightning.callbacks.model_checkpoint" in path.read_bytes()
    te = sdclip.load(path)
    assert [t.prefix for t in te.info.towers] == [HF]
    loaded = params(te)
    assert loaded.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(loaded[k], reference[k], rtol=0, atol=0)
    assert te.info.ignored == {"model.diffusion_model.*": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zip_format", [True, False])
def test_half_precision_pickles_load(tmp_path, state, reference, dtype, zip_format):
    path = tmp_path / "half.ckpt"
    torch.save(
        {"state_dict": {k: v.to(dtype) for k, v in state.items()}}, path, _use_new_zipfile_serialization=zip_format
    )
    te = sdclip.load(path)
    for k, v in params(te).items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, reference[k].to(dtype).float(), rtol=0, atol=0)


def test_views_and_shared_storages_read_back_exactly(tmp_path):
    """torch.save keeps views of one storage (offsets, strides); each must read back as saved."""
    base = torch.arange(60, dtype=torch.float32)
    tensors = {
        "a": base[:12].view(3, 4),
        "b": base[12:36].view(4, 6).t(),
        "c": base[40:],
        "d": base,
        "e": torch.zeros(0, 5),
        "s": torch.tensor(3.5),
    }
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    with open_tensor_file(path) as f:
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert f.shape(k) == tuple(v.shape) and f.dtype(k) == v.dtype
            torch.testing.assert_close(f.get(k), v, rtol=0, atol=0)


def test_big_endian_archive_reads_back_exactly(tmp_path):
    """torch.save on a big-endian machine: same archive, records byte-swapped, byteorder "big"."""
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).half(), "i": torch.arange(4)}
    little = tmp_path / "little.pt"
    torch.save(tensors, little)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        storages = {f"little/data/{i}": v for i, v in enumerate(tensors.values())}  # saved in this order
        for name in src.namelist():
            data = src.read(name)
            if name == "little/byteorder":
                data = b"big"
            elif name in storages:
                item = storages[name].element_size()
                data = np.frombuffer(data, np.uint8).reshape(-1, item)[:, ::-1].tobytes()
            dst.writestr(name.replace("little/", "big/"), data)
    for k, v in torch.load(big, weights_only=True).items():  # torch agrees on what the file holds
        torch.testing.assert_close(v, tensors[k], rtol=0, atol=0)
    with open_tensor_file(big) as f:
        for k, v in tensors.items():
            torch.testing.assert_close(f.get(k), v, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.save
def test_torchscript_archive_tensors_are_found(tmp_path):
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(10, 4)
            self.ln_final = torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.ln_final(self.token_embedding(x))

    module = Text()
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(module), path)
    with open_tensor_file(path) as f:
        assert getattr(f, "is_torchscript", False)
        for k, v in module.state_dict().items():
            torch.testing.assert_close(f.get(k), v, rtol=0, atol=0)


# --- lazy reading ----------------------------------------------------------------------------


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_total = 0

    def read(self, n=-1):
        data = super().read(n)
        CountingFile.read_total += len(data or b"")
        return data

    def readinto(self, b):
        n = super().readinto(b)
        CountingFile.read_total += n or 0
        return n


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_opening_reads_no_tensor_data(tmp_path, monkeypatch, fmt):
    tensors = {"unet.big": torch.zeros(4_000_000), "small": torch.ones(8)}  # 16 MB and 32 bytes
    path = tmp_path / f"big.{fmt}"
    if fmt == "ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, path)
    monkeypatch.setattr(tensorfile, "open", lambda p, mode: CountingFile(p, "r"), raising=False)
    CountingFile.read_total = 0
    with open_tensor_file(path) as f:
        assert f.shape("unet.big") == (4_000_000,) and f.dtype("unet.big") == torch.float32
        assert CountingFile.read_total < 100_000
        assert f.get("small").tolist() == [1.0] * 8
        assert CountingFile.read_total < 100_000


def test_loading_reads_only_text_encoder_tensors(tmp_path, monkeypatch, state):
    unet = {f"model.diffusion_model.{i}.weight": torch.randn(100, 100) for i in range(5)}
    st, ckpt = tmp_path / "model.safetensors", tmp_path / "model.ckpt"
    save_file({**unet, **state}, st)
    torch.save({"state_dict": {**unet, **state}}, ckpt)
    read: list[str] = []
    for cls in (SafetensorsFile, PickleFile):
        real = cls.get
        monkeypatch.setattr(cls, "get", lambda self, key, real=real: read.append(key) or real(self, key))
    for path in (st, ckpt):
        read.clear()
        sdclip.load(path)
        assert read and all(k.startswith(HF) for k in read), read


def test_corrupt_record_of_an_unused_tensor_does_not_matter(tmp_path, state, reference):
    """Only the tensors used are read: a broken U-Net record still serves the text encoder."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.randn(1000), **state}}, path)
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():  # record 0 holds the first tensor saved
            data = src.read(info)
            dst.writestr(info, data[:100] if info.filename == "model/data/0" else data)
    with open_tensor_file(broken) as f:
        with pytest.raises(BadInput) as info:
            f.get("model.diffusion_model.w")
        assert str(broken) in str(info.value) and "model/data/0" in str(info.value)
    loaded = params(sdclip.load(broken))
    for k in reference:
        torch.testing.assert_close(loaded[k], reference[k], rtol=0, atol=0)


# --- broken files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(state, tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("good")
    save_file(state, folder / "a.safetensors")
    torch.save({"state_dict": state}, folder / "a.ckpt")
    torch.save(state, folder / "a.bin", _use_new_zipfile_serialization=False)
    return {ext: (folder / f"a.{ext}").read_bytes() for ext in ("safetensors", "ckpt", "bin")}


@pytest.mark.parametrize("ext", ["safetensors", "ckpt", "bin"])
@pytest.mark.parametrize("where", [3, 20, 200, 0.5, -10, -1])
def test_truncated_files(tmp_path, files, ext, where):
    data = files[ext]
    cut = int(len(data) * where) if isinstance(where, float) else where % len(data)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[:cut])
    bad_input(path, "truncated")


@pytest.mark.parametrize(
    "content", [b"", b"\x00" * 3, os.urandom(64), os.urandom(100_000), b"x" * 1000, b"not a model\n" * 10]
)
def test_empty_and_random_files(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    bad_input(path)


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    bad_input(path, "not a torch")


def test_safetensors_header_pointing_past_the_end(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    bad_input(path, "truncated")


def test_safetensors_header_length_past_the_end(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"a":')
    bad_input(path, "truncated")


def test_safetensors_header_length_starting_with_the_pickle_byte(tmp_path, state):
    """A header of 0x..80 bytes starts the file with 0x80, as a pickle does: still safetensors."""
    path = tmp_path / "model.safetensors"
    for pad in range(0, 2048, 8):
        save_file(state, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert isinstance(open_tensor_file(path), SafetensorsFile)
    sdclip.load(path)


def test_safetensors_header_not_json(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"\xff" * 10)
    bad_input(path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint16,
        torch.complex64,
    ],
)
def test_wrong_weight_dtype(tmp_path, state, dtype):
    key = f"{HF}encoder.layers.1.mlp.fc1.weight"
    bad = dict(state)
    if dtype == torch.complex64:
        path = tmp_path / "model.ckpt"
        bad[key] = bad[key].to(dtype)
        torch.save(bad, path)
    else:
        bad[key] = bad[key].to(dtype)
        path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, key, "dtype")


def test_dtype_of_an_ignored_tensor_does_not_matter(tmp_path, state):
    path = write_safetensors(
        tmp_path / "model.safetensors",
        {
            **state,
            "model.diffusion_model.w": torch.zeros(4, dtype=torch.float8_e4m3fn),
            "model.diffusion_model.u": torch.zeros(4, dtype=torch.uint16),
        },
    )
    assert sdclip.load(path).info.ignored["model.diffusion_model.*"] == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_weights(tmp_path, state, value):
    key = f"{HF}encoder.layers.0.self_attn.k_proj.weight"
    bad = dict(state)
    bad[key] = bad[key].clone()
    bad[key][3, 5] = value
    path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, key, "nan or infinite")


@pytest.mark.parametrize(
    "missing",
    [
        "encoder.layers.1.layer_norm2.bias",
        "encoder.layers.0.self_attn.v_proj.weight",
        "final_layer_norm.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.1.mlp.fc2.weight",
        "encoder.layers.0.mlp.fc1.weight",
    ],
)
def test_missing_tensor(tmp_path, state, missing):
    bad = {k: v for k, v in state.items() if k != HF + missing}
    path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, "missing", missing)


def test_missing_middle_layer(tmp_path, state):
    bad = {k: v for k, v in state.items() if ".layers.0." not in k}
    path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, "missing")


@pytest.mark.parametrize(
    "key,shape",
    [
        ("encoder.layers.1.mlp.fc1.weight", (MLP + 8, WIDTH)),
        ("encoder.layers.1.mlp.fc1.bias", (MLP + 8,)),
        ("encoder.layers.0.self_attn.out_proj.weight", (WIDTH, WIDTH + 1)),
        ("encoder.layers.1.layer_norm1.weight", (WIDTH - 1,)),
        ("final_layer_norm.bias", (WIDTH, 1)),
        ("embeddings.token_embedding.weight", (VOCAB * WIDTH,)),
        ("embeddings.position_embedding.weight", (77,)),
    ],
)
def test_wrong_shape(tmp_path, state, key, shape):
    bad = dict(state)
    bad[HF + key] = torch.zeros(shape)
    path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, "shape")


def test_q_k_v_with_compensating_wrong_shapes(tmp_path, state):
    """q one row too many, k one too few: concatenated they look right, but the model would be wrong."""
    b = f"{HF}encoder.layers.0.self_attn."
    bad = dict(state)
    bad[b + "q_proj.weight"] = torch.zeros(WIDTH + 1, WIDTH)
    bad[b + "k_proj.weight"] = torch.zeros(WIDTH - 1, WIDTH)
    path = write_safetensors(tmp_path / "model.safetensors", bad)
    bad_input(path, "shape", "q_proj.weight")


def test_unknown_layout(tmp_path):
    unet = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
    }
    path = write_safetensors(tmp_path / "unet.safetensors", unet)
    bad_input(path, "no CLIP text encoder")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    bad_input(tmp_path, "no weights")


def test_missing_path(tmp_path):
    bad_input(tmp_path / "nope.safetensors", "no such file")


def test_folder_config_disagreeing_with_tensors(tmp_path, state):
    """A config.json saying 3 layers beside a 2-layer file means a file lost a layer."""
    flat = {k.removeprefix("cond_stage_model.transformer."): v for k, v in state.items()}
    save_file(flat, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": WIDTH, "num_hidden_layers": 3, "intermediate_size": MLP, "hidden_act": "quick_gelu"})
    )
    bad_input(tmp_path, "config.json", "num_hidden_layers 3")


def test_sharded_index_naming_a_tensor_its_shard_lacks(tmp_path, state):
    save_file(state, tmp_path / "model-00001.safetensors")
    weight_map = {k: "model-00001.safetensors" for k in state}
    weight_map[HF + "extra.weight"] = "model-00001.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bad_input(tmp_path / "model.safetensors.index.json", "extra.weight")


def test_sharded_index_with_missing_shard(tmp_path, state):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(BadInput) as info:
        sdclip.load(tmp_path / "model.safetensors.index.json")
    assert "gone.safetensors" in str(info.value)


def test_legacy_pickle_holding_no_dictionary(tmp_path):
    path = tmp_path / "model.bin"
    torch.save([torch.ones(2)], path, _use_new_zipfile_serialization=False)
    bad_input(path, "dictionary")


def test_tensor_reaching_past_its_storage(tmp_path):
    """A pickle whose tensor claims more elements than its storage holds."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    with zipfile.ZipFile(buf) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    # size (4,) -> (9,): the same pickle opcode sequence with a different BININT1
    entries["archive/data.pkl"] = entries["archive/data.pkl"].replace(b"K\x04\x85", b"K\x09\x85", 1)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in entries.items():
            z.writestr(n, d)
    with open_tensor_file(path) as f, pytest.raises(BadInput) as info:
        f.get("w")
    assert str(path) in str(info.value)
