"""`sdclip serve` under load, loopback only, bounded in count and time (issue 13, item 4).

    python bench/bench_serve.py [--requests 10000] [--clients 200] [--rounds 3] [--queue-size 256] [--out bench/out]
    python bench/bench_serve.py --vit-l --requests 200 --clients 50     # SD1's tower shape, random weights

1. load: ``--clients`` concurrent clients send ``--requests`` requests mixing /v1/encode (A1111, ComfyUI,
   diffusers; with and without negatives), /v1/embeddings and /v1/tokenize; every answer is checked against
   the same request run in this process (``encode_prompts`` with no cache, ``TextEncoder.encode``, the
   tokenizer and chunker): lost, wrong, 5xx counted; p50 / p99 latency and throughput.  ``--rounds`` times,
   against a fresh server each (empty caches);
2. the engine's own throughput on the same work (in-process, batches of 64, a fresh conditioning cache), run
   before the first round and after each: a round's prompts/s over the engine's in the faster of the runs either
   side of it is the ratio the issue asks to be >= 0.8 (this host's speed drifts by tens of % within minutes);
   every round and the median are reported;
3. (the last round's server) overload: twice ``--queue-size`` heavy requests at once: 503s with Retry-After, no
   crash, then recovery (a normal request answers, /readyz is 200, the queue is empty);
4. disconnects: rounds of heavy requests whose clients go away mid-request; RSS and queue depth of the server
   before and after.

The server runs in its own process on 127.0.0.1 with the bundled sdclip-mini.  It keeps its HTTP process on one
core and its model process on the others; the load clients stand for other machines and run on the HTTP process's
core, off the model's (``--driver-anywhere``: on any core, as the scheduler places them).  The load clients are a
minimal keep-alive HTTP/1.1 client (``Connection``) with their request bodies and expected answers prepared before
the clock starts, and compare each answer's bytes with the reference's (the tensors' difference is computed only
when they differ), on uvloop, so that the driver costs the server little CPU; the server's and the driver's CPU
seconds are reported with the load figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import orjson
import torch
import uvloop
from safetensors.torch import load as load_safetensors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from common import machine, random_vit_l, write_results  # noqa: E402

import sdclip  # noqa: E402
from sdclip.cache import ConditioningCache  # noqa: E402
from sdclip.prompts import chunk  # noqa: E402
from sdclip.serve.process import model_threads, split_cores  # noqa: E402

COLOURS = ["red", "blue", "green", "orange", "purple", "yellow", "white", "black"]
SHAPES = ["star", "square", "circle", "cross", "triangle", "hexagon"]
PREFIXES = [
    "",
    "masterpiece, best quality, ",
    "(masterpiece:1.2), highly detailed, sharp focus, ",
    "a photo of ",
    "(cinematic lighting:1.1), 8k, ",
]
NEGATIVES = [None, "blurry", "lowres, (bad anatomy:1.2), worst quality", "ugly"]


def prompt(rng: random.Random) -> str:
    text = f"{rng.choice(PREFIXES)}a ({rng.choice(COLOURS)}:{rng.choice([1.0, 1.1, 1.3])}) {rng.choice(SHAPES)}"
    if rng.random() < 0.3:
        text += f" above a [{rng.choice(COLOURS)}] {rng.choice(SHAPES)}"
    if rng.random() < 0.05:
        text += ", " + ", ".join(rng.choice(COLOURS) + " " + rng.choice(SHAPES) for _ in range(30))  # 2 chunks
    return text


def workload(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``n`` requests: 50 % encode, 30 % embeddings, 20 % tokenize, 1-4 prompts each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            k = rng.randint(1, 4)
            body = {
                "prompts": [prompt(rng) for _ in range(k)],
                "dialect": rng.choice(["a1111", "comfy", "diffusers"]),
                "negative": rng.choice(NEGATIVES),
            }
            out.append(("/v1/encode", body))
        elif r < 0.8:
            out.append(
                (
                    "/v1/embeddings",
                    {"input": [prompt(rng).replace("(", "").replace(")", "") for _ in range(rng.randint(1, 4))]},
                )
            )
        else:
            out.append(("/v1/tokenize", {"prompt": prompt(rng), "dialect": rng.choice(["a1111", "comfy", "compel"])}))
    return out


def key(path: str, body: dict) -> str:
    return path + json.dumps(body, sort_keys=True)


def reference(te: sdclip.TextEncoder, path: str, body: dict) -> object:
    """The in-process answer to one request."""
    if path == "/v1/encode":
        cond = sdclip.encode_prompts(te, body["prompts"], body["negative"], dialect=body["dialect"], cache=None)
        return {"hidden": cond.hidden, "negative_hidden": cond.negative_hidden}
    if path == "/v1/embeddings":
        out = te.encode(body["input"], hidden=False)
        return out.pooled if out.pooled_projected is None else out.pooled_projected  # a tower without projection
    tok = te.tokenizers[0]
    tree = chunk(body["prompt"], body["dialect"], tok, pad_id=te.towers[0].config.pad_id)
    return tok.encode(body["prompt"]), [list(r) for r in tree.ids], [list(r) for r in tree.weights]


class Expected:
    """A reference answer in the form a response is compared with cheaply: the raw bytes, shape and dtype of each
    tensor (a safetensors body), the embeddings as Python floats, or the tokenizer's lists."""

    def __init__(self, path: str, want: object):
        self.path, self.want = path, want
        if path == "/v1/encode":
            self.tensors = {
                k: (str(v.dtype).removeprefix("torch."), list(v.shape), v.contiguous().numpy().tobytes())
                for k, v in want.items()  # type: ignore[union-attr]
            }
        elif path == "/v1/embeddings":
            self.vectors = want.tolist()  # type: ignore[union-attr]  # float32 -> float: exact

    def difference(self, body: bytes) -> float:
        """0.0 when the answer is the in-process one bit for bit, else the largest |difference| (inf: other shape)."""
        if self.path == "/v1/encode":
            return 0.0 if self._same_tensors(body) else self._tensor_difference(body)
        data = orjson.loads(body)
        if self.path == "/v1/embeddings":
            got = [d["embedding"] for d in data["data"]]
            if got == self.vectors:
                return 0.0
            got = torch.tensor(got, dtype=torch.float32)
            return float("inf") if got.shape != self.want.shape else float((got - self.want).abs().max())
        leaf = data["chunks"]
        same = (data["ids"], [c["ids"] for c in leaf["chunks"]], [c["weights"] for c in leaf["chunks"]]) == self.want
        return 0.0 if same else float("inf")

    def _same_tensors(self, body: bytes) -> bool:
        """The safetensors body holds exactly the expected tensors, byte for byte."""
        n = int.from_bytes(body[:8], "little")
        header = orjson.loads(body[8 : 8 + n])
        header.pop("__metadata__", None)
        if set(header) != set(self.tensors):
            return False
        data = memoryview(body)[8 + n :]
        for k, (dtype, shape, raw) in self.tensors.items():
            entry = header[k]
            start, end = entry["data_offsets"]
            if entry["dtype"] != _SAFETENSORS_DTYPES[dtype] or entry["shape"] != shape or data[start:end] != raw:
                return False
        return True

    def _tensor_difference(self, body: bytes) -> float:
        got, want = load_safetensors(body), self.want
        if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):  # type: ignore[union-attr]
            return float("inf")
        return max(float((got[k] - want[k]).abs().max()) for k in want)  # type: ignore[index, union-attr]


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def engine_seconds(te: sdclip.TextEncoder, requests: list[tuple[str, dict]], batch: int = 64) -> float:
    """The same work in-process, batched: encode prompts grouped by dialect and negative, embeddings in batches,
    tokenize one by one (a fresh conditioning cache: repeats inside the workload are free, as in the server)."""
    cache = ConditioningCache()
    groups: dict[tuple, list[str]] = {}
    inputs, tokenize = [], []
    for path, body in requests:
        if path == "/v1/encode":
            groups.setdefault((body["dialect"], body["negative"]), []).extend(body["prompts"])
        elif path == "/v1/embeddings":
            inputs.extend(body["input"])
        else:
            tokenize.append(body)
    t0 = time.perf_counter()
    for (dialect, negative), prompts in groups.items():
        conditioner = sdclip.Conditioner(te, dialect, cache=cache)
        for s in range(0, len(prompts), batch):
            conditioner.encode(prompts[s : s + batch], negative)
    for s in range(0, len(inputs), batch):
        te.encode(inputs[s : s + batch], hidden=False)
    tok = te.tokenizers[0]
    for body in tokenize:
        tok.encode(body["prompt"])
        chunk(body["prompt"], body["dialect"], tok, pad_id=te.towers[0].config.pad_id)
    return time.perf_counter() - t0


def prompts_in(body: dict) -> int:
    value = body.get("prompts", body.get("input", body.get("prompt")))
    return 1 if isinstance(value, str) else len(value)


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, one request at a time: a few lines of asyncio instead of a
    general client, so that the load test measures the server rather than its driver."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request_bytes(self, path: str, body: bytes, accept: str) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The status and body of the answer to ``request`` (raises OSError or asyncio.IncompleteReadError)."""
        if self.reader is None or self.reader.at_eof():  # first use, or the server closed an idle connection
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            raise OSError(f"an answer without a length (status {status})")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load_phase(base: str, requests: list, wants: dict, clients: int) -> dict:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connections = [Connection(host, int(port)) for _ in range(clients)]
    # the bodies and expected answers are ready before the clock starts: clients send what they have
    accept = {"/v1/encode": "application/octet-stream"}
    todo = [
        (
            path,
            connections[0].request_bytes(path, json.dumps(body).encode(), accept.get(path, "application/json")),
            wants[key(path, body)],
        )
        for path, body in requests
    ]
    todo.reverse()  # popped from the end: the workload's order
    latencies, statuses, wrong, lost, worst = [], {}, {}, 0, 0.0

    async def worker(connection: Connection) -> None:
        nonlocal lost, worst
        while todo:
            path, request, want = todo.pop()
            t0 = time.perf_counter()
            try:
                status, body = await connection.send(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                connection.close()
                lost += 1
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                delta = want.difference(body)
                if delta:
                    wrong[path] = wrong.get(path, 0) + 1
                    worst = max(worst, delta)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for c in connections:
            c.close()
    wall = time.perf_counter() - t0
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {
        "wall_s": wall,
        "statuses": statuses,
        "wrong": sum(wrong.values()),
        "wrong_by_route": wrong,
        "max_abs_difference": worst,
        "lost": lost,
        "answered": len(latencies),
        "p50_ms": 1000 * pick(0.5),
        "p99_ms": 1000 * pick(0.99),
        "max_ms": 1000 * latencies[-1],
    }


def heavy(i: int) -> dict:
    """A request of 16 distinct one-chunk prompts."""
    return {"prompts": [f"{i} {j} " + "a (red:1.1) star, blue square, " * 4 for j in range(16)], "dialect": "a1111"}


async def overload_phase(base: str, n: int, te: sdclip.TextEncoder) -> dict:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        rs = await asyncio.gather(
            *(
                client.post("/v1/encode", json=heavy(i), headers={"Accept": "application/octet-stream"})
                for i in range(n)
            ),
            return_exceptions=True,
        )
        statuses: dict[int, int] = {}
        retry_after = True
        checked = wrong = 0
        for i, r in enumerate(rs):
            if isinstance(r, Exception):
                statuses[-1] = statuses.get(-1, 0) + 1
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 503:
                retry_after &= r.headers.get("retry-after") == "1"
            elif r.status_code == 200 and checked < 8:  # a sample of the heavy answers
                checked += 1
                want = sdclip.encode_prompts(te, heavy(i)["prompts"], dialect="a1111", cache=None)
                wrong += not torch.equal(load_safetensors(r.content)["hidden"], want.hidden)
        after = await client.post("/v1/encode", json={"prompts": "a red star", "dialect": "a1111"})
        ready = await client.get("/readyz")
    return {
        "sent": n,
        "statuses": statuses,
        "retry_after_on_every_503": retry_after,
        "sample_checked": checked,
        "sample_wrong": wrong,
        "recovered": after.status_code == 200 and ready.status_code == 200,
    }


async def disconnect_round(base: str, n: int, after_s: float) -> int:
    """``n`` heavy requests whose clients give up after ``after_s``: returns how many were cut off."""
    async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=n), timeout=300) as client:
        tasks = [asyncio.create_task(client.post("/v1/encode", json=heavy(10_000 + i))) for i in range(n)]
        await asyncio.sleep(after_s)
        cut = sum(not t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return cut


def descendants(pid: int) -> list[int]:
    """The server's own processes below ``pid``: its model processes."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def model_processes(pid: int) -> list[int]:
    """The server's model processes (its descendants but multiprocessing's resource tracker)."""
    return [p for p in descendants(pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def rss_kb(pid: int) -> int:
    """Resident memory of the server: its HTTP process and its model processes (shared weights counted in each)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (on a shared machine, a steadier measure than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in model_processes(pid))


def metric(base: str, name: str) -> float:
    """The sum of a metric's samples over its labels, from /metrics."""
    text = httpx.get(base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def queue_depth(base: str) -> float:
    return metric(base, "sdclip_queue_depth")


def settle(base: str, timeout: float = 60) -> float:
    """Wait until the queue is empty and the server idle; returns the queue depth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and queue_depth(base) > 0:
        time.sleep(0.2)
    time.sleep(1.0)
    return queue_depth(base)


def timed_cpu(f, *args) -> tuple[float, float]:
    """``f(*args)`` (which returns its wall seconds) and the CPU seconds this process spent in it."""
    cpu = time.process_time()
    wall = f(*args)
    return wall, time.process_time() - cpu


def start_server(args: argparse.Namespace, threads: int) -> tuple[subprocess.Popen, str]:
    """``sdclip serve`` on a free loopback port, once /readyz answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    options = {"--queue-size": args.queue_size, "--max-batch": args.max_batch, "--max-wait-ms": args.max_wait_ms}
    server = subprocess.Popen(
        [sys.executable, "-m", "sdclip.cli", "serve", "--port", str(port), "--log-level", "warning"]
        + [str(x) for kv in options.items() for x in kv]
        + ["--threads", str(threads), *(["--model", args.model] if args.model else [])]
        + (["--no-pin-cores"] if args.no_pin_cores else []),
        env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")},
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def load_round(server: subprocess.Popen, base: str, requests: list, wants: dict, args: argparse.Namespace) -> dict:
    """One load phase, with the batches, the cores and the CPU seconds of the server's processes and the driver."""
    server_cpu, model_cpu, client_cpu = cpu_seconds(server.pid), model_cpu_seconds(server.pid), time.process_time()
    batches = metric(base, "sdclip_batch_prompts_count"), metric(base, "sdclip_batch_prompts_sum")
    allowed, http_cores = os.sched_getaffinity(0), os.sched_getaffinity(server.pid)
    if not args.driver_anywhere:  # this thread only: the driver is this thread's event loop
        os.sched_setaffinity(0, http_cores)
    try:
        load = uvloop.run(load_phase(base, requests, wants, args.clients))
    finally:
        os.sched_setaffinity(0, allowed)
    load["server_cpu_s"] = cpu_seconds(server.pid) - server_cpu  # the HTTP process
    load["model_cpu_s"] = model_cpu_seconds(server.pid) - model_cpu  # the model's process
    load["client_cpu_s"] = time.process_time() - client_cpu  # the driver and its exactness checks
    load["batches"] = metric(base, "sdclip_batch_prompts_count") - batches[0]
    load["mean_batch_prompts"] = (metric(base, "sdclip_batch_prompts_sum") - batches[1]) / max(1, load["batches"])
    load["driver_cores"] = sorted(allowed if args.driver_anywhere else http_cores)
    load["http_cores"] = sorted(http_cores)
    load["model_cores"] = sorted(set().union(*(os.sched_getaffinity(p) for p in model_processes(server.pid))))
    return load


def faults(server: subprocess.Popen, base: str, te: sdclip.TextEncoder, queue_size: int) -> tuple[dict, dict]:
    """The overload and disconnect phases."""
    overload = asyncio.run(overload_phase(base, 2 * queue_size, te))
    overload["server_alive"] = server.poll() is None
    overload["queue_depth_after"] = settle(base)
    print(json.dumps(overload), file=sys.stderr)
    before_rss = rss_kb(server.pid)
    cuts = [asyncio.run(disconnect_round(base, 100, 0.3)) for _ in range(5)]
    depth = settle(base)
    after_rss = rss_kb(server.pid)
    disconnect = {
        "rounds": 5,
        "cut_off": cuts,
        "queue_depth_after": depth,
        "rss_before_mb": before_rss / 1024,
        "rss_after_mb": after_rss / 1024,
        "rss_growth_pct": 100 * (after_rss - before_rss) / before_rss,
        "server_alive": server.poll() is None,
        "still_answers": httpx.post(base + "/v1/tokenize", json={"prompt": "a"}).status_code == 200,
    }
    print(json.dumps(disconnect), file=sys.stderr)
    return overload, disconnect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, choices=range(1, 100), metavar="N", help="load rounds (default 3)")
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: the cores less one)")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--quick", action="store_true", help="1,000 requests, 50 clients")
    ap.add_argument("--load-only", action="store_true", help="skip the overload and disconnect phases")
    ap.add_argument(
        "--no-pin-cores",
        action="store_true",
        help="run the server with --no-pin-cores (its processes, and so the load clients, on any core)",
    )
    ap.add_argument(
        "--driver-anywhere",
        action="store_true",
        help="let the load clients run on any core (default: on the server's HTTP core, off the model's)",
    )
    ap.add_argument("--model", help="the checkpoint to serve (default: the bundled sdclip-mini)")
    ap.add_argument(
        "--vit-l",
        action="store_true",
        help="serve a random CLIP ViT-L/14 text tower, SD1's shape, where encoding outweighs HTTP (load phase only; "
        "results as serve_vitl; use a few hundred requests: a prompt costs ~0.1 s of one core)",
    )
    args = ap.parse_args()
    if args.quick:
        args.requests, args.clients = 1000, 50
    folder = None
    if args.vit_l:
        folder = tempfile.TemporaryDirectory()
        random_vit_l(folder.name)
        args.model, args.load_only = folder.name, True
    warnings.simplefilter("ignore", UserWarning)  # truncation notes of the long prompts
    # the server's torch threads (its default: the cores less one); GEMMs round with the thread count, and the
    # references must be computed as the server computes
    threads = args.threads or model_threads(split_cores(), 1)
    torch.set_num_threads(threads)
    te = sdclip.load(args.model) if args.model else sdclip.load()
    requests = workload(args.requests)
    t0 = time.perf_counter()
    wants = {}
    for path, body in requests:
        k = key(path, body)
        if k not in wants:
            wants[k] = Expected(path, reference(te, path, body))
    print(f"references for {len(wants)} distinct requests: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    prompts = sum(prompts_in(b) for _, b in requests)
    # rounds against a fresh server each (empty caches), between runs of the engine: a round's ratio is its
    # throughput over the engine's in the faster of the runs just before and after it (this host's speed drifts
    # by tens of %); neighbouring rounds share an engine run
    engine_runs, rounds, exit_codes = [timed_cpu(engine_seconds, te, requests)], [], []
    for number in range(args.rounds):
        server, base = start_server(args, threads)
        last = number == args.rounds - 1
        try:
            baseline_rss = rss_kb(server.pid)
            load = load_round(server, base, requests, wants, args)
            settle(base)
            after_load_rss = rss_kb(server.pid)
            overload = disconnect = None
            if last and not args.load_only:
                overload, disconnect = faults(server, base, te, args.queue_size)
            server.send_signal(signal.SIGTERM)
            exit_codes.append(server.wait(60))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        engine_runs.append(timed_cpu(engine_seconds, te, requests))
        engine = min(engine_runs[-2][0], engine_runs[-1][0])  # the faster neighbour: the engine's best case
        load["requests_per_s"] = args.requests / load["wall_s"]
        load["prompts_per_s"] = prompts / load["wall_s"]
        load["engine_cpu_s"] = (engine_runs[-2][1] + engine_runs[-1][1]) / 2
        load["engine_prompts_per_s"] = prompts / engine
        load["ratio_to_engine"] = load["prompts_per_s"] / load["engine_prompts_per_s"]
        print(json.dumps(load), file=sys.stderr)
        rounds.append(load)
    median = sorted(rounds, key=lambda r: r["ratio_to_engine"])[(len(rounds) - 1) // 2]  # the lower one of two
    statuses: dict[int, int] = {}
    wrong_by_route: dict[str, int] = {}
    for r in rounds:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["wrong_by_route"].items():
            wrong_by_route[k] = wrong_by_route.get(k, 0) + v
    five = sum(v for k, v in statuses.items() if k >= 500)
    total = lambda k: sum(r[k] for r in rounds)
    rows = [
        {
            "what": f"load: {args.rounds} rounds x {args.requests} requests, {args.clients} clients"
            f" (a fresh server each)",
            "value": f"{total('answered')} answered, {total('lost')} lost, {total('wrong')} not bit-identical "
            f"{wrong_by_route or ''} (max abs difference {max(r['max_abs_difference'] for r in rounds):.1e}), "
            f"{five} 5xx (statuses {statuses})",
        },
        {
            "what": "server / engine, each round (engine: the faster of the runs before and after it)",
            "value": ", ".join(f"{r['ratio_to_engine']:.2f}x" for r in rounds)
            + f"; median {median['ratio_to_engine']:.2f}x (target >= 0.8x)",
        },
        {
            "what": "median round: latency p50 / p99 / max",
            "value": f"{median['p50_ms']:.1f} / {median['p99_ms']:.1f} / {median['max_ms']:.1f} ms",
        },
        {
            "what": "median round: throughput (engine in-process, same work, batches of 64)",
            "value": f"{median['requests_per_s']:.0f} requests/s, {median['prompts_per_s']:.0f} prompts/s "
            f"({median['engine_prompts_per_s']:.0f} prompts/s)",
        },
        {
            "what": "median round: CPU seconds of the HTTP process / model process / load driver (engine: same work)",
            "value": f"{median['server_cpu_s']:.1f} / {median['model_cpu_s']:.1f} / {median['client_cpu_s']:.1f} "
            f"({median['engine_cpu_s']:.1f})",
        },
        {
            "what": "cores: HTTP process / model process / load driver",
            "value": f"{median['http_cores']} / {median['model_cores']} / {median['driver_cores']}",
        },
    ]
    if overload is not None and disconnect is not None:
        rows += [
            {
                "what": f"overload: {overload['sent']} heavy requests (16 prompts) at once, queue {args.queue_size}",
                "value": f"statuses {overload['statuses']}, "
                f"Retry-After on every 503: {overload['retry_after_on_every_503']}, "
                f"sample of answers checked {overload['sample_checked']} wrong {overload['sample_wrong']}, "
                f"alive {overload['server_alive']}, recovered {overload['recovered']}, queue after "
                f"{overload['queue_depth_after']:g}",
            },
            {
                "what": "disconnects: 5 rounds x 100 heavy requests cut off after 0.3 s",
                "value": f"cut off {disconnect['cut_off']}, queue after {disconnect['queue_depth_after']:g}, RSS "
                f"{disconnect['rss_before_mb']:.0f} -> {disconnect['rss_after_mb']:.0f} MB "
                f"({disconnect['rss_growth_pct']:+.1f} %), still answers {disconnect['still_answers']}",
            },
        ]
    rows += [
        {
            "what": "last round: server RSS, started / after the load",
            "value": f"{baseline_rss / 1024:.0f} / {after_load_rss / 1024:.0f} MB",
        },
        {"what": "SIGTERM exit status, each round", "value": ", ".join(map(str, exit_codes))},
    ]
    text = write_results(
        "serve_vitl" if args.vit_l else "serve",
        rows,
        ["what", "value"],
        args.out,
        {
            "rounds": rounds,
            "overload": overload,
            "disconnect": disconnect,
            "exit_codes": exit_codes,
            "machine": machine(),
        },
    )
    print(text)


if __name__ == "__main__":
    main()
