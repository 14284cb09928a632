"""No NaN or infinite conditioning ever leaves sdclip: weights beyond float32, weights whose product overflows and
compel blends whose weights sum to 0 are a clear error (exit 2) naming the prompt and the weight."""

from __future__ import annotations

import pytest
import torch

import sdclip
from sdclip.cli import main

HUGE = "9" * 40  # 1e40: beyond float32 (A1111's weight syntax takes digits and dots only)


@pytest.fixture(scope="module")
def te():
    return sdclip.load()


@pytest.mark.parametrize(
    "dialect, prompt, said",
    [
        ("a1111", f"a (x:{HUGE}) cat", "weight 1e+40 is beyond float32"),
        ("a1111", f"[a:b:0.5] (x:{HUGE}) AND c", "weight 1e+40 is beyond float32"),
        ("comfy", "a (x:1e39) cat", "weight 1e+39 is beyond float32"),
        ("comfy", "a (x:1e308) cat", "weight 1e+308 is beyond float32"),
        ("compel", f"a (x){HUGE} cat", "weight 1e+40 is beyond float32"),
        ("a1111", "a (x:1" + "0" * 38 + ") cat", "weight 1e+38 makes the conditioning overflow float32"),
        (
            "compel",
            '("a", "b").blend(1, -1)',
            ".blend() weights 1, -1 sum to 0 and compel divides by their sum: compel itself gives NaN",
        ),
    ],
)
def test_non_finite_conditioning_is_refused(te, dialect, prompt, said):
    with pytest.raises(sdclip.BadInput) as e:
        sdclip.Conditioner(te, dialect, cache=None).encode_tree(prompt)
    assert said in str(e.value) and repr(prompt) in str(e.value)
    with pytest.raises(sdclip.BadInput, match="NaN or infinite"):  # as a negative prompt too
        sdclip.Conditioner(te, dialect, cache=None).encode("a cat", negative=prompt)


def test_cli_exit_2_and_no_file(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["encode", "a (x:1e39) cat", "--dialect", "comfy", "--out", str(out)]) == 2
    assert "weight 1e+39" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "dialect, prompt",
    [
        ("a1111", "a (x:1e30) cat"),
        ("comfy", "a (x:1e6) cat"),
        ("compel", '("a", "b").blend(1, 1)'),
        ("a1111", "a (x:1e39) cat"),
    ],
)
def test_large_but_finite_weights_pass(te, dialect, prompt):
    """A1111's mean restoration keeps 1e30 finite; (x:1e39) is plain text to A1111 (no exponent syntax)."""
    out = sdclip.Conditioner(te, dialect, cache=None).encode(prompt)
    assert torch.isfinite(out.hidden).all()
