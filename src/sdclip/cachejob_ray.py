"""``sdclip cache --engine ray``: the shards of a cache job encoded by a pool of Ray Data actors.

The driver plans as the local engine does (the same rows, uniques and shards: dedup needs one view of the
whole input, and ids come from sdclip's readers) and writes each shard's captions to ``--out/plans``; each
shard to produce becomes one Ray Data row, and ``map_batches`` with a callable class (one model per actor,
``--workers`` actors, one GPU each with ``--device cuda``) reads its plan, encodes it with the same batches
and writes it with the same commit protocol.  The
bits are the local engine's; ``--out`` must be a folder every node sees (a shared filesystem).

Imported only when this engine is chosen: ``ray`` is the optional extra ``sdclip[ray]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict

from .cachejob import CacheDir, CacheOptions, RowEncoder, ShardWork, produce_shard
from .errors import BadInput, SdclipError


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise BadInput("--engine ray needs Ray Data: pip install 'sdclip[ray]'") from None
    return ray


class ShardEncoder:
    """A Ray Data actor: one model; each batch is one shard to encode, write and commit."""

    def __init__(self, options: dict, root: str, threads: int | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)  # the driver's: the same thread count as a local job
        self.encoder = RowEncoder(CacheOptions(**options))
        self.folder = CacheDir(root)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records = []
        for number in batch["number"]:
            work = self.folder.read_plan(int(number))
            records.append(json.dumps(produce_shard(self.encoder, self.folder, work)))
        return {"record": np.array(records, dtype=object)}


class RayProducer:
    """Plans every shard to do into ``--out/plans`` (driver memory: one shard of captions), then encodes them
    all in one Ray Data pipeline: the actors start and load the model once per job, not once per window."""

    def __init__(self, options: CacheOptions, folder: CacheDir, *, workers: int = 1, address: str | None = None):
        if workers < 1:
            raise BadInput("--workers must be at least 1")
        self.options, self.folder, self.workers, self.address = options, folder, workers, address

    def __call__(self, works: Iterator[ShardWork]) -> Iterator[dict]:
        numbers = [self.folder.write_plan(work) for work in works]
        if not numbers:
            return
        ray = _ray()
        started = False
        if not ray.is_initialized():
            # a loaded machine starts Ray's agents slowly; Ray's default wait then kills the node at startup
            os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
            try:
                if self.address is None:
                    ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=self.address, log_to_driver=False)
            except Exception as e:
                ray.shutdown()  # the processes a failed start left behind
                raise SdclipError(
                    f"cannot start or join Ray{f' at {self.address}' if self.address else ''}: {e}"
                ) from None
            started = True
        try:
            yield from self._run(ray, numbers)
            self.folder.drop_plans()
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, numbers: list[int]) -> Iterator[dict]:
        import torch

        gpus = 1 if self.options.device.startswith("cuda") else 0
        ds = ray.data.from_items([{"number": n} for n in numbers], override_num_blocks=len(numbers)).map_batches(
            ShardEncoder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(numbers))),
            num_cpus=1,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "options": asdict(self.options),
                "root": str(self.folder.root),
                "threads": torch.get_num_threads(),
            },
        )
        try:
            for row in ds.iter_rows():
                yield json.loads(row["record"])
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, (BadInput, SdclipError)):
                raise type(cause)(str(cause)) from None
            raise SdclipError(f"a Ray worker failed: {cause}") from None
