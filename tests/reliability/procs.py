"""/proc helpers for the tests that kill a parent and check its worker processes die with it (Linux)."""

from __future__ import annotations

from pathlib import Path


def pool_workers(pid: int) -> list[int]:
    """Pids of ``pid``'s multiprocessing (spawn) workers: its children whose command line is ``spawn_main``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
