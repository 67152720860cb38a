"""Worker processes that end with the process that started them, even when it is killed with SIGKILL.

A ``kill -9`` of a multi-process run reaches only the process it names: its workers (rag-eval's
spawned ranks, Lightning's DDP ranks, torchrun's workers) would otherwise run on and write
predictions, metrics or checkpoints after the run is gone. `die_with_parent` ties a worker to its
parent twice: the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux), and a
watchdog thread that polls the parent PID (every platform; ends the worker within ``poll_s``).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_ENV = "RAG_RUN_PID"  # set by a run's first process; its re-executed children find their parent here
EXIT_ORPHANED = 137  # the status of a process killed by SIGKILL, as a shell reports it


def _set_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (thread) exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, poll_s: float) -> None:
    """Body of the watchdog thread: exit the process at once when the parent is gone (re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(EXIT_ORPHANED)  # no clean-up, no atexit handlers: nothing more may be written


def die_with_parent(parent_pid: int, *, poll_s: float = 0.5) -> None:
    """End this process when ``parent_pid`` (its parent) ends; at once if it already has.

    Call it first thing in a worker. Linux delivers SIGKILL on the parent's death; elsewhere (or
    should the signal be lost) a daemon thread notices within ``poll_s`` seconds that the process
    was re-parented and exits it with status 137, skipping every clean-up handler.
    """
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=_watch, args=(parent_pid, poll_s), name="parent-watchdog", daemon=True).start()


def tie_to_launcher() -> None:
    """In a run's process: die with the launcher that started it, if any; else mark this process as the launcher.

    - A process whose parent PID is in ``RAG_RUN_PID`` was started by our own run (Lightning re-executing
      ``rag-train`` for the other DDP ranks): it dies with that parent.
    - Under torchrun (``TORCHELASTIC_RUN_ID`` set) each rank dies with torchrun's agent.
    - Otherwise this is the run's first process: its PID goes into ``RAG_RUN_PID``, inherited by the
      processes it launches.
    """
    parent = os.getppid()
    if os.environ.get(PARENT_ENV) == str(parent) or "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(parent)
        return
    os.environ[PARENT_ENV] = str(os.getpid())
