"""Prompts to conditioning: each front end's weighting, layers, lengths, SDXL rules and outputs, checked
against straightforward per-token computations on tiny in-memory encoders (the peers themselves are run in
test_peers.py)."""

from __future__ import annotations

import json
import math
import warnings

import condfakes
import layouts
import pytest
import torch
from clipfakes import randomize
from condfakes import TOK
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import sdclip
from sdclip import BadInput, Conditioner, encode_prompts, layer_for, prompts
from sdclip.checkpoint import Usage
from sdclip.cli import main
from sdclip.prompts.types import Conjunction, Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6


@pytest.fixture(scope="module")
def sd1():
    return condfakes.encoder("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return condfakes.encoder("sdxl", (48, 64))


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def raw(te, chunked, encoder: int = 1, usage: Usage | None = None) -> torch.Tensor:
    """A chunked prompt's unweighted hidden states [k, 77, C]."""
    ids, _ = chunked.tensors()
    u = usage or te.usages[encoder - 1]
    return te.encode_ids(ids, encoder=encoder, layer=u.layer, final_norm=u.final_norm).hidden


def empty_row(te, encoder: int = 1, usage: Usage | None = None) -> torch.Tensor:
    pad = te.towers[encoder - 1].config.pad_id
    return raw(te, prompts.chunk("", "diffusers", TOK, pad_id=pad), encoder, usage)[0]


# --- A1111 emphasis -------------------------------------------------------------------------------


def a1111_reference(z: torch.Tensor, w: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """A1111's emphasis of one chunk tensor [R, 77, C], token by token."""
    out = z.clone()
    for r in range(z.shape[0]):
        for p in range(z.shape[1]):
            out[r, p] = z[r, p] * float(w[r, p])
    return out * (z.mean() / out.mean()) if mode == "original" else out


@pytest.mark.parametrize("mode", ["original", "no-norm"])
def test_a1111_emphasis(sd1, mode):
    prompt = "a (red:1.3) cat on a [hill], (((sky))), (dark:0.4)"
    c = prompts.chunk(prompt, "a1111", TOK)
    ref = a1111_reference(raw(sd1, c), c.tensors()[1], mode)[0]
    got = encode_prompts(sd1, prompt, dialect="a1111", emphasis=mode).hidden[0]
    assert diff(got, ref) <= TOL
    assert diff(got, raw(sd1, c)[0]) > 1e-3  # the weights did something


def test_a1111_ignore_and_none(sd1):
    plain_ = raw(sd1, prompts.chunk("a red cat on a hill", "a1111", TOK))[0]
    assert (
        diff(
            encode_prompts(sd1, "a (red:1.5) cat on a [hill]", dialect="a1111", emphasis="ignore").hidden[0],
            raw(sd1, prompts.chunk("a (red:1.5) cat on a [hill]", "a1111", TOK))[0],
        )
        == 0
    )
    literal = prompts.chunk("a (red:1.5) cat", "a1111", TOK, emphasis=False)
    none = encode_prompts(sd1, "a (red:1.5) cat", dialect="a1111", emphasis="none").hidden[0]
    assert diff(none, raw(sd1, literal)[0]) == 0
    assert diff(plain_, raw(sd1, literal)[0]) > 1e-3  # "none" reads the brackets as text


def test_a1111_schedule_rows_share_one_mean(sd1):
    """A1111 encodes a prompt's schedule texts in one batch; the mean restore runs over all of them."""
    prompt = "a [cat:dog:0.5] on a (hill:1.5)"
    texts = [t for _, t in prompts.a1111.schedule_text(prompt, 20)]
    assert texts == ["a cat on a (hill:1.5)", "a dog on a (hill:1.5)"]
    chunks = [prompts.chunk(t, "a1111", TOK) for t in texts]
    z = torch.cat([raw(sd1, c) for c in chunks])
    ref = a1111_reference(z, torch.cat([c.tensors()[1] for c in chunks]))
    cond = Conditioner(sd1, "a1111")
    assert diff(cond.encode(prompt, step=0).hidden[0], ref[0]) <= TOL
    assert diff(cond.encode(prompt, step=15).hidden[0], ref[1]) <= TOL
    alone = a1111_reference(raw(sd1, chunks[0]), chunks[0].tensors()[1])[0]
    assert diff(ref[0], alone) > 1e-5  # so the batch matters


def test_a1111_schedule_pads_short_rows_with_empty_chunks(sd1):
    """Rows of a batch with fewer chunks get empty chunks, which take part in that chunk's mean."""
    long = " ".join(["word"] * 80)
    prompt = f"[{long}:short:3] (cat:1.4)"
    texts = [t for _, t in prompts.a1111.schedule_text(prompt, 20)]
    chunks = [prompts.chunk(t, "a1111", TOK) for t in texts]
    assert [len(c.ids) for c in chunks] == [2, 1]
    empty = prompts.chunk("", "a1111", TOK)
    ones = torch.ones(1, 77)
    ref = []
    for k in range(2):
        rows = [c if k < len(c.ids) else empty for c in chunks]
        z = torch.cat([raw(sd1, c)[k if k < len(c.ids) else 0][None] for c in rows])
        w = torch.cat([c.tensors()[1][k][None] if k < len(c.ids) else ones for c in rows])
        ref.append(a1111_reference(z, w))
    tree = Conditioner(sd1, "a1111").encode_tree(prompt)
    assert isinstance(tree, Schedule)
    for r, (_, conj) in enumerate(tree.entries):
        got = conj.parts[0].hidden
        assert got.shape == (154, 64)
        assert diff(got, torch.cat([ref[0][r], ref[1][r]])) <= TOL


def test_a1111_and_is_composable_diffusion(sd1):
    cond = Conditioner(sd1, "a1111")
    tree = cond.encode_tree("a red cube AND a blue sphere :0.5")
    assert isinstance(tree, Schedule) and isinstance(tree.entries[0][1], Conjunction)
    conj = tree.entries[0][1]
    assert conj.weights == (1.0, 0.5)
    assert diff(conj.parts[1].hidden, cond.encode(" a blue sphere").hidden[0]) == 0
    with pytest.raises(BadInput, match="composable diffusion"):
        cond.encode("a red cube AND a blue sphere")
    # the negative prompt is not split at AND (A1111 reads it whole)
    neg = cond.encode("x", negative="a AND b").negative_hidden[0]
    assert diff(neg, raw(sd1, prompts.a1111.chunk("a AND b", TOK))[0]) <= TOL


# --- ComfyUI and compel: from the empty prompt --------------------------------------------------------


def lerp_reference(z: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = z.clone()
    for k in range(z.shape[0]):
        for p in range(z.shape[1]):
            if float(w[k, p]) != 1.0:
                out[k, p] = (z[k, p] - e[p]) * float(w[k, p]) + e[p]
    return out


def test_comfy_weights_move_from_the_empty_prompt(sd1):
    prompt = "a (red:1.3) cat on a (hill:0.6), ((sky)) " + "more words " * 40
    c = prompts.chunk(prompt, "comfy", TOK)
    assert len(c.ids) == 2
    ref = lerp_reference(raw(sd1, c), empty_row(sd1), c.tensors()[1]).flatten(0, 1)
    assert diff(encode_prompts(sd1, prompt, dialect="comfy").hidden[0], ref) <= TOL


def test_diffusers_reads_no_syntax(sd1):
    prompt = "a (red:1.3) cat+ " + "word " * 90
    with pytest.warns(UserWarning, match="truncated"):
        got = encode_prompts(sd1, prompt, dialect="diffusers").hidden[0]
    assert diff(got, sd1.encode([prompt]).hidden[0]) == 0


# --- lengths ------------------------------------------------------------------------------------------

LONG = "a long prompt, " + "word " * 80


def test_a1111_lengths(sd1):
    """Prompts of a batch: the last vector repeated (A1111's multicond batch); prompt against negative: empty
    chunks (pad_cond_uncond)."""
    cond = encode_prompts(sd1, ["short", LONG], negative="", dialect="a1111")
    assert cond.hidden.shape == cond.negative_hidden.shape == (2, 154, 64)
    short = cond.hidden[0]
    assert torch.equal(short[77:], short[76:77].expand(77, -1))
    assert diff(cond.negative_hidden[0, 77:], empty_row(sd1)) == 0
    assert diff(cond.negative_hidden[0, :77], empty_row(sd1)) == 0


def test_compel_and_comfy_lengths(sd1):
    compel_ = encode_prompts(sd1, ["short", "word " * 100], negative="", dialect="compel", truncate=False)
    assert compel_.hidden.shape == (2, 154, 64)
    assert diff(compel_.hidden[0, 77:], empty_row(sd1)) == 0
    three = "x " * 160
    comfy = encode_prompts(sd1, [LONG], negative=three, dialect="comfy")  # 2 and 3 chunks: tiled to 6
    assert comfy.hidden.shape == comfy.negative_hidden.shape == (1, 462, 64)
    assert torch.equal(comfy.hidden[0, :154], comfy.hidden[0, 154:308])
    assert torch.equal(comfy.negative_hidden[0, :231], comfy.negative_hidden[0, 231:])


def test_identical_rows_are_encoded_once(sd1):
    before = sd1.reuse.stats.rows
    encode_prompts(sd1, ["a cat"] * 4, negative="a cat", dialect="a1111")
    assert sd1.reuse.stats.rows - before == 2  # "a cat" and the empty prompt


def test_encode_many_shares_passes_and_gives_each_request_its_own_bits(sd1):
    """Requests of any dialects, clip skips, negatives and textual-inversion tables run as one call: each result is
    bit for bit its own ``encode`` (uncached), a bad request fails alone, and the shared call runs fewer rows than
    the requests one by one."""
    slim = sdclip.Embedding("slim", "<slim>", {"*": torch.randn(2, 64, generator=torch.Generator().manual_seed(3))})
    conditioners = [
        Conditioner(sd1, "a1111", cache=None),
        Conditioner(sd1, "comfy", cache=None),
        Conditioner(sd1, "comfy", clip_skip=2, cache=None),
        Conditioner(sd1, "compel", cache=None),
        Conditioner(sd1, "diffusers", cache=None),
        Conditioner(sd1, "a1111", embeddings=[slim], cache=None),
    ]
    requests = [
        (conditioners[0], ["a (red:1.2) star", "a cat"], "blurry", 0),
        (conditioners[1], ["a (red:1.2) star", LONG], None, 0),
        (conditioners[2], "a (red:1.2) star", "blurry", 0),
        (conditioners[3], ["a red++ star", "a cat"], ["ugly", "blurry"], 0),
        (conditioners[4], "a cat", None, 0),
        (conditioners[5], ["a slim cat", "a (red:1.2) star"], "blurry", 0),
        (conditioners[1], "a (red:1e39) star", None, 0),  # NaN conditioning: a BadInput of its own
        (conditioners[0], "[a cat:a dog:5]", None, 7),  # prompt editing at a step
    ]
    before = sd1.reuse.stats.rows
    results = sdclip.encode_many(requests)
    together = sd1.reuse.stats.rows - before
    alone = 0
    for (conditioner, prompts_, negative, step), got in zip(requests, results):
        start = sd1.reuse.stats.rows
        try:
            want = conditioner.encode(prompts_, negative, step=step)
        except BadInput as e:
            assert isinstance(got, BadInput) and str(got) == str(e)
            continue
        alone += sd1.reuse.stats.rows - start
        for name in ("hidden", "pooled", "negative_hidden", "negative_pooled"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    assert sum(isinstance(r, BadInput) for r in results) == 1
    assert together < alone  # the empty prompt, "a (red:1.2) star" and "blurry" once for all dialects
    with pytest.raises(ValueError, match="same TextEncoder"):
        sdclip.encode_many([(conditioners[0], "a", None, 0), (Conditioner(condfakes.encoder("sd1")), "a", None, 0)])


# --- layers -------------------------------------------------------------------------------------------


def test_layer_numbering():
    sd1 = condfakes.encoder("sd1", layers=4)
    for dialect, skip in (("a1111", 2), ("comfy", -2), ("comfy", 2), ("diffusers", 1), ("compel", 1)):
        assert layer_for(sd1, 1, dialect, skip) == Usage(-2, True), dialect
    assert layer_for(sd1, 1, "a1111", 1) == layer_for(sd1, 1, "diffusers", 0) == Usage(-1, True)
    # SD2: a 24-block file reads block 23 (-2), a 23-layer diffusers folder its last; clip skip agrees on both
    full = condfakes.encoder("sd2", layers=4, usages=[Usage(-2, True)])
    cut = condfakes.encoder("sd2", layers=3, usages=[Usage(-1, True)])
    for dialect, skip, on_full, on_cut in (("comfy", -2, -2, -1), ("comfy", -3, -3, -2), ("diffusers", 1, -3, -2)):
        assert layer_for(full, 1, dialect, skip).layer == on_full
        assert layer_for(cut, 1, dialect, skip).layer == on_cut
    with pytest.raises(BadInput, match="does not have"):
        layer_for(cut, 1, "comfy", -1)  # the layer diffusers' folder left out
    with pytest.warns(UserWarning, match="ignores"):
        assert layer_for(full, 1, "a1111", 3) == Usage(-2, True)
    xl = condfakes.encoder("sdxl", (48, 64), layers=4)
    for encoder in (1, 2):
        assert layer_for(xl, encoder, "comfy", -1) == Usage(-1, False)
        assert layer_for(xl, encoder, "diffusers", 1) == Usage(-3, False)
    with pytest.raises(BadInput, match="does not have"):
        layer_for(sd1, 1, "a1111", 6)


def test_clip_skip_end_to_end(sd1):
    want = sd1.encode(["a cat"], layer=-2, final_norm=True).hidden[0]
    for dialect, skip in (("a1111", 2), ("comfy", -2), ("diffusers", 1), ("compel", 1)):
        cond = encode_prompts(sd1, "a cat", negative="a cat", dialect=dialect, clip_skip=skip)
        assert diff(cond.hidden[0], want) <= TOL, dialect
        # diffusers encodes the negative prompt without clip_skip; the others with it
        neg_layer = -1 if dialect == "diffusers" else -2
        assert diff(cond.negative_hidden[0], sd1.encode(["a cat"], layer=neg_layer).hidden[0]) <= TOL, dialect


# --- SDXL -----------------------------------------------------------------------------------------------


def test_sdxl_joins_encoders_and_pools_the_first_chunk(sdxl):
    prompt = "a (red:1.2) fox, " + "tree " * 90
    for dialect in ("a1111", "comfy"):
        cond = encode_prompts(sdxl, prompt, dialect=dialect)
        assert cond.hidden.shape == (1, 154, 112) and cond.pooled.shape == (1, 64)
        first = prompts.chunk(prompt, dialect, TOK, pad_id=0)
        ids, _ = first.tensors()
        ref_pooled = sdxl.encode_ids(ids[:1], encoder=2).pooled_projected[0]
        assert diff(cond.pooled[0], ref_pooled) <= TOL
    cond = encode_prompts(sdxl, "a fox", dialect="diffusers")
    ref = torch.cat([sdxl.encode(["a fox"], encoder=e).hidden[0] for e in (1, 2)], -1)
    assert diff(cond.hidden[0], ref) == 0
    assert diff(cond.pooled[0], sdxl.encode(["a fox"], encoder=2).pooled_projected[0]) == 0


def test_compel_pools_the_raw_text(sdxl):
    prompt = "a fox++ in the (snow)0.7"
    cond = encode_prompts(sdxl, prompt, dialect="compel")
    assert diff(cond.pooled[0], sdxl.encode([prompt], encoder=2).pooled_projected[0]) == 0


def test_sdxl_empty_negative(sdxl):
    zeros = encode_prompts(sdxl, "a fox", dialect="a1111")  # A1111: an empty SDXL negative is all zeros
    assert zeros.negative_hidden.shape == (1, 77, 112) and not zeros.negative_hidden.any()
    assert not zeros.negative_pooled.any()
    assert not encode_prompts(sdxl, "a fox", negative="", dialect="a1111").negative_hidden.any()
    assert not encode_prompts(sdxl, "a fox", dialect="diffusers").negative_hidden.any()  # force_zeros_for_empty_prompt
    for dialect in ("diffusers", "comfy", "compel"):  # an explicit "" is encoded
        cond = encode_prompts(sdxl, "a fox", negative="", dialect=dialect)
        ref = torch.cat([empty_row(sdxl, e) for e in (1, 2)], -1)
        assert diff(cond.negative_hidden[0], ref) <= TOL, dialect


def test_refiner_and_sd3_shapes():
    refiner = condfakes.encoder("sdxl-refiner", (64,))
    cond = encode_prompts(refiner, "a fox", dialect="a1111")
    assert cond.hidden.shape == (1, 77, 64) and cond.pooled.shape == (1, 64) and not cond.negative_pooled.any()
    sd3 = condfakes.encoder("sd3", (48, 64))
    cond = encode_prompts(sd3, "a fox", dialect="comfy")
    assert cond.hidden.shape == (1, 77, 112) and cond.pooled.shape == (1, 112)  # clip_l | clip_g, both pooled


# --- outputs --------------------------------------------------------------------------------------------------


def test_outputs(sd1, sdxl):
    cond = encode_prompts(sd1, ["a", "b"], negative=["x", "y"], dialect="a1111")
    assert set(cond.to_diffusers()) == {"prompt_embeds", "negative_prompt_embeds"}
    positive, negative = cond.to_comfy()
    assert positive[0][0] is cond.hidden and positive[0][1] == {} and negative[0][0] is cond.negative_hidden
    cond = encode_prompts(sdxl, "a", dialect="comfy")
    kwargs = cond.to_diffusers()
    assert set(kwargs) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    positive, negative = cond.to_comfy()
    assert positive[0][1]["pooled_output"] is cond.pooled and negative[0][1]["pooled_output"] is cond.negative_pooled


def test_bad_requests(sd1):
    with pytest.raises(BadInput, match="dialect"):
        Conditioner(sd1, "midjourney")
    with pytest.raises(BadInput, match="emphasis"):
        Conditioner(sd1, "a1111", emphasis="loud")
    with pytest.raises(BadInput, match="2 negative prompts for 3"):
        encode_prompts(sd1, ["a", "b", "c"], negative=["x", "y"])
    with pytest.raises(BadInput, match="string"):
        encode_prompts(sd1, [3])  # type: ignore[list-item]


def test_no_autograd_and_no_weight_change(sd1):
    before = {k: v.clone() for k, v in sd1.towers[0].state_dict().items()}
    cond = encode_prompts(sd1, "a (b:1.2)", dialect="compel")
    assert not cond.hidden.requires_grad
    assert all(torch.equal(v, sd1.towers[0].state_dict()[k]) for k, v in before.items())


def test_downweight_factor_is_compels():
    from sdclip.conditioning import _downweight_factor

    assert _downweight_factor(0.5) == pytest.approx(1.0)
    assert _downweight_factor(1.0) == 0.0
    assert _downweight_factor(0.0) == math.tan((1 - 1e-5) * math.pi / 2)


def test_warnings_are_quiet_for_plain_prompts(sd1):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dialect in ("a1111", "comfy", "compel", "diffusers"):
            encode_prompts(sd1, "a cat", negative="blurry", dialect=dialect)


# --- the command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """A diffusers SDXL folder: CLIP-L-like (width 32) and bigG-like (width 48, projection, pad "!") encoders."""
    l_model = randomize(CLIPTextModel(condfakes.hf_config(32, 2)).eval(), 1)
    g_model = randomize(CLIPTextModelWithProjection(condfakes.hf_config(48, 2, 48, "gelu")).eval(), 2)
    return layouts.write_pipeline(
        tmp_path_factory.mktemp("xl"),
        "StableDiffusionXLPipeline",
        [(l_model, False, "<|endoftext|>"), (g_model, True, "!")],
    )


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_cli_encode_with_a_dialect(capsys, xl_folder, tmp_path):
    prompts_ = ["a (red:1.2) fox", "a cat " * 30]
    out = tmp_path / "cond.safetensors"
    assert (
        main(["encode", *prompts_, "-m", str(xl_folder), "--dialect", "a1111", "--negative", "blurry", "-o", str(out)])
        == 0
    )
    tensors, meta = read(out)
    want = encode_prompts(sdclip.load(xl_folder), prompts_, negative="blurry", dialect="a1111")
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "hidden": [2, 77, 80],
        "pooled": [2, 48],
        "negative_hidden": [2, 77, 80],
        "negative_pooled": [2, 48],
    }
    for name in tensors:
        assert torch.equal(tensors[name], getattr(want, name)), name
    assert (meta["dialect"], meta["family"], json.loads(meta["negative"])) == ("a1111", "sdxl", "blurry")
    negatives = tmp_path / "neg.txt"
    negatives.write_text("ugly\nblurry\n")
    assert (
        main(
            [
                "encode",
                *prompts_,
                "-m",
                str(xl_folder),
                "-d",
                "comfy",
                "--negative-file",
                str(negatives),
                "--clip-skip",
                "-1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    tensors, _ = read(out)
    want = encode_prompts(sdclip.load(xl_folder), prompts_, negative=["ugly", "blurry"], dialect="comfy", clip_skip=-1)
    assert torch.equal(tensors["negative_hidden"], want.negative_hidden)
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--negative", "x"], "need --dialect"),
        (["--dialect", "a1111", "--layer", "-2"], "--clip-skip"),
        (["--dialect", "a1111", "--negative", "x", "--negative-file", "f"], "not both"),
        (["--dialect", "diffusers", "--clip-skip", "9"], "does not have"),
    ],
)
def test_cli_encode_refusals(capsys, xl_folder, tmp_path, argv, words):
    code = main(["encode", "a cat", "-m", str(xl_folder), "-o", str(tmp_path / "x.safetensors"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
