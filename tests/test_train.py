"""Training: the loss falls, a resumed run repeats the uninterrupted one, the outputs load; the CLI."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sdclip
from sdclip.cli import main
from sdclip.clip import CLIPModel
from sdclip.errors import BadInput
from sdclip.shapes import Shapes
from sdclip.train import TrainConfig, lr_at, train

TINY = dict(  # a CLIP that trains in a second: shared with tests/test_runs.py
    batch_size=16,
    warmup=2,
    text_width=64,
    text_layers=1,
    vision_width=64,
    vision_layers=1,
    embed_dim=32,
    image_size=32,
    patch_size=8,
    eval_images=16,
    save_dtype="float32",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(folder) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_falls_on_a_small_folder(tmp_path):
    """Eight image-caption pairs seen over and over: the model must learn to pair them."""
    data = tmp_path / "data"
    data.mkdir()
    shapes = Shapes(size=32, seed=5)
    for i in range(8):
        image, caption = shapes[i]
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    config = TrainConfig(
        data=str(data), steps=25, lr=3e-3, eval_every=0, checkpoint_every=25, **{**TINY, "batch_size": 8}
    )
    train(config, tmp_path / "run", log=io.StringIO())
    losses = _losses(tmp_path / "run")
    assert len(losses) == 25 and losses[0] > math.log(8) - 0.5  # about chance at first
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_resume_repeats_the_uninterrupted_run(tmp_path, ema):
    config = TrainConfig(steps=6, checkpoint_every=2, eval_every=3, ema=ema, **TINY)
    log = io.StringIO()
    straight = train(config, tmp_path / "a", log=log)
    assert "step 6/6" in log.getvalue() and "pairs/s" in log.getvalue() and "ETA" in log.getvalue()
    train(config, tmp_path / "b", until=3, log=io.StringIO())
    assert not (tmp_path / "b" / "model.safetensors").exists() and len(_losses(tmp_path / "b")) == 3
    resumed = train(TrainConfig(steps=999), tmp_path / "b", resume=True, log=io.StringIO())  # settings come from b
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "zero_shot_seen" in r] == [0, 3, 6]
    saved = CLIPModel.load(tmp_path / "b", dtype="float32")  # what the run returns is what it saves (fp16)
    assert (saved.text.token_embedding.weight - resumed.text.token_embedding.weight).abs().max() < 1e-3


def test_ema_is_the_moving_average_of_the_weights(tmp_path):
    """With ema=d the run returns and saves avg <- d avg + (1 - d) weights after each step, starting at the
    first step's weights (checked against the plain run's weights, which the same seed reproduces)."""

    def run(folder: str, **settings) -> dict[str, torch.Tensor]:
        config = TrainConfig(steps=2, checkpoint_every=1, eval_every=0, **TINY, **settings)
        return train(config, tmp_path / folder, log=io.StringIO()).state_dict()

    first = train(
        TrainConfig(steps=2, checkpoint_every=1, eval_every=0, **TINY), tmp_path / "w1", until=1, log=io.StringIO()
    ).state_dict()
    second = run("w2")
    averaged = run("ema", ema=0.75)
    for name in ("vision.class_embedding", "text.token_embedding.weight", "logit_scale"):
        assert torch.allclose(averaged[name], 0.75 * first[name] + 0.25 * second[name], atol=1e-6), name
    assert not torch.allclose(averaged["vision.class_embedding"], second["vision.class_embedding"])
    with pytest.raises(BadInput, match="ema"):
        TrainConfig(ema=1.0)


def test_outputs_load_as_clip_and_as_sd_conditioner(tmp_path):
    config = TrainConfig(steps=2, checkpoint_every=2, eval_every=1, **TINY)
    model = train(config, tmp_path, log=io.StringIO())
    assert (tmp_path / "training.png").is_file() and Image.open(tmp_path / "training.png").size == (900, 360)
    loaded = CLIPModel.load(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    assert (
        loaded.logits(pixels, ["a red circle", "a blue star"]) - model.logits(pixels, ["a red circle", "a blue star"])
    ).abs().max() < 1e-4
    out = sdclip.load(tmp_path).encode(["a red circle"])
    assert out.hidden.shape == (1, 77, 64) and out.pooled_projected.shape == (1, 32)


def test_schedule_and_bad_settings():
    config = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(config, 0) == pytest.approx(0.1) and lr_at(config, 9) == pytest.approx(1.0)
    assert lr_at(config, 55) == pytest.approx(0.5) and lr_at(config, 100) == pytest.approx(0.0)
    with pytest.raises(BadInput):
        TrainConfig(batch_size=1)
    with pytest.raises(BadInput, match="no checkpoint"):
        train(TrainConfig(), "/nonexistent/run", resume=True)


def test_cli_train_zeroshot_similarity(tmp_path, capsys):
    args = ["train-clip", "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "0"]
    for k, v in TINY.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    assert main(args) == 0
    images = []
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        images.append(str(tmp_path / f"{i}.png"))
    capsys.readouterr()
    assert (
        main(
            ["zeroshot", *images, "--labels", "red square,blue square,cat", "--model", str(tmp_path / "run"), "--json"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in lines] == images and abs(sum(lines[0]["probs"].values()) - 1) < 1e-5
    assert list(lines[1]["probs"]) == ["red square", "blue square", "cat"]
    assert main(["zeroshot", *images, "--labels", "a,b", "--model", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].split() == ["a", "b"]
    assert (
        main(["similarity", "--model", str(tmp_path / "run"), "--text", "a red square", "a cat", "--image", *images])
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and all(-1 <= float(v) <= 1 for v in table[1].split()[-2:])
    assert main(["zeroshot", images[0], "--labels", "one", "--model", str(tmp_path / "run")]) == 2
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["zeroshot", str(tmp_path / "bad.png"), "--labels", "a,b", "--model", str(tmp_path / "run")]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_bootstrap_freezes_text_and_resumes_exactly(tmp_path):
    """During the bootstrap the text tower keeps its random init and the captions are shapes
    alone; a run stopped inside it and resumed repeats the uninterrupted one."""
    config = TrainConfig(steps=6, checkpoint_every=3, eval_every=0, bootstrap_steps=3, **TINY)
    fresh = CLIPModel.create(*config.towers(), seed=config.seed)
    train(config, tmp_path / "a", until=3, log=io.StringIO())
    at3 = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    for name, p in fresh.text.state_dict().items():
        assert torch.equal(at3["text." + name], p), name
    assert not torch.equal(at3["vision.blocks.0.mlp.fc.weight"], fresh.vision.blocks[0].mlp.fc.weight)
    straight = train(config, tmp_path / "b", log=io.StringIO())
    train(config, tmp_path / "c", until=2, log=io.StringIO())
    resumed = train(config, tmp_path / "c", resume=True, log=io.StringIO())
    assert _losses(tmp_path / "b") == _losses(tmp_path / "c")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(straight.text.blocks[0].mlp.fc.weight, fresh.text.blocks[0].mlp.fc.weight)
    with pytest.raises(BadInput, match="bootstrap_steps"):
        TrainConfig(steps=5, bootstrap_steps=5)
    with pytest.raises(BadInput, match="bootstrap_steps"):
        TrainConfig(data="folder", bootstrap_steps=1)


def test_whitened_patch_embedding():
    """The patch embedding's outputs on the sample it was fitted to: uncorrelated, unit variance
    (up to eps), strongest directions first."""
    from sdclip.images import pixel_values
    from sdclip.train import whiten_patches_
    from sdclip.vision import VisionConfig, VisionTransformer

    shapes = Shapes(size=32, seed=1)
    pixels = pixel_values([shapes[i][0] for i in range(64)], 32)
    tower = VisionTransformer(
        VisionConfig(width=16, layers=1, heads=1, mlp_width=16, image_size=32, patch_size=4, projection_dim=8)
    ).init_weights(torch.Generator().manual_seed(0))
    whiten_patches_(tower, pixels, eps=1e-6)
    out = tower.patch_embedding(pixels).flatten(2).transpose(1, 2).reshape(-1, 16).double()
    cov = torch.cov(out.t())
    assert (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 1e-3
    assert TrainConfig(patch_init="clip").patch_init == "clip"
    with pytest.raises(BadInput, match="patch_init"):
        TrainConfig(patch_init="zca")
