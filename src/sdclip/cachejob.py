"""``sdclip cache``: a caption dataset -> cached conditioning on disk, exact and resumable.

The job, in two passes over the inputs (reading is cheap next to encoding):

1. plan and encode: rows are read in their fixed order (``dataset``); each caption not seen before gets
   the next *unique* number u, and unique u is stored in shard ``u // shard_rows`` at row
   ``u % shard_rows``.  A full shard is encoded in batches of ``batch_size`` captions in unique order
   (the same batches on every run and under any engine), written to a temp file, fsynced, renamed to
   ``shards/shard-NNNNNN.safetensors`` and only then committed: ``commits/shard-NNNNNN.json`` (the
   manifest's journal: rows, the file's sha256, a digest of its captions, rows that failed).  A shard
   whose commit matches the plan is not encoded again: that is resume.
2. index: the rows are read again and ``index.parquet`` (id, caption, caption sha256, shard, row, token
   count, truncated), ``errors.jsonl`` and, for ``--format kohya``, the ``.npz`` files are written
   (each atomically), then ``manifest.json`` says ``complete``.

A kill at any moment leaves only whole files at final paths; starting the same command again finishes
the job with the same bits.  Encoding runs in float32 (exact); rows are stored cast to ``dtype``.
Cross-call state that could make a batch's bits depend on what ran before (the conditioning cache, the
prefix cache) is off or cleared per batch, so every batch is a function of its captions alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from . import atomic
from .dataset import Columns, Row, expand, read_rows, require_pyarrow
from .errors import BadInput, SdclipError

if TYPE_CHECKING:
    import sdclip

FORMAT = "sdclip-cache"
FORMAT_VERSION = 1
CHUNK = 77
_INDEX_BATCH = 65536


@dataclass(frozen=True)
class CacheOptions:
    """What a cache's bits depend on (all recorded in the manifest; a DIR made with other values is refused).

    ``dialect`` etc.: as ``encode_prompts``; ``layer`` / ``final_norm`` / ``encoder``: raw hidden states as
    ``TextEncoder.encode`` gives them (then ``dialect`` is not used).  ``dtype``: the stored dtype."""

    model: str | None = None
    dialect: str = "diffusers"
    clip_skip: int | None = None
    embeddings: str | None = None
    dialect_options: dict[str, Any] = field(default_factory=dict)  # the front end's own (its CLI options)
    layer: int | None = None
    final_norm: bool | None = None
    encoder: int | None = None
    dtype: str = "float16"
    device: str = "cpu"
    mode: str = "hf"
    batch_size: int = 64
    shard_rows: int = 4096
    format: str = "sdclip"
    caption_column: str | None = None
    id_column: str | None = None
    max_chars: int = 20_000

    @property
    def raw(self) -> bool:
        return self.layer is not None or self.final_norm is not None or self.encoder is not None

    def identity(self, inputs: Sequence[Path]) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "model"}
        out["inputs"] = [str(p) for p in inputs]
        return out

    def check(self) -> None:
        if self.batch_size < 1 or self.shard_rows < 1:
            raise BadInput("--batch-size and --shard-rows must be at least 1")
        if self.dtype not in _DTYPES:
            raise BadInput(f"unknown dtype {self.dtype!r}; choose one of {', '.join(_DTYPES)}")
        if self.format not in ("sdclip", "kohya"):
            raise BadInput(f"unknown format {self.format!r}; choose sdclip or kohya")
        if self.format == "kohya":
            if self.raw or self.dialect not in ("diffusers", "plain") or self.clip_skip is not None:
                raise BadInput(
                    "--format kohya writes what kohya's SDXL caching computes (diffusers-style plain "
                    "prompts, no clip skip): drop --dialect / --clip-skip / --layer / --final-norm / "
                    "--encoder"
                )
            if self.dtype == "bfloat16":
                raise BadInput(
                    "--format kohya: numpy has no bfloat16 (kohya stores bf16 outputs as float32); use "
                    "--dtype float32 or float16"
                )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- encoding one shard ---------------------------------------------------------------------------------


class RowEncoder:
    """The model and options that turn a list of captions into per-row tensors; one per process / actor."""

    def __init__(self, options: CacheOptions, te: sdclip.TextEncoder | None = None):
        import sdclip

        self.options = options
        self.te = (
            te
            if te is not None
            else sdclip.load(options.model, dtype="float32", device=options.device, tokenizer_mode=options.mode)
        )
        front_end = dict(options.dialect_options)
        self.step = front_end.pop("step", 0)  # which sampler step's prompt editing (A1111): an encode argument
        self.conditioner = (
            None
            if options.raw
            else sdclip.Conditioner(
                self.te,
                options.dialect,
                clip_skip=options.clip_skip,
                embeddings=options.embeddings,
                cache=None,
                **front_end,
            )
        )  # no cross-call cache: a batch's bits depend on it alone

    def encode(self, captions: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption: ``hidden`` [77 k, C] and, where the model gives them, ``pooled`` (and, raw,
        ``pooled_projected``) — what ``encode_prompts`` gives that caption alone."""
        self.te.reuse.cache.clear()  # prefixes cached by earlier batches would make bits depend on history
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation etc.: the index records it per row
            if self.conditioner is None:
                o = self.options
                out = self.te.encode(list(captions), encoder=o.encoder or 1, layer=o.layer, final_norm=o.final_norm)
                parts = {"hidden": out.hidden, "pooled": out.pooled, "pooled_projected": out.pooled_projected}
                return [{k: v[i] for k, v in parts.items() if v is not None} for i in range(len(captions))]
            cond = self.conditioner.encode(list(captions), step=self.step)
            if cond.hidden.shape[1] != CHUNK and len(captions) > 1:
                # a long caption pads its companions (A1111 repeats, ComfyUI tiles, compel appends): encode each
                # caption of this batch alone, as encode_prompts would
                return [row for c in captions for row in self.encode([c])]
            return [
                {"hidden": cond.hidden[i], **({} if cond.pooled is None else {"pooled": cond.pooled[i]})}
                for i in range(len(captions))
            ]

    def token_count(self, caption: str) -> int:
        """The caption's tokens as plain text on the first tokenizer (BOS / EOS not counted)."""
        return len(self.te.tokenizers[0].encode(caption)) - 2


def encode_shard(encoder: RowEncoder, captions: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """One shard's tensors (rows in caption order) and the rows that failed, with the reason.

    ``hidden`` [n, L, C] (zero beyond a row's ``length``), ``length`` [n], ``token_count`` [n], ``failed`` [n],
    ``pooled`` [n, P] when the model gives one.  Batches: consecutive runs of ``batch_size`` captions."""
    dtype = _DTYPES[encoder.options.dtype]
    rows: list[dict[str, torch.Tensor] | None] = []
    failed: dict[int, str] = {}
    size = encoder.options.batch_size
    for start in range(0, len(captions), size):
        batch = captions[start : start + size]
        try:
            rows.extend(encoder.encode(batch))
        except BadInput:  # a caption the front end refuses: find which, keep the others
            for i, caption in enumerate(batch):
                try:
                    rows.extend(encoder.encode([caption]))
                except BadInput as e:
                    failed[start + i] = str(e)
                    rows.append(None)
    good = [r for r in rows if r is not None]
    template = good[0] if good else None
    length = max((r["hidden"].shape[0] for r in good), default=CHUNK)
    tensors: dict[str, torch.Tensor] = {}
    n = len(captions)
    if template is not None:
        width = template["hidden"].shape[-1]
        hidden = torch.zeros(n, length, width, dtype=dtype)
        for i, r in enumerate(rows):
            if r is not None:
                hidden[i, : r["hidden"].shape[0]] = r["hidden"].to("cpu", dtype)
        tensors["hidden"] = hidden
        for key in [k for k in template if k != "hidden"]:
            tensors[key] = torch.stack(
                [
                    r[key].to("cpu", dtype)
                    if r is not None
                    else torch.zeros_like(template[key], device="cpu", dtype=dtype)
                    for r in rows
                ]
            )
    tensors["length"] = torch.tensor([0 if r is None else r["hidden"].shape[0] for r in rows], dtype=torch.int32)
    tensors["token_count"] = torch.tensor([encoder.token_count(c) for c in captions], dtype=torch.int32)
    tensors["failed"] = torch.tensor([i in failed for i in range(n)], dtype=torch.uint8)
    return tensors, failed


# --- the directory: shards, commits, manifest ---------------------------------------------------------------


def captions_digest(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(hashlib.sha256(c.encode("utf-8")).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardWork:
    """A shard to produce: its number and its unique captions, in order."""

    number: int
    captions: list[str]

    @property
    def digest(self) -> str:
        return captions_digest(self.captions)


class CacheDir:
    """The output folder's layout and its commit protocol (shared by every engine and process)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def shard_name(self, number: int) -> str:
        return f"shard-{number:06d}.safetensors"

    def shard_path(self, number: int) -> Path:
        return self.root / "shards" / self.shard_name(number)

    def commit_path(self, number: int) -> Path:
        return self.root / "commits" / f"shard-{number:06d}.json"

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise BadInput(f"{self.manifest_path}: cannot read ({e})") from None

    def write_manifest(self, manifest: dict) -> None:
        atomic.write_text(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def plan_path(self, number: int) -> Path:
        return self.root / "plans" / f"shard-{number:06d}.json"

    def write_plan(self, work: ShardWork) -> int:
        """Hand a shard's captions to another process (a Ray actor) through the folder; returns its number."""
        atomic.write_text(self.plan_path(work.number), json.dumps(work.captions))
        return work.number

    def read_plan(self, number: int) -> ShardWork:
        return ShardWork(number, json.loads(self.plan_path(number).read_text(encoding="utf-8")))

    def drop_plans(self) -> None:
        for plan in self.root.glob("plans/*.json"):
            plan.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.root / "plans").rmdir()

    def commit_of(self, number: int) -> dict | None:
        try:
            return json.loads(self.commit_path(number).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent (or unreadable: then the shard is made again)

    def write_shard(self, work: ShardWork, tensors: dict[str, torch.Tensor], failed: dict[int, str]) -> dict:
        """Write, fsync, rename the shard; then commit it.  Returns the commit record."""
        from safetensors.torch import save_file

        path = self.shard_path(work.number)
        with atomic.atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"sdclip": FORMAT})
            digest = file_sha256(tmp)
        record = {
            "shard": path.name,
            "rows": len(work.captions),
            "sha256": digest,
            "captions": work.digest,
            "failed": {str(k): v for k, v in failed.items()},
        }
        atomic.write_text(self.commit_path(work.number), json.dumps(record) + "\n")
        return record


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def produce_shard(encoder: RowEncoder, folder: CacheDir, work: ShardWork) -> dict:
    """Encode, write and commit one shard (what a local process or a Ray actor does)."""
    tensors, failed = encode_shard(encoder, work.captions)
    return folder.write_shard(work, tensors, failed)


# --- the plan: rows -> uniques -> shards ------------------------------------------------------------------


def caption_key(caption: str) -> bytes:
    """The dedup key: the caption's sha256 (the first 16 bytes in memory)."""
    return hashlib.sha256(caption.encode("utf-8")).digest()


@dataclass
class Counts:
    rows: int = 0
    unique: int = 0
    duplicates: int = 0
    errors: int = 0


@dataclass
class Plan:
    """Pass 1's state: unique numbers by caption key, and the counts."""

    shard_rows: int
    uniques: dict[bytes, int] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)

    def shards(self, rows: Iterable[Row], strict: bool) -> Iterator[ShardWork]:
        """Each shard's captions as soon as it is full (the last one possibly short)."""
        pending: list[str] = []
        for row in rows:
            self.counts.rows += 1
            if row.error is not None:
                self.counts.errors += 1
                if strict:
                    raise BadInput(f"row {row.id}: {row.error} (--strict)")
                continue
            key = caption_key(row.caption)[:16]
            if key in self.uniques:
                self.counts.duplicates += 1
                continue
            self.uniques[key] = len(self.uniques)
            self.counts.unique += 1
            pending.append(row.caption)
            if len(pending) == self.shard_rows:
                yield ShardWork(self.counts.unique // self.shard_rows - 1, pending)
                pending = []
        if pending:
            yield ShardWork(len(self.uniques) // self.shard_rows, pending)


# --- the job ------------------------------------------------------------------------------------------------


class _Rate:
    """rows/s and ETA for ``runs.Progress`` (one status line on stderr)."""

    def __init__(self, total: int, stream: TextIO):
        from .runs import Progress

        self.bar, self.total, self.start = (
            Progress(total, stream, unit="rows", counting="rows"),
            total,
            time.monotonic(),
        )

    def update(self, done: int, force: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        rate = done / max(elapsed, 1e-9)
        self.bar.update(done, None, rate, elapsed, (self.total - done) / rate if rate > 0 else 0.0, force)

    def close(self) -> None:
        self.bar.close()


Producer = Callable[[Iterator[ShardWork]], Iterator[dict]]


def run(
    inputs: Sequence[str],
    out: str | Path,
    options: CacheOptions,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int = 1,
    strict: bool = False,
    progress: TextIO | None = sys.stderr,
    te: sdclip.TextEncoder | None = None,
) -> dict:
    """Run (or resume) a cache job; returns the report (rows, unique, duplicates, errors, seconds, rows/s).

    ``te``: a text encoder already in memory (float32), used instead of loading ``options.model`` (local
    engine only: Ray actors load the model themselves)."""
    started = time.monotonic()
    options.check()
    require_pyarrow()
    paths = expand(inputs)
    columns = Columns(options.caption_column, options.id_column)
    folder = CacheDir(out)
    if te is not None and engine != "local":
        raise BadInput("a text encoder in memory runs on the local engine; give Ray a model path")
    in_memory = te is not None
    encoder = RowEncoder(options, te)
    te = encoder.te
    if options.format == "kohya":
        if te.family != "sdxl":
            raise BadInput(
                f"--format kohya is kohya's SDXL text-encoder cache; {options.model or 'this model'} is "
                f"a {te.family} model (use --format sdclip)"
            )
        if not all(p.is_dir() for p in paths):
            raise BadInput("--format kohya writes an .npz beside each image: give kohya folders as inputs")
    manifest = _start(folder, options, paths, te, in_memory)
    total = sum(1 for _ in read_rows(paths, columns, options.max_chars))
    bar = _Rate(total, progress) if progress is not None else None
    plan = Plan(options.shard_rows)

    def counted(rows: Iterator[Row]) -> Iterator[Row]:
        for n, row in enumerate(rows, 1):
            if bar is not None and n % 1024 == 0:
                bar.update(n)
            yield row

    def todo() -> Iterator[ShardWork]:
        for work in plan.shards(counted(read_rows(paths, columns, options.max_chars)), strict):
            record = folder.commit_of(work.number)
            if (
                record is not None
                and record.get("captions") == work.digest
                and folder.shard_path(work.number).is_file()
            ):
                continue  # committed by an earlier run
            yield work

    if engine == "local":

        def local(works: Iterator[ShardWork]) -> Iterator[dict]:
            for work in works:
                yield produce_shard(encoder, folder, work)

        producer: Producer = local
    elif engine == "ray":
        from .cachejob_ray import RayProducer

        producer = RayProducer(options, folder, workers=workers, address=address)
    else:
        raise BadInput(f"unknown engine {engine!r}; choose local or ray")
    encoded = 0
    for record in producer(todo()):
        encoded += record["rows"]
        if strict and record["failed"]:
            row, reason = next(iter(record["failed"].items()))
            raise BadInput(f"{record['shard']} row {row}: {reason} (--strict)")
    if bar is not None:
        bar.update(plan.counts.rows, force=True)
        bar.close()
    records = _gather(folder, plan)
    errors = _write_index(folder, paths, columns, options, plan, records)
    if options.format == "kohya":
        _write_kohya(folder, paths, columns, options, plan, te)
    seconds = time.monotonic() - started
    report = {
        "rows": plan.counts.rows,
        "unique": plan.counts.unique,
        "duplicates": plan.counts.duplicates,
        "errors": errors,
        "encoded": encoded,
        "shards": len(records),
        "seconds": round(seconds, 3),
        "rows_per_s": round(plan.counts.rows / max(seconds, 1e-9), 1),
        "out": str(folder.root),
    }
    manifest.update(
        state="complete",
        outputs=_outputs(folder, records),
        rows=plan.counts.rows,
        unique=plan.counts.unique,
        duplicates=plan.counts.duplicates,
        errors=errors,
        shards=[{k: r[k] for k in ("shard", "rows", "sha256")} for r in records],
    )
    folder.write_manifest(manifest)
    return report


def _start(folder: CacheDir, options: CacheOptions, paths: Sequence[Path], te, in_memory: bool) -> dict:
    """The manifest to work under: a new one, or the existing one when it was made by this very job."""
    import sdclip

    job = options.identity(paths)
    model = {
        "source": "in memory" if in_memory else str(options.model or "sdclip-mini"),
        "fingerprint": te.fingerprint,
        "family": te.family,
    }
    existing = folder.read_manifest()
    if existing is not None:
        if existing.get("format") != FORMAT:
            raise BadInput(
                f"{folder.manifest_path}: not an sdclip cache manifest; refusing to write into {folder.root}"
            )
        different = [
            k for k in sorted(set(job) | set(existing.get("job", {}))) if job.get(k) != existing.get("job", {}).get(k)
        ]
        if existing.get("model", {}).get("fingerprint") != te.fingerprint:
            different.insert(0, "model")
        if different:
            raise BadInput(
                f"{folder.root} holds a cache made with other {', '.join(different)} "
                f"({'; '.join(_differs(k, existing, job, model) for k in different[:4])}); "
                f"nothing was changed: use another --out, or the same options to resume"
            )
        for stale in [
            *folder.root.glob(".*.tmp"),
            *folder.root.glob("shards/.*.tmp"),
            *folder.root.glob("commits/.*.tmp"),
            *folder.root.glob("plans/.*.tmp"),
        ]:
            stale.unlink(missing_ok=True)  # temp files of a killed run (never at a final path)
        return existing
    if folder.root.exists() and (not folder.root.is_dir() or any(folder.root.iterdir())):
        raise BadInput(
            f"{folder.root}: exists and is not an sdclip cache (no manifest.json); refusing to write "
            f"into it: give a new or empty folder"
        )
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sdclip": sdclip.__version__,
        "model": model,
        "job": job,
        "state": "running",
        "index": "index.parquet",
        "errors_file": "errors.jsonl",
    }
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.write_manifest(manifest)
    return manifest


def _outputs(folder: CacheDir, records: list[dict]) -> list[str]:
    """The per-row tensors the shards hold (hidden, and pooled / pooled_projected where the model has them)."""
    from safetensors import safe_open

    if not records:
        return []
    with safe_open(str(folder.shard_path(0)), framework="pt") as f:
        held = set(f.keys())  # a safe_open handle, not a dict
        return [k for k in ("hidden", "pooled", "pooled_projected") if k in held]


def saved_threads(out: str | Path) -> int | None:
    """The torch thread count an existing cache in ``out`` was encoded with (None: no cache there)."""
    try:
        fingerprint = CacheDir(out).read_manifest()["model"]["fingerprint"]  # type: ignore[index]
    except (BadInput, TypeError, KeyError):
        return None
    _, _, threads = str(fingerprint).rpartition("/threads=")
    return int(threads) if threads.isdigit() and int(threads) > 0 else None


def _differs(key: str, existing: dict, job: dict, model: dict) -> str:
    if key == "model":
        there, now = str(existing.get("model", {}).get("fingerprint")), model["fingerprint"]
        if there.rpartition("/threads=")[0] == now.rpartition("/threads=")[0]:
            return (
                f"torch threads: the same model encoded with {there.rpartition('=')[2]} threads there, "
                f"{now.rpartition('=')[2]} now (the last bits depend on the thread count; resume with "
                f"--threads {there.rpartition('=')[2]})"
            )
        return f"model: {existing.get('model', {}).get('source')} there, {model['source']} now"
    return f"{key}: {existing.get('job', {}).get(key)!r} there, {job.get(key)!r} now"


def _gather(folder: CacheDir, plan: Plan) -> list[dict]:
    """Every shard's commit record, which must exist now (all shards were produced or were there)."""
    count = -(-plan.counts.unique // plan.shard_rows)
    records = []
    for number in range(count):
        record = folder.commit_of(number)
        if record is None:
            raise SdclipError(f"{folder.root}: shard {number} has no commit after the job ran (a worker failed?)")
        records.append(record)
    return records


def _write_index(folder: CacheDir, paths, columns, options: CacheOptions, plan: Plan, records: list[dict]) -> int:
    """Pass 2: ``index.parquet`` and ``errors.jsonl``, each written whole then renamed.  Returns the error count."""
    pa = require_pyarrow()
    from safetensors import safe_open

    tokens, truncated = [], []
    failed: dict[int, str] = {}
    for number, record in enumerate(records):
        with safe_open(str(folder.shard_path(number)), framework="pt") as f:
            counts, lengths = f.get_tensor("token_count"), f.get_tensor("length")
        tokens.append(counts)
        truncated.append(counts > (lengths // CHUNK) * (CHUNK - 2))
        for row, reason in record["failed"].items():
            failed[number * plan.shard_rows + int(row)] = reason
    tokens_all = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int32)
    truncated_all = torch.cat(truncated) if truncated else torch.zeros(0, dtype=torch.bool)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("caption", pa.string()),
            ("caption_sha256", pa.string()),
            ("shard", pa.int32()),
            ("row", pa.int32()),
            ("token_count", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    )
    errors = 0
    columns_now: dict[str, list] = {name: [] for name in schema.names}
    with (
        atomic.atomic_path(folder.root / "index.parquet") as index_tmp,
        atomic.atomic_path(folder.root / "errors.jsonl") as errors_tmp,
        open(errors_tmp, "w", encoding="utf-8") as ef,
    ):
        writer = pa.parquet.ParquetWriter(str(index_tmp), schema)

        def flush() -> None:
            writer.write_table(pa.table(columns_now, schema=schema))
            for values in columns_now.values():
                values.clear()

        for row in read_rows(paths, columns, options.max_chars):
            error = row.error
            if error is None:
                digest = caption_key(row.caption)
                u = plan.uniques[digest[:16]]
                error = failed.get(u)
            if error is not None:
                errors += 1
                ef.write(json.dumps({"id": row.id, "error": error}) + "\n")
                continue
            for name, value in zip(
                schema.names,
                (
                    row.id,
                    row.caption,
                    digest.hex(),
                    u // plan.shard_rows,
                    u % plan.shard_rows,
                    int(tokens_all[u]),
                    bool(truncated_all[u]),
                ),
            ):
                columns_now[name].append(value)
            if len(columns_now["id"]) >= _INDEX_BATCH:
                flush()
        flush()
        writer.close()
    return errors


def _write_kohya(folder: CacheDir, paths, columns, options: CacheOptions, plan: Plan, te) -> None:
    """``<image stem>_te_outputs.npz`` beside each image, with the keys, shapes and dtypes kohya sd-scripts reads.

    From kohya-ss/sd-scripts ``library/strategy_sdxl.py`` (SdxlTextEncoderOutputsCachingStrategy): per image
    ``np.savez(path, hidden_state1=[77, 768], hidden_state2=[77, 1280], pool2=[1280])`` (no batch axis), the
    path ``os.path.splitext(image)[0] + "_te_outputs.npz"``; ``load_outputs_npz`` reads exactly those three keys
    and ``is_disk_cached_outputs_expected`` checks they are there.  hidden_state1: CLIP-L ``hidden_states[11]``
    (penultimate, no final LayerNorm); hidden_state2: bigG ``hidden_states[-2]``; pool2: bigG's projected EOS
    state.  dtype: the text encoder's (bfloat16 is stored as float32); the older writer, ``library/train_util.py``
    ``save_text_encoder_outputs_to_disk`` / ``load_text_encoder_outputs_from_disk``, stores float32 and reads
    the same three keys with ``torch.from_numpy``.  These are the halves of diffusers SDXL conditioning's
    ``hidden`` on the channel axis and its ``pooled``."""
    import numpy as np
    from safetensors import safe_open

    split = te.towers[0].config.width
    handles: dict[int, object] = {}
    for row in read_rows(paths, columns, options.max_chars):
        if row.error is not None:
            continue
        u = plan.uniques[caption_key(row.caption)[:16]]
        number, r = divmod(u, plan.shard_rows)
        if number not in handles:
            if len(handles) >= 4:
                handles.pop(next(iter(handles)))
            handles[number] = safe_open(str(folder.shard_path(number)), framework="pt")
        f = handles[number]
        if int(f.get_slice("failed")[r : r + 1][0]):
            continue
        hidden = f.get_slice("hidden")[r : r + 1][0, : int(f.get_slice("length")[r : r + 1][0])]
        pooled = f.get_slice("pooled")[r : r + 1][0]
        target = row.image.with_name(row.image.stem + "_te_outputs.npz")
        with atomic.atomic_path(target) as tmp, open(tmp, "wb") as out:
            np.savez(
                out,
                hidden_state1=hidden[:, :split].numpy(),
                hidden_state2=hidden[:, split:].numpy(),
                pool2=pooled.numpy(),
            )


# --- verify -------------------------------------------------------------------------------------------------


def verify(out: str | Path) -> dict:
    """Every shard's hash as committed, every index row pointing at a stored row, every id once."""
    pa = require_pyarrow()
    folder = CacheDir(out)
    manifest = folder.read_manifest()
    if manifest is None or manifest.get("format") != FORMAT:
        raise BadInput(f"{out}: not an sdclip cache (no manifest.json)")
    if manifest.get("state") != "complete":
        raise SdclipError(f"{out}: the job has not finished (state {manifest.get('state')!r}); run it again to resume")
    problems = []
    sizes = {}
    for number, shard in enumerate(manifest["shards"]):
        path = folder.root / "shards" / shard["shard"]
        if not path.is_file():
            problems.append(f"{shard['shard']}: missing")
            continue
        if file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['shard']}: sha256 differs from the manifest (corrupt or replaced)")
        sizes[number] = shard["rows"]
    table = pa.parquet.read_table(folder.root / "index.parquet", columns=["id", "shard", "row"])
    ids = table.column("id").to_pylist()
    seen: set[str] = set()
    for i, (shard, row) in enumerate(zip(table.column("shard").to_pylist(), table.column("row").to_pylist())):
        if not 0 <= row < sizes.get(shard, 0):
            problems.append(f"index row {i} ({ids[i]}): points at shard {shard} row {row}, which does not exist")
    for i in ids:
        if i in seen:
            problems.append(f"id {i!r}: more than once in the index")
        seen.add(i)
    with open(folder.root / "errors.jsonl", encoding="utf-8") as f:
        errors = sum(1 for _ in f)
    if len(ids) + errors != manifest["rows"]:
        problems.append(f"index has {len(ids)} rows and errors.jsonl {errors}; the manifest says {manifest['rows']}")
    if problems:
        raise SdclipError(f"{out}: {len(problems)} problem(s): " + "; ".join(problems[:10]))
    return {"ok": True, "rows": len(ids), "errors": errors, "shards": len(sizes)}
