"""Run untrusted model-written Python (HumanEval/MBPP completions plus their tests) in a contained process.

Each program runs in its own process with:
  * a fresh temporary working directory (removed afterwards), stdin closed, output to size-capped files;
  * a minimal environment (PATH, HOME/TMPDIR = the temp dir, LANG): no inherited secrets or tokens;
  * its own session (``start_new_session``), so the whole process group is killed on timeout;
  * rlimits: CPU seconds, address space (a 10 GB allocation fails with MemoryError), file size, open
    files, no core dumps, and RLIMIT_NPROC (a fork bomb stops at a few dozen processes);
  * when the evaluator runs as root: a fresh unprivileged uid/gid per program (no passwd entry, owns
    nothing but its temp dir). That uid cannot write outside the temp dir and world-writable places,
    cannot signal any other process (``kill -9 -1`` only reaches its own), and its RLIMIT_NPROC count is
    its own. Every process left with that uid (e.g. one that called setsid to escape the process group)
    is killed when the program ends.
Without root the program runs as the evaluator's own user (``contained_uid()`` returns None): rlimits,
timeouts and the environment still apply, but signals to the user's other processes are not blocked, so
run untrusted code as root in a container or VM.

The verdict is one of passed / failed / timeout, with a one-line reason (the exception's last line,
"killed by signal 9", "timed out after 10.0 s").
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr (and of any file) a program may write


@dataclass
class Limits:
    """timeout: wall-clock seconds; cpu_seconds: CPU time; memory_mb: address space; processes: RLIMIT_NPROC."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 2048
    processes: int = 16
    open_files: int = 64


@dataclass
class Verdict:
    status: str  # passed | failed | timeout
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def contained_uid() -> int | None:
    """A fresh unprivileged uid for one program when we are root (None otherwise)."""
    if os.geteuid() != 0:
        return None
    return random.SystemRandom().randrange(1 << 20, 1 << 30)  # far above any real account


def _executable_by_others(path: str) -> bool:
    p = Path(path).resolve()
    if not os.access(p, os.X_OK) or not p.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in p.parents)


@cache
def interpreter() -> str:
    """A Python an unprivileged uid can execute: ours if it is reachable, else the system python3."""
    if os.geteuid() != 0 or _executable_by_others(sys.executable):
        return sys.executable
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and Path(candidate).exists() and _executable_by_others(candidate):
            return str(Path(candidate).resolve())
    raise RuntimeError("no Python interpreter that an unprivileged uid can execute (e.g. /usr/bin/python3)")


def _limit_child(limits: Limits):
    def apply() -> None:  # runs in the child between fork and exec (after the uid switch)
        mem = limits.memory_mb << 20
        for what, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, OUTPUT_LIMIT),
                            (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0),
                            (resource.RLIMIT_NPROC, limits.processes)):
            resource.setrlimit(what, (value, value))
        # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later for a program that
        # catches it; with soft == hard the kernel sends SIGKILL at once, indistinguishable from other kills
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    return apply


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: a forked child becomes that uid and sends kill(-1), which reaches
    exactly that uid's processes, forks included; repeated until none is left."""
    for _ in range(100):
        if not _processes_of(uid):
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_program(program: str, limits: Limits = Limits()) -> Verdict:
    """Execute ``program`` (a complete Python source) contained; passed = exit status 0 within the limits."""
    uid = contained_uid()
    work = Path(tempfile.mkdtemp(prefix="b2-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="b2-sandbox-logs-"))  # ours, out of the program's reach
    try:
        (work / "program.py").write_text(program, encoding="utf-8")
        out_path, err_path = logs / "stdout", logs / "stderr"
        if uid is not None:
            for p in (work, work / "program.py"):
                os.chown(p, uid, uid)
        os.chmod(work, 0o700)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen([interpreter(), "-I", "-B", "program.py"], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                    start_new_session=True, preexec_fn=_limit_child(limits), **ids)
            try:
                code = proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                if uid is not None:
                    _kill_uid(uid)
            elapsed = time.monotonic() - start
        if timed_out:
            return Verdict("timeout", f"timed out after {elapsed:.1f} s")
        stderr = _tail(err_path)
        if code == 0:
            return Verdict("passed")
        if code == -signal.SIGXCPU:  # ran out of CPU time: the same verdict as running out of wall-clock time
            # (which limit comes first depends on how busy the machine is, so both must read alike)
            return Verdict("timeout", f"timed out: CPU time limit of {limits.cpu_seconds} s reached "
                                      f"after {elapsed:.1f} s")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            why = {"SIGXFSZ": " (file size limit)"}.get(name, "")
            return Verdict("failed", f"killed by signal {-code} ({name}){why}" +
                           (f": {_reason(stderr)}" if _reason(stderr) else ""))
        return Verdict("failed", _reason(stderr) or f"exit status {code}")
    except (OSError, RuntimeError) as e:  # could not start it (e.g. no usable interpreter): the sample fails
        return Verdict("failed", f"sandbox error: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int = 0) -> list[Verdict]:
    """``run_program`` over many programs, several at a time (each still in its own process and uid)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))
