"""Repo ids through a Hugging Face hub cache laid out by hand (blobs, ``snapshots/<commit>/`` links,
``refs/main``), offline: the cache alone answers, and an uncached repo gets a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import layouts
import pytest
import torch
from huggingface_hub import constants
from references import ARCHS, PROMPTS, assert_close, build, max_diffs, reference

import sdclip
from sdclip.checkpoint import Usage

CLIP_REPO = "openai/clip-vit-large-patch14"
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The repos' files, written once: a CLIPModel repo and an SD1 pipeline repo of one CLIP-L-width tower."""
    root = tmp_path_factory.mktemp("staged")
    model = build(ARCHS["L2"], seed=21)
    layouts.write_clip_repo(model, root / "clip")
    layouts.write_pipeline(root / "sd", "StableDiffusionPipeline", [(model, False, "<|endoftext|>")])
    yield root, model, reference(model, sdclip.Tokenizer()(PROMPTS))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch):
    """An empty hub cache that huggingface_hub uses, offline."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield folder
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(
    "repo, sub, family, layout, projection",
    [
        (CLIP_REPO, "clip", "clip", "CLIPModel", True),
        (SD_REPO, "sd", "sd1", "diffusers pipeline", False),
    ],
)
def test_cached_repo_matches_transformers(
    staged, cache: Path, repo: str, sub: str, family: str, layout: str, projection: bool
):
    root, model, ref = staged
    snapshot = layouts.write_hub_cache(cache, repo, root / sub)
    te = sdclip.load(repo)
    assert te.family == family and layout in te.info.layout
    assert all(Path(f).is_relative_to(snapshot) for f in te.info.files)
    assert te.usages == [Usage(-1, True)]
    assert torch.equal(te.tokenize(PROMPTS), ref.ids)
    assert_close(max_diffs(te.tower(), ref, projection=projection))


def test_nothing_cached_says_how_to_get_the_files(cache: Path):
    with pytest.raises(sdclip.SdclipError, match="not in the Hugging Face cache") as e:
        sdclip.load(CLIP_REPO)
    assert not isinstance(e.value, sdclip.BadInput)
    assert f"hf download {CLIP_REPO}" in str(e.value)


def test_cached_configs_without_weights_say_how_to_get_them(staged, cache: Path, tmp_path: Path):
    """Another tool fetched only the configs: the snapshot exists but holds no weights."""
    root = staged[0]
    partial = tmp_path / "partial"
    for name in ("model_index.json", "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "sd" / name, partial / name)
    layouts.write_hub_cache(cache, SD_REPO, partial)
    with pytest.raises(sdclip.SdclipError, match="holds no text-encoder weights") as e:
        sdclip.load(SD_REPO)
    assert f"hf download {SD_REPO}" in str(e.value)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return subprocess.run(
        [sys.executable, "-m", "sdclip.cli", *args], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )


def test_cli_reads_the_cache_under_hf_home(staged, tmp_path: Path):
    """The environment as users set it: HF_HOME (the cache in its hub/) and HF_HUB_OFFLINE=1."""
    home = tmp_path / "home"
    layouts.write_hub_cache(home / "hub", CLIP_REPO, staged[0] / "clip")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = _cli(["info", "--json", CLIP_REPO], env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["family"] == "clip" and info["encoders"][0]["width"] == 768
    missing = _cli(["info", "org/not-cached"], env)
    assert missing.returncode == 1 and "not in the Hugging Face cache" in missing.stderr
    assert "hf download org/not-cached" in missing.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
