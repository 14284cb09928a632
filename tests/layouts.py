"""Write a transformers CLIP text tower in every weights layout Stable Diffusion users hold.

Each writer takes a ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and writes one layout the way
the tool that makes it does (reference doc §5): transformers' own ``save_pretrained`` for folders,
hand-built key layouts for single files, TorchScript for OpenAI ``.pt``.  The OpenCLIP layout is
written from the transformers tensors here (q|k|v rows fused, projection transposed); the
``OpenAIText`` module checks that layout against ``torch.nn.MultiheadAttention``'s semantics, so it
does not rest on sdclip's own name table.
"""

import copy
import hashlib
import json
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

import sdclip

TextModel = CLIPTextModel | CLIPTextModelWithProjection
FILLER_SHAPES = {  # U-Net / VAE / scheduler tensors a real checkpoint carries beside its text encoder
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": (3,),
    "alphas_cumprod": (1000,),
}


# --- tensors under each naming scheme ---------------------------------------------------------


def hf_tensors(model: TextModel, *, projection: bool = True) -> dict[str, torch.Tensor]:
    """transformers' own names: ``text_model.*`` and, with a projection, ``text_projection.weight``."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not projection:
        state.pop("text_projection.weight", None)
    return state


def position_ids(dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The ``position_ids`` buffer older transformers saved (float after some merges)."""
    return torch.arange(77, dtype=dtype)[None]


def openclip_tensors(model: TextModel, *, projection: str | None = "matmul") -> dict[str, torch.Tensor]:
    """The OpenCLIP / OpenAI text names.

    ``projection``: ``"matmul"`` = ``text_projection`` [width, out] used as x @ P (OpenCLIP, OpenAI);
    ``"linear"`` = ``text_projection`` holding the Linear weight [out, width] (kohya SDXL TE2);
    ``"linear_named"`` = ``text_projection.weight`` [out, width] (Playground); ``"ones"`` = kohya SD2's
    all-ones placeholder; ``None`` = no projection (SD2 fine-tunes converted from diffusers).
    """
    hf = hf_tensors(model)
    t = "text_model."
    out = {
        "token_embedding.weight": hf[t + "embeddings.token_embedding.weight"],
        "positional_embedding": hf[t + "embeddings.position_embedding.weight"],
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}ln_1.{p}"] = hf[f"{src}layer_norm1.{p}"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([hf[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[f"{dst}attn.out_proj.{p}"] = hf[f"{src}self_attn.out_proj.{p}"]
            out[f"{dst}ln_2.{p}"] = hf[f"{src}layer_norm2.{p}"]
            out[f"{dst}mlp.c_fc.{p}"] = hf[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.c_proj.{p}"] = hf[f"{src}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = hf[f"{t}final_layer_norm.{p}"]
    weight = hf.get("text_projection.weight")
    if projection == "matmul":
        out["text_projection"] = weight.t().contiguous()
    elif projection == "linear":
        out["text_projection"] = weight
    elif projection == "linear_named":
        out["text_projection.weight"] = weight
    elif projection == "ones":
        out["text_projection"] = torch.ones(model.config.hidden_size, model.config.hidden_size)
    elif projection is not None:
        raise ValueError(projection)
    return out


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def filler(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in FILLER_SHAPES.items()}


def _save(tensors: dict[str, torch.Tensor], path: Path, **ckpt: object) -> Path:
    """``.safetensors`` by name, else a torch pickle of ``{"state_dict": ..., **ckpt}`` (Lightning style)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save({"state_dict": tensors, **ckpt}, path)
    return path


# --- Hugging Face / diffusers folders -----------------------------------------------------------


def text_model(model: TextModel, *, projection: bool = True) -> TextModel:
    """The tower as the transformers class a folder would hold (CLIPTextModel when no projection)."""
    if projection or isinstance(model, CLIPTextModel):
        return model
    plain = CLIPTextModel(model.config).eval()
    plain.load_state_dict(hf_tensors(model, projection=False))
    return plain


def write_hf_folder(
    model: TextModel,
    folder: Path,
    *,
    weights: str = "model.safetensors",
    projection: bool = True,
    flat: bool = False,
    position_ids_dtype: torch.dtype | None = None,
) -> Path:
    """A transformers folder: ``config.json`` + one of ``model.safetensors``, ``model.fp16.safetensors``
    (and no fp32 file), ``pytorch_model.bin``, or sharded safetensors (``weights="sharded"``).

    ``flat`` writes the keys without ``text_model.`` as transformers >= 5.6 saves CLIPTextModel;
    ``position_ids_dtype`` adds the stored ``position_ids`` older versions wrote.
    """
    folder.mkdir(parents=True, exist_ok=True)
    m = text_model(model, projection=projection)
    if weights == "sharded":
        m.save_pretrained(folder, max_shard_size="20MB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif weights == "model.fp16.safetensors":
        copy.deepcopy(m).half().save_pretrained(folder, variant="fp16")
    elif weights == "pytorch_model.bin":
        m.save_pretrained(folder, safe_serialization=False)
    elif weights == "model.safetensors":
        m.save_pretrained(folder)
    else:
        raise ValueError(weights)
    if flat or position_ids_dtype is not None:
        tensors = hf_tensors(m, projection=projection)
        if position_ids_dtype is not None:
            tensors["text_model.embeddings.position_ids"] = position_ids(position_ids_dtype)
        if flat:
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        target = folder / weights
        if weights == "pytorch_model.bin":
            torch.save(tensors, target)
        else:
            assert weights == "model.safetensors", "flat / position_ids variants: one-file layouts only"
            save_file(tensors, str(target))
    return folder


_VOCAB: dict[str, bytes] = {}


def write_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> Path:
    """A transformers CLIPTokenizer folder: vocab.json, merges.txt, special_tokens_map.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _VOCAB:
        tmp = folder / ".tok"
        sdclip.Tokenizer().save_hf(tmp)
        _VOCAB.update({n: (tmp / n).read_bytes() for n in ("vocab.json", "merges.txt")})
        shutil.rmtree(tmp)
    for name, data in _VOCAB.items():
        (folder / name).write_bytes(data)
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials})
    )
    return folder


def write_pipeline(folder: Path, pipeline: str, encoders: list[tuple[TextModel, bool, str]]) -> Path:
    """A diffusers pipeline folder: ``model_index.json``, ``text_encoder/`` + ``tokenizer/`` and, for a
    second encoder, ``text_encoder_2/`` + ``tokenizer_2/``.  ``encoders``: (model, with projection,
    tokenizer pad token) each."""
    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.39.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for n, (model, projection, pad) in enumerate(encoders):
        suffix = "" if n == 0 else f"_{n + 1}"
        write_hf_folder(model, folder / f"text_encoder{suffix}", projection=projection)
        write_tokenizer(folder / f"tokenizer{suffix}", pad)
        index[f"text_encoder{suffix}"] = [
            "transformers",
            "CLIPTextModelWithProjection" if projection else "CLIPTextModel",
        ]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_clip_repo(model: TextModel, folder: Path) -> Path:
    """An ``openai/clip-vit-large-patch14``-style folder: a whole CLIPModel (tiny vision tower) in
    ``model.safetensors`` with ``config.json`` nesting the text config, the tokenizer files beside."""
    text = model.config.to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    clip = CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.config.projection_dim)
    ).eval()
    state = clip.state_dict()
    state.update(hf_tensors(model))
    clip.load_state_dict(state)
    clip.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


# --- single files -------------------------------------------------------------------------------


def write_sd1(model: TextModel, path: Path, *, old: bool = False) -> Path:
    """SD1 single file: ``cond_stage_model.transformer.text_model.*`` (``old``: without ``text_model.``)
    with float ``position_ids``, U-Net / VAE filler; ``.ckpt`` = a Lightning-style pickle."""
    tensors = hf_tensors(model, projection=False)
    tensors["text_model.embeddings.position_ids"] = position_ids(torch.float32)
    if old:
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return _save({**filler(), **prefixed("cond_stage_model.transformer.", tensors)}, path, epoch=6, global_step=840000)


def write_sd2(model: TextModel, path: Path, *, projection: str | None = "matmul") -> Path:
    """SD2 single file: every block of the tower in OpenCLIP layout under ``cond_stage_model.model.``
    (SD2 feeds its U-Net the penultimate one), ``logit_scale``, filler."""
    tensors = openclip_tensors(model, projection=projection)
    tensors["logit_scale"] = torch.tensor(4.6052)
    return _save({**filler(), **prefixed("cond_stage_model.model.", tensors)}, path)


def write_kohya_sd2(model: TextModel, path: Path) -> Path:
    """kohya sd-scripts' SD2 save of a diffusers (one block short) tower: a dummy last block copied
    from the one before, ``text_projection`` all ones, an integer ``logit_scale``."""
    tensors = openclip_tensors(model, projection="ones")
    last = model.config.num_hidden_layers - 1
    for k in list(tensors):
        if k.startswith(f"transformer.resblocks.{last}."):
            tensors[k.replace(f".{last}.", f".{last + 1}.")] = tensors[k].clone()
    tensors["logit_scale"] = torch.tensor(1)
    return _save({**filler(), **prefixed("cond_stage_model.model.", tensors)}, path)


def write_sdxl(clip_l: TextModel, clip_g: TextModel, path: Path, *, g_projection: str = "matmul") -> Path:
    """SDXL base single file: CLIP-L in HF layout at ``conditioner.embedders.0.transformer.``, bigG in
    OpenCLIP layout at ``conditioner.embedders.1.model.`` (``g_projection="linear"``: kohya's save)."""
    l_tensors = hf_tensors(clip_l, projection=False)
    l_tensors["text_model.embeddings.position_ids"] = position_ids()
    g_tensors = openclip_tensors(clip_g, projection=g_projection)
    g_tensors["logit_scale"] = torch.tensor(4.6052)
    return _save(
        {
            **filler(),
            **prefixed("conditioner.embedders.0.transformer.", l_tensors),
            **prefixed("conditioner.embedders.1.model.", g_tensors),
        },
        path,
    )


def write_sdxl_refiner(clip_g: TextModel, path: Path) -> Path:
    """SDXL refiner single file: only bigG, at ``conditioner.embedders.0.model.``."""
    g_tensors = openclip_tensors(clip_g)
    g_tensors["logit_scale"] = torch.tensor(4.6052)
    return _save({**filler(), **prefixed("conditioner.embedders.0.model.", g_tensors)}, path)


def write_sd3(clip_l: TextModel, clip_g: TextModel, path: Path) -> Path:
    """SD3-style file: both towers in HF layout with projections under ``text_encoders.clip_{l,g}.transformer.``
    and a T5 filler tensor."""
    tensors = {
        **filler(),
        "text_encoders.t5xxl.transformer.shared.weight": torch.randn(64, 16),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(16, 16),
    }
    for name, model in (("clip_l", clip_l), ("clip_g", clip_g)):
        tensors.update(prefixed(f"text_encoders.{name}.transformer.", hf_tensors(model)))
    return _save(tensors, path)


def write_comfy_clip(model: TextModel, path: Path) -> Path:
    """ComfyUI CLIPSave output for one encoder: HF names, ``text_projection.weight``, ``logit_scale``."""
    tensors = hf_tensors(model)
    tensors["logit_scale"] = torch.tensor(4.6052)
    tensors["text_model.embeddings.position_ids"] = position_ids()
    return _save(tensors, path)


def write_open_clip(model: TextModel, path: Path, *, variant: str = "plain") -> Path:
    """open_clip checkpoints: ``plain`` state dict, ``ddp`` training checkpoint
    ``{"epoch", "state_dict": {"module.*"}}``, ``custom`` CustomTextCLIP (``text.*``)."""
    text = openclip_tensors(model)
    other = {
        "logit_scale": torch.tensor(4.6052),
        "visual.conv1.weight": torch.randn(8, 3, 4, 4),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
        "visual.proj": torch.randn(8, model.config.projection_dim),
    }
    if variant == "custom":
        tensors = {**prefixed("text.", text), **other}
    else:
        tensors = {**text, **other}
    path.parent.mkdir(parents=True, exist_ok=True)
    if variant == "ddp":
        torch.save(
            {
                "epoch": 32,
                "name": "run",
                "state_dict": prefixed("module.", tensors),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            },
            path,
        )
    else:
        torch.save(tensors, path)
    return path


# --- OpenAI CLIP TorchScript archive -------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """OpenAI naming: ln_1, attn (nn.MultiheadAttention), ln_2, mlp.c_fc, mlp.c_proj."""

    def __init__(self, width: int, heads: int, mlp: int, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=act, c_proj=nn.Linear(mlp, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int, activation: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    """A token vision tower: only its tensors matter."""

    def __init__(self, output: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 4, 4, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(8))
        self.transformer = Transformer(8, 1, 2, 16, "quick_gelu")
        self.ln_post = nn.LayerNorm(8)
        self.proj = nn.Parameter(torch.randn(8, output))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x).flatten(1)


class OpenAIText(nn.Module):
    """OpenAI CLIP's module tree (text tower + a token ``visual``), written from the computation in
    reference doc §1 with ``nn.MultiheadAttention``: ``encode_text`` is an independent check of the
    OpenCLIP layout ``openclip_tensors`` writes."""

    embed_dim: int

    def __init__(self, model: TextModel):
        super().__init__()
        c = model.config
        self.embed_dim = c.projection_dim
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.positional_embedding = nn.Parameter(torch.empty(c.max_position_embeddings, c.hidden_size))
        self.transformer = Transformer(
            c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act
        )
        self.ln_final = nn.LayerNorm(c.hidden_size)
        self.text_projection = nn.Parameter(torch.empty(c.hidden_size, c.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.visual = Visual(c.projection_dim)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(c.max_position_embeddings))
        self.register_buffer("vocab_size", torch.tensor(c.vocab_size))
        state = self.state_dict()
        state.update(openclip_tensors(model))
        self.load_state_dict(state)
        self.requires_grad_(False)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Projected pooled output: [B, P]."""
        n = ids.shape[1]
        mask = torch.full((n, n), float("-inf"), dtype=self.positional_embedding.dtype).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        x = self.transformer(x.transpose(0, 1), mask).transpose(0, 1)  # nn.MultiheadAttention: [L, B, C]
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode_text(ids)


def write_openai_pt(model: TextModel, path: Path, *, script: bool = False) -> Path:
    """OpenAI's ``ViT-*.pt``: the module tree traced (as OpenAI did; ``script``: scripted), cast to fp16
    and saved as a TorchScript archive."""
    module = OpenAIText(model).eval()
    example = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated, and tracing warns about shape checks
        warnings.simplefilter("ignore")
        jit = torch.jit.script(module) if script else torch.jit.trace(module, example)
        torch.jit.save(jit.half(), str(path))
    return path


# --- Hugging Face hub cache ----------------------------------------------------------------------


def write_hub_cache(
    cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """Lay ``source``'s files out as huggingface_hub caches ``repo_id``: blobs named by content hash,
    ``snapshots/<commit>/`` links to them, ``refs/main`` naming the commit.  Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
