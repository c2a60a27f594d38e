"""Checksum manifests for checkpoint directories, and paths that must stay inside a directory.

Every directory the project writes as a unit (released HF checkpoints, training
checkpoints) carries ``checksums.sha256``: one ``<sha256>  <relative path>`` line
per file, the format ``sha256sum -c`` reads.  Loaders verify it before using the
files, so one flipped byte in a weight file is refused with the file's name
instead of silently changing the model.  (A checksum catches corruption, not an
attacker who can rewrite the manifest too; unsafe *formats* are handled
elsewhere: safetensors, ``weights_only`` loads, ``utils.safe_pickle``.)

Verification reads every byte once (~1-2 GB/s).  It is on by default; pass
``verify=False`` to a loader, or set ``BAICHUAN2_VERIFY_CHECKSUMS=0`` in the
environment, to skip it (e.g. a local checkpoint just written by the same job).
Directories without a manifest (official downloads, older runs) load as before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from baichuan2.utils.io import InputError, atomic_write_text

MANIFEST = "checksums.sha256"
VERIFY_ENV = "BAICHUAN2_VERIFY_CHECKSUMS"


class ChecksumError(InputError):
    """A file whose bytes differ from its manifest entry, a listed file that is missing, or a path that escapes."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_default(verify: bool | None) -> bool:
    """``verify`` if given, else the environment (``BAICHUAN2_VERIFY_CHECKSUMS=0`` turns checks off)."""
    if verify is not None:
        return verify
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def confined_path(directory: str | os.PathLike, relative: str, source: str | os.PathLike) -> Path:
    """``directory / relative``, refusing absolute paths, ``..`` and symlinks that lead outside ``directory``.

    ``source`` (the index or manifest naming the path) goes into the error message."""
    rel = Path(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts or "\\" in relative:
        raise ChecksumError(f"{source}: refusing path {relative!r} (must be relative and stay inside {directory})")
    root = Path(directory).resolve()
    path = Path(directory) / rel
    if not path.resolve().is_relative_to(root):
        raise ChecksumError(f"{source}: refusing path {relative!r}: it resolves to {path.resolve()}, "
                            f"outside {root} (symlink?)")
    return path


def write_manifest(directory: str | os.PathLike) -> Path:
    """Hash every regular file under ``directory`` (not the manifest itself) into ``directory/checksums.sha256``."""
    d = Path(directory)
    lines = []
    for path in sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST):
        lines.append(f"{file_sha256(path)}  {path.relative_to(d).as_posix()}\n")
    atomic_write_text(d / MANIFEST, "".join(lines))
    return d / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict[str, str] | None:
    """``{relative path: sha256}`` from the manifest, or None when the directory has none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    entries = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not line.strip():
            continue
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ChecksumError(f"{path}:{n}: malformed line (expected '<sha256>  <path>')")
        entries[name] = digest
    return entries


def verify_manifest(directory: str | os.PathLike, verify: bool | None = None,
                    files: list[str] | None = None) -> int:
    """Check the files listed in ``directory``'s manifest (or only ``files``, relative names, when given).

    Returns the number of files checked (0 when skipped or there is no manifest); raises
    ``ChecksumError`` naming the first file that is missing or whose bytes changed."""
    if not verify_default(verify):
        return 0
    entries = read_manifest(directory)
    if entries is None:
        return 0
    source = Path(directory) / MANIFEST
    names = list(entries) if files is None else files
    for name in names:
        if name not in entries:
            raise ChecksumError(f"{Path(directory) / name}: not listed in {source} (added after the checkpoint "
                                "was written?)")
        path = confined_path(directory, name, source)
        if not path.is_file():
            raise ChecksumError(f"{path}: listed in {source} but missing")
        if file_sha256(path) != entries[name]:
            raise ChecksumError(f"{path}: checksum mismatch (sha256 differs from {source}); the file is corrupt "
                                f"or was modified. Set {VERIFY_ENV}=0 to load it anyway")
    return len(names)
