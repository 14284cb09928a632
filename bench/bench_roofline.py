"""How fast could any CLIP text tower run on this CPU? A roofline for the engines benchmark's targets.

The text tower is almost all matrix products, so its time is bounded below by (its matmul FLOPs) / (the
fastest GEMM this machine runs). This benchmark measures that GEMM ceiling and puts the contenders of
``bench_engines.py`` (read from ``engines.json`` in the same ``--out`` folder, written by the same ``bench/run.py``
run, with its thread count: one in ``run.py``) against it:

* FLOPs per forward at batch B, from the ViT-L/14 config: per block the four linear maps (q, k, v, out: 4 d²),
  the MLP (2 d·mlp) and attention's QKᵀ and AV (2 n² d); no final projection (the timed output is
  ``last_hidden_state``). ``bench_engines.py`` reports each contender's FLOPs / median time.
* GEMM rates: fp32 ONNX Runtime ``MatMul`` with constant weights (prepacked, as in the exported graphs) and
  ``torch.mm``; int8 ONNX Runtime ``DynamicQuantizeMatMul`` (what ``quantize_dynamic`` graphs run: activations
  quantized per call, weights int8 per output channel) and ``MatMulInteger`` (the integer product alone:
  quantizing the activations not counted); on the tower's own shapes (M = 77·B rows, K/N from the config, fresh
  weights for each product as in a forward) and one large square product. Each rate is the best of several
  calls, the kinds interleaved.
* Ceiling = (the fastest fp32 contender's median time) / (a forward's time were it only its matmuls, each at
  the best rate measured, less the exact savings below): the most any implementation doing these products
  could gain over that contender, every non-GEMM op being free. Two bounds: every product at the best rate seen
  on any shape (the machine), or at the best rate seen on its own shape (today's GEMM libraries). For int8 the
  linear maps run at the int8 rate, attention at the fp32 rate (dynamic quantization leaves activation x
  activation products in float); also with sdclip's layout, whose first block stays float for fidelity.
* Exact FLOP savings still open: position 0 (BOS) attends only itself under the causal mask, so its column is
  the same for every prompt; causal attention needs only the lower triangle of QKᵀ and AV; layer 0's q/k/v of
  the tail (EOS and the padding after it, all the same token) depend only on the position.
* Where ONNX Runtime's time goes: its profiler's time per op type (recorded by ``bench_engines.py``), its matmul
  ops' GFLOP/s against the best measured.

    python bench/bench_roofline.py [--quick] [--batches 1 8 32] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, paired, vit_l_config, write_results

FP32_CONTENDERS = ("ONNX Runtime", "ONNX Runtime + optimizer", "OpenVINO", "torch.compile (transformers)")
EXACT_TARGET, INT8_TARGET = 1.1, 2.0
CALL_FLOPS = 1.5e9  # fresh weights per call until a call does at least this much work (~20 ms)
SQUARE = 2048


def tower_flops(batch: int, config=None) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward of ``batch`` 77-token prompts."""
    c = config or vit_l_config()
    n, d, layers = c.max_position_embeddings, c.hidden_size, c.num_hidden_layers
    linear = layers * 2 * batch * n * (4 * d * d + 2 * d * c.intermediate_size)
    attention = layers * 2 * 2 * batch * n * n * d
    return {"linear": linear, "attention": attention, "total": linear + attention}


def exact_savings(tail: int, config=None) -> dict[str, float]:
    """FLOPs per prompt an exact implementation could skip; ``tail``: positions from the EOS on."""
    c = config or vit_l_config()
    n, d = c.max_position_embeddings, c.hidden_size
    per_row = tower_flops(1, c)["linear"] / n
    return {
        "BOS column (position 0, same for every prompt)": per_row,
        "causal attention (lower triangle of QKᵀ and AV)": tower_flops(1, c)["attention"] * (1 - (n + 1) / (2 * n)),
        "layer 0 q/k/v of the tail (depends only on the position)": tail * 2 * 3 * d * d,
    }


def gemm_shapes(batch: int, config=None) -> list[tuple[int, int, int]]:
    """(M, K, N) of the tower's weight products: q/k/v/out, q+k+v fused, MLP in, MLP out."""
    c = config or vit_l_config()
    m, d, f = batch * c.max_position_embeddings, c.hidden_size, c.intermediate_size
    return [(m, d, d), (m, d, 3 * d), (m, d, f), (m, f, d)]


def _ort_products(m: int, k: int, n: int, copies: int, kind: str, threads: int) -> Callable[[], None]:
    """One ONNX Runtime session running ``copies`` products of the same input by constant weights, timed
    through IO binding (outputs preallocated: no copy, no allocation in the timings)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    x = rng.standard_normal((m, k), dtype=np.float32)
    in_type, out_type = TensorProto.FLOAT, TensorProto.FLOAT
    for i in range(copies):
        w, y = f"w{i}", f"y{i}"
        if kind == "fp32 MatMul":
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), w))
            nodes.append(helper.make_node("MatMul", ["x", w], [y]))
        else:
            inits.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), w))
            inits.append(numpy_helper.from_array(np.zeros(n, np.int8), f"{w}_zero"))
            if kind == "int8 DynamicQuantizeMatMul":
                inits.append(numpy_helper.from_array(np.full(n, 1e-3, np.float32), f"{w}_scale"))
                nodes.append(
                    helper.make_node(
                        "DynamicQuantizeMatMul", ["x", w, f"{w}_scale", f"{w}_zero"], [y], domain="com.microsoft"
                    )
                )
            else:  # MatMulInteger: u8 activations given, int32 out
                in_type, out_type = TensorProto.UINT8, TensorProto.INT32
                if i == 0:
                    inits.append(numpy_helper.from_array(np.array(128, np.uint8), "x_zero"))
                nodes.append(helper.make_node("MatMulInteger", ["x", w, "x_zero", f"{w}_zero"], [y]))
        outputs.append(helper.make_tensor_value_info(y, out_type, [m, n]))
    if in_type == TensorProto.UINT8:
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", in_type, [m, k])], outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    out_dtype = np.int32 if out_type == TensorProto.INT32 else np.float32
    for o in outputs:
        binding.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_numpy(np.empty((m, n), out_dtype)))
    return lambda: session.run_with_iobinding(binding)


def _torch_products(m: int, k: int, n: int, copies: int) -> Callable[[], None]:
    """``copies`` ``torch.mm`` of one input by weights stored as ``nn.Linear`` stores them ([N, K], used
    transposed), into a preallocated output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    weights = [torch.randn(n, k, generator=g) for _ in range(copies)]
    out = torch.empty(m, n)

    def run() -> None:
        for w in weights:
            torch.mm(x, w.t(), out=out)

    return run


KINDS = ("fp32 MatMul", "fp32 torch.mm", "int8 DynamicQuantizeMatMul", "int8 MatMulInteger")


def gemm_rates(shapes: list[tuple[int, int, int]], repeats: int, threads: int = 1) -> list[dict]:
    """GFLOP/s (int8: GOP/s) of each product kind on each shape on ``threads`` threads: best call and median
    call, the kinds interleaved per shape."""
    rows = []
    with torch.inference_mode():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for m, k, n in shapes:
                copies = max(1, math.ceil(CALL_FLOPS / (2 * m * k * n)))
                calls = {
                    kind: _torch_products(m, k, n, copies)
                    if kind == "fp32 torch.mm"
                    else _ort_products(m, k, n, copies, kind, threads)
                    for kind in KINDS
                }
                times = paired(calls, repeats=repeats)
                flops = 2 * m * k * n * copies
                for kind, ts in times.items():
                    rows.append(
                        {
                            "M x K x N": f"{m} x {k} x {n}",
                            "product": kind,
                            "weights per call": copies,
                            "best GFLOP/s": round(flops / min(ts) / 1e9, 1),
                            "median GFLOP/s": round(flops / median(ts) / 1e9, 1),
                            "spread (max/min time)": f"{max(ts) / min(ts):.2f}",
                        }
                    )
        finally:
            torch.set_num_threads(before)
    return rows


def ort_op_seconds(path: str, feeds: dict, runs: int, threads: int = 1) -> dict[str, float]:
    """Seconds an ONNX Runtime graph spends in each op type, and in the whole run ("run"), in its median run of
    ``runs`` after a warm-up one (its profiler; the median run, as on a shared machine some runs wait)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    timed = sorted((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])[1:]
    chosen = sorted(timed, key=lambda e: e["dur"])[len(timed) // 2]
    seconds = {"run": chosen["dur"] / 1e6}
    for e in events:
        kernel = e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        if kernel and chosen["ts"] <= e["ts"] <= chosen["ts"] + chosen["dur"]:
            op = e["args"]["op_name"]
            seconds[op] = seconds.get(op, 0.0) + e["dur"] / 1e6
    return seconds


def _is_matmul(op: str) -> bool:
    return "MatMul" in op or op == "Gemm"


def profile_rows(profiles: dict[str, dict[str, dict[str, float]]], rates: list[dict]) -> list[dict]:
    """Where the ONNX Runtime contenders' time goes: their matmul ops against the GEMM ceiling, the rest."""
    rows = []
    for batch, graphs in profiles.items():
        flops = tower_flops(int(batch))["total"]
        for graph, ops in graphs.items():
            gemm = sum(t for op, t in ops.items() if _is_matmul(op))
            rest = sorted((t, op) for op, t in ops.items() if op != "run" and not _is_matmul(op))
            best = _best(rates, "int8" if "int8" in graph else "fp32")
            rows.append(
                {
                    "batch": batch,
                    "graph": graph,
                    "run ms": f"{ops['run'] * 1e3:.1f}",
                    "matmul ops ms (share)": f"{gemm * 1e3:.1f} ({100 * gemm / ops['run']:.0f}%)",
                    "matmul ops GFLOP/s": f"{flops / gemm / 1e9:.1f} ({100 * flops / gemm / 1e9 / best:.0f}% of best)",
                    "other ops ms": f"{(ops['run'] - gemm) * 1e3:.1f}",
                    "largest other ops (ms)": ", ".join(f"{op} {t * 1e3:.1f}" for t, op in rest[::-1][:4]),
                }
            )
    return rows


def engines_results(out: str) -> tuple[dict[int, dict[str, float]], dict, int]:
    """batch -> contender -> median seconds, the ONNX Runtime op profiles and the threads per contender, from
    the engines benchmark's results in ``out`` (nothing, 1 thread when it has not run)."""
    path = Path(out) / "engines.json"
    if not path.exists():
        return {}, {}, 1
    results = json.loads(path.read_text())
    times: dict[int, dict[str, float]] = {}
    for row in results["rows"]:
        times.setdefault(int(row["batch"]), {})[row["contender"]] = float(row["ms"]) / 1e3
    return times, results.get("ort_op_seconds", {}), results.get("threads", 1)


def _best(rates: list[dict], prefix: str, shape: tuple[int, int, int] | None = None) -> float:
    """Best GFLOP/s of the ``prefix`` ("fp32" / "int8") products, on ``shape`` or on any shape."""
    label = shape and " x ".join(map(str, shape))
    return max(r["best GFLOP/s"] for r in rates if r["product"].startswith(prefix) and label in (None, r["M x K x N"]))


def ideal_seconds(batch: int, rates: list[dict], linear: str, per_shape: bool, float_blocks: int = 0) -> float:
    """A forward's time were it only its matmuls, each at the best rate measured: on any shape or on its own
    shape (q/k/v as three products or one fused, whichever is faster); the linear maps of all but the first
    ``float_blocks`` blocks run as ``linear`` ("fp32" / "int8"), attention and float blocks as fp32. The exact
    savings of the benchmark's prompts taken off."""
    config = vit_l_config()
    flops = tower_flops(batch, config)
    (m, d, _), (_, _, qkv), (_, _, f), _ = gemm_shapes(batch, config)

    def block(kind: str) -> float:
        if not per_shape:
            return flops["linear"] / config.num_hidden_layers / _best(rates, kind) / 1e9
        t = {s: 2 * s[0] * s[1] * s[2] / _best(rates, kind, s) / 1e9 for s in gemm_shapes(batch, config)}
        return min(3 * t[m, d, d], t[m, d, qkv]) + t[m, d, d] + t[m, d, f] + t[m, f, d]

    layers = config.num_hidden_layers
    seconds = (layers - float_blocks) * block(linear) + float_blocks * block("fp32")
    seconds += flops["attention"] / _best(rates, "fp32") / 1e9
    saved = batch * sum(exact_savings(1, config).values())  # the benchmark's prompts fill all 77 positions
    return seconds * (1 - saved / flops["total"])


def _reachable(left: float) -> str:
    return f"{'yes' if left >= 0 else 'no'} ({left * 1e3:.1f} ms)"


def ceilings(batch: int, times: dict[str, float], rates: list[dict]) -> list[dict]:
    """The roofline rows of one batch size, one per bound: every matmul at the best rate seen on any shape
    (the machine's), or at the best rate seen on its own shape (today's GEMM libraries'). Time
    left for the rest: what a target leaves for everything but the matmuls (negative: out of reach even were
    all of it free)."""
    flops = tower_flops(batch)["total"]
    fastest = min((n for n in FP32_CONTENDERS if n in times), key=times.get)
    t = times[fastest]
    sdclip = ("sdclip backend=onnxruntime", "sdclip backend=onnxruntime int8")
    now = [f"{t / times[n]:.2f}x" for n in sdclip if n in times]
    rows = []
    for per_shape in (False, True):
        exact = ideal_seconds(batch, rates, "fp32", per_shape)
        int8 = ideal_seconds(batch, rates, "int8", per_shape)
        int8_sdclip = ideal_seconds(batch, rates, "int8", per_shape, float_blocks=1)
        rows.append(
            {
                "batch": batch,
                "fastest fp32 contender": f"{fastest}: {t * 1e3:.1f} ms, {flops / t / 1e9:.1f} GFLOP/s",
                "GEMM rate": "best on its own shape" if per_shape else "best on any shape",
                "exact ceiling": f"{t / exact:.3f}x",
                f"{EXACT_TARGET}x reachable (time left for the rest)": _reachable(t / EXACT_TARGET - exact),
                "int8 ceiling (all int8 / block 0 float)": f"{t / int8:.2f}x / {t / int8_sdclip:.2f}x",
                f"{INT8_TARGET:g}x reachable (all int8 / block 0 float)": " / ".join(
                    _reachable(t / INT8_TARGET - c) for c in (int8, int8_sdclip)
                ),
                "sdclip now (exact / int8)": " / ".join(now),
            }
        )
    return rows


def savings_rows() -> list[dict]:
    config = vit_l_config()
    total = tower_flops(1, config)["total"]
    rows = []
    for words, label in ((75, "the benchmark's (77 tokens)"), (20, "20 tokens"), (0, "empty")):
        tail = config.max_position_embeddings - 1 - words  # EOS at position words + 1, padding after it
        saved = exact_savings(tail, config)
        row = {"prompt": f"{label}: tail of {tail}"}
        row.update({k: f"{100 * v / total:.2f}%" for k, v in saved.items()})
        row["all"] = f"{100 * sum(saved.values()) / total:.2f}%"
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def run(batches: list[int], quick: bool, out: str) -> str:
    times, profiles, threads = engines_results(out)
    shapes = [s for b in batches for s in gemm_shapes(b)] + [(SQUARE, SQUARE, SQUARE)]
    rates = gemm_rates(shapes, repeats=3 if quick else 9, threads=threads)
    fp32, int8 = _best(rates, "fp32"), _best(rates, "int8")
    rows = [row for b in batches if b in times for row in ceilings(b, times[b], rates)]
    savings = savings_rows()
    extra = {
        "threads": threads,
        "ort_profile": profile_rows(profiles, rates),
        "best_fp32_gemm_gflops": fp32,
        "best_int8_gemm_gops": int8,
        "gemm_rates": rates,
        "exact_savings": savings,
        "flops": {b: tower_flops(b) for b in batches},
    }
    sections = [
        f"Best GEMM on {threads} thread(s): fp32 {fp32:.1f} GFLOP/s, int8 {int8:.1f} GOP/s\n\n" + table(rates),
        "Exact FLOP savings left, as a share of the model's matmul FLOPs:\n\n" + table(savings),
    ]
    if profiles:
        sections.insert(1, "Where ONNX Runtime's time goes (its profiler, same run):\n\n" + table(extra["ort_profile"]))
    if not rows:
        sections.insert(0, "(no engines.json in the output folder: run bench_engines.py first for the ceilings)")
    md = write_results("roofline", rows, list(rows[0]) if rows else ["batch"], out, extra)
    md += "".join(f"\n{section}\n" for section in sections)
    (Path(out) / "roofline.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 timed calls per product instead of 9")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    print(run(**vars(ap.parse_args())))


if __name__ == "__main__":
    main()
