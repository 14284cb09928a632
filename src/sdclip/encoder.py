"""``sdclip.load``: a file, folder or hub id in, a ready text encoder out.

A ``TextEncoder`` holds the one or two towers of a checkpoint, their tokenizers and the layer
each Stable Diffusion family feeds its U-Net, and turns prompts into hidden states and pooled
outputs.

What "encoder" means in sdclip: one text tower of a checkpoint as the user numbers it, from 1
(SDXL: 1 = CLIP-L, 2 = OpenCLIP-bigG; ``encoder=2``, ``--encoder 2``, "encoder 2").  Its module is
a tower (``TextTransformer``); ``TextEncoder`` holds all of a checkpoint's encoders.  Objects that
run a tower are runners (``reuse.ReusingRunner``), and a dialect's view of one encoder is an
``_EncoderUse``.  Exceptions kept for their users: ``Tokenizer.encoder`` / ``decoder`` (the
vocabulary maps, named as in OpenAI's and transformers' tokenizers) and ``accel.CudaGraphEncoder``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from . import bundled, hub
from .accel import quantize_int8
from .checkpoint import (
    CheckpointInfo,
    TowerSpec,
    Usage,
    build,
    check_hf_config,
    check_tokenizer_fits,
    family_of,
    find_towers,
    ignored_tensors,
    infer,
    layout_name,
    usage_for,
)
from .errors import BadInput
from .model import TextOutput, TextTransformer
from .reuse import ReusingRunner
from .tensorfile import TensorFile, open_tensor_file
from .tokenizer import CONTEXT_LENGTH, Tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# in a folder, the first of these that exists holds the weights (full precision first)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.fp16.safetensors",
    "model.safetensors.index.fp16.json",
    "pytorch_model.fp16.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


class TextEncoder:
    """The text encoder(s) of one checkpoint: towers, tokenizers, family defaults.

    ``encoder`` arguments count from 1 (SDXL: 1 = CLIP-L, 2 = OpenCLIP-bigG).  One encoder may be shared by
    threads: encoding only reads the weights; ``reuse`` (its counters and prefix cache) takes a lock.
    """

    def __init__(
        self,
        towers: Sequence[TextTransformer],
        usages: Sequence[Usage],
        tokenizers: Sequence[Tokenizer],
        family: str = "clip",
        info: CheckpointInfo | None = None,
        reuse: ReusingRunner | None = None,
        backend: str = "torch",
        quantize: str | None = None,
    ):
        self.towers = list(towers)
        self.usages = list(usages)
        self.tokenizers = list(tokenizers)
        self.family = family
        self.info = info
        self.reuse = reuse or ReusingRunner()
        self._fingerprint: str | None = None
        self.backend, self.quantize = backend, quantize
        self._engines: list | None = None  # per tower: what runs its plain passes (sdclip.backends)
        self.fast_source: dict | None = None  # the file's identity when sdclip.faststart may index its graphs

    def __getstate__(self) -> dict:
        """Picklable (``sdclip serve`` hands an encoder to its model process): without the open checkpoint files
        and the backends' sessions, which are built again where they are used."""
        state = dict(vars(self))
        state["_engines"] = None
        if self.info is not None:
            state["info"] = replace(self.info, towers=[replace(t, file=None) for t in self.info.towers])
        return state

    def __repr__(self) -> str:
        names = ", ".join(t.config.architecture for t in self.towers)
        return f"TextEncoder(family={self.family!r}, towers=[{names}], dtype={self.dtype}, device={self.device})"

    @property
    def fingerprint(self) -> str:
        """``weights_fingerprint`` with the micro-batch shape and thread count (which decide the rounding): what
        caches of this model's outputs key on, so that two loads of one checkpoint share entries."""
        return f"{self.weights_fingerprint}/{self.reuse.signature}/threads={torch.get_num_threads()}"

    @property
    def weights_fingerprint(self) -> str:
        """A digest of the weights (sampled), architecture, tokenizers, defaults, dtype, device and engine: what
        an exported graph of this model keys on."""
        if self._fingerprint is None:
            h = hashlib.sha256(
                repr(
                    (
                        self.family,
                        self.usages,
                        [(t.mode, t.vocab_size) for t in self.tokenizers],
                        str(self.dtype),
                        str(self.device),
                    )
                ).encode()
            )
            if self.backend != "torch":  # an engine's outputs differ from torch's in the last bits
                h.update(f"{self.backend} {self.quantize}".encode())
            with torch.no_grad():
                for tower in self.towers:
                    h.update(repr((tower.config, [type(m).__name__ for m in tower.modules()])).encode())
                    for name, t in (*tower.named_parameters(), *tower.named_buffers()):
                        flat = t.detach().reshape(-1)
                        sample = flat[:: max(1, flat.numel() // 64)].float().cpu()
                        # an integer sum of the bit patterns: the whole tensor counts, and unlike a float sum the
                        # result does not depend on how torch's threads split the reduction
                        total = flat.float().view(torch.int32).sum(dtype=torch.int64)
                        h.update(name.encode() + sample.numpy().tobytes() + total.cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def dtype(self) -> torch.dtype:
        return self.towers[0].token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.towers[0].token_embedding.weight.device

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> TextEncoder:
        for t in self.towers:
            t.to(device=device, dtype=_dtype(dtype) if dtype is not None else None)
        self.reuse.cache.clear()  # cached prefixes hold the old device / dtype
        self._fingerprint = None
        self._engines = None  # exports are keyed by the fingerprint
        self.fast_source = None  # the weights may no longer be the file's (a float16 round trip)
        return self

    def _index(self, encoder: int) -> int:
        if not 1 <= encoder <= len(self.towers):
            raise BadInput(
                f"encoder {encoder} does not exist: this {self.family} checkpoint has "
                f"{len(self.towers)} text encoder{'s' if len(self.towers) > 1 else ''}"
            )
        return encoder - 1

    def tower(self, encoder: int = 1) -> TextTransformer:
        return self.towers[self._index(encoder)]

    def tokenize(self, prompts: str | Sequence[str], encoder: int = 1) -> torch.Tensor:
        """[B, 77] ids as this encoder reads them: truncated to BOS + 75 + EOS, padded with its pad id."""
        i = self._index(encoder)
        config = self.towers[i].config
        return self.tokenizers[i](prompts, length=min(config.context_length, CONTEXT_LENGTH), pad_id=config.pad_id)

    @torch.inference_mode()
    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        encoder: int = 1,
        layer: int | None = None,
        final_norm: bool | None = None,
        hidden: bool = True,
        pooled: bool = True,
        pooling: str | None = None,
    ) -> TextOutput:
        """Hidden states [B, 77, C] of the chosen layer (default: what this family feeds its U-Net),
        pooled [B, C] and, with a projection, pooled_projected [B, P].  ``hidden=False`` asks for
        the pooled outputs only, which stops each prompt at its EOS."""
        return self.encode_ids(
            self.tokenize(prompts, encoder),
            encoder=encoder,
            layer=layer,
            final_norm=final_norm,
            hidden=hidden,
            pooled=pooled,
            pooling=pooling,
        )

    @torch.inference_mode()
    def encode_ids(
        self,
        ids: torch.Tensor,
        *,
        encoder: int = 1,
        layer: int | None = None,
        final_norm: bool | None = None,
        hidden: bool = True,
        pooled: bool = True,
        pooling: str | None = None,
        token_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TextOutput:
        """``encode`` for token ids [B, L] already built (prompt dialects build their own chunks).

        Identical rows, shared prefixes and pooled-only requests are computed once (``reuse``);
        ``token_embeds`` [B, L, C] replaces the token-embedding lookup (textual inversion) and
        ``attention_mask`` [B, L] hides positions (0) from attention (compel); such rows are computed
        as they are.
        """
        i = self._index(encoder)
        tower, usage = self.towers[i], self.usages[i]
        layer = usage.layer if layer is None else layer
        final_norm = usage.final_norm if final_norm is None else final_norm
        tower.resolve_layer(layer)  # a bad layer fails before any work
        if not hidden and not pooled:
            raise BadInput("nothing to compute: hidden=False and pooled=False")
        ids = ids.to(self.device)
        if token_embeds is not None or attention_mask is not None:
            out = tower(
                ids,
                layer=layer,
                final_norm=final_norm,
                pooled=pooled,
                pooling=pooling,
                token_embeds=None if token_embeds is None else token_embeds.to(self.device, self.dtype),
                attention_mask=attention_mask,
            )
            return out if hidden else TextOutput(None, out.pooled, out.pooled_projected)  # type: ignore[arg-type]
        return self.reuse(
            self._engine(i), ids, layer=layer, final_norm=final_norm, hidden=hidden, pooled=pooled, pooling=pooling
        )

    def _engine(self, i: int) -> TextTransformer:
        """What runs tower i's plain passes: the tower itself, or its exported graph on the chosen backend
        (``sdclip.backends``, imported only then)."""
        if self.backend == "torch":
            return self.towers[i]
        if self._engines is None:
            from .backends import EngineTower

            self._engines = [
                EngineTower(
                    t,
                    self.backend,
                    f"{self.weights_fingerprint}-{n}",
                    quantize=self.quantize,
                    on_session=partial(self._index_graph, n + 1),
                )
                for n, t in enumerate(self.towers)
            ]
        return self._engines[i]  # type: ignore[return-value]  # called as a tower is

    def _index_graph(self, encoder: int, graph: Path, layer: int, final_norm: bool, pooling: str) -> None:
        """Let the torch-free ``sdclip.faststart`` answer this file with ``graph`` next time."""
        if self.fast_source is not None:
            from .faststart import remember

            independent = self._engines[encoder - 1].rows_independent  # type: ignore[index]
            remember(self, encoder, graph, layer, final_norm, pooling, independent)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise BadInput(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return DTYPES[dtype]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BadInput(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _text_config(folder: Path) -> dict | None:
    """The text part of a transformers config.json (CLIPConfig nests it; CLIPTextConfig is it)."""
    if not (folder / "config.json").is_file():
        return None
    config = _read_json(folder / "config.json")
    return check_hf_config(
        config.get("text_config") if isinstance(config.get("text_config"), dict) else config, folder / "config.json"
    )


def _tokenizer_for(folder: Path | None, mode: str, shared: dict[str, Tokenizer]) -> tuple[Tokenizer, int | None]:
    """A folder's own tokenizer and pad id when it has one, else the bundled vocabulary."""
    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = Tokenizer.from_folder(folder, mode=mode)
        pad = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                value = _read_json(folder / name).get("pad_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value in tok.encoder:
                    pad = tok.encoder[value]
                    break
        return tok, pad
    if mode not in shared:
        shared[mode] = Tokenizer(mode=mode)
    return shared[mode], None


def _open(source: str | Path) -> tuple[list[tuple[TensorFile, dict | None, Path | None]], str | None, str]:
    """(file, transformers text config, tokenizer folder) per weights file, the pipeline class, the
    name to report."""
    path = Path(source)
    if not path.exists():
        if hub.looks_like_repo_id(str(source)):
            path = hub.resolve(str(source))
        else:
            raise BadInput(f"{source}: no such file or folder (nor a Hugging Face repo id like org/name)")
    if not path.is_dir():  # a file; open_tensor_file refuses devices and FIFOs
        return [(open_tensor_file(path), None, None)], None, str(source)
    index = path / "model_index.json"
    if index.is_file() or (path / "text_encoder").is_dir():
        pipeline = _read_json(index).get("_class_name") if index.is_file() else None
        if pipeline is not None and not isinstance(pipeline, str):
            raise BadInput(f"{index}: _class_name is {pipeline!r}, not a pipeline class name")
        parts = []
        for sub, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if (path / sub).is_dir():
                parts.append((open_tensor_file(_weights_in(path / sub)), _text_config(path / sub), path / tok))
        if not parts:
            raise BadInput(f"{path}: a diffusers pipeline folder without text_encoder/ or text_encoder_2/")
        return parts, pipeline or "", str(source)
    return [(open_tensor_file(_weights_in(path)), _text_config(path), path)], None, str(source)


def load(
    source: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    tokenizer_mode: str = "hf",
    quantize: str | None = None,
    compile: bool = False,
    backend: str = "torch",
    micro_batch: int = 8,
    share_prefixes: bool = False,
    **overrides: Any,
) -> TextEncoder:
    """Load the text encoder(s) of a checkpoint file, a diffusers / Hugging Face folder or a hub id
    (no source, or ``"sdclip-mini"``: the model bundled with sdclip).

    Only text-encoder tensors are read.  ``overrides`` replace inferred ``TextConfig`` fields
    (``activation="gelu"``, ``pad_id=0``, ...).  ``quantize="int8"`` runs the Linear layers in int8
    on the CPU (faster, not exact: see ``sdclip.accel``).  ``compile=True`` runs the towers through
    ``torch.compile``: the first call of each input shape compiles (about 10 s on a CPU), later ones run
    1.06-1.12x faster on a CPU, within 5e-6 of the eager output (bench/bench_model.py --compile); worth it
    for a long-lived process, not for one command.  ``backend="onnxruntime"`` or ``"openvino"`` runs the plain
    forward passes on that engine from a graph exported once per model into ``~/.cache/sdclip`` (``SDCLIP_CACHE``;
    see ``sdclip.backends``: optional packages, ``pip install sdclip[onnx]``); with ``quantize="int8"`` ONNX
    Runtime runs a dynamically quantized export instead of torch's int8.
    ``micro_batch``: the rows of every forward pass (results
    are bit-identical whatever the batch, history or threads for one value; 1 is fastest for one prompt at a
    time on a CPU); ``share_prefixes=True`` computes shared prompt prefixes once (faster, not bit-stable:
    ``sdclip.reuse``).  Bad files raise ``BadInput`` naming the file.
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise BadInput(f"micro_batch must be a whole number of at least 1, got {micro_batch!r}")
    if quantize not in (None, "int8"):
        raise BadInput(f"unknown quantization {quantize!r}; the choice is int8")
    if compile and quantize:
        raise BadInput("compile and quantize do not combine; choose one")
    if backend != "torch":
        from .backends import require

        require(backend)  # a missing package fails before the checkpoint is read
        if compile:
            raise BadInput(f"backend {backend!r} does not combine with compile")
        if quantize and backend != "onnxruntime":
            raise BadInput(f"backend {backend!r} does not combine with quantize; int8 runs on torch or onnxruntime")
    source = bundled.resolve(source)
    torch_dtype = _dtype(dtype)
    fast_source = None
    if backend == "onnxruntime" and not overrides:  # read before the weights: a later change shows as stale
        from .faststart import file_identity

        fast_source = file_identity(source)
    parts, pipeline, name = _open(source)
    files = [f for f, _, _ in parts]
    try:
        found: list[TowerSpec] = []
        configs, tok_dirs = [], []
        for f, hf_config, tok_dir in parts:
            in_file = find_towers(f)
            found += in_file
            configs += [hf_config] * len(in_file)
            tok_dirs += [tok_dir] * len(in_file)
        if not found:
            raise BadInput(
                f"{source}: no CLIP text encoder found (looked for '*embeddings.token_embedding.weight' "
                f"and OpenCLIP '*token_embedding.weight' + 'transformer.resblocks.*' tensors)"
            )
        family = family_of(found, pipeline)
        shared: dict[str, Tokenizer] = {}  # the bundled vocabulary, built once per mode
        towers: list[TowerSpec] = []
        modules, tokenizers = [], []
        for spec, hf_config, tok_dir in zip(found, configs, tok_dirs):
            tokenizer, pad = _tokenizer_for(tok_dir, tokenizer_mode, shared)
            tower_overrides = {"pad_id": pad, **overrides} if pad is not None else overrides
            spec = infer(spec, hf_config, **tower_overrides)
            check_tokenizer_fits(spec, tokenizer)
            module = build(spec, dtype=torch_dtype, device=device)
            if quantize == "int8" and backend == "torch":  # an engine quantizes its own export
                module = quantize_int8(module)
            elif compile:
                module.compile(dynamic=None)  # in place: the module stays the one reuse and caches know
            towers.append(spec)
            modules.append(module)
            tokenizers.append(tokenizer)
        info = CheckpointInfo(
            name,
            layout_name(family, towers, files[0])
            if pipeline is None
            else f"diffusers pipeline folder ({pipeline or 'no model_index.json'})",
            family,
            towers,
            ignored_tensors(files, towers),
            [str(f.path) for f in files],
        )
    finally:
        for f in files:
            f.close()
    te = TextEncoder(
        modules,
        [usage_for(family, t) for t in towers],
        tokenizers,
        family,
        info,
        ReusingRunner(micro_batch, prefixes=share_prefixes),
        backend,
        quantize if backend != "torch" else None,
    )
    te.fast_source = fast_source
    return te
