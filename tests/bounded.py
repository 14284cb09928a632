"""Run sdclip on hostile input in a child process with a memory cap and a timeout.

A regression in a bound must fail its test, not take the machine down: the child's address space is
capped with ``RLIMIT_AS`` (an allocation past it fails inside the child), and a hang is killed after
``timeout`` seconds.  One child runs a batch of CLI calls, so the import cost is paid once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

# the address space of a child that imported torch and sdclip is ~0.7 GB; every bomb here needs ~8 GB or more
MEMORY_CAP = 2 << 30

_DRIVER = r"""
import contextlib, io, json, sys
from sdclip.cli import main
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    print(json.dumps({"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()[-2000:]}), flush=True)
"""


@dataclass
class Outcome:
    rc: int
    stderr: str
    stdout: str


def _limit(memory: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return apply


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("SDCLIP_DEBUG", None)
    return env


def run_cli(calls: list[list[str]], *, memory: int = MEMORY_CAP, timeout: float = 120) -> list[Outcome]:
    """``sdclip`` ``calls`` (argv lists) in one capped child: each call's exit status, stderr and stdout."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit(memory),
        env=_env(),
    )
    outcomes = [Outcome(**json.loads(line)) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(calls), f"the child died (exit {done.returncode}): {done.stderr[-3000:]}"
    return outcomes


def run_python(code: str, *, memory: int = MEMORY_CAP, timeout: float = 120) -> str:
    """Run ``code`` in a capped child; its stdout (the child must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit(memory),
        env=_env(),
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout
