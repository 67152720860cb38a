"""Kill a command with SIGKILL at a file-system event, then check what it left and rerun it.

    outcome = kill_at(command, root=OUT, moment=Moment("faiss write", ".index.tmp-*"), env=env)
    assert not outcome.survivors and not outcome.written_after_kill

`kill_at` starts the command in its own process group, polls ``root`` (every 2 ms) until the moment's
event (a file or directory matching a glob appears for the n-th time, optionally with at least N
bytes), then sends SIGKILL to the whole group, or to its first process only (``leader_only``: what
``kill -9 PID`` does, the case where workers must die by themselves). It then records

- the processes of the group still alive 3 s later (``survivors``, killed by the harness afterwards),
- the entries of ``root`` that changed during those 3 s (``written_after_kill``),
- the temporaries of killed writes left behind and their bytes (``leftovers``, ``leftover_bytes``).

The moments that are too short to be seen by polling (a rename) are stretched by
``tests/kill_hooks/sitecustomize.py``: ``Moment.stall`` holds renames of matching temporaries for a while.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rag_models.leftovers import TEMP_PATTERN

HOOKS = Path(__file__).resolve().parent / "kill_hooks"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Moment:
    """When to kill: the ``nth`` appearance of a path matching ``pattern`` (a glob of the name) under the root.

    Fields:
        name: what the moment is, for reports.
        pattern: glob of a file or directory name, searched at every depth of the root.
        nth: kill at its n-th appearance (an appearance is absent -> present).
        min_bytes: the matching file must also hold at least this many bytes.
        stall: hold renames of temporaries matching this glob (``KILL_HARNESS_STALL``) so that
            the moment between write and publication lasts ``stall_s`` seconds; None: no stall.
        leader_only: SIGKILL the first process only (its workers must die on their own).
    """

    name: str
    pattern: str
    nth: int = 1
    min_bytes: int = 0
    stall: str | None = None
    stall_s: float = 3.0
    leader_only: bool = False


@dataclass
class Outcome:
    """What a kill left behind (see the module docstring)."""

    moment: Moment
    killed: bool  # False: the command finished before the moment came
    seconds_to_kill: float
    survivors: list[int] = field(default_factory=list)
    written_after_kill: list[str] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    leftover_bytes: int = 0
    output: str = ""


def _matches(root: Path, pattern: str, min_bytes: int) -> set[str]:
    """Relative paths under ``root`` whose name matches ``pattern`` (and that hold ``min_bytes``)."""
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            if fnmatch.fnmatch(name, pattern):
                path = Path(directory) / name
                try:
                    size = path.stat().st_size if path.is_file() else min_bytes
                except OSError:
                    continue
                if size >= min_bytes:
                    found.add(str(path.relative_to(root)))
    return found


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``, by relative path."""
    state = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            try:
                info = path.stat()
            except OSError:
                continue
            state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return state


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def temporaries(root: Path) -> list[Path]:
    """Temporaries of atomic writes under ``root`` (names ``.NAME.tmp-PID...`` / ``.NAME.old-PID...``)."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            if TEMP_PATTERN.match(name):
                found.append(Path(directory) / name)
        dirs[:] = [d for d in dirs if not TEMP_PATTERN.match(d)]
    return sorted(found)


def disk_bytes(path: Path) -> int:
    """Bytes of a file or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def command_env(stall: str | None = None, stall_s: float = 3.0) -> dict[str, str]:
    """The environment of a harnessed command: offline, one thread, this checkout first, the stall hook."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PL_DISABLE_FORK": "1"}
    paths = [str(HOOKS), str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("KILL_HARNESS_STALL", None)
    if stall:
        env["KILL_HARNESS_STALL"], env["KILL_HARNESS_STALL_S"] = stall, str(stall_s)
    return env


def run(command: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` to its end (no stall); raise with its output when it fails."""
    done = subprocess.run(command, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def kill_at(command: list[str], *, root: Path, moment: Moment, cwd: Path, timeout: float = 600,
            settle_s: float = 3.0) -> Outcome:
    """Start ``command``, SIGKILL it at ``moment`` (events under ``root``), and record what it left.

    Every process of the group is gone when this returns (survivors are recorded, then killed).
    """
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(cwd / f"kill-{os.getpid()}-{time.time_ns()}.log", "w+") as log:
        process = subprocess.Popen(command, cwd=cwd, env=command_env(moment.stall, moment.stall_s), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        pgid = process.pid  # a new session: its own process group, led by the command
        seen: set[str] = set()
        appearances = 0
        killed = False
        try:
            while process.poll() is None and time.monotonic() - started < timeout:
                now = _matches(root, moment.pattern, moment.min_bytes)
                appearances += len(now - seen)
                seen = now
                if appearances >= moment.nth:
                    if moment.leader_only:
                        os.kill(process.pid, signal.SIGKILL)
                    else:
                        os.killpg(pgid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.002)
            seconds = time.monotonic() - started
            before = _snapshot(root)
            process.wait(timeout=60)
            deadline = time.monotonic() + settle_s
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(max(0.0, deadline - time.monotonic()))  # anything still writing has had its chance
            survivors = group_members(pgid)
            after = _snapshot(root)
        finally:
            try:
                os.killpg(pgid, signal.SIGKILL)  # never leave a process behind, whatever the outcome
            except ProcessLookupError:
                pass
            if process.poll() is None:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read()
    Path(log.name).unlink()
    written = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
    left = temporaries(root)
    return Outcome(moment, killed, seconds, survivors, written, left, sum(disk_bytes(p) for p in left), output)


def python_module(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
