"""Unpickling with an allow-list: for the one state file whose format is a pickle we do not control.

``torch.distributed.checkpoint`` stores a checkpoint's ``.metadata`` as a pickle
(torch's own reader calls ``pickle.load`` on it), and a pickle can call any
importable function: a crafted ``.metadata`` runs code the moment a run resumes.
``restricted_load`` resolves only the globals named in an allow-list, so the
stream can rebuild plain data and the listed classes but never reach ``os.system``,
``eval``, ``subprocess`` or any other callable; anything else is refused with an
``UnsafePickleError`` naming the file and the global it asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Iterable
from typing import IO, Any

from baichuan2.utils.io import InputError

# Builtin types a pickle of plain data may name (lists, dicts, tuples, str, numbers need no global).
BUILTIN_TYPES = frozenset({("builtins", n) for n in ("set", "frozenset", "bytearray", "complex", "slice")}
                          | {("collections", "OrderedDict")})


class UnsafePickleError(InputError):
    """A pickle that names something outside the allow-list (or is not a readable pickle at all)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: IO[bytes], allowed: Callable[[str, str], bool], source: str):
        super().__init__(fh)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in BUILTIN_TYPES or self._allowed(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self._source}: refusing to unpickle {module}.{name} (not an allowed "
                                "checkpoint metadata type; the file may have been tampered with)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing a persistent id in a pickle ({pid!r:.60})")


def restricted_load(data: bytes | IO[bytes], allowed: Iterable[tuple[str, str]] | Callable[[str, str], bool],
                    source: str | os.PathLike = "<pickle>") -> Any:
    """Unpickle ``data`` resolving only the allowed ``(module, name)`` globals (plus plain builtins).

    ``allowed`` is a set of pairs or a predicate.  Any other global, and any malformed
    stream, raises ``UnsafePickleError`` naming ``source``."""
    if not callable(allowed):
        pairs = frozenset(allowed)
        allowed = lambda module, name: (module, name) in pairs  # noqa: E731
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _RestrictedUnpickler(fh, allowed, str(source)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or garbled stream; an allowed class given bad arguments
        raise UnsafePickleError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def dcp_metadata_allowed(module: str, name: str) -> bool:
    """The globals a ``torch.distributed.checkpoint`` ``.metadata`` pickle legitimately names.

    Its dataclasses (``metadata``: Metadata, MetadataIndex, TensorStorageMetadata ...;
    ``filesystem._StorageInfo``), ``torch.Size``, dtypes, the layout lookup torch pickles
    layouts with, and the path class of ``StorageMeta.checkpoint_id``: constructors of data
    that run no user-chosen code."""
    import torch
    import torch.distributed.checkpoint.metadata as md

    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(getattr(md, name, None), type) and name in _DCP_METADATA_TYPES
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name == "_get_layout"  # name -> torch.strided etc., a dictionary lookup
    if module == "pathlib":
        return name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    return False


_DCP_METADATA_TYPES = frozenset({"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                 "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                 "_MEM_FORMAT_ENCODING"})
