"""Front ends as objects: the registry, and that a new front end needs nothing but its object and a registry line
(the conditioner and the command line know no front end by name)."""

import ast
import json
from pathlib import Path

import condfakes
import pytest
import torch

import sdclip
from sdclip import BadInput, Conditioner, prompts
from sdclip.cli import main
from sdclip.prompts.plain import Diffusers

SRC = Path(sdclip.__file__).parent


def test_registry():
    assert prompts.DIALECTS == ("a1111", "comfy", "compel", "diffusers")
    assert all(prompts.get(name).name == name for name in prompts.DIALECTS)
    assert prompts.get("plain") is prompts.get("diffusers")
    with pytest.raises(BadInput, match="unknown prompt dialect 'invoke'; choose one of a1111, comfy"):
        prompts.get("invoke")
    with pytest.raises(BadInput, match="unknown emphasis"):
        Conditioner(condfakes.encoder("sd1"), "comfy", emphasis="loud")


@pytest.mark.parametrize("module", ["conditioning.py", "cli.py"])
def test_no_front_end_names(module):
    """Rules live in the front-end objects: no code compares anything with a front end's name."""
    names = {*prompts.DIALECTS, "plain"}
    tree = ast.parse((SRC / module).read_text())
    found = [
        (node.lineno, c.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for c in ast.walk(node)
        if isinstance(c, ast.Constant) and c.value in names and not ast.unparse(node).startswith("args.format")
    ]  # an embedding file format, not a front end
    assert found == []


class Toy(Diffusers):
    name, title, aliases = "toy", "Toy", ("plaything",)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(prompts.REGISTRY, "toy", Toy())
    monkeypatch.setitem(prompts.ALIASES, "plaything", "toy")


def test_new_front_end_is_one_object(toy, capsys):
    te = condfakes.encoder("sdxl", (48, 64))
    ours = Conditioner(te, "plaything", cache=None).encode(["a red fox"], None)
    theirs = Conditioner(te, "diffusers", cache=None).encode(["a red fox"], None)
    assert torch.equal(ours.hidden, theirs.hidden) and torch.equal(ours.negative_pooled, theirs.negative_pooled)
    assert main(["parse", "--dialect", "toy", "--json", "a (b:1.2)"]) == 0
    assert json.loads(capsys.readouterr().out) == [["a (b:1.2)", 1.0]]
    assert main(["tokenize", "--help"]) == 0
    assert "toy" in capsys.readouterr().out


def test_cli_options_come_from_the_front_ends(capsys):
    assert main(["encode", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for d in prompts.REGISTRY.values():
        for o in d.options:
            assert f"{o.flag}" in out and f"{d.name}: {o.help.split()[0]}" in out, o.flag
