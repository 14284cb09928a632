"""Textual inversion: only the new vectors learn, runs resume exactly, the files written load back in sdclip and in
diffusers, bad files are refused; and on the bundled model a shape it never saw is learned from a few pictures."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import condfakes
import layouts
import numpy as np
import pytest
import torch
from clipfakes import randomize
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import sdclip
from sdclip import BadInput, Embedding, bundled, encode_prompts, read_embedding, save_embedding, train_embedding
from sdclip.cli import main
from sdclip.clip import CLIPModel
from sdclip.inversion import conditioning, initial_vectors
from sdclip.model import TextConfig
from sdclip.shapes import ZERO_SHOT_TEMPLATES, eval_set, labels, phrase, pictures
from sdclip.vision import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "<blob>"


def tiny_clip(seed: int = 0) -> CLIPModel:
    return CLIPModel.create(
        TextConfig(width=32, layers=2, heads=2, mlp_width=64, projection_dim=16),
        VisionConfig(width=32, layers=1, heads=2, mlp_width=64, image_size=16, patch_size=8, projection_dim=16),
        seed=seed,
    )


def pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in module.state_dict().items()
    }


# --- training ------------------------------------------------------------------------------------------------


def test_clip_objective_changes_only_the_new_vectors():
    model = tiny_clip()
    model.requires_grad_(True)  # as a model fresh from training is: the run must freeze it, then restore it
    before = digests(model)
    init = initial_vectors(model.text, model.tokenizer, "shape", 2)
    seen = []
    original = torch.Tensor.backward

    def spy(loss, *args, **kwargs):  # at each backward: no model weight may require grad
        seen.append([n for n, p in model.named_parameters() if p.requires_grad])
        return original(loss, *args, **kwargs)

    torch.Tensor.backward = spy
    try:
        e = train_embedding(
            model,
            pixels(),
            token=TOKEN,
            init_word="shape",
            vectors=2,
            steps=5,
            lr=1e-2,
            negatives=["a circle", "a square"],
            log=None,
        )
    finally:
        torch.Tensor.backward = original
    assert digests(model) == before
    assert seen == [[]] * 5 and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert e.token == TOKEN and e.name == "blob" and e.vectors["*"].shape == (2, 32)
    assert not torch.equal(e.vectors["*"], init)


def test_injection_equals_the_word_it_copies():
    """A word whose vectors are another word's token embeddings encodes exactly as that word."""
    model = tiny_clip()
    circle = initial_vectors(model.text, model.tokenizer, "circle", 1)
    e = Embedding("blob", TOKEN, {"*": circle})
    got = model.encode_text(["a <blob>", "<blob> and a square ok", "no word here"], embeddings=e)
    assert torch.equal(got, model.encode_text(["a circle", "circle and a square ok", "no word here"]))
    with pytest.raises(BadInput, match="width 64"):
        model.encode_text("a <blob>", embeddings=Embedding("blob", TOKEN, {"*": torch.zeros(1, 64)}))


def test_init_word_repeated_or_averaged():
    model = tiny_clip()
    rows = model.text.token_embedding.weight[model.tokenizer.tokenize("red circle")]
    assert torch.equal(initial_vectors(model.text, model.tokenizer, "red circle", 3), rows[[0, 1, 0]])
    assert torch.allclose(initial_vectors(model.text, model.tokenizer, "red circle", 1), rows.mean(0, keepdim=True))
    with pytest.raises(BadInput, match="no tokens"):
        initial_vectors(model.text, model.tokenizer, "   ", 1)


def test_resume_continues_exactly(tmp_path):
    model, images = tiny_clip(), pixels()
    settings = dict(
        token=TOKEN,
        init_word="shape",
        vectors=2,
        steps=6,
        checkpoint_every=2,
        lr=1e-2,
        negatives=["a circle"],
        log=None,
    )
    whole = train_embedding(model, images, out=tmp_path / "a", **settings)
    train_embedding(model, images, out=tmp_path / "b", until=3, **settings)
    resumed = train_embedding(model, images, out=tmp_path / "b", resume=True, log=None)
    assert torch.equal(whole.vectors["*"], resumed.vectors["*"])

    def rows(folder):
        return [
            {k: v for k, v in json.loads(line).items() if k != "elapsed"}
            for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows("a") == rows("b") and len(rows("a")) == 6
    assert (tmp_path / "b" / "loss.png").is_file()
    with pytest.raises(BadInput, match="other example images"):
        train_embedding(model, pixels(seed=1), out=tmp_path / "b", resume=True, log=None)


def test_loss_hook_sees_the_sdxl_conditioning():
    """loss_fn gets [B, 77, C_l + C_g] and the pooled output, as the diffusers pipeline computes them (vectors
    equal to a word's token embeddings give that word's conditioning); each encoder gets its own vectors."""
    te = condfakes.encoder("sdxl", widths=(32, 48))
    got = []

    def loss_fn(batch: sdclip.PromptBatch) -> torch.Tensor:
        got.append(batch)
        noise = torch.randn(batch.hidden.shape, generator=batch.generator)
        return ((batch.hidden - noise) ** 2).mean() + batch.pooled.square().mean()

    e = train_embedding(
        te,
        loss_fn=loss_fn,
        token=TOKEN,
        init_word="a cat",
        vectors=2,
        steps=2,
        batch_size=3,
        templates=["a photo of {}", "{} on a hill"],
        log=None,
    )
    assert set(e.vectors) == {"clip_l", "clip_g"} and e.vectors["clip_g"].shape == (2, 48)
    first = got[0]
    assert first.hidden.shape == (3, 77, 80) and first.pooled.shape == (3, 48) and first.step == 0
    assert first.hidden.requires_grad
    cat = {
        role: initial_vectors(te.tower(n), te.tokenizers[n - 1], "cat", 1) for n, role in ((1, "clip_l"), (2, "clip_g"))
    }
    with torch.no_grad():
        hidden, pooled = conditioning(te, first.prompts, cat, TOKEN)
    cond = encode_prompts(te, [p.replace(TOKEN, "cat") for p in first.prompts], dialect="diffusers", cache=None)
    assert (cond.hidden - hidden).abs().max() < 1e-5 and (cond.pooled - pooled).abs().max() < 1e-5
    with pytest.raises(BadInput, match="scalar"):
        train_embedding(te, loss_fn=lambda b: torch.tensor(1.0), token=TOKEN, init_word="cat", steps=1, log=None)
    with pytest.raises(BadInput, match="full CLIP model"):
        train_embedding(te, pixels(), token=TOKEN, steps=1, log=None)


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(token="two words"), "one word"),
        (dict(templates=["no slot"]), "needs one"),
        (dict(vectors=0), "vectors"),
        (dict(steps=0), "steps"),
        (dict(colour=1), "unknown setting"),
        (dict(negatives=["a <blob>"]), "negative"),
    ],
)
def test_bad_settings(settings, words):
    with pytest.raises(BadInput, match=words):
        train_embedding(tiny_clip(), pixels(), **{"token": TOKEN, **settings})


# --- files ------------------------------------------------------------------------------------------------------


def vectors(n: int = 2, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize(
    "name, fmt, keys",
    [
        ("blob.pt", "a1111", None),
        ("blob.bin", "a1111", None),
        ("blob.safetensors", "safetensors", {"emb_params"}),
        ("learned_embeds.safetensors", "diffusers", {TOKEN}),
        ("learned_embeds.bin", "diffusers", {TOKEN}),
    ],
)
def test_round_trip_and_layouts(tmp_path, name, fmt, keys):
    e = Embedding("blob", TOKEN, {"*": torch.cat([vectors(), torch.zeros(5000, 32)])[:2]})  # a view of more
    path = save_embedding(e, tmp_path / name, step=7, checkpoint="sdclip-mini")
    assert path.stat().st_size < 4096  # the vectors alone
    back = read_embedding(path)
    assert torch.equal(back.vectors["*"], e.vectors["*"]) and back.name == path.stem
    assert back.token == {"a1111": TOKEN, "safetensors": "emb_params", "diffusers": TOKEN}[fmt]
    if fmt == "a1111":  # A1111's own keys, readable without running code
        data = torch.load(path, weights_only=True)
        assert data.keys() == {
            "string_to_token",
            "string_to_param",
            "name",
            "step",
            "sd_checkpoint",
            "sd_checkpoint_name",
        }
        assert data["string_to_token"] == {"*": 265} and data["name"] == TOKEN and data["step"] == 7
        assert torch.equal(data["string_to_param"]["*"], e.vectors["*"])
    elif path.suffix == ".safetensors":
        assert set(load_file(path)) == keys
    else:
        assert set(torch.load(path, weights_only=True)) == keys


def test_sdxl_pairs(tmp_path):
    e = Embedding("blob", TOKEN, {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280, 1)})
    back = read_embedding(save_embedding(e, tmp_path / "blob.safetensors"))
    assert set(load_file(tmp_path / "blob.safetensors")) == {"clip_l", "clip_g"}
    assert all(torch.equal(back.vectors[k], e.vectors[k]) for k in e.vectors)
    for name in ("blob.pt", "learned_embeds.safetensors"):
        with pytest.raises(BadInput, match="SDXL embedding"):
            save_embedding(e, tmp_path / name)
    with pytest.raises(BadInput, match="ends in"):
        save_embedding(e, tmp_path / "blob.pt", "safetensors")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A tiny transformers CLIP text encoder with its tokenizer, saved as a folder sdclip loads too."""
    folder = tmp_path_factory.mktemp("te")
    randomize(CLIPTextModel(condfakes.hf_config(32, 2)).eval()).save_pretrained(folder)
    layouts.write_tokenizer(folder)
    return folder


@pytest.mark.parametrize(
    "name, token",
    [
        ("blob.pt", None),
        ("blob.safetensors", TOKEN),
        ("learned_embeds.safetensors", None),
        ("learned_embeds.bin", None),
    ],
)
def test_diffusers_loads_what_we_write(tmp_path, text_folder, name, token):
    """diffusers' load_textual_inversion accepts each file; its encoding of a prompt with the word equals sdclip's."""
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):  # what a pipeline brings: a tokenizer and a text encoder
        hf_device_map, components = None, {}

        def __init__(self):
            self.tokenizer = CLIPTokenizer.from_pretrained(text_folder)
            self.text_encoder = CLIPTextModel.from_pretrained(text_folder).eval()

    e = Embedding("blob", TOKEN, {"*": vectors()})
    path = save_embedding(e, tmp_path / name)
    loader = Loader()
    loader.load_textual_inversion(str(path), token=token)
    rows = loader.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[loader.tokenizer.convert_tokens_to_ids([TOKEN, TOKEN + "_1"])], e.vectors["*"])
    prompt = "a <blob> on a hill"
    expanded = prompt.replace(TOKEN, f"{TOKEN} {TOKEN}_1")  # diffusers' maybe_convert_prompt
    with torch.no_grad():
        want = loader.text_encoder(loader.tokenizer(expanded, padding="max_length", return_tensors="pt").input_ids)
    te = sdclip.load(text_folder)
    got = encode_prompts(te, prompt, dialect="diffusers", embeddings={TOKEN: read_embedding(path)}, cache=None)
    assert (got.hidden[0] - want.last_hidden_state[0]).abs().max() < 1e-5


# --- CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip().save(tmp_path_factory.mktemp("clip"), dtype="float32")


def test_cli_train_convert_inspect(tmp_path, clip_folder, capsys):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    run = tmp_path / "run"
    common = [str(tmp_path), "-m", str(clip_folder), "--out", str(run)]
    assert (
        main(
            [
                "ti",
                "train",
                *common,
                "--token",
                TOKEN,
                "--init-word",
                "shape",
                "--vectors",
                "2",
                "--steps",
                "4",
                "--negatives",
                "a circle, a square",
                "--template",
                "a {}",
                "--template",
                "a photo of {}",
                "--until",
                "2",
                "--format",
                "a1111",
            ]
        )
        == 0
    )
    assert "stopped at step 2" in capsys.readouterr().err and not (run / "blob.pt").exists()
    assert main(["ti", "train", *common, "--resume", "--format", "a1111"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert {p.name for p in run.iterdir()} == {"blob.pt", "checkpoint.pt", "metrics.jsonl", "loss.png"}
    assert read_embedding(run / "blob.pt").vectors["*"].shape == (2, 32)

    out = tmp_path / "learned_embeds.safetensors"
    assert main(["ti", "convert", str(run / "blob.pt"), str(out)]) == 0
    assert set(load_file(out)) == {TOKEN}
    assert main(["ti", "inspect", str(out), "-m", str(clip_folder), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "2 x 32" in text and "fits" in text and text.count("nearest:") == 2


def test_cli_bad_files(tmp_path, clip_folder, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))

    (tmp_path / "empty.pt").write_bytes(b"")
    save_file({"emb_params": torch.full((1, 32), math.nan)}, tmp_path / "nan.safetensors")
    torch.save({"string_to_param": {"*": vectors()}, "x": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    save_file({"emb_params": vectors(1, 768)}, tmp_path / "wide.safetensors")
    cases = [
        ("empty.pt", "empty"),
        ("nan.safetensors", "NaN"),
        ("evil.pt", "refused"),
        ("wide.safetensors", "do not fit"),
    ]
    for name, words in cases:
        for argv in (
            ["ti", "inspect", str(tmp_path / name), "-m", str(clip_folder)],
            ["ti", "convert", str(tmp_path / name), str(tmp_path / "out.pt")],
        ):
            if name == "wide.safetensors" and argv[1] == "convert":
                continue  # converting needs no model
            assert main(argv) == 2, argv
            assert words in capsys.readouterr().err
    assert main(["ti", "convert", str(tmp_path / "wide.safetensors"), str(tmp_path / "out.txt")]) == 2
    assert "name the file" in capsys.readouterr().err


# --- the demonstration on the bundled model ------------------------------------------------------------------

NEW = "<crescent>"
CONCEPT = [("red", "crescent")]
# chosen on five seed sets, this test's and four others (1-4 vectors, 60-200 steps, lr 3e-3 / 5e-3): on each the
# new word wins on >= 83 % of fresh crescents and the known classes lose at most one picture in 240.  A red heart
# is harder for this model: its pictures sit close to those of red hexagons, and teaching <heart> to 80 % costs
# the known classes 2-3 points (the model card has the figures).
DEMO = dict(token=NEW, init_word="shape", vectors=3, steps=100, lr=5e-3, batch_size=3, templates=ZERO_SHOT_TEMPLATES)


def crescents(n: int, seed: int, size: int) -> list:
    """Pictures of a red crescent, a shape the bundled model never saw, drawn like the training pictures."""
    return [image for image, _, _ in pictures(CONCEPT, n, size, seed)]


@pytest.mark.skipif(
    not (Path(str(bundled.__file__)).parent / "data" / bundled.DEFAULT / "model.safetensors").is_file(),
    reason="the bundled model is not installed",
)
def test_learns_a_shape_the_bundled_model_never_saw():
    """8 pictures of red crescents teach <crescent>: on fresh crescents, zero-shot accuracy among <crescent> and the
    48 known colour x shape labels rises from near chance to >= 80 %; the known classes keep their accuracy within
    2 points."""
    model = CLIPModel.load()
    size = model.vision.config.image_size
    known = [phrase(c, s) for c, s in labels()]
    fresh = model.encode_image(crescents(96, seed=2, size=size))
    others = eval_set("seen", 240, size, seed=20_261_128)
    other_images = model.encode_image([im for im, _, _ in others])
    target = torch.tensor([labels().index((c, s)) for _, c, s in others])

    def accuracy(e: Embedding) -> tuple[float, float]:
        classes = model.class_embeddings(known + [NEW], ZERO_SHOT_TEMPLATES, embeddings=e)
        new = ((fresh @ classes.t()).argmax(-1) == len(known)).float().mean().item()
        return new, ((other_images @ classes.t()).argmax(-1) == target).float().mean().item()

    start = Embedding(
        "crescent", NEW, {"*": initial_vectors(model.text, model.tokenizer, DEMO["init_word"], DEMO["vectors"])}
    )
    baseline = (
        ((other_images @ model.class_embeddings(known, ZERO_SHOT_TEMPLATES).t()).argmax(-1) == target)
        .float()
        .mean()
        .item()
    )
    began = time.monotonic()
    learned = train_embedding(model, crescents(8, seed=1, size=size), negatives=known, log=None, **DEMO)
    seconds = time.monotonic() - began
    (new_before, other_before), (new_after, other_after) = accuracy(start), accuracy(learned)
    print(
        f"\n{NEW}: {new_before:.3f} -> {new_after:.3f}; other classes {baseline:.3f} (without the word), "
        f"{other_before:.3f} -> {other_after:.3f}; training {seconds:.1f} s"
    )
    assert new_before <= 0.1 and new_after >= 0.8
    assert other_after >= baseline - 0.02
