"""sdclip against the CPU engines users pick for CLIP text encoding: ONNX Runtime and OpenVINO.

One random ViT-L/14 text tower (transformers CLIPTextModel, seed 0), the same unique 77-token
prompts, every contender timed interleaved in one process (A B C ... A B C ...), fp32 unless named:

* transformers sdpa (eager torch): the reference every ratio is against;
* ONNX Runtime on the tower exported from transformers as optimum does it (optimum is not installed
  here: ``torch.onnx.export`` of ``CLIPTextModel`` with eager attention, TorchScript exporter, opset 17,
  dynamic batch and length; outputs last_hidden_state and pooler_output), plain and after
  ``onnxruntime.transformers.optimizer`` (model_type "clip": fused attention / LayerNorm / GELU where
  its patterns match), default session options as optimum's ORTModel sets them;
* OpenVINO on that same ONNX file (f32 inference precision, latency hint);
* torch.compile of the transformers model;
* int8: ORT dynamic quantization (per channel, of the exported graph), OpenVINO with NNCF int8 weight
  compression, sdclip's own ``quantize_int8``;
* sdclip eager, sdclip with ``backend="onnxruntime"`` and ``backend="openvino"`` (its own tower exported
  to the cache folder; the export is in the setup, not in the timings), each timed as users call it:
  ``TextEncoder.encode_ids`` through exact reuse, so what a batch of 1 costs includes the padding of its
  fixed-shape micro-batch (8 rows on torch, int8 and OpenVINO; none on ONNX Runtime float32, whose rows
  are provably independent of their batch: tests/test_backends.py).

Each contender's GFLOP/s is the tower's matmul FLOPs (``bench_roofline.tower_flops``) over its median time; the
ONNX Runtime contenders are also run once more under ONNX Runtime's profiler (time per op type, into
``engines.json`` for ``bench_roofline.py``, which sets all of it against this machine's GEMM ceiling).

Fidelity: max |Δ| of last_hidden_state and the per-token cosine (mean, min) against transformers fp32.
Speed: median wall time and median CPU time (the process's, all threads) per call; on a machine shared with
other jobs the CPU-time ratios are the steadier ones (with ``--threads 1`` a call's wall time includes the
time it waited for a core, its CPU time does not).

    python bench/bench_engines.py [--quick] [--batches 1 8 32] [--out bench/out]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import unique_prompts
from bench_roofline import ort_op_seconds, tower_flops
from common import median, paired, random_vit_l, write_results

import sdclip

warnings.filterwarnings("ignore")

PLAIN, INT8 = "clip-text.onnx", "clip-text-int8.onnx"  # the exported tower and its ORT dynamic quantization
PROFILED = {"ONNX Runtime": PLAIN, "ONNX Runtime int8 (dynamic)": INT8}


def export_transformers(model, path: str) -> None:
    ids = torch.full((2, 77), 49407, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids,),
            path,
            input_names=["input_ids"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "length"},
                "last_hidden_state": {0: "batch", 1: "length"},
                "pooler_output": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )


def contenders(folder: str, work: str) -> tuple[dict, dict, dict]:
    """name -> fn(ids) returning last_hidden_state as a tensor; name -> setup seconds; notes."""
    import onnxruntime as ort
    import openvino as ov
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    hf = random_vit_l(folder)
    fns, setup, notes = {}, {}, {}
    threads = torch.get_num_threads()
    fns["transformers sdpa"] = lambda ids: hf["sdpa"](ids).last_hidden_state

    t0 = time.perf_counter()
    plain = os.path.join(work, PLAIN)
    export_transformers(hf["eager"], plain)
    setup["export (transformers -> ONNX)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = os.path.join(work, "clip-text-fused.onnx")
    optimized = optimize_model(plain, model_type="clip", num_heads=12, hidden_size=768)
    fused_ops = sorted(
        {n.op_type for n in optimized.model.graph.node}
        & {
            "Attention",
            "MultiHeadAttention",
            "SkipLayerNormalization",
            "LayerNormalization",
            "QuickGelu",
            "FastGelu",
            "BiasGelu",
        }
    )
    optimized.save_model_to_file(fused)
    setup["ORT transformer optimizer"] = time.perf_counter() - t0
    notes["ONNX Runtime + optimizer"] = "fused ops: " + ", ".join(fused_ops)

    def session(path: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    for name, path in (("ONNX Runtime", plain), ("ONNX Runtime + optimizer", fused)):
        s = session(path)
        fns[name] = (
            lambda s: lambda ids: torch.from_numpy(s.run(["last_hidden_state"], {"input_ids": ids.numpy()})[0])
        )(s)

    core = ov.Core()
    t0 = time.perf_counter()
    ov_model = core.read_model(plain)
    ov_config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(ov_model, "CPU", ov_config)
    setup["OpenVINO compile"] = time.perf_counter() - t0
    fns["OpenVINO"] = lambda ids: torch.from_numpy(compiled({"input_ids": ids.numpy()})[compiled.outputs[0]].copy())

    compiled_hf = torch.compile(hf["sdpa"])
    fns["torch.compile (transformers)"] = lambda ids: compiled_hf(ids).last_hidden_state

    t0 = time.perf_counter()
    q8 = os.path.join(work, INT8)  # optimum's ORTQuantizer path: the exported model, dynamic
    quantize_dynamic(plain, q8, per_channel=True, weight_type=QuantType.QInt8)
    setup["ORT dynamic quantization"] = time.perf_counter() - t0
    s8 = session(q8)
    fns["ONNX Runtime int8 (dynamic)"] = lambda ids: torch.from_numpy(
        s8.run(["last_hidden_state"], {"input_ids": ids.numpy()})[0]
    )
    try:
        import nncf

        t0 = time.perf_counter()
        compressed = nncf.compress_weights(core.read_model(plain), mode=nncf.CompressWeightsMode.INT8_ASYM)
        compiled8 = core.compile_model(compressed, "CPU", ov_config)
        setup["NNCF int8 weight compression"] = time.perf_counter() - t0
        fns["OpenVINO int8 (NNCF weights)"] = lambda ids: torch.from_numpy(
            compiled8({"input_ids": ids.numpy()})[compiled8.outputs[0]].copy()
        )
    except ImportError:
        notes["OpenVINO int8 (NNCF weights)"] = "nncf not installed"

    # sdclip as a user calls it: ``encode_ids`` through exact reuse (fixed-shape micro-batches of 8 rows: on torch
    # and int8 a lone prompt is padded to 8 rows, on ONNX Runtime float32 it runs alone, EngineTower.rows_independent)
    for name, options in (
        ("sdclip", {}),
        ("sdclip int8", {"quantize": "int8"}),
        ("sdclip backend=onnxruntime", {"backend": "onnxruntime"}),
        ("sdclip backend=openvino", {"backend": "openvino"}),
        ("sdclip backend=onnxruntime int8", {"backend": "onnxruntime", "quantize": "int8"}),
    ):
        te = sdclip.load(folder, **options)
        t0 = time.perf_counter()
        te.encode_ids(torch.full((1, 77), 49407), layer=-1, final_norm=True)
        if options.get("backend"):
            setup[f"{name}: export + build (once per model)"] = time.perf_counter() - t0
        fns[name] = (lambda te: lambda ids: te.encode_ids(ids, layer=-1, final_norm=True).hidden)(te)
    return fns, setup, notes


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    cos = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1)
    return cos.mean().item(), cos.min().item(), (ref - out).abs().max().item()


def run(batches: list[int], quick: bool, out: str) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    profiles: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as work:
        os.environ["SDCLIP_CACHE"] = work
        fns, setup, notes = contenders(folder, work)
        tokenizer = sdclip.Tokenizer()
        for batch in batches:
            ids = tokenizer(unique_prompts(batch, seed=batch))
            with torch.inference_mode():
                ref = fns["transformers sdpa"](ids)
                fid = {name: fidelity(ref, fn(ids)) for name, fn in fns.items()}
                first = {}
                if "torch.compile (transformers)" in fns:  # compile per shape outside the timings
                    t0 = time.perf_counter()
                    fns["torch.compile (transformers)"](ids)
                    first["torch.compile (transformers)"] = time.perf_counter() - t0
                repeats = {1: 9, 8: 5}.get(batch, 3) if not quick else 3
                cpu: dict[str, list[float]] = {}
                calls = {name: (lambda fn: lambda: fn(ids))(fn) for name, fn in fns.items()}
                times = paired(calls, repeats=repeats, cpu=cpu)
            profiles[batch] = {  # where the ONNX Runtime contenders' time goes, for bench_roofline.py
                name: ort_op_seconds(
                    os.path.join(work, path), {"input_ids": ids.numpy()}, 3 if quick else 5, torch.get_num_threads()
                )
                for name, path in PROFILED.items()
            }
            base, cpu_base = median(times["transformers sdpa"]), median(cpu["transformers sdpa"])
            for name, ts in times.items():
                t = median(ts)
                mean, low, diff = fid[name]
                rows.append(
                    {
                        "batch": batch,
                        "contender": name,
                        "ms": f"{t * 1e3:.1f}",
                        "prompts/s": f"{batch / t:.2f}",
                        "vs transformers sdpa": f"{base / t:.2f}x",
                        "GFLOP/s": f"{tower_flops(batch)['total'] / t / 1e9:.1f}",
                        "CPU s": f"{median(cpu[name]):.3f}",
                        "vs transformers, CPU time": f"{cpu_base / median(cpu[name]):.2f}x",
                        "max |Δ|": f"{diff:.1e}",
                        "cosine mean / min": f"{mean:.6f} / {low:.6f}",
                        "notes": notes.get(name, "") + (f"first call {first[name]:.0f} s" if name in first else ""),
                    }
                )
            extra = {"setup_seconds": setup, "ort_op_seconds": profiles}
            write_results("engines", rows, HEADER, out, extra)  # each batch size as it ends
    return rows, extra


HEADER = [
    "batch",
    "contender",
    "ms",
    "prompts/s",
    "vs transformers sdpa",
    "GFLOP/s",
    "CPU s",
    "vs transformers, CPU time",
    "max |Δ|",
    "cosine mean / min",
    "notes",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--threads",
        type=int,
        help="threads for every contender (default: torch's default, one per "
        "core); 1 gives steadier ratios on a machine shared with other jobs",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, extra = run(args.batches, args.quick, args.out)
    extra["threads"] = torch.get_num_threads()
    md = write_results("engines", rows, HEADER, args.out, extra)
    setup = f"- threads per contender: {extra['threads']}\n" + "\n".join(
        f"- {k}: {v:.1f} s" for k, v in extra["setup_seconds"].items()
    )
    with open(Path(args.out) / "engines.md", "a") as f:
        f.write(f"\nSetup (not in the timings):\n{setup}\n")
    print(md + "\nSetup:\n" + setup)


if __name__ == "__main__":
    main()
