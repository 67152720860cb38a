"""Loaded by every Python process of a run under the kill harness (this folder leads PYTHONPATH).

Holds each rename whose source matches ``KILL_HARNESS_STALL`` (a glob of the file name, e.g.
``.best.ckpt.tmp-*``) for ``KILL_HARNESS_STALL_S`` seconds before doing it: the temporary is whole
but not yet published, a moment that otherwise lasts microseconds and a polling harness could not see.
Nothing else changes: the rename then happens as it would have.
"""
from __future__ import annotations

import fnmatch
import os
import time

_PATTERN = os.environ.get("KILL_HARNESS_STALL")
_SECONDS = float(os.environ.get("KILL_HARNESS_STALL_S", "2"))

if _PATTERN:
    _replace = os.replace

    def _stalled_replace(src, dst, *args, **kwargs):  # same signature as os.replace
        if fnmatch.fnmatch(os.path.basename(os.fspath(src)), _PATTERN):
            time.sleep(_SECONDS)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _stalled_replace
