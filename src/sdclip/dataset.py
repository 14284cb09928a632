"""Caption datasets read as rows with stable ids, for ``sdclip cache``.

Every input yields ``Row``\\ s in a fixed order (inputs in the order given, each glob's matches sorted;
rows in file order), so a job started again sees the same rows in the same order.  Row ids:

=================  =============================================================================
input              id
=================  =============================================================================
``.txt``           ``FILE:LINE`` (1-based line number; every line is a row, a blank one is a bad row)
``.jsonl``         ``FILE:LINE`` (blank lines skipped), or the ``--id-column`` key's value
``.csv``           ``FILE:N`` (1-based data row, header not counted), or the ``--id-column`` value
``.parquet``       ``FILE:N`` (1-based row), or the ``--id-column`` value
webdataset ``.tar``  ``FILE:KEY`` (the sample key: member path up to the first dot of its name)
kohya folder       the image's path relative to the folder (``sub/img001.png``)
=================  =============================================================================

``FILE`` is the path as given (after glob expansion).  A row whose caption cannot be read (bytes that
are not UTF-8, an empty caption, one over the length limit, a missing key) still has its id and carries
the reason in ``error``: the job reports it in ``errors.jsonl``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".jxl")
CAPTION_SUFFIXES = (".txt", ".caption")  # sidecars and webdataset members, in order of preference
MAX_CHARS = 20_000  # a caption longer than this is a bad row: no front end reads that much (memory bound)
_PARQUET_BATCH = 8192


@dataclass(frozen=True)
class Row:
    """One dataset row: ``caption`` None when ``error`` says why it is unusable; ``image`` for kohya folders."""

    id: str
    caption: str | None
    error: str | None = None
    image: Path | None = None


@dataclass(frozen=True)
class Columns:
    """Where captions and ids live: jsonl key / csv and parquet column (None: ``caption`` then ``text``)."""

    caption: str | None = None
    id: str | None = None


def expand(inputs: Sequence[str]) -> list[Path]:
    """Inputs in the order given; a glob's matches sorted.  Nothing matching is bad input."""
    out: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches or not Path(matches[0]).exists():
            raise BadInput(f"{item}: no such file or folder")
        for m in matches:
            path = Path(m)
            if not path.is_dir() and path.suffix.lower() not in _READERS:
                raise BadInput(
                    f"{m}: unknown input type; give .txt, .jsonl, .csv, .parquet, a webdataset .tar or "
                    f"a kohya folder (images with .txt / .caption sidecars)"
                )
            out.append(path)
    if not out:
        raise BadInput("no inputs")
    return out


def read_rows(paths: Sequence[Path], columns: Columns = Columns(), max_chars: int = MAX_CHARS) -> Iterator[Row]:
    """Every row of every input, streamed (memory does not grow with the input)."""
    for path in paths:
        reader = _read_folder if path.is_dir() else _READERS[path.suffix.lower()]
        for row in reader(path, columns):
            yield _checked(row, max_chars)


def _checked(row: Row, max_chars: int) -> Row:
    if row.error is not None:
        return row
    if not row.caption or not row.caption.strip():
        return Row(row.id, None, "empty caption", row.image)
    if len(row.caption) > max_chars:
        return Row(row.id, None, f"caption of {len(row.caption)} characters, over the limit of {max_chars}", row.image)
    return row


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None


def _read_txt(path: Path, columns: Columns) -> Iterator[Row]:
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            text, error = _decode(line.rstrip(b"\r\n"))
            yield Row(f"{path}:{n}", text, error)


def _pick(obj: dict, key: str | None, what: str) -> tuple[object, str | None]:
    keys = [key] if key else ["caption", "text"]
    for k in keys:
        if k in obj:
            return obj[k], None
    return None, f"no {what} {' or '.join(map(repr, keys))}"


def _caption_of(value: object, where: str) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    return None, f"{where} is {type(value).__name__}, not a string"


def _read_jsonl(path: Path, columns: Columns) -> Iterator[Row]:
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            line, error = _decode(raw)
            row_id = f"{path}:{n}"
            if error is not None:
                yield Row(row_id, None, error)
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                yield Row(row_id, None, f"not JSON ({e})")
                continue
            if isinstance(value, dict):
                if columns.id is not None:
                    if columns.id not in value:
                        yield Row(row_id, None, f"no id key {columns.id!r}")
                        continue
                    row_id = str(value[columns.id])
                value, error = _pick(value, columns.caption, "caption key")
                if error is not None:
                    yield Row(row_id, None, error)
                    continue
            yield Row(row_id, *_caption_of(value, "the caption"))


def _read_csv(path: Path, columns: Columns) -> Iterator[Row]:
    with _open(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="", errors="strict")
        try:
            reader = csv.DictReader(text)
            header = reader.fieldnames or []
            caption = _column(path, header, columns.caption)
            if columns.id is not None and columns.id not in header:
                raise BadInput(f"{path}: no id column {columns.id!r} (columns: {', '.join(header)})")
            for n, record in enumerate(reader, 1):
                row_id = record[columns.id] if columns.id is not None else f"{path}:{n}"
                yield Row(row_id, record[caption])
        except UnicodeDecodeError as e:
            raise BadInput(f"{path}: not UTF-8 text ({e.reason}); a CSV file is read as UTF-8") from None
        except csv.Error as e:
            raise BadInput(f"{path}: not a CSV file ({e})") from None


def _column(path: Path, header: Sequence[str], wanted: str | None) -> str:
    for name in [wanted] if wanted else ["caption", "text"]:
        if name in header:
            return name
    raise BadInput(
        f"{path}: no caption column {wanted or 'caption or text'!r} (columns: {', '.join(header)}); "
        f"name it with --caption-column"
    )


def _read_parquet(path: Path, columns: Columns) -> Iterator[Row]:
    pa = require_pyarrow()
    try:
        file = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"{path}: not a parquet file ({e})") from None
    caption = _column(path, file.schema_arrow.names, columns.caption)
    wanted = [caption] + ([columns.id] if columns.id is not None else [])
    if columns.id is not None and columns.id not in file.schema_arrow.names:
        raise BadInput(f"{path}: no id column {columns.id!r}")
    n = 0
    for batch in file.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted):
        ids = batch.column(columns.id).to_pylist() if columns.id is not None else None
        for i, value in enumerate(batch.column(caption).to_pylist()):
            n += 1
            row_id = str(ids[i]) if ids is not None else f"{path}:{n}"
            yield Row(row_id, *_caption_of(value, f"column {caption!r}"))


def _read_tar(path: Path, columns: Columns) -> Iterator[Row]:
    """A webdataset shard: members grouped by key (path up to the first dot of the name), in tar order."""
    try:
        tar = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BadInput(f"{path}: not a tar file ({e})") from None
    with tar:
        key, found, extensions = None, None, set()
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, _, ext = name.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None:
                    yield _tar_row(path, key, found, extensions)
                key, found, extensions = member_key, None, set()
            extensions.add("." + ext)
            if "." + ext in CAPTION_SUFFIXES and (found is None or CAPTION_SUFFIXES.index("." + ext) < found[0]):
                found = (CAPTION_SUFFIXES.index("." + ext), tar.extractfile(member).read())
        if key is not None:
            yield _tar_row(path, key, found, extensions)


def _tar_row(path: Path, key: str, found: tuple[int, bytes] | None, extensions: set[str]) -> Row:
    if found is None:
        return Row(f"{path}:{key}", None, f"no .txt or .caption member (has {', '.join(sorted(extensions))})")
    return Row(f"{path}:{key}", *_decode(found[1]))


def _read_folder(path: Path, columns: Columns) -> Iterator[Row]:
    """A kohya folder: every image below it, with the caption from its .txt (else .caption) sidecar."""
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        row_id = image.relative_to(path).as_posix()
        sidecar = next((image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()), None)
        if sidecar is None:
            yield Row(row_id, None, "no .txt or .caption sidecar", image)
            continue
        try:
            data = sidecar.read_bytes()
        except OSError as e:
            yield Row(row_id, None, f"cannot read {sidecar.name} ({e.strerror or e})", image)
            continue
        text, error = _decode(data)
        yield Row(row_id, None if text is None else text.strip(), error, image)


def require_pyarrow():
    """pyarrow (the parquet index and inputs): an optional extra, with a clear error when missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise BadInput("parquet needs pyarrow: pip install 'sdclip[cache]'") from None
    return pyarrow


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".tar": _read_tar}
