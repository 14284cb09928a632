"""Optional inference engines for the text tower: ONNX Runtime and OpenVINO.

``sdclip.load(..., backend="onnxruntime" | "openvino")`` exports sdclip's own tower (its plain
forward pass: ids in; the requested layer, pooled and projected outputs out) to ONNX once per model
fingerprint and output choice, into the cache folder (``SDCLIP_CACHE``, default ``~/.cache/sdclip``),
and runs that graph on the chosen engine.  ONNX Runtime runs it after its transformer graph
optimizer (fused LayerNorm, GELU, bias adds where its patterns match), with one thread
per core, sequential execution and every graph optimization.  The same weights, the same
arithmetic: within 1e-5 of transformers in float32 (tests/test_backends.py).

What the export does not cover runs on the torch tower, exactly as without a backend: rows after a
shared prefix (exact reuse's prefix path), injected textual-inversion vectors, attention masks
(compel), all hidden states, other dtypes and devices than float32 on the CPU.  Identical rows and
pooled-only requests still go through the engine (reuse calls the tower as usual).

The engines are optional packages, imported only when chosen: ``pip install sdclip[onnx]`` /
``sdclip[openvino]``.  This module itself imports torch only when a graph is built or run, so that
the command line can offer ``--backend`` without importing torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .atomic import atomic_path
from .errors import BadInput, SdclipError

if TYPE_CHECKING:
    import torch

    from .model import Prefix, TextOutput, TextTransformer

BACKENDS = ("torch", "onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
OPSET = 17


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$SDCLIP_CACHE``, else ``~/.cache/sdclip``."""
    return Path(os.environ.get("SDCLIP_CACHE") or Path.home() / ".cache" / "sdclip")


def require(backend: str) -> None:
    """Fail with how to install it when ``backend``'s packages are missing."""
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from importlib.util import find_spec

    missing = [p for p in _PACKAGES.get(backend, ()) if find_spec(p) is None]
    if missing:
        raise SdclipError(
            f"backend {backend!r} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'sdclip[{_EXTRAS[backend]}]'"
        )


def export_onnx(tower: TextTransformer, path: Path, layer: int, final_norm: bool, pooled: bool, pooling: str) -> None:
    """Write the plain pass (ids [batch, length] int64 -> hidden, pooled, pooled_projected) to ``path``
    atomically: a crash never leaves a half-written graph in the cache."""
    import warnings

    import torch

    class PlainPass(torch.nn.Module):  # the tower's plain forward pass with fixed output choices
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower

        def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.tower(ids, layer=layer, final_norm=final_norm, pooled=pooled, pooling=pooling)
            return tuple(t for t in (out.hidden, out.pooled, out.pooled_projected) if t is not None)

    names = ["hidden", *(["pooled"] + (["pooled_projected"] if tower.projection is not None else []) if pooled else [])]
    ids = torch.full((2, tower.config.context_length), tower.config.eos_id, dtype=torch.long)
    ids[:, 0] = 49406
    axes = {
        "ids": {0: "batch", 1: "length"},
        "hidden": {0: "batch", 1: "length"},
        **{n: {0: "batch"} for n in names[1:]},
    }
    with atomic_path(path) as tmp, torch.no_grad():
        with warnings.catch_warnings():  # the TorchScript exporter's tracer warnings are about Python ifs on shapes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                PlainPass(),
                (ids,),
                str(tmp),
                input_names=["ids"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )


def optimize_for_ort(source: Path, target: Path, config: Any) -> None:
    """ONNX Runtime's transformer optimizer over an export: LayerNorm, GELU and bias fusions where its patterns
    match (model type "bert": sdclip's graph is a plain pre-LN encoder)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False  # its patterns do not match SDPA's export, and it trips on layer outputs
    # residual add + LayerNorm fused into SkipLayerNormalization ran ~4% slower in all than the two ops on the
    # CPU (bench/bench_engines.py's machine, 1 thread, CPU time at batch 1 and 8)
    options.enable_skip_layer_norm = False
    model = optimize_model(
        str(source),
        model_type="bert",
        num_heads=config.heads,
        hidden_size=config.width,
        opt_level=1,
        optimization_options=options,
    )
    save_mappable(model.model, target)


def save_mappable(model: Any, path: Path, min_bytes: int = 1024, align: int = 1 << 16) -> None:
    """Write an ONNX graph with its weights in a side file that ONNX Runtime maps instead of parsing and copying
    (a session over a CLIP-L graph starts ~3x faster: bench/bench_load.py), tensors of 1 MiB and up at offsets
    aligned for mmap.  The side file is named after its content and written first, the graph last, both
    atomically: a graph in the cache always finds its weights, even with processes exporting at once."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    big = [t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= min_bytes]
    digest = hashlib.sha256()
    for t in big:
        digest.update(t.name.encode() + len(t.raw_data).to_bytes(8, "little") + t.raw_data)
    data = path.with_name(f"{path.name}.{digest.hexdigest()[:16]}.data")
    offset = 0
    with atomic_path(data) as tmp, open(tmp, "wb") as f:
        for t in big:
            if len(t.raw_data) >= 1 << 20:
                f.write(bytes(-offset % align))
                offset += -offset % align
            f.write(t.raw_data)
            set_external_data(t, location=data.name, offset=offset, length=len(t.raw_data))
            offset += len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())


def quantize_for_ort(source: Path, target: Path, float_blocks: int = 1) -> None:
    """ONNX Runtime's dynamic int8 quantization of an export (weights int8 per output channel, activations
    quantized per call: ``EngineTower`` runs one row per call), the first ``float_blocks`` blocks left in float
    as ``sdclip.accel.quantize_int8`` leaves them (they read the raw embeddings, whose range one activation
    scale fits worst)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = tuple(f"/blocks.{i}/" for i in range(float_blocks))
    graph = onnx.load(str(source), load_external_data=False).graph
    excluded = [n.name for n in graph.node if any(k in n.name for k in keep)]
    with atomic_path(target) as tmp:
        quantize_dynamic(
            str(source), str(tmp), per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=excluded
        )


def ort_session(path: Path, threads: int | None = None) -> Any:
    """The one way sdclip opens a graph on ONNX Runtime (the torch-free ``sdclip.faststart`` too: same settings,
    same bits); ``threads`` defaults to torch's count."""
    import onnxruntime as ort

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_model(path: Path, threads: int | None = None) -> Any:
    import openvino as ov
    import torch

    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    return ov.Core().compile_model(str(path), "CPU", config)


def _stack(runs: list[list[Any]]) -> list[Any]:
    """Per-row runs' outputs joined along the batch."""
    import numpy as np

    return [np.concatenate(parts) for parts in zip(*runs)]


class EngineTower:
    """A tower whose plain forward pass runs on ONNX Runtime or OpenVINO; the rest on torch.

    Stands where a ``TextTransformer`` is called (``TextEncoder.encode_ids`` and exact reuse):
    ``config``, ``resolve_layer`` and ``compute_prefix`` are the torch tower's.
    """

    def __init__(
        self,
        tower: TextTransformer,
        backend: str,
        fingerprint: str,
        folder: Path | None = None,
        quantize: str | None = None,
        on_session: Callable[[Path, int, bool, str], None] | None = None,
    ):
        """``quantize="int8"``: ONNX Runtime's dynamic int8 quantization of the export (not exact: the
        figures are in the README's speed table); the torch tower stays float for what the export lacks.
        ``on_session(graph, layer, final_norm, pooling)`` is told each ONNX Runtime graph a session was built
        from (``TextEncoder`` indexes it for ``sdclip.faststart``)."""
        require(backend)
        if quantize not in (None, "int8") or (quantize and backend != "onnxruntime"):
            raise BadInput(f"quantize={quantize!r} with backend {backend!r}: int8 runs on onnxruntime or torch")
        self.tower, self.backend, self.fingerprint, self.quantize = tower, backend, fingerprint, quantize
        self.folder = (folder or cache_dir()) / "exports"
        self.on_session = on_session
        self._runners: dict[tuple, Callable[[Any], list[Any]]] = {}
        self._lock = threading.Lock()

    @property
    def config(self):
        return self.tower.config

    def resolve_layer(self, layer: int) -> int:
        return self.tower.resolve_layer(layer)

    def compute_prefix(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> Prefix:
        return self.tower.compute_prefix(ids, token_embeds)

    @property
    def rows_independent(self) -> bool:
        """Whether a row's output is the same bits whatever rows share its batch, so that exact reuse need not pad
        a lone prompt to a full micro-batch.  True for ONNX Runtime in float32: every op of the export is
        row-wise (LayerNorm, softmax, GELU) or a matrix product whose rows are computed alone (MLAS packs the
        weights once, in K blocks of a fixed size, and splits work across threads by rows or columns, never
        along K; attention's products have K <= 128, one block).  int8 runs each row alone: dynamic quantization
        takes one activation scale per tensor, so in a batch a row's output would depend on the rows beside it
        (alone, a row costs about what it does in a batch of 8).  tests/test_backends.py checks both bit for bit
        across batch sizes and thread counts.  Not OpenVINO (oneDNN's blocking may depend on the batch)."""
        import torch

        weight = self.tower.token_embedding.weight
        return self.backend == "onnxruntime" and weight.dtype == torch.float32 and weight.device.type == "cpu"

    def covers(self, ids: torch.Tensor, **options: Any) -> bool:
        """Whether the exported plain pass computes this call."""
        import torch

        weight = self.tower.token_embedding.weight
        return (
            weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and ids.device.type == "cpu"
            and ids.shape[1] <= self.config.context_length
            and all(
                options.get(k) in (None, False)
                for k in ("prefix", "token_embeds", "attention_mask", "output_hidden_states")
            )
        )

    def __call__(
        self,
        ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        pooled: bool = True,
        pooling: str | None = None,
        **options: Any,
    ) -> TextOutput:
        if not self.covers(ids, **options):
            return self.tower(ids, layer=layer, final_norm=final_norm, pooled=pooled, pooling=pooling, **options)
        if ids.dim() != 2:
            raise BadInput(f"ids must be [batch, length], got shape {tuple(ids.shape)}")
        import torch

        from .model import TextOutput

        key = (self.resolve_layer(layer), bool(final_norm), bool(pooled), pooling or self.config.pooling)
        outputs = [torch.from_numpy(o) for o in self._runner(key)(ids.numpy())]
        out = TextOutput(outputs[0])
        if pooled:
            out.pooled = outputs[1]
            out.pooled_projected = outputs[2] if len(outputs) > 2 else None
        return out

    def _runner(self, key: tuple) -> Callable[[Any], list[Any]]:
        with self._lock:  # one export per key, even when threads ask at once
            if key not in self._runners:
                self._runners[key] = self._build(*key)
            return self._runners[key]

    def _build(self, layer: int, final_norm: bool, pooled: bool, pooling: str) -> Callable[[Any], list[Any]]:
        stem = f"{self.fingerprint}-L{layer}{'n' if final_norm else ''}{'-pooled-' + pooling if pooled else ''}"
        plain = self.folder / f"{stem}.onnx"
        if not plain.is_file():
            try:
                export_onnx(self.tower, plain, layer, final_norm, pooled, pooling)
            except SdclipError as e:  # sdclip.atomic names the file and the reason
                raise SdclipError(
                    f"{e}; the {self.backend} backend keeps its exports there: set SDCLIP_CACHE to a writable folder"
                ) from None
        if self.backend == "onnxruntime":
            fused = self.folder / f"{stem}.ort-{'int8' if self.quantize else 'fused'}.onnx"
            if not fused.is_file():
                if self.quantize:
                    quantize_for_ort(plain, fused)
                else:
                    optimize_for_ort(plain, fused, self.config)
            session = ort_session(fused)
            if self.on_session is not None and pooled:
                self.on_session(fused, layer, final_norm, pooling)
            if self.quantize:  # one row per run: see rows_independent
                return lambda ids: _stack([session.run(None, {"ids": ids[i : i + 1]}) for i in range(len(ids))])
            return lambda ids: session.run(None, {"ids": ids})
        compiled = openvino_model(plain)
        request = compiled.create_infer_request()
        lock = threading.Lock()

        def run(ids: Any) -> list[Any]:
            with lock:  # an infer request serves one call at a time; its outputs are copied out
                results = request.infer({"ids": ids})
                return [results[o].copy() for o in compiled.outputs]

        return run
