"""Executors run the same task functions locally (processes) or on a Ray cluster.

A task is a module-level function plus picklable arguments; it writes its own outputs atomically and
returns a small result (counts).  Executors only schedule, so switching ``executor: ray`` in a recipe
changes where tasks run, never what they compute.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from tqdm.auto import tqdm

# Fault injection for the crash/resume tests: exit hard after this many task completions in this process.
FAIL_AFTER_ENV = "BAICHUAN2_DATA_FAIL_AFTER"


class _FaultCounter:
    def __init__(self):
        limit = os.environ.get(FAIL_AFTER_ENV)
        self.remaining = int(limit) if limit else None

    def tick(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                os._exit(17)  # simulate a kill: no cleanup, no flush


_FAULTS = _FaultCounter()


class LocalExecutor:
    """Process pool over tasks (``workers=1`` runs inline, which is also what tests use for speed)."""

    def __init__(self, workers: int = 2):
        self.workers = max(1, workers)

    def map(self, fn: Callable, args_list: Sequence[tuple], desc: str = "", units: Sequence[int] | None = None,
            unit: str = "task") -> list[Any]:
        """Run fn(*args) for every args; the bar counts tasks, or ``units[i]`` ``unit``s for task i."""
        results: list[Any] = [None] * len(args_list)
        bar = _bar(args_list, desc, units, unit)
        if self.workers == 1 or len(args_list) <= 1:
            for i, args in enumerate(args_list):
                results[i] = fn(*args)
                _FAULTS.tick()
                bar.update(units[i] if units else 1)
        else:
            # spawn: workers start clean (no forked torch/BLAS thread state), one BLAS thread each.
            ctx = get_context("spawn")
            with ProcessPoolExecutor(min(self.workers, len(args_list)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(fn, *args): i for i, args in enumerate(args_list)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    _FAULTS.tick()
                    bar.update(units[futures[fut]] if units else 1)
        bar.close()
        return results


def _bar(args_list: Sequence[tuple], desc: str, units: Sequence[int] | None, unit: str) -> tqdm:
    total = sum(units) if units else len(args_list)
    return tqdm(total=total, desc=desc, unit=unit, disable=len(args_list) < 2, leave=False, mininterval=1.0)


def _init_worker(parent_pid: int) -> None:
    from baichuan2.utils.procs import die_with_parent

    die_with_parent(parent_pid)  # after kill -9 of `data run`, no worker keeps computing and writing
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


class RayExecutor:
    """Ray tasks over the same functions.  ``address=None`` starts (or joins) a local cluster; give
    ``auto`` or ``ray://host:10001`` for a real one.  All task outputs go to ``out_dir``, which must be
    on storage every node sees (NFS, or a mounted bucket)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ImportError("executor 'ray' needs Ray: pip install 'baichuan2[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)

    def map(self, fn: Callable, args_list: Sequence[tuple], desc: str = "", units: Sequence[int] | None = None,
            unit: str = "task") -> list[Any]:
        remote = self.ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(*args) for args in args_list]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        with _bar(args_list, desc, units, unit) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    results[index[ref]] = self.ray.get(ref)
                    _FAULTS.tick()
                    bar.update(units[index[ref]] if units else 1)
        return results


def make_executor(kind: str, workers: int, ray_address: str | None = None):
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(ray_address, num_cpus=workers if not ray_address else None)
    raise ValueError(f"unknown executor {kind!r} (use 'local' or 'ray')")
