"""Commands that need no model never import torch (a fast start), and the lazy package still
offers every public name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
# runs the command line in-process, then reports its exit status and whether torch got imported
PROBE = """
import contextlib, io, json, sys
from sdclip.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules,
                  "out": out.getvalue()}))
"""


def run_probe(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["tokenize", "a photo of a cat", "an astronaut, (riding a horse:1.2)"],
        ["tokenize", "--chunks", "--dialect", "comfy", "a (red:1.2) fox"],
        ["parse", "--dialect", "a1111", "a (red:1.2) fox AND a [dog:cat:5]"],
        ["parse", "--dialect", "compel", "a (fluffy)1.2 cat++", "--json"],
        ["tokens", "--dialect", "a1111", "masterpiece, (best:1.3) quality BREAK a cat"],
        ["encode", "--help"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_commands_without_a_model_never_import_torch(argv):
    result = run_probe(*argv)
    assert result["code"] == 0
    assert not result["torch"], f"sdclip {' '.join(argv)} imported torch"
    assert not result["numpy"], f"sdclip {' '.join(argv)} imported numpy"


def test_tokenize_output_unchanged_without_torch():
    result = run_probe("tokenize", "a photo of a cat")
    assert json.loads(result["out"]) == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_lazy_package_offers_every_public_name():
    probe = (
        "import sdclip, sys; assert 'torch' not in sys.modules; "
        "missing = [n for n in sdclip.__all__ if n not in dir(sdclip)]; assert not missing, missing; "
        "values = [getattr(sdclip, n) for n in sdclip.__all__]; "
        "assert sdclip.load.__module__ == 'sdclip.encoder'; assert sdclip.accel.quantize_int8; "
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_unknown_attribute_is_an_attribute_error():
    import sdclip

    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        sdclip.nonsense  # noqa: B018
    assert not hasattr(sdclip, "__wrapped__")
    from sdclip import Tokenizer, load  # from-imports go through the same hook

    assert callable(load) and Tokenizer().encode("a cat") == [49406, 320, 2368, 49407]
