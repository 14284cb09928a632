"""Finding, inferring and reading the CLIP towers in a weights file or folder, whatever layout wrote it.

Two naming schemes cover every layout users hold: the Hugging Face one (``text_model.*`` /
``vision_model.*``: SD1 single files, SDXL encoder 1, diffusers folders, SD3 and ComfyUI files,
CLIPModel files) and the OpenCLIP one (``transformer.resblocks.*`` / ``visual.*``: SD2 and SDXL
encoder 2 single files, OpenAI and open_clip checkpoints).  A tower is found by its first embedding
(token embedding for text, patch embedding for images); the key prefix in front of it says where it
sits and so which Stable Diffusion family the file belongs to.

Both towers go one way: ``find_towers`` -> ``infer`` -> ``build``, each step handing on a frozen
``TowerSpec``.  ``NAMES`` below is the one place that maps foreign tensor names to sdclip's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import families
from .errors import BadInput
from .families import Usage
from .model import TextConfig, TextTransformer
from .tensorfile import TensorFile
from .vision import VisionConfig, VisionTransformer

# sdclip name -> name in each layout, relative to the tower's prefix; a tuple is concatenated
# on dim 0 (transformers keeps q, k and v apart, sdclip fuses them).  The residual blocks are named
# alike in both towers of a CLIP model.  Projections sit apart (``TowerSpec.projection``).
_BLOCK_NAMES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "hf": {
        "blocks.{i}.ln_1.{p}": "encoder.layers.{i}.layer_norm1.{p}",
        "blocks.{i}.attn.qkv.{p}": tuple(f"encoder.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"),
        "blocks.{i}.attn.out.{p}": "encoder.layers.{i}.self_attn.out_proj.{p}",
        "blocks.{i}.ln_2.{p}": "encoder.layers.{i}.layer_norm2.{p}",
        "blocks.{i}.mlp.fc.{p}": "encoder.layers.{i}.mlp.fc1.{p}",
        "blocks.{i}.mlp.proj.{p}": "encoder.layers.{i}.mlp.fc2.{p}",
    },
    "openclip": {
        "blocks.{i}.ln_1.{p}": "transformer.resblocks.{i}.ln_1.{p}",
        "blocks.{i}.attn.qkv.{p}": "transformer.resblocks.{i}.attn.in_proj_{p}",
        "blocks.{i}.attn.out.{p}": "transformer.resblocks.{i}.attn.out_proj.{p}",
        "blocks.{i}.ln_2.{p}": "transformer.resblocks.{i}.ln_2.{p}",
        "blocks.{i}.mlp.fc.{p}": "transformer.resblocks.{i}.mlp.c_fc.{p}",
        "blocks.{i}.mlp.proj.{p}": "transformer.resblocks.{i}.mlp.c_proj.{p}",
    },
}
# tower kind ("text" / "image") -> naming style -> sdclip name -> foreign name(s)
NAMES: dict[str, dict[str, dict[str, str | tuple[str, ...]]]] = {
    "text": {
        "hf": {
            "token_embedding.weight": "embeddings.token_embedding.weight",
            "position_embedding": "embeddings.position_embedding.weight",
            **_BLOCK_NAMES["hf"],
            "final_norm.{p}": "final_layer_norm.{p}",
        },
        "openclip": {
            "token_embedding.weight": "token_embedding.weight",
            "position_embedding": "positional_embedding",
            **_BLOCK_NAMES["openclip"],
            "final_norm.{p}": "ln_final.{p}",
        },
    },
    "image": {
        "hf": {
            "patch_embedding.weight": "embeddings.patch_embedding.weight",
            "class_embedding": "embeddings.class_embedding",
            "position_embedding": "embeddings.position_embedding.weight",
            "pre_norm.{p}": "pre_layrnorm.{p}",  # sic
            **_BLOCK_NAMES["hf"],
            "post_norm.{p}": "post_layernorm.{p}",
        },
        "openclip": {
            "patch_embedding.weight": "conv1.weight",
            "class_embedding": "class_embedding",
            "position_embedding": "positional_embedding",
            "pre_norm.{p}": "ln_pre.{p}",
            **_BLOCK_NAMES["openclip"],
            "post_norm.{p}": "ln_post.{p}",
        },
    },
}
BLOCK_INDEX = {
    "hf": re.compile(r"encoder\.layers\.(\d+)\."),
    "openclip": re.compile(r"transformer\.resblocks\.(\d+)\."),
}


@dataclass(frozen=True)
class TowerSpec:
    """One tower of a file: where it sits (``find_towers``), then its architecture (``infer``).

    Frozen: each step returns a new spec, and ``build`` reads the tensors it names."""

    kind: str  # "text" or "image": the key of ``NAMES`` and ``KINDS``
    style: str  # "hf" or "openclip"
    prefix: str
    file: TensorFile = field(repr=False, compare=False)
    role: str = ""  # a text tower's name by width (``families.ARCHITECTURES``)
    config: TextConfig | VisionConfig | None = None
    notes: tuple[str, ...] = ()
    dropped_block: bool = False  # the file's last block was a placeholder copy (kohya SD2) and is left out

    def key(self, name: str) -> str:
        """The file's key for one sdclip parameter name (a single tensor)."""
        return self.prefix + foreign_names(self.kind, self.style, name)[0]

    def projection(self) -> tuple[str, bool] | None:
        """The projection's key and whether it is stored as a Linear weight [out, in] (else [width, out],
        used as x @ P)."""
        return KINDS[self.kind].projection(self)


def _text_projection(t: TowerSpec) -> tuple[str, bool] | None:
    """OpenCLIP keeps ``text_projection`` [width, out] used as x @ P; transformers a Linear
    ``text_projection.weight``.  kohya and Playground write OpenCLIP files with the Linear
    form, named ``text_projection.weight`` or (when not square) recognisable by shape.  A square
    ``text_projection`` is read as x @ P, as SGM, A1111 and ComfyUI read it: kohya's SDXL saves
    of a diffusers bigG store its Linear weight there, indistinguishably."""
    keys = t.file.keys()
    if t.style == "hf":
        return _hf_projection(t)
    if t.prefix + "text_projection.weight" in keys:
        return t.prefix + "text_projection.weight", True
    key = t.prefix + "text_projection"
    if key not in keys:
        return None
    shape = t.file.shape(key)
    width = t.file.shape(t.key("token_embedding.weight"))[1]
    return key, len(shape) == 2 and shape[0] != width and shape[1] == width


def _hf_projection(t: TowerSpec) -> tuple[str, bool] | None:
    """transformers keeps each projection as a Linear weight beside the tower's namespace."""
    k = KINDS[t.kind]
    key = t.prefix.removesuffix(k.hf_prefix) + k.hf_projection
    return (key, True) if key in t.file.keys() else None


def _image_projection(t: TowerSpec) -> tuple[str, bool] | None:
    """HF keeps a Linear ``visual_projection.weight`` beside ``vision_model.``; OpenAI ``visual.proj``
    [width, out] used as x @ P."""
    if t.style == "hf":
        return _hf_projection(t)
    key = t.prefix + "proj"
    return (key, False) if key in t.file.keys() else None


@dataclass
class CheckpointInfo:
    """What ``sdclip info`` reports about a file or folder."""

    source: str
    layout: str
    family: str
    towers: list[TowerSpec]
    ignored: Counter = field(default_factory=Counter)  # prefix -> number of tensors
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layout": self.layout,
            "family": self.family,
            "files": self.files,
            "encoders": [self._tower_dict(t) for t in self.towers],
            "ignored": dict(self.ignored),
        }

    def _tower_dict(self, t: TowerSpec) -> dict[str, Any]:
        c, usage = t.config, usage_for(self.family, t)
        return {
            "role": t.role,
            "architecture": c.architecture if c else None,  # type: ignore[union-attr]
            "key_prefix": t.prefix,
            "naming": t.style,
            "layers": c.layers if c else None,
            "width": c.width if c else None,
            "heads": c.heads if c else None,
            "mlp_width": c.mlp_width if c else None,
            "activation": c.activation if c else None,
            "projection_dim": c.projection_dim if c else None,
            "pad_id": c.pad_id if c else None,  # type: ignore[union-attr]
            "pooling": c.pooling if c else None,  # type: ignore[union-attr]
            "default_layer": usage.layer,
            "default_final_norm": usage.final_norm,
            "dtype": str(t.file.dtype(t.key("token_embedding.weight"))).removeprefix("torch."),
            "parameters": sum(_numel(t.file.shape(k)) for k in used_keys(t)),
            "notes": list(t.notes),
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- finding towers --------------------------------------------------------------------------


def find_towers(file: TensorFile, kind: str = "text") -> list[TowerSpec]:
    """Every tower of ``kind`` in ``file``: text towers ordered by width (SDXL: CLIP-L first, then bigG),
    image towers in file order."""
    k = KINDS[kind]
    keys = file.keys()
    keyset = set(keys)
    towers = []
    for key in keys:
        for style in ("hf", "openclip"):  # an HF name also ends like the OpenCLIP one: HF first
            anchor = foreign_names(kind, style, k.anchor)[0]
            if not key.endswith(anchor):
                continue
            prefix = key[: -len(anchor)]
            if all(prefix + foreign_names(kind, style, n)[0] in keyset for n in k.needs[style]):
                towers.append(TowerSpec(kind, style, prefix, file))
            break
    return k.found(towers)


def _found_text(towers: list[TowerSpec]) -> list[TowerSpec]:
    """Text towers named by width and sorted by it."""
    named = []
    for t in towers:
        shape = t.file.shape(t.key("token_embedding.weight"))
        if len(shape) != 2:
            raise BadInput(f"{t.file.path}: {t.prefix}token embedding has shape {shape}, expected [vocab, width]")
        named.append(replace(t, role=families.architecture(shape[1]).role))
    return sorted(named, key=lambda t: t.file.shape(t.key("token_embedding.weight"))[1])


def family_of(towers: list[TowerSpec], pipeline: str | None = None) -> str:
    """The Stable Diffusion family of a single file (from where its towers sit) or of a diffusers folder (from
    its pipeline class): ``families.FAMILIES``."""
    roles = [t.role for t in towers]
    if pipeline is not None:
        return families.of_pipeline(pipeline, roles).name
    return families.of_file([t.prefix for t in towers], roles).name


def usage_for(family: str, tower: TowerSpec) -> Usage:
    """Each family's Stable Diffusion default (../shared/reference/clip-text-encoders.md §4); a tower saved
    without its unused last block (diffusers' 23-layer SD2 encoder, kohya's placeholder left out) has its own."""
    row = families.FAMILIES[family]
    trimmed = tower.style != "openclip" or tower.dropped_block
    return row.trimmed if row.trimmed is not None and trimmed else row.usage


# --- inferring the architecture --------------------------------------------------------------


def block_shapes(layers: int, w: int, m: int) -> dict[str, tuple[int, ...]]:
    """sdclip name -> shape of every residual block's tensors (the text and image towers share them)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "ln_1.weight": (w,),
                b + "ln_1.bias": (w,),
                b + "ln_2.weight": (w,),
                b + "ln_2.bias": (w,),
                b + "attn.qkv.weight": (3 * w, w),
                b + "attn.qkv.bias": (3 * w,),
                b + "attn.out.weight": (w, w),
                b + "attn.out.bias": (w,),
                b + "mlp.fc.weight": (m, w),
                b + "mlp.fc.bias": (m,),
                b + "mlp.proj.weight": (w, m),
                b + "mlp.proj.bias": (w,),
            }
        )
    return shapes


def _text_shapes(c: TextConfig) -> dict[str, tuple[int, ...]]:
    w = c.width
    return {
        "token_embedding.weight": (c.vocab_size, w),
        "position_embedding": (c.context_length, w),
        "final_norm.weight": (w,),
        "final_norm.bias": (w,),
        **block_shapes(c.layers, w, c.mlp_width),
    }


def _image_shapes(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    w = c.width
    return {
        "patch_embedding.weight": (w, 3, c.patch_size, c.patch_size),
        "class_embedding": (w,),
        "position_embedding": (c.grid**2 + 1, w),
        "pre_norm.weight": (w,),
        "pre_norm.bias": (w,),
        "post_norm.weight": (w,),
        "post_norm.bias": (w,),
        **block_shapes(c.layers, w, c.mlp_width),
    }


def foreign_names(kind: str, style: str, name: str) -> tuple[str, ...]:
    """The foreign tensor name(s) behind one sdclip parameter name of a ``kind`` tower."""
    for ours, theirs in NAMES[kind][style].items():
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"
        m = re.match(pattern, name)
        if m:
            parts = theirs if isinstance(theirs, tuple) else (theirs,)
            return tuple(p.format(**m.groupdict()) for p in parts)
    raise KeyError(name)


def infer(tower: TowerSpec, hf_config: dict | None = None, **overrides: Any) -> TowerSpec:
    """``tower`` with its architecture read from tensor shapes and naming (``hf_config``: the tower's
    transformers config, where there is one); ``overrides`` replace any inferred field."""
    return KINDS[tower.kind].infer(tower, hf_config, overrides)


def _apply(config: Any, overrides: dict[str, Any], f: TensorFile) -> Any:
    try:
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, BadInput) as e:
        raise BadInput(f"bad configuration override for {f.path}: {e}") from None


def _blocks(tower: TowerSpec) -> set[int]:
    f, p = tower.file, tower.prefix
    return {int(m.group(1)) for k in f.keys() if k.startswith(p) and (m := BLOCK_INDEX[tower.style].match(k[len(p) :]))}


def _text_config(tower: TowerSpec, hf_config: dict | None, overrides: dict[str, Any]) -> TextConfig:
    """The text architecture (activation: config.json, else by width)."""
    f, p = tower.file, tower.prefix
    need = [tower.key("token_embedding.weight"), tower.key("position_embedding")]
    for k in need:
        if k not in f.keys():
            raise BadInput(f"{f.path}: missing tensor {k}")
    vocab, width = f.shape(need[0])
    _check_rank(f, need[1], 2)
    context = f.shape(need[1])[0]
    blocks = _blocks(tower)
    layers = len(blocks)
    if blocks != set(range(layers)):
        raise BadInput(f"{f.path}: the text encoder at '{p}' has blocks {sorted(blocks)}; some are missing")
    if layers == 0:
        raise BadInput(f"{f.path}: the text encoder at '{p}' has no transformer blocks")
    _check_blocks_whole(tower, layers)
    fc = tower.key("blocks.0.mlp.fc.weight")
    _check_rank(f, fc, 2)
    mlp = f.shape(fc)[0]
    found = tower.projection()
    projection = 0
    bias = (found[0].removesuffix(".weight") + ".bias") if found is not None else ""
    if bias in f.keys():  # open_clip's proj_bias towers: not a CLIP text encoder Stable Diffusion uses
        raise BadInput(f"{f.path}: {bias}: a text projection with a bias is not supported")
    if found is not None:
        projection = _projection_dim(f, found)
    arch = families.architecture(width)
    activation = hf_config["hidden_act"] if hf_config and hf_config.get("hidden_act") else arch.activation
    for name, found_value in (("hidden_size", width), ("num_hidden_layers", layers), ("intermediate_size", mlp)):
        stated = (hf_config or {}).get(name)
        if stated is not None and stated != found_value:  # e.g. a file that lost its last layers
            raise BadInput(
                f"{f.path}: its config.json says {name} {stated}, but the tensors at '{p}' give "
                f"{found_value}; weights and configuration do not belong together"
            )
    heads = (hf_config or {}).get("num_attention_heads") or max(width // 64, 1)
    legacy = (hf_config or {}).get("eos_token_id") == 2  # transformers then pools at argmax(ids)
    try:
        config = TextConfig(
            width=width,
            layers=layers,
            heads=heads,
            mlp_width=mlp,
            vocab_size=vocab,
            context_length=context,
            activation=activation,
            projection_dim=projection,
            pad_id=arch.pad_id,
            pooling="argmax" if legacy else "first_eos",
        )
    except BadInput as e:
        raise BadInput(
            f"{f.path}: the text encoder at '{p}' ({need[0]} is {vocab} x {width}; config.json, if any, beside it): {e}"
        ) from None
    return _apply(config, overrides, f)


def _projection_dim(f: TensorFile, found: tuple[str, bool]) -> int:
    shape = f.shape(found[0])
    if len(shape) != 2:
        raise BadInput(f"{f.path}: tensor {found[0]} has shape {list(shape)}, expected a 2-d projection")
    return shape[0] if found[1] else shape[1]


def _infer_text(tower: TowerSpec, hf_config: dict | None, overrides: dict[str, Any]) -> TowerSpec:
    """The text configuration and notes, leaving out the placeholders kohya writes into SD2 files saved
    from diffusers' 23-layer encoder: an all-ones projection and a last block copied from the one before
    (a trained model never has two equal blocks)."""
    config = _text_config(tower, hf_config, overrides)
    f, found = tower.file, tower.projection()
    notes: list[str] = []
    dropped = False
    if found is not None and config.projection_dim:
        key, linear = found
        if bool((f.get(key) == 1).all()):
            notes.append(f"{key} is all ones (a placeholder kohya writes for SD2); ignored")
            config = replace(config, projection_dim=0)
        elif linear and tower.style == "openclip":
            notes.append(f"{key} is stored as a Linear weight [out, in] (kohya / Playground style); read as such")
    last = config.layers - 1
    if tower.style == "openclip" and last >= 1 and overrides.get("layers") is None:
        a, b = (tower.key(f"blocks.{i}.mlp.fc.weight") for i in (last, last - 1))
        if a in f.keys() and b in f.keys() and torch.equal(f.get(a), f.get(b)):
            notes.append(
                f"block {last} is a copy of block {last - 1} (a placeholder kohya writes for SD2); "
                f"left out: the encoder has {last} layers"
            )
            config = replace(config, layers=last)
            dropped = True
    return replace(tower, config=config, notes=tuple(notes), dropped_block=dropped)


def _infer_image(tower: TowerSpec, hf_config: dict | None, overrides: dict[str, Any]) -> TowerSpec:
    """The image architecture; ``hf_config`` (a transformers ``vision_config``) supplies heads and
    activation where present, else width / 64 heads and quick_gelu (pass the text tower's: both towers
    of a CLIP model use the same)."""
    f, p = tower.file, tower.prefix
    for name in ("patch_embedding.weight", "position_embedding", "blocks.0.mlp.fc.weight"):
        if tower.key(name) not in f.keys():
            raise BadInput(f"{f.path}: missing tensor {tower.key(name)}")
    conv = f.shape(tower.key("patch_embedding.weight"))
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise BadInput(
            f"{f.path}: {tower.key('patch_embedding.weight')} has shape {list(conv)}, expected [width, 3, patch, patch]"
        )
    width, patch = conv[0], conv[2]
    tokens = f.shape(tower.key("position_embedding"))[0] - 1
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or grid == 0:
        raise BadInput(
            f"{f.path}: {tower.key('position_embedding')} has {tokens + 1} rows; expected 1 + a square "
            f"number of patches"
        )
    blocks = _blocks(tower)
    if not blocks or blocks != set(range(len(blocks))):
        raise BadInput(f"{f.path}: the image tower at '{p}' has blocks {sorted(blocks)}; some are missing")
    found = tower.projection()
    projection = _projection_dim(f, found) if found is not None else 0
    hf_config = hf_config or {}
    config = VisionConfig(
        width=width,
        layers=len(blocks),
        heads=hf_config.get("num_attention_heads") or max(width // 64, 1),
        mlp_width=f.shape(tower.key("blocks.0.mlp.fc.weight"))[0],
        image_size=grid * patch,
        patch_size=patch,
        activation=hf_config.get("hidden_act") or "quick_gelu",
        projection_dim=projection,
    )
    return replace(tower, config=_apply(config, overrides, f))


def _check_rank(f: TensorFile, key: str, rank: int) -> None:
    """A tensor the architecture is read from exists and has ``rank`` dimensions (a scalar is refused)."""
    if key not in f.keys():
        raise BadInput(f"{f.path}: missing tensor {key}")
    if len(f.shape(key)) != rank:
        raise BadInput(f"{f.path}: tensor {key} has shape {list(f.shape(key))}, expected {rank} dimensions")


def _check_blocks_whole(tower: TowerSpec, layers: int) -> None:
    """Every block present has all its tensors: a half-written last layer is a damaged file, never a
    shallower model."""
    keys = set(tower.file.keys())
    for i in range(layers):
        names = [
            n
            for name in block_shapes(1, 1, 1)
            for n in foreign_names(tower.kind, tower.style, name.replace("0", str(i), 1))
        ]
        missing = [tower.prefix + n for n in names if tower.prefix + n not in keys]
        if missing:
            raise BadInput(
                f"{tower.file.path}: layer {i} of the text encoder at '{tower.prefix}' is incomplete: "
                f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )


# the transformers config.json fields sdclip reads, and the type each must have
_HF_FIELDS = {
    "hidden_act": str,
    "num_attention_heads": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "intermediate_size": int,
}


def check_hf_config(config: dict, path: Any) -> dict:
    """``config`` (a transformers text config read from ``path``) if the fields sdclip reads have the right
    type and range; ``BadInput`` naming the file and the field otherwise."""
    for name, kind in _HF_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if type(value) is not kind or (kind is int and value <= 0):
            wanted = "a positive whole number" if kind is int else "a string"
            raise BadInput(f"{path}: {name} is {value!r}, not {wanted}")
    return config


def check_tokenizer_fits(tower: TowerSpec, tokenizer: Any) -> None:
    """The tokenizer's ids all have a row in the token embedding (a 1000-row embedding under CLIP's
    49408-token vocabulary would fail at the first prompt)."""
    c = tower.config
    assert isinstance(c, TextConfig)
    if tokenizer.vocab_size > c.vocab_size:
        raise BadInput(
            f"{tower.file.path}: tensor {tower.key('token_embedding.weight')} has {c.vocab_size} rows, "
            f"but the tokenizer has {tokenizer.vocab_size} tokens: ids past the embedding"
        )


# --- building the module ---------------------------------------------------------------------


def used_keys(tower: TowerSpec) -> set[str]:
    """The file's keys ``build`` reads for an inferred tower."""
    if tower.config is None:
        return set()
    keys = {
        tower.prefix + n
        for name in KINDS[tower.kind].shapes(tower.config)
        for n in foreign_names(tower.kind, tower.style, name)
    }
    found = tower.projection()
    if tower.config.projection_dim and found is not None:
        keys.add(found[0])
    return keys


def build(tower: TowerSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The inferred tower's module (``TextTransformer`` / ``VisionTransformer``) from its tensors, checking
    every name, shape and value."""
    f, p, c, k = tower.file, tower.prefix, tower.config, KINDS[tower.kind]
    assert c is not None
    what = f"a {c.layers}-layer width-{c.width} {k.what}"
    state: dict[str, torch.Tensor] = {}
    for name, shape in k.shapes(c).items():
        state[name] = read_checked(f, [p + n for n in foreign_names(tower.kind, tower.style, name)], shape, dtype, what)
    found = tower.projection()
    if c.projection_dim and found is not None:
        state["projection.weight"] = read_projection(f, found, c.width, c.projection_dim, dtype)
    with torch.device("meta"):
        model = k.module(c)
    model.load_state_dict(state, assign=True)
    model.to(device)
    if hasattr(f, "release"):
        f.release()  # type: ignore[attr-defined]
    return model


@dataclass(frozen=True)
class Kind:
    """What differs between the text and the image tower on the way from file to module."""

    anchor: str  # the sdclip name of the tensor a tower is found by
    needs: dict[str, tuple[str, ...]]  # per style, sdclip names that must sit beside the anchor (a bare name is common)
    found: Callable[[list[TowerSpec]], list[TowerSpec]]  # what ``find_towers`` does with the towers it found
    projection: Callable[[TowerSpec], tuple[str, bool] | None]
    infer: Callable[[TowerSpec, dict | None, dict[str, Any]], TowerSpec]
    shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # sdclip name -> shape, from the config
    module: Callable[[Any], nn.Module]
    what: str  # in error messages
    hf_prefix: str  # the tower's namespace in a transformers CLIPModel ...
    hf_projection: str  # ... and its projection's name beside it


KINDS: dict[str, Kind] = {
    "text": Kind(
        "token_embedding.weight",
        {"hf": (), "openclip": ("blocks.0.attn.qkv.weight",)},
        _found_text,
        _text_projection,
        _infer_text,
        _text_shapes,
        TextTransformer,
        "text encoder",
        "text_model.",
        "text_projection.weight",
    ),
    "image": Kind(
        "patch_embedding.weight",
        {"hf": (), "openclip": ("class_embedding", "blocks.0.attn.qkv.weight")},
        list,
        _image_projection,
        _infer_image,
        _image_shapes,
        VisionTransformer,
        "image encoder",
        "vision_model.",
        "visual_projection.weight",
    ),
}


# fp8 and integer files need scales or dequantisation sdclip does not do: refused, not misread
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_projection(f: TensorFile, found: tuple[str, bool], width: int, out: int, dtype: torch.dtype) -> torch.Tensor:
    """A projection as a Linear weight [out, width]: OpenCLIP keeps x @ P [width, out], P transposed."""
    key, linear = found
    w = read_checked(f, [key], (out, width) if linear else (width, out), dtype, f"a width-{width} projection")
    return w if linear else w.t().contiguous()


def read_checked(f: TensorFile, keys: list[str], shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """The tensors ``keys`` stacked on dim 0 into one ``dtype`` tensor of ``shape``: names, dtypes
    and shapes are checked before reading, values (NaN / inf, also from a lossy down-cast) after."""
    for key in keys:
        if key not in f.keys():
            raise BadInput(f"{f.path}: missing tensor {key}")
        if f.dtype(key) not in WEIGHT_DTYPES:
            raise BadInput(
                f"{f.path}: tensor {key} has dtype {str(f.dtype(key)).removeprefix('torch.')}; "
                f"a text encoder's weights are float32, float16 or bfloat16"
            )
    # each of q, k, v alone: wrong sizes that add up right would still make a wrong model
    part = (shape[0] // len(keys), *shape[1:])
    if any(tuple(f.shape(k)) != part for k in keys):
        found = " + ".join(str(list(f.shape(k))) for k in keys)
        raise BadInput(f"{f.path}: tensor {' + '.join(keys)} has shape {found}, expected {list(shape)} for {what}")
    out = torch.empty(shape, dtype=dtype)
    row = 0
    for key in keys:  # convert straight into the (fused) destination: one pass, no concatenation copy
        t = f.get(key)
        out[row : row + t.shape[0]].copy_(t)
        row += t.shape[0]
    if out.numel() and not all(torch.isfinite(v) for v in torch.aminmax(out)):  # NaN propagates to min/max
        cast = "" if all(f.dtype(k) == dtype for k in keys) else f" (in {str(dtype).removeprefix('torch.')})"
        raise BadInput(f"{f.path}: tensor {' + '.join(keys)} holds NaN or infinite values{cast}")
    return out


def ignored_tensors(files: list[TensorFile], towers: list[TowerSpec]) -> Counter:
    """Tensors no tower uses, grouped so the report stays short yet names what was skipped: inside a
    tower's own namespace by full name (``...position_ids``, ``logit_scale``, a placeholder block as
    ``...resblocks.23.*``), elsewhere by their first two name components (``model.diffusion_model.*``)."""
    per_tower = [(t, used_keys(t)) for t in towers]
    used = set().union(*(keys for _, keys in per_tower))
    counts: Counter = Counter()
    for f in files:
        own = [(t.prefix, {k[len(t.prefix) :].split(".")[0] for k in keys}) for t, keys in per_tower if t.file is f]
        for k in f.keys():
            if k not in used:
                counts[_ignored_group(k, own)] += 1
    return counts


_ANY_BLOCK = re.compile(r"(?:encoder\.layers|transformer\.resblocks)\.\d+\.")


def _ignored_group(key: str, own: list[tuple[str, set[str]]]) -> str:
    for prefix, heads in own:
        rest = key[len(prefix) :]
        if key.startswith(prefix) and ("." not in rest or rest.split(".")[0] in heads):
            block = _ANY_BLOCK.match(rest)
            return prefix + block.group(0) + "*" if block else key
    parts = key.split(".")
    return ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")


def layout_name(family: str, towers: list[TowerSpec], file: TensorFile) -> str:
    """A short human description of the file's layout."""
    if getattr(file, "is_torchscript", False):
        return "OpenAI CLIP TorchScript archive"
    styles = {t.style for t in towers}
    prefixes = [t.prefix for t in towers]
    layout = families.FAMILIES[family].layout
    if layout is not None:
        old = any(t.style == "hf" and "text_model." not in t.prefix for t in towers)
        return layout + (" (old layout without text_model.)" if old else "")
    if styles == {"openclip"}:
        return "open_clip / OpenAI state dict" if prefixes in ([""], ["text."], ["module."]) else "OpenCLIP layout"
    if prefixes == ["text_model."]:
        keys = file.keys()
        if any(k.startswith("vision_model.") for k in keys):
            return "Hugging Face CLIPModel (its text tower)"
        return "Hugging Face CLIP" + (" (ComfyUI CLIPSave)" if "logit_scale" in keys else "")
    if prefixes == [""]:
        return "Hugging Face CLIP, flat keys (transformers >= 5.6)"
    return "Hugging Face layout at " + ", ".join(repr(p) for p in prefixes)
