"""Crash-safe file output and careful input.

Every artefact the project writes (checkpoints, shards, reports, logs that are
rewritten) goes through these helpers: data is written to a temporary sibling,
flushed and fsync'ed, then renamed over the target.  A crash at any point
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open ``path`` for writing; the file appears (atomically) only if the block succeeds."""
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing a whole new file ('w' modes only)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place on success.

    With ``overwrite=True`` an existing directory is replaced (moved aside, then
    deleted only after the new one is in place); otherwise an existing target
    is an error, so released checkpoints are never overwritten by accident.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (refusing to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class InputError(ValueError):
    """Bad user input (file, config, record).  The message names the place and the fix."""


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning decode errors into an InputError naming the file and position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def iter_jsonl(path: str | os.PathLike, strict: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)`` from a JSONL file (``.gz``/``.zst`` transparently).

    ``strict=True`` raises an InputError at the first bad line (naming file and
    line).  ``strict=False`` yields ``(line_number, InputError)`` for bad lines
    instead, so callers such as the data pipeline can route them to rejects.
    Lines are decoded one by one, so one invalid byte costs one line, not a
    whole read buffer.  Blank lines are skipped.
    """
    path = Path(path)
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
                continue
            except UnicodeDecodeError as e:
                err = InputError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line")
            except json.JSONDecodeError as e:
                err = InputError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
            if strict:
                raise err
            yield lineno, err


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for binary reading, decompressing ``.gz`` and ``.zst`` by suffix."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(raw)
    return open(path, "rb")


def open_text(path: str | os.PathLike, errors: str = "strict") -> IO[str]:
    """Open a text file for reading, decompressing ``.gz`` and ``.zst`` by suffix."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors=errors)


def as_paths(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """One path or several (the CLI accepts ``file`` as well as ``[a,b]``) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(place, record)`` from a JSON-array file or JSONL (also .gz/.zst), detected from the first bytes;
    ``place`` ("file[i]" or "file:line") is for error messages."""
    with open_text(path, errors="replace") as fh:
        is_array = fh.read(4096).lstrip().startswith("[")
    if is_array:
        for i, record in enumerate(read_json(path)):
            yield f"{path}[{i}]", record
    else:
        for n, record in iter_jsonl(path):
            yield f"{path}:{n}", record


def load_callable(spec: str, what: str = "function") -> Any:
    """``"package.module:function"`` -> the function, or an InputError saying why it cannot be imported."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise InputError(f"{what} {spec!r} cannot be imported: {e}") from None
