"""Every file sdclip writes goes through here: a temp file beside the target, fsync, rename.

A failure at any point (disk full, a kill, a read-only folder) leaves the old file whole and no
partial file behind.  The new file gets the mode an ordinary tool would give it: the old file's
mode when it replaces one, else 0o666 less the umask.  A target that is a symlink is followed (the
file it points to is replaced, the link stays); a target that is a folder, device node, FIFO or
socket is refused.

    >>> with atomic_path("out.safetensors") as tmp:
    ...     save_file(tensors, tmp)           # anything that writes a path
    >>> write_bytes("a.bin", b"...")
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BadInput, SdclipError

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read without a window where it is changed for other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def target_of(path: str | os.PathLike) -> Path:
    """Where writing ``path`` really goes: symlinks followed; anything but a regular file refused."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise SdclipError(f"{path}: cannot write ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise BadInput(f"{path}: is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise BadInput(f"{path}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    return target


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; once the block ends without error it becomes ``path``."""
    target = target_of(path)
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise SdclipError(f"{path}: cannot write ({e.strerror or e})") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SdclipError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (its writer reports I/O errors as its own exception type); ``tensors``
    are torch tensors or, all of them, numpy arrays (the torch-free encode path)."""
    from safetensors import SafetensorError

    if tensors and all(type(t).__module__ == "numpy" for t in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            if "I/O error" not in str(e):
                raise
            raise OSError(str(e).rsplit("I/O error: ", 1)[-1].split(" (os error")[0]) from None
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Put the header's ``__metadata__`` keys in sorted order, in place: the safetensors writer emits them in
    its hash map's order, which changes from process to process, so that the same tensors and metadata
    would give different bytes.  The keys are re-encoded as that writer encodes them (same escapes, no
    spaces): same length; should a length ever differ, the file is left as written (valid either way)."""
    import json

    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(
            {"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(text) == len(raw.rstrip(b" ")):
            f.seek(8)
            f.write(text.ljust(n, b" "))
