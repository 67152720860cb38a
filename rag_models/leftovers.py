"""Temporaries of killed writes: find the ones whose writer is dead, remove them, say how much was freed.

Every atomic write (rag_models/atomic.py) works under a hidden sibling name that carries the writer's PID:

- ``.NAME.tmp-PID`` (a file) and ``.NAME.tmp-PID-XXXX`` (a directory) until it is renamed onto ``NAME``;
- ``.NAME.old-PID-XXXX``: the directory ``NAME`` replaced, between the two renames of `publish_directory`.

A ``kill -9`` leaves them behind (tens of GB for a Wikipedia index). The next run of a command sweeps its
output directory with `sweep_stale`: a temporary whose PID is no longer a live process on this host is
removed; a live process's temporary is never touched (another run may be writing it). An ``.old`` directory
whose ``NAME`` is missing is the only whole copy left: it is renamed back onto ``NAME`` instead.

Limit: liveness is that of this host; two hosts writing one shared directory at the same time are not told apart.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, killed but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (0 for what vanished meanwhile)."""
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


def stale_temporaries(directory: str | Path, *, recursive: bool = False) -> list[Path]:
    """Temporaries under ``directory`` (its entries, or every level with ``recursive``) whose writer is dead.

    A recursive search does not descend into temporaries (their contents go with them).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: list[Path] = []
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = TEMP_PATTERN.match(entry.name)
            if match is not None:
                if not process_alive(int(match["pid"])):
                    found.append(entry)
            elif recursive and entry.is_dir() and not entry.is_symlink():
                pending.append(entry)
    return sorted(found)


@dataclass
class Sweep:
    """What `sweep_stale` did: temporaries removed with their bytes, and ``.old`` directories put back."""

    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    restored: list[Path] = field(default_factory=list)

    def summary(self, root: Path) -> str:
        """One line for the user, or "" when nothing was found."""
        parts = []
        if self.removed:
            shown = ", ".join(str(p.relative_to(root)) for p in self.removed[:3])
            more = ", ..." if len(self.removed) > 3 else ""
            plural = "y" if len(self.removed) == 1 else "ies"
            parts.append(f"removed {len(self.removed)} temporar{plural} of killed runs under {root} "
                         f"({_human(self.freed_bytes)} freed: {shown}{more})")
        if self.restored:
            parts.append(f"put back {len(self.restored)} director{'y' if len(self.restored) == 1 else 'ies'} "
                         f"that a killed run had moved aside: {', '.join(str(p) for p in self.restored)}")
        return "; ".join(parts)


def _human(n_bytes: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    value = float(n_bytes)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - unreachable


def remove_stale(paths: list[Path]) -> Sweep:
    """Remove (or, for an ``.old`` directory whose target is missing, restore) each of ``paths``."""
    sweep = Sweep()
    for path in paths:
        match = TEMP_PATTERN.match(path.name)
        target = path.with_name(match["name"]) if match else None
        if match and match["kind"] == "old" and target is not None and not target.exists():
            os.replace(path, target)  # the only whole copy: back in service
            sweep.restored.append(target)
            continue
        size = _size(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another sweep got there first
            continue
        sweep.removed.append(path)
        sweep.freed_bytes += size
    return sweep


def sweep_stale(directory: str | Path, *, command: str, recursive: bool = True) -> Sweep:
    """Remove the dead writers' temporaries under ``directory`` and print what was freed (stderr, one line).

    ``command`` prefixes the line (``rag-build-index: note: removed 2 temporaries ... (1.3 GB freed ...)``).
    """
    directory = Path(directory)
    sweep = remove_stale(stale_temporaries(directory, recursive=recursive))
    line = sweep.summary(directory)
    if line:
        print(f"{command}: note: {line}", file=sys.stderr, flush=True)
    return sweep
