"""The CLIP model that ships inside sdclip, ``sdclip-mini``: where it lives and which names mean it.

``sdclip.load()`` and ``CLIPModel.load()`` with no source, and the CLI commands without
``--model``, use it; so does its name wherever a checkpoint is expected (unless a file or folder
of that name exists: a path on disk always wins, as it does over hub ids).  It was trained by
``sdclip train-clip`` on the built-in shapes; its model card, ``data/sdclip-mini/README.md``,
says how.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import SdclipError

DEFAULT = "sdclip-mini"
NAMES = (DEFAULT,)


def folder(name: str = DEFAULT) -> Path:
    """The installed folder of bundled model ``name`` (a Hugging Face CLIPModel folder)."""
    path = Path(str(resources.files("sdclip"))) / "data" / name
    if not (path / "model.safetensors").is_file():
        raise SdclipError(
            f"this sdclip install lacks its bundled model {name} (no {path / 'model.safetensors'}); "
            f"reinstall sdclip, or pass a checkpoint"
        )
    return path


def resolve(source: str | Path | None) -> str | Path:
    """``None`` or a bundled model's name -> that model's folder; any other source unchanged."""
    if source is None:
        return folder()
    if str(source) in NAMES and not Path(source).exists():
        return folder(str(source))
    return source
