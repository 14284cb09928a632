"""``sdclip.load`` reads every checkpoint layout and matches transformers exactly.

Each layout is written from a random-weight transformers tower (``layouts``), loaded back by
sdclip, and compared with transformers on every hidden state, last_hidden_state, pooler_output
and text_embeds (max |Δ| <= 1e-5 in fp32, 64 prompts padded with the tower's pad id); the
family, default layer, pad id and parameter count are checked on the way.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import layouts
import pytest
import torch
from references import (
    ARCHS,
    PROMPTS,
    TOLERANCE,
    VIT_L_PARAMETERS,
    Arch,
    Reference,
    assert_close,
    build,
    drop_last_layer,
    hidden_state,
    max_diffs,
    reference,
)
from safetensors.torch import load_file, save_file

import sdclip
from sdclip.checkpoint import Usage
from sdclip.model import count_parameters

SEEDS = {"L": 1, "L2": 2, "H": 3, "G": 4, "B": 5}


class Towers:
    """The reference towers and their outputs on ``PROMPTS``, built on first use.

    ``H23`` is ``H`` without its last block, as diffusers ships SD2's 23-layer encoder.
    """

    def __init__(self) -> None:
        self.models: dict[str, layouts.TextModel] = {}
        self.refs: dict[str, Reference] = {}
        self.seen: dict[str, float] = {}  # arch -> worst max |Δ| over the layouts that hold it

    def model(self, name: str) -> layouts.TextModel:
        if name not in self.models:
            self.models[name] = drop_last_layer(self.model("H")) if name == "H23" else build(ARCHS[name], SEEDS[name])
        return self.models[name]

    def ref(self, name: str) -> Reference:
        if name not in self.refs:
            pad = ARCHS[name.removesuffix("23")].pad
            self.refs[name] = reference(self.model(name), sdclip.Tokenizer()(PROMPTS, pad_id=pad))
        return self.refs[name]


@pytest.fixture(scope="module")
def towers():
    t = Towers()
    yield t
    print("\nmax |Δ| per architecture:", json.dumps(t.seen))


@pytest.fixture
def out(tmp_path: Path):
    """A scratch folder, emptied after the test: layouts of ViT-L weigh ~0.5 GB each."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def hf_parameters(model: layouts.TextModel, projection: bool) -> int:
    n = sum(p.numel() for p in model.text_model.parameters())
    return n + (model.text_projection.weight.numel() if projection else 0)


def _info(path: Path, capsys) -> dict:
    """What ``sdclip info --json`` prints."""
    from sdclip.cli import main

    capsys.readouterr()
    assert main(["info", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def _info_sd1(info: dict, t: Towers) -> None:
    (e,) = info["encoders"]
    assert (
        e["role"],
        e["layers"],
        e["width"],
        e["heads"],
        e["mlp_width"],
        e["activation"],
        e["dtype"],
        e["projection_dim"],
        e["pad_id"],
        e["default_layer"],
        e["default_final_norm"],
    ) == ("clip_l", 2, 768, 12, 3072, "quick_gelu", "float32", 0, 49407, -1, True)
    ignored = info["ignored"]
    assert ignored["cond_stage_model.transformer.text_model.embeddings.position_ids"] == 1
    assert ignored["model.diffusion_model.*"] == 3 and ignored["first_stage_model.encoder.*"] == 1
    assert ignored["alphas_cumprod"] == 1
    assert sum(ignored.values()) == len(layouts.FILLER_SHAPES) + 1


def _info_sdxl(info: dict, t: Towers) -> None:
    l, g = info["encoders"]
    assert (l["role"], l["key_prefix"], l["naming"], l["projection_dim"]) == (
        "clip_l",
        "conditioner.embedders.0.transformer.text_model.",
        "hf",
        0,
    )
    assert (
        g["role"],
        g["key_prefix"],
        g["naming"],
        g["layers"],
        g["width"],
        g["heads"],
        g["mlp_width"],
        g["activation"],
        g["projection_dim"],
        g["pad_id"],
        g["default_layer"],
        g["default_final_norm"],
    ) == ("clip_g", "conditioner.embedders.1.model.", "openclip", 2, 1280, 20, 5120, "gelu", 1280, 0, -2, False)
    assert info["ignored"]["conditioner.embedders.1.model.logit_scale"] == 1
    assert info["ignored"]["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] == 1


def _info_kohya_sd2(info: dict, t: Towers) -> None:
    (e,) = info["encoders"]
    assert (
        e["layers"],
        e["width"],
        e["heads"],
        e["activation"],
        e["projection_dim"],
        e["pad_id"],
        e["default_layer"],
        e["default_final_norm"],
    ) == (1, 1024, 16, "gelu", 0, 0, -1, True)
    assert any("all ones" in n for n in e["notes"]) and any("copy of block 0" in n for n in e["notes"])
    ignored = info["ignored"]
    assert ignored["cond_stage_model.model.transformer.resblocks.1.*"] == 12  # the dummy block
    assert ignored["cond_stage_model.model.text_projection"] == 1
    assert ignored["cond_stage_model.model.logit_scale"] == 1


def _info_openai(info: dict, t: Towers) -> None:
    (e,) = info["encoders"]
    assert (
        e["role"],
        e["layers"],
        e["width"],
        e["heads"],
        e["activation"],
        e["dtype"],
        e["projection_dim"],
        e["key_prefix"],
    ) == ("clip_b", 12, 512, 8, "quick_gelu", "float16", 512, "")
    for key in ("logit_scale", "input_resolution", "context_length", "vocab_size"):
        assert info["ignored"][key] == 1
    assert info["ignored"]["visual.transformer.*"] > 0


@dataclass
class Case:
    write: Callable[[Towers, Path], Path]
    towers: list[tuple[str, bool]]  # (arch, the file holds its projection) per encoder, in sdclip's order
    family: str
    layout: str  # part of the reported layout name
    usage: tuple[int, bool]  # the family's default for every encoder
    info: Callable[[dict, Towers], None] | None = None  # checks of `sdclip info --json`


SDXL_USAGE = (-2, False)
CASES = {
    "hf-folder": Case(
        lambda t, d: layouts.write_hf_folder(t.model("L2"), d / "clip"),
        [("L2", True)],
        "clip",
        "Hugging Face CLIP",
        (-1, True),
    ),
    "hf-folder-fp16-only": Case(
        lambda t, d: layouts.write_hf_folder(t.model("L2"), d / "clip", weights="model.fp16.safetensors"),
        [("L2", True)],
        "clip",
        "Hugging Face CLIP",
        (-1, True),
    ),
    "hf-pytorch-bin-float-position-ids": Case(
        lambda t, d: layouts.write_hf_folder(
            t.model("L2"), d / "clip", weights="pytorch_model.bin", position_ids_dtype=torch.float32
        ),
        [("L2", True)],
        "clip",
        "Hugging Face CLIP",
        (-1, True),
    ),
    "hf-flat-keys-position-ids": Case(
        lambda t, d: layouts.write_hf_folder(
            t.model("L2"), d / "clip", projection=False, flat=True, position_ids_dtype=torch.int64
        ),
        [("L2", False)],
        "clip",
        "flat keys",
        (-1, True),
    ),
    "hf-sharded": Case(
        lambda t, d: layouts.write_hf_folder(t.model("L2"), d / "clip", weights="sharded"),
        [("L2", True)],
        "clip",
        "Hugging Face CLIP",
        (-1, True),
    ),
    "sd1-safetensors-vit-l": Case(
        lambda t, d: layouts.write_sd1(t.model("L"), d / "sd1.safetensors"),
        [("L", False)],
        "sd1",
        "SD1 single file",
        (-1, True),
    ),
    "sd1-ckpt": Case(
        lambda t, d: layouts.write_sd1(t.model("L2"), d / "sd1.ckpt"),
        [("L2", False)],
        "sd1",
        "SD1 single file",
        (-1, True),
        _info_sd1,
    ),
    "sd1-old-layout": Case(
        lambda t, d: layouts.write_sd1(t.model("L2"), d / "sd1.safetensors", old=True),
        [("L2", False)],
        "sd1",
        "old layout",
        (-1, True),
    ),
    "sd2": Case(
        lambda t, d: layouts.write_sd2(t.model("H"), d / "sd2.safetensors"),
        [("H", True)],
        "sd2",
        "SD2 single file",
        (-2, True),
    ),
    "sd2-kohya": Case(
        lambda t, d: layouts.write_kohya_sd2(t.model("H23"), d / "sd2.safetensors"),
        [("H23", False)],
        "sd2",
        "SD2 single file",
        (-1, True),
        _info_kohya_sd2,
    ),
    "sdxl": Case(
        lambda t, d: layouts.write_sdxl(t.model("L2"), t.model("G"), d / "sdxl.safetensors"),
        [("L2", False), ("G", True)],
        "sdxl",
        "SDXL single file",
        SDXL_USAGE,
        _info_sdxl,
    ),
    "sdxl-refiner": Case(
        lambda t, d: layouts.write_sdxl_refiner(t.model("G"), d / "refiner.ckpt"),
        [("G", True)],
        "sdxl-refiner",
        "SDXL refiner",
        SDXL_USAGE,
    ),
    "sd3": Case(
        lambda t, d: layouts.write_sd3(t.model("L2"), t.model("G"), d / "sd3.safetensors"),
        [("L2", True), ("G", True)],
        "sd3",
        "SD3",
        SDXL_USAGE,
    ),
    "comfyui-clipsave": Case(
        lambda t, d: layouts.write_comfy_clip(t.model("L2"), d / "clip_l.safetensors"),
        [("L2", True)],
        "clip",
        "ComfyUI CLIPSave",
        (-1, True),
    ),
    "openai-pt-traced": Case(
        lambda t, d: layouts.write_openai_pt(t.model("B"), d / "ViT-B-32.pt"),
        [("B", True)],
        "clip",
        "TorchScript",
        (-1, True),
        _info_openai,
    ),
    "openai-pt-scripted": Case(
        lambda t, d: layouts.write_openai_pt(t.model("L2"), d / "ViT-L-14.pt", script=True),
        [("L2", True)],
        "clip",
        "TorchScript",
        (-1, True),
    ),
    "open-clip-ddp": Case(
        lambda t, d: layouts.write_open_clip(t.model("H"), d / "epoch_32.pt", variant="ddp"),
        [("H", True)],
        "clip",
        "open_clip",
        (-1, True),
    ),
    "open-clip-plain": Case(
        lambda t, d: layouts.write_open_clip(t.model("L2"), d / "open_clip_pytorch_model.bin"),
        [("L2", True)],
        "clip",
        "open_clip",
        (-1, True),
    ),
    "open-clip-custom-text": Case(
        lambda t, d: layouts.write_open_clip(t.model("L2"), d / "c.pt", variant="custom"),
        [("L2", True)],
        "clip",
        "open_clip",
        (-1, True),
    ),
    "diffusers-sd1": Case(
        lambda t, d: layouts.write_pipeline(
            d / "sd1", "StableDiffusionPipeline", [(t.model("L2"), False, "<|endoftext|>")]
        ),
        [("L2", False)],
        "sd1",
        "diffusers pipeline",
        (-1, True),
    ),
    "diffusers-sd2": Case(
        lambda t, d: layouts.write_pipeline(d / "sd2", "StableDiffusionPipeline", [(t.model("H23"), False, "!")]),
        [("H23", False)],
        "sd2",
        "diffusers pipeline",
        (-1, True),
    ),
    "diffusers-sdxl": Case(
        lambda t, d: layouts.write_pipeline(
            d / "sdxl",
            "StableDiffusionXLPipeline",
            [(t.model("L2"), False, "<|endoftext|>"), (t.model("G"), True, "!")],
        ),
        [("L2", False), ("G", True)],
        "sdxl",
        "diffusers pipeline",
        SDXL_USAGE,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_layout_matches_transformers(name: str, towers: Towers, out: Path, capsys):
    case = CASES[name]
    path = case.write(towers, out)
    te = sdclip.load(path)
    assert te.family == case.family
    assert case.layout in te.info.layout
    assert len(te.towers) == len(case.towers)
    for n, (arch, projection) in enumerate(case.towers, 1):
        model, ref = towers.model(arch), towers.ref(arch)
        tower = te.tower(n)
        assert torch.equal(te.tokenize(PROMPTS, encoder=n), ref.ids), "ids or pad id differ"
        assert count_parameters(tower) == hf_parameters(model, projection)
        assert not any(p.requires_grad for p in tower.parameters())
        diffs = max_diffs(tower, ref, projection=projection)
        towers.seen[arch] = max(towers.seen.get(arch, 0.0), *diffs.values())
        assert_close(diffs)
        assert te.usages[n - 1] == Usage(*case.usage)
        default = te.encode(PROMPTS[:8], encoder=n)
        assert (default.hidden - hidden_state(model, ref, *case.usage)[:8]).abs().max() <= TOLERANCE
    if case.info is not None:
        info = _info(path, capsys)
        assert (info["layout"], info["family"]) == (te.info.layout, case.family)
        for e, tower in zip(info["encoders"], te.towers):
            assert e["parameters"] == count_parameters(tower)
        case.info(info, towers)


def test_vit_l_has_the_reference_parameter_count(towers: Towers):
    model = towers.model("L")
    assert sum(p.numel() for p in model.text_model.parameters()) == VIT_L_PARAMETERS
    with torch.device("meta"):
        ours = sdclip.TextTransformer(sdclip.TextConfig())  # sdclip's defaults are ViT-L/14's
    assert count_parameters(ours) == VIT_L_PARAMETERS


def test_sd2_default_is_the_23_layer_model(towers: Towers):
    """SD2 single files default to -2 + final LN on all their blocks: exactly what diffusers'
    one-block-shorter encoder gives as last_hidden_state (its own default, -1 + LN)."""
    sd2_default = hidden_state(towers.model("H"), towers.ref("H"), -2, True)
    assert (sd2_default - towers.ref("H23").last_hidden_state).abs().max() <= TOLERANCE


def test_openai_module_tree_agrees_with_transformers(towers: Towers):
    """The OpenCLIP layout ``layouts`` writes means, to torch.nn.MultiheadAttention, the same model
    as transformers' one: the layout checks do not rest on sdclip's own name table."""
    model, ref = towers.model("L2"), towers.ref("L2")
    with torch.inference_mode():
        embeds = layouts.OpenAIText(model)(ref.ids[:16])
    assert (embeds - ref.text_embeds[:16]).abs().max() <= TOLERANCE


# --- small towers for the cases that need no full width -----------------------------------------

TINY = Arch(128, 2, 2, 256, "quick_gelu", 96, 49407)  # heads = width / 64, as sdclip infers without config


@pytest.fixture(scope="module")
def tiny():
    model = build(TINY, seed=7)
    return model, reference(model, sdclip.Tokenizer()(PROMPTS))


def test_a_wrong_layout_is_caught(tiny, out: Path):
    """The comparison can fail: q and k swapped in the file give a different model."""
    model, ref = tiny
    folder = layouts.write_hf_folder(model, out / "clip")
    tensors = load_file(folder / "model.safetensors")
    q, k = (f"text_model.encoder.layers.1.self_attn.{x}_proj.weight" for x in "qk")
    tensors[q], tensors[k] = tensors[k], tensors[q]
    save_file(tensors, str(folder / "model.safetensors"))
    assert max_diffs(sdclip.load(folder).tower(), ref)["last_hidden_state"] > 1e-3


@pytest.mark.parametrize("projection", ["matmul", "linear", "linear_named", None])
def test_openclip_projection_forms(tiny, out: Path, projection: str | None):
    """OpenCLIP's ``text_projection`` [width, out] (x @ P), the Linear weight [out, width] kohya stores
    under that name (told apart by shape when not square), Playground's ``text_projection.weight``,
    and no projection at all (SD2 fine-tunes converted from diffusers)."""
    model, ref = tiny
    path = out / "open_clip.safetensors"
    save_file(layouts.openclip_tensors(model, projection=projection), str(path))
    tower = sdclip.load(path).tower()
    assert_close(max_diffs(tower, ref, projection=projection is not None))


def test_square_projection_is_read_as_openclip(out: Path):
    """A square ``text_projection`` cannot say how it is stored: like SGM, A1111 and ComfyUI, sdclip
    reads it as OpenCLIP's x @ P (so a kohya SDXL save of a diffusers bigG is read as those tools read it)."""
    model = build(Arch(128, 1, 2, 256, "gelu", 128, 0), seed=8)
    tensors = layouts.openclip_tensors(model, projection="linear")
    save_file(tensors, str(out / "square.safetensors"))
    tower = sdclip.load(out / "square.safetensors").tower()
    assert torch.equal(tower.projection.weight, tensors["text_projection"].t())
