"""sdclip's conditioning against the real peers on the same weights: compel (PyPI) and diffusers pipelines.

Tiny random-weight diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` are built offline from
configs and saved with ``save_pretrained``; ``sdclip.load`` reads the same folders.  compel must give the same
conditioning (max |Δ| <= 1e-5) on 100+ prompts; a pipeline fed ``to_diffusers()`` must give bit-identical
latents to the pipeline encoding the prompt itself.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
compel = pytest.importorskip("compel")

import condfakes  # noqa: E402
import layouts  # noqa: E402
from clipfakes import randomize  # noqa: E402
from compel import Compel, ReturnedEmbeddingsType  # noqa: E402
from compel.embeddings_provider import EmbeddingsProvider  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

import sdclip  # noqa: E402
from sdclip import Conditioner, encode_prompts  # noqa: E402

TOLERANCE = 1e-5
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # numpy / pyparsing notices inside peers
    pytest.mark.filterwarnings("ignore:.*truncated:UserWarning"),
]  # the long prompts, as diffusers warns
diffusers_logging.set_verbosity_error()  # truncation notices for the long prompts
transformers_logging.set_verbosity_error()


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2,
    )


def _unet(cross_attention_dim: int, **xl) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=2,
        **xl,
    )


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD1-style pipeline (text encoder width 32, 3 layers), saved and reloaded, and sdclip on its folder."""
    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(layouts.write_tokenizer(folder / "tok"))
    pipe = StableDiffusionPipeline(
        unet=_unet(32),
        vae=_vae(),
        text_encoder=randomize(CLIPTextModel(condfakes.hf_config(32, 3)).eval()),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe, sdclip.load(folder / "pipe"), folder


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL pipeline: CLIP-L-like encoder (pad EOS) + bigG-like encoder with projection (pad "!")."""
    folder = tmp_path_factory.mktemp("xl")
    torch.manual_seed(0)
    unet = _unet(
        64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    )  # 32 pooled + 6 time ids x 8
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=randomize(CLIPTextModel(condfakes.hf_config(32, 3)).eval(), 1),
        text_encoder_2=randomize(CLIPTextModelWithProjection(condfakes.hf_config(32, 3, 32, "gelu")).eval(), 2),
        tokenizer=CLIPTokenizer.from_pretrained(layouts.write_tokenizer(folder / "tok")),
        tokenizer_2=CLIPTokenizer.from_pretrained(layouts.write_tokenizer(folder / "tok2", pad="!")),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
        ),
    )
    pipe.save_pretrained(folder / "pipe")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    te = sdclip.load(folder / "pipe")
    assert te.family == "sdxl" and [t.config.pad_id for t in te.towers] == [49407, 0]
    return pipe, te


def latents(pipe, **kwargs) -> torch.Tensor:
    prompt, negative = kwargs.get("prompt"), kwargs.get("negative_prompt")
    if isinstance(prompt, list) and isinstance(negative, str):  # diffusers wants the same type for both
        kwargs["negative_prompt"] = [negative] * len(prompt)
    return pipe(
        num_inference_steps=2,
        output_type="latent",
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- diffusers pipelines: bit-identical latents ---------------------------------------------------------------

LONG = "a castle on a hill, " + "tall towers, " * 40


@pytest.mark.parametrize(
    "prompt, negative, clip_skip",
    [
        ("a photo of a cat", None, None),
        (["a (red:1.2) dog, detailed", "a cat+"], "blurry, lowres", None),
        (["a photo of a cat", "a cat at night"], ["x", "y"], 1),
        (LONG, "ugly", 2),
    ],
)
def test_sd_pipeline_latents(sd, prompt, negative, clip_skip):
    pipe, te, _ = sd
    cond = encode_prompts(te, prompt, negative=negative, dialect="diffusers", clip_skip=clip_skip)
    assert torch.equal(
        latents(pipe, prompt=prompt, negative_prompt=negative, clip_skip=clip_skip),
        latents(pipe, **cond.to_diffusers()),
    )


@pytest.mark.parametrize(
    "prompt, negative, clip_skip",
    [
        ("a photo of a cat", None, None),  # force_zeros_for_empty_prompt: zeros
        ("a photo of a cat", "", None),  # an explicit "" is encoded
        (["a (red:1.2) dog", "a bird"], "blurry", 1),
        (LONG, "ugly", None),
    ],
)
def test_sdxl_pipeline_latents(xl, prompt, negative, clip_skip):
    """A list of prompts: diffusers projects their pooled outputs in one product, whose rounding depends on the
    batch; sdclip projects each prompt on its own (its answer never depends on its companions), which is what
    diffusers computes for each prompt given alone."""
    pipe, te = xl
    cond = encode_prompts(te, prompt, negative=negative, dialect="diffusers", clip_skip=clip_skip)
    assert cond.hidden.shape[-1] == 64 and cond.pooled.shape[-1] == 32
    if isinstance(prompt, list):
        negatives = negative if isinstance(negative, list) else [negative] * len(prompt)
        with torch.no_grad():
            each = [
                pipe.encode_prompt(p, device=torch.device("cpu"), negative_prompt=n, clip_skip=clip_skip)
                for p, n in zip(prompt, negatives)
            ]
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        reference = latents(pipe, **{name: torch.cat([e[i] for e in each]) for i, name in enumerate(names)})
    else:
        reference = latents(pipe, prompt=prompt, negative_prompt=negative, clip_skip=clip_skip)
    assert torch.equal(reference, latents(pipe, **cond.to_diffusers()))


def test_textual_inversion_latents(sd, tmp_path):
    """diffusers' load_textual_inversion (vocabulary tokens <tok>, <tok>_1) against sdclip's slot injection."""
    pipe, te, folder = sd
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 0.1}, file)
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(file))
    prompt = "a <cat-toy> on a hill"
    cond = encode_prompts(te, prompt, negative="a <cat-toy>", dialect="diffusers", embeddings=file)
    assert torch.equal(
        latents(pipe, prompt=prompt, negative_prompt="a <cat-toy>"), latents(pipe, **cond.to_diffusers())
    )
    assert not torch.equal(cond.hidden, encode_prompts(te, prompt).hidden)


# --- compel -----------------------------------------------------------------------------------------------------

WORDS = (
    "cat dog castle forest astronaut portrait cinematic lighting watercolor ancient city river mountain "
    "sunset neon detailed photograph painting the with and of blue red"
).split()


def compel_prompts(n: int, seed: int = 0) -> list[str]:
    """compel syntax: +/- runs, (words)weight, nesting, commas and sentences; some fragments below 1."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def fragment(depth: int = 0) -> str:
        r = rng.random()
        if r < 0.35:
            return words(rng.randint(1, 3))
        if r < 0.55:
            return rng.choice(WORDS) + rng.choice(["+", "++", "-", "--", "+++"])
        if r < 0.85 or depth:
            return f"({words(rng.randint(1, 4))}){rng.choice(['1.3', '0.5', '0.2', '1.1', '0.8', '+', '-'])}"
        return f"({fragment(1)} {words(1)}){rng.choice(['1.2', '0.7'])}"

    return [rng.choice([" ", ", ", ". "]).join(fragment() for _ in range(rng.randint(1, 7))) for _ in range(n)]


def long_compel_prompts() -> list[str]:
    return [
        "a photo of a cat sitting on a mat. " * 6 + "(blurry)0.5",
        "(" + "many words without punctuation " * 14 + ")0.6 and a tail",  # across chunks; cut when truncating
        "a, b, " * 30 + "(soft light)0.3, " + "x " * 20,
        "(a long weighted fragment of many words)1.2 " * 12 + "and the rest. " * 3,
        "(start)0.4 " + "word " * 150 + "(end)0.5",
        "x " * 74 + "(cut here now)0.5",  # the fragment straddles position 75: the EOS is masked too
        "x " * 73 + "(sunny day)0.2",
    ]


@pytest.fixture(scope="module")
def compel_sd1(sd):
    pipe, te, _ = sd
    return pipe.tokenizer, pipe.text_encoder, te


@pytest.mark.parametrize("truncate", [True, False])
def test_compel_many_prompts(compel_sd1, truncate):
    tokenizer, text_encoder, te = compel_sd1
    reference = Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=truncate)
    ours = Conditioner(te, "compel", truncate=truncate)
    prompts = (
        compel_prompts(110 if truncate else 40)
        + long_compel_prompts()
        + [
            '("a cat on a hill", "a dog")0.5.and()',
            '("a forest", "fog++").and(1, 0.3)',
            '("a castle on a hill", "a watercolor painting").and(0.6, 1.4)',
            "",
            "a cat",
            "(a cat)0.0001",
        ]
    )
    worst = 0.0
    for prompt in prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = reference(prompt)[0]
        got = ours.encode(prompt).hidden[0]
        worst = max(worst, diff(got, want))
    assert worst <= TOLERANCE, worst


def test_compel_batch_and_negative_padding(compel_sd1):
    tokenizer, text_encoder, te = compel_sd1
    reference = Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False)
    batch = ["a cat", "word " * 100, "(a dog)0.5 " + "word " * 160]
    want = reference(batch)
    negative = reference.build_conditioning_tensor("blurry")
    [padded_negative, _] = reference.pad_conditioning_tensors_to_same_length([negative, want[2:]])
    got = encode_prompts(te, batch, negative="blurry", dialect="compel", truncate=False)
    assert diff(got.hidden, want) <= TOLERANCE
    assert diff(got.negative_hidden[0], padded_negative[0]) <= TOLERANCE


def test_compel_clip_skip(compel_sd1):
    tokenizer, text_encoder, te = compel_sd1
    reference = Compel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
    )
    for prompt in compel_prompts(8, seed=1):
        got = encode_prompts(te, prompt, dialect="compel", clip_skip=1).hidden[0]
        assert diff(got, reference(prompt)[0]) <= TOLERANCE


def test_compel_blend(compel_sd1):
    """compel 2.3.1 fails on .blend() (a keyword its own helper lacks), so the reference is assembled from its
    parts exactly as its _get_conditioning_for_blend does: pad with the empty prompt, weighted sum."""
    tokenizer, text_encoder, te = compel_sd1
    reference = Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=False)
    for parts, weights, normalize in (
        (("a cat", "a (dog)0.5"), (0.7, 0.3), True),
        (("a castle", "word " * 100), (1.0, 2.0), False),
    ):
        conds = reference.pad_conditioning_tensors_to_same_length([reference(p) for p in parts])
        want = EmbeddingsProvider.apply_embedding_weights(torch.cat(conds).unsqueeze(0), list(weights), normalize)
        quoted = ", ".join(f'"{p}"' for p in parts)
        prompt = f"({quoted}).blend({', '.join(map(str, weights))}{'' if normalize else ', no_normalize'})"
        got = encode_prompts(te, prompt, dialect="compel", truncate=False).hidden
        assert diff(got, want) <= TOLERANCE


def test_compel_sdxl(xl):
    pipe, te = xl
    reference = Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
    )
    for prompt in compel_prompts(6, seed=2) + ["(a cat)0.3 on a mat++, " + "word " * 80]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want, want_pooled = reference(prompt)
        got = encode_prompts(te, prompt, dialect="compel")
        assert diff(got.hidden, want) <= TOLERANCE
        assert diff(got.pooled, want_pooled) <= TOLERANCE
