"""Worker processes that never outlive the process that started them.

A pool worker killed with its parent should stop, not keep encoding and writing for
minutes (or forever, if it waits on a queue nobody feeds).  Python does not arrange
that: after ``kill -9`` of the parent, a busy worker finishes its task and may carry
on.  ``die_with_parent`` (call it first thing in a pool initializer) asks Linux to
SIGKILL the worker when its parent dies (``PR_SET_PDEATHSIG``) and, everywhere,
starts a daemon thread that exits the worker within a second of noticing that its
parent has gone (re-parenting changes ``getppid``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, poll_seconds: float = 1.0) -> None:
    """Make the calling process exit when its parent process dies (even by SIGKILL).

    ``parent_pid``: the parent's pid as the parent saw it (``os.getpid()`` passed in the pool's
    initargs), which also catches a parent that died before this call; default: the current parent."""
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still applies
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
