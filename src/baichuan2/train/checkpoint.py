"""Training-state checkpoints (exact resume, any world size) and released model checkpoints.

Training state = model + optimizer (``torch.distributed.checkpoint``: every rank
writes its own shards, any other world size can read them) + ``trainer.json``
(step, tokens, data position, NaN streak) + each rank's RNG state.  A
checkpoint is written under ``step-N.tmp`` and renamed to ``step-N`` only after
every rank finished, so a crash never leaves a checkpoint that looks complete.
It carries ``checksums.sha256`` (utils/checksums.py), verified before resuming.
Nothing read back is unpickled freely: DCP's ``.metadata`` pickle goes through
an allow-list (``SafeFileSystemReader``), tensors and RNG states through
``torch.load(weights_only=True)``, the rest is JSON.

Released checkpoints (Baichuan 2 published one every 220B tokens) are full
Hugging Face directories under ``release/tokens-<N>`` with ``release.json``
(step, tokens, loss); they are never overwritten.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

from baichuan2.utils.checksums import confined_path, verify_manifest, write_manifest
from baichuan2.utils.io import InputError, atomic_write_json, fsync_dir, read_json
from baichuan2.utils.safe_pickle import dcp_metadata_allowed, restricted_load

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_training_state(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], rank: int,
                        distributed: bool, keep_last: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if rank == 0:
        for stale in root.glob("step-*.tmp"):  # this one, and any left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(distributed)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = _map_strided({"model": model_sd, "optim": optim_sd}, gather_packed)
    with warnings.catch_warnings():  # torch warns on every single-process save, which is what we asked for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _dist_ready())
    torch.save(_rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    _barrier(distributed)
    if rank == 0:
        atomic_write_json(tmp / "trainer.json", trainer_state)
        write_manifest(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(distributed)
    return final


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, except that ``.metadata`` is unpickled through an allow-list of metadata
    types (torch's own reader calls ``pickle.load``, so a crafted file would run code on resume) and
    every storage file it names must lie inside the checkpoint directory."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = restricted_load(fh, dcp_metadata_allowed, path)
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise InputError(f"{path}: not a torch.distributed.checkpoint metadata file")
        for info in metadata.storage_data.values():
            confined_path(self.path, str(getattr(info, "relative_path", "")), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        rank: int, verify: bool | None = None) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``path``; returns ``trainer.json``.

    ``verify`` checks ``checksums.sha256`` first (None: on unless ``BAICHUAN2_VERIFY_CHECKSUMS=0``)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"resume: checkpoint directory {path} not found")
    if not (path / "trainer.json").exists():
        raise InputError(f"resume: {path} is not a complete training checkpoint (no trainer.json)")
    verify_manifest(path, verify)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    templates = {"model": model_sd, "optim": optim_sd}
    state = _map_strided(templates, lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device))
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # refuse here: dcp.load would log our error and fall back to per-rank metadata
    dcp.load(state, storage_reader=reader, no_dist=not _dist_ready())
    state = _restore_strided(state, templates)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.exists():  # a rank that did not exist in the saving run starts from its seed instead
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return read_json(path / "trainer.json")


def _is_strided(t: Any) -> bool:
    """A tensor-parallel packed [Wq; Wk; Wv]: strided along the ``tp`` mesh dimension.

    (FSDP's own strided placement on ``dp`` for ordinary TP weights is handled by DCP.)"""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor):
        return False
    names = t.device_mesh.mesh_dim_names or ()
    return "tp" in names and isinstance(t.placements[names.index("tp")], _StridedShard)


def _map_strided(tree: Any, fn) -> Any:
    """Apply ``fn`` to the strided-sharded tensors (tensor-parallel W_pack and its optimizer moments).

    DCP cannot describe a strided shard as one chunk of the global tensor, so these few
    tensors are stored whole (gathered over their TP/FSDP groups); everything else stays
    sharded.  Stored whole or sharded, a key means the same tensor, so any world size can load it."""
    if isinstance(tree, dict):
        return {k: _map_strided(v, fn) for k, v in tree.items()}
    return fn(tree) if _is_strided(tree) else tree


def _mesh_axis(t, name: str):
    names = t.device_mesh.mesh_dim_names or ()
    if name not in names:
        return None, 1
    sub = t.device_mesh[name] if len(names) > 1 else t.device_mesh
    return sub, sub.size()


def gather_packed(t) -> torch.Tensor:
    """The full [Wq; Wk; Wv] of a tensor-parallel W_pack (also under FSDP), on every rank.

    Layout (see train/parallel.py): TP rank r holds [q_r; k_r; v_r]; FSDP then splits that
    block into torch.chunk pieces over dp.  (DTensor.full_tensor mis-assembles the nested
    strided placement, so this is done by hand.)"""
    local = t.to_local()
    dp_mesh, dp = _mesh_axis(t, "dp")
    tp_mesh, tp = _mesh_axis(t, "tp")
    rows_tp = t.shape[0] // tp
    if dp > 1:
        chunk = -(-rows_tp // dp)
        padded = local.new_zeros((chunk, *local.shape[1:]))
        padded[: local.shape[0]] = local
        out = local.new_empty((dp * chunk, *local.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=dp_mesh.get_group())
        local = out[:rows_tp]
    if tp > 1:
        out = local.new_empty((tp * rows_tp, *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=tp_mesh.get_group())
        parts = [p.chunk(3) for p in out.chunk(tp)]
        local = torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    return local


def scatter_packed(full: torch.Tensor, template) -> Any:
    """Inverse of ``gather_packed``: this rank's piece of ``full`` as a DTensor shaped like ``template``."""
    from torch.distributed.tensor import DTensor

    dp_mesh, dp = _mesh_axis(template, "dp")
    tp_mesh, tp = _mesh_axis(template, "tp")
    full = full.to(template.to_local().device, template.dtype)
    local = full
    if tp > 1:
        r = tp_mesh.get_local_rank()
        local = torch.cat([part.chunk(tp)[r] for part in full.chunk(3)])
    if dp > 1:
        local = local.chunk(dp)[dp_mesh.get_local_rank()] if dp_mesh.get_local_rank() < len(local.chunk(dp)) else \
            local[:0]
    return DTensor.from_local(local.contiguous(), template.device_mesh, template.placements, shape=template.shape,
                              stride=template.stride(), run_check=False)


def _restore_strided(loaded: Any, template: Any) -> Any:
    if isinstance(template, dict):
        return {k: _restore_strided(loaded[k], v) for k, v in template.items()}
    if _is_strided(template):
        return scatter_packed(loaded, template)
    return loaded


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, gathered from FSDP/TP shards (every rank takes part)."""
    from torch.distributed.tensor import DTensor

    full = {}
    for key, value in get_model_state_dict(model).items():
        if _is_strided(value):
            value = gather_packed(value)
        elif isinstance(value, DTensor):
            value = value.full_tensor()
        full[key] = value.detach().to("cpu")
    return full


def release_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, tokens: int, step: int, loss: float,
                       rank: int, tokenizer_dir: str | None = None, dtype: torch.dtype | None = None,
                       name: str | None = None) -> Path | None:
    """Write ``release/<name or tokens-N>`` in the HF layout (rank 0), never overwriting one."""
    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.model.model import Baichuan

    state = full_model_state(model)
    if rank != 0:
        return None
    target = Path(run_dir) / "release" / (name or f"tokens-{tokens:015d}")
    if target.exists():
        return target  # already released (e.g. a resumed run crossing the same boundary)
    with torch.device("meta"):
        cpu_model = Baichuan(model.config)
    cpu_model.load_state_dict(state, assign=True)
    tokenizer = None
    if tokenizer_dir:
        from baichuan2.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    meta = {"step": step, "tokens": tokens, "loss": loss}
    save_pretrained(cpu_model, target, dtype=dtype, tokenizer=tokenizer, extra_files={"release.json": meta})
    return target
