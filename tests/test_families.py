"""The family table: how each family is recognised, and that a new family or layout is one row of it."""

from __future__ import annotations

import layouts
import pytest
from references import Arch, build
from safetensors.torch import save_file

import sdclip
from sdclip import families
from sdclip.families import FAMILIES, Family, Usage

L, H, G, B = "clip_l", "clip_h", "clip_g", "clip_b"


@pytest.mark.parametrize(
    "prefixes, roles, family",
    [
        (["cond_stage_model.transformer.text_model."], [L], "sd1"),
        (["cond_stage_model.transformer."], [L], "sd1"),
        (["cond_stage_model.model."], [H], "sd2"),
        (["cond_stage_model.model."], [B], "clip"),
        (["cond_stage_model.a.", "cond_stage_model.b."], [L, G], "clip"),
        (["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."], [L, G], "sdxl"),
        (["conditioner.embedders.0.model."], [G], "sdxl-refiner"),
        (["conditioner.embedders.0.transformer.text_model."], [L], "clip"),
        (
            ["text_encoders.clip_l.transformer.text_model.", "text_encoders.clip_g.transformer.text_model."],
            [L, G],
            "sd3",
        ),
        (["text_encoders.clip_l.transformer.text_model."], [L], "sd3"),
        (["text_model."], [L], "clip"),
        ([""], [H], "clip"),
    ],
)
def test_single_files(prefixes, roles, family):
    assert families.of_file(prefixes, roles).name == family


@pytest.mark.parametrize(
    "pipeline, roles, family",
    [
        ("StableDiffusion3Pipeline", [L, G], "sd3"),
        ("StableDiffusionXLPipeline", [L, G], "sdxl"),
        ("StableDiffusionXLImg2ImgPipeline", [G], "sdxl-refiner"),
        ("StableDiffusionXLPipeline", [L, G, G], "sdxl-refiner"),
        ("StableDiffusionPipeline", [L], "sd1"),
        ("StableDiffusionPipeline", [H], "sd2"),
        ("", [L], "sd1"),
        ("StableDiffusionPipeline", [B], "clip"),
        ("StableDiffusionPipeline", [L, G], "clip"),
    ],
)
def test_pipelines(pipeline, roles, family):
    assert families.of_pipeline(pipeline, roles).name == family


def test_rows_are_consistent():
    for f in FAMILIES.values():
        towers = len(f.roles) if f.roles is not None else 2
        assert set(f.pooled) <= set(range(1, towers + 1)) and set(f.unet) <= set(range(1, towers + 1)), f.name
        assert f.clip_skip_base == (1 if f.usage.layer == -1 else 2), f.name
    assert list(FAMILIES)[-1] == "clip" and FAMILIES["clip"].prefix is None  # the fallback comes last


def test_a_new_family_is_one_row(monkeypatch, tmp_path):
    """A made-up layout (towers under ``te.``) becomes a family by adding its row: loading, defaults, the layout's
    name and which encoders the U-Net reads all follow."""
    row = Family(
        "toy", "te.", ("clip_l",), "toy single file", None, Usage(-3, False), None, (1,), (1,), 3, False, False, False
    )
    monkeypatch.setattr(families, "FAMILIES", {"toy": row, **FAMILIES})
    monkeypatch.setitem(FAMILIES, "toy", row)  # the table conditioning reads
    model = build(Arch(768, 3, 12, 256, "quick_gelu", 768, 49407), seed=3)
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in layouts.prefixed("te.", layouts.hf_tensors(model)).items()}, str(path))
    te = sdclip.load(path)
    assert (te.family, te.usages, te.info.layout) == ("toy", [Usage(-3, False)], "toy single file")
    cond = sdclip.encode_prompts(te, "a cat", dialect="comfy", clip_skip=-4, cache=None)
    assert cond.hidden.shape == (1, 77, 768) and cond.pooled.shape == (1, 768)
    assert sdclip.layer_for(te, 1, "comfy", -4) == Usage(-4, False)
