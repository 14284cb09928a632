"""The run folder both trainers share: torn metrics, runs stopped before their first checkpoint, the saved thread
count, file names that stay inside the folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdclip import BadInput, train_embedding
from sdclip.cli import main
from sdclip.clip import CLIPModel
from sdclip.model import TextConfig
from sdclip.runs import load_checkpoint, read_metrics
from sdclip.vision import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(
    token="<blob>", init_word="shape", vectors=2, steps=4, checkpoint_every=2, lr=1e-2, negatives=["a circle"]
)


def tiny_clip() -> CLIPModel:
    return CLIPModel.create(
        TextConfig(width=32, layers=2, heads=2, mlp_width=64, projection_dim=16),
        VisionConfig(width=32, layers=1, heads=2, mlp_width=64, image_size=16, patch_size=8, projection_dim=16),
        seed=0,
    )


def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def steps(folder) -> list[int]:
    return [r["step"] for r in read_metrics(folder / "metrics.jsonl")]


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(BadInput, match=r"metrics.jsonl:2: not a JSON metrics row"):
        read_metrics(path)


def test_resume_after_a_torn_metrics_line(tmp_path):
    model = tiny_clip()
    whole = train_embedding(model, images(), out=tmp_path / "a", log=None, **SETTINGS)
    train_embedding(model, images(), out=tmp_path / "b", until=2, log=None, **SETTINGS)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed while writing step 3's row, before its checkpoint
    resumed = train_embedding(model, images(), out=tmp_path / "b", resume=True, log=None)
    assert torch.equal(whole.vectors["*"], resumed.vectors["*"])
    assert steps(tmp_path / "b") == [1, 2, 3, 4]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    model = tiny_clip()
    whole = train_embedding(model, images(), out=tmp_path / "a", log=None, **SETTINGS)
    train_embedding(model, images(), out=tmp_path / "b", until=1, log=None, **SETTINGS)
    (tmp_path / "b" / "checkpoint.pt").unlink()  # as if killed before step 2 wrote the first checkpoint
    log = io.StringIO()
    resumed = train_embedding(model, images(), out=tmp_path / "b", resume=True, log=log, **SETTINGS)
    assert "stopped before its first checkpoint; starting it over" in log.getvalue()
    assert torch.equal(whole.vectors["*"], resumed.vectors["*"]) and steps(tmp_path / "b") == [1, 2, 3, 4]
    with pytest.raises(BadInput, match="no checkpoint.pt to resume from"):  # a folder that holds no run
        train_embedding(model, images(), out=tmp_path / "none", resume=True, log=None, **SETTINGS)


@pytest.fixture
def run_args(tmp_path):
    folder = tiny_clip().save(tmp_path / "clip", dtype="float32")
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return [
        str(tmp_path / "0.png"),
        str(tmp_path / "1.png"),
        "-m",
        str(folder),
        "--out",
        str(tmp_path / "run"),
        "--init-word",
        "shape",
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
    ]


def test_threads_are_saved_and_restored_on_resume(tmp_path, run_args, capsys):
    assert main(["ti", "train", *run_args, "--token", "<blob>", "--threads", "1", "--until", "2"]) == 0
    assert load_checkpoint(tmp_path / "run")["threads"] == 1
    torch.set_num_threads(2)
    assert main(["ti", "train", *run_args, "--resume"]) == 0
    assert torch.get_num_threads() == 1  # the run's own count, so the result is the unstopped run's
    assert "resuming" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["../../escaped", "<a/b>", "<..>", "a\\b"])
def test_token_file_names_stay_inside_out(tmp_path, run_args, token, capsys):
    assert main(["ti", "train", *run_args, "--token", token]) == 2
    assert "cannot name a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "clip"]


def test_train_clip_metrics_rows_are_whole_json(tmp_path):
    """train-clip writes through the same run folder: every row one JSON object, the plot written."""
    from test_train import TINY

    from sdclip.train import TrainConfig, train

    config = TrainConfig(steps=2, eval_every=0, **{**TINY, "warmup": 1})
    train(config, tmp_path / "run", log=io.StringIO())
    assert steps(tmp_path / "run") == [1, 2] and (tmp_path / "run" / "training.png").is_file()
    assert all(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
