"""Reference text towers for the checkpoint, encoder and hub tests: transformers models with random
weights built offline from a ``CLIPTextConfig``, their outputs on a fixed prompt set, and the
comparison of sdclip's outputs against them.

Weights are rounded to fp16 once at construction, so one reference serves the fp32 and the fp16
layouts (OpenAI ``.pt``, ``model.fp16.safetensors``) alike: loading an fp16 file in fp32 is then exact.
Layer norms and biases get random values too, so a mixed-up LayerNorm or bias cannot go unseen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import sdclip

TOLERANCE = 1e-5  # max |Δ| in fp32 against transformers


@dataclass(frozen=True)
class Arch:
    """One tower shape, as transformers' CLIPTextConfig numbers."""

    width: int
    layers: int
    heads: int
    mlp: int
    activation: str
    projection: int
    pad: int  # the pad id Stable Diffusion uses with this tower

    def config(self, **overrides) -> CLIPTextConfig:
        values = dict(
            vocab_size=49408,
            hidden_size=self.width,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=77,
            hidden_act=self.activation,
            projection_dim=self.projection,
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            attn_implementation="eager",
        )
        values.update(overrides)
        return CLIPTextConfig(**values)


ARCHS = {
    "L": Arch(768, 12, 12, 3072, "quick_gelu", 768, 49407),  # CLIP ViT-L/14 at full size (SD1, SDXL enc 1)
    "L2": Arch(768, 2, 12, 3072, "quick_gelu", 768, 49407),  # the same width, 2 layers: the layout matrix
    "H": Arch(1024, 2, 16, 4096, "gelu", 1024, 0),  # OpenCLIP ViT-H/14 width, 2 layers (SD2's 24)
    "G": Arch(1280, 2, 20, 5120, "gelu", 1280, 0),  # OpenCLIP ViT-bigG/14 width, 2 layers (SDXL enc 2)
    "B": Arch(512, 12, 8, 2048, "quick_gelu", 512, 49407),  # CLIP ViT-B/32, B/16 text at full size
}
VIT_L_PARAMETERS = 123_060_480  # CLIPTextModel ViT-L/14 without projection (reference doc §2)

_WORDS = (
    "cat dog castle forest astronaut portrait cinematic lighting watercolor ancient city river "
    "mountain sunset neon cyberpunk detailed 8k photograph oil painting of a the with and by"
).split()


def _prompts() -> list[str]:
    fixed = [
        "",
        " ",
        "a",
        "cat",
        "a photo of a cat",
        "A Photo Of A CAT!!",
        "an astronaut riding a horse on mars",
        "masterpiece, best quality, (extremely detailed:1.2), 1girl, solo, looking at viewer",
        "a [dog|cat] in the (rain), [[blurry]], {hat}",
        "photo of <|endoftext|> a dog",
        "<|startoftext|>explicit specials<|endoftext|> and more",
        "3.14159 2718 1,000,000 42%",
        "naïve café crème brûlée",
        "東京の夜景、ネオン",
        "красивый пейзаж",
        "🐱🐶🦄 emoji party 🎉",
        "don't won't it's we're they've i'm you'll she'd",
        "&amp; &lt;b&gt; html &quot;entities&quot;",
        "tab\tseparated\nnew line  double  space",
        "!!!???...,,,;;;:::",
        "a" * 200,
        " ".join(["word"] * 80),
        " ".join(["supercalifragilistic"] * 30),
        "lorem ipsum dolor sit amet, " * 12,
        "a very long prompt " + "with many many details, " * 20,
        "ÆØÅ æøå ß ẞ ĳ œ",
        "mixed CASE and UPPER and lower",
        "https://example.com/path?x=1&y=2",
        "snake_case_words and kebab-case-words",
        "#hashtag @mention $dollar ^caret ~tilde `backtick`",
        "   leading and trailing spaces   ",
        "\u00a0non-breaking\u00a0spaces\u2003em space",
        "a photo of a cat, trending on artstation, by greg rutkowski",
        "zebra " * 74,
        "zebra " * 75,
        "zebra " * 76,  # around the 75-token limit
    ]
    rng = random.Random(1234)
    generated = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 100))) for _ in range(28)]
    return fixed + generated


PROMPTS = _prompts()
assert len(PROMPTS) == 64


def ids_for(pad: int, prompts: list[str] = PROMPTS) -> torch.Tensor:
    """[B, 77] ids from sdclip's tokenizer (transformers 4.x cleaning), padded with ``pad``."""
    return sdclip.Tokenizer()(prompts, pad_id=pad)


def build(arch: Arch, seed: int = 0, **config_overrides) -> CLIPTextModelWithProjection:
    """A transformers tower with random, fp16-exact weights (every LayerNorm and bias random too)."""
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(arch.config(**config_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())
    return model.requires_grad_(False)


@dataclass
class Reference:
    """transformers' outputs for one batch of ids."""

    ids: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    text_embeds: torch.Tensor


def reference(model: CLIPTextModelWithProjection, ids: torch.Tensor) -> Reference:
    """One forward of ``model``: every hidden state, last_hidden_state, text_embeds and (captured from
    the inner CLIPTextTransformer) pooler_output."""
    captured = {}

    def capture(module, args, out) -> None:
        captured["pooler"] = out.pooler_output

    hook = model.text_model.register_forward_hook(capture)
    try:
        with torch.inference_mode():
            out = model(ids, output_hidden_states=True)
    finally:
        hook.remove()
    return Reference(ids, out.hidden_states, out.last_hidden_state, captured["pooler"], out.text_embeds)


def drop_last_layer(model: CLIPTextModelWithProjection) -> CLIPTextModelWithProjection:
    """The same tower without its last block, as transformers runs it (diffusers' 23-layer SD2)."""
    config = model.config.to_dict()
    config["num_hidden_layers"] -= 1
    short = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    short.load_state_dict(
        {k: v for k, v in model.state_dict().items() if f"layers.{model.config.num_hidden_layers - 1}." not in k}
    )
    return short.requires_grad_(False)


def hidden_state(model: CLIPTextModelWithProjection, ref: Reference, layer: int, final_norm: bool) -> torch.Tensor:
    """transformers' hidden state ``layer`` (a Python index into hidden_states), final LN applied or not."""
    h = ref.hidden_states[layer]
    with torch.inference_mode():
        return model.text_model.final_layer_norm(h) if final_norm else h


def sdclip_outputs(tower: sdclip.TextTransformer, ids: torch.Tensor) -> dict[str, torch.Tensor | tuple]:
    """sdclip's counterparts of transformers' outputs, from one forward pass."""
    with torch.inference_mode():
        out = tower(ids, layer=-1, final_norm=True, output_hidden_states=True)
    return {
        "hidden_states": out.hidden_states,
        "last_hidden_state": out.hidden,
        "pooler_output": out.pooled,
        "text_embeds": out.pooled_projected,
    }


def max_diffs(tower: sdclip.TextTransformer, ref: Reference, *, projection: bool = True) -> dict[str, float]:
    """max |Δ| per output (hidden states: the worst layer) of ``tower`` against ``ref``."""
    ours = sdclip_outputs(tower, ref.ids)
    assert len(ours["hidden_states"]) == len(ref.hidden_states), "number of hidden states"
    diffs = {
        "hidden_states": max(_diff(a, b) for a, b in zip(ours["hidden_states"], ref.hidden_states)),
        "last_hidden_state": _diff(ours["last_hidden_state"], ref.last_hidden_state),
        "pooler_output": _diff(ours["pooler_output"], ref.pooler_output),
    }
    if projection:
        assert ours["text_embeds"] is not None, "the tower lost its projection"
        diffs["text_embeds"] = _diff(ours["text_embeds"], ref.text_embeds)
    else:
        assert ours["text_embeds"] is None, "the tower has a projection the file does not hold"
    return diffs


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_close(diffs: dict[str, float], tolerance: float = TOLERANCE) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    assert not bad, f"max |Δ| above {tolerance}: {bad}"
