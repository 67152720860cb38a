"""One exception type for bad user input, so every message names where and what to do."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: a malformed file, a mismatched index, a bad setting.

    The message always says where (file and line, or the setting) and what to do:
    ``"<where>: <problem>. <fix>"``.

    Args:
        problem: what is wrong, e.g. ``"unknown pooling 'max'"``; the message's core.
        path: the offending file or directory; when given it is the "where" (and ``setting`` is not shown).
        line: 1-based line number within ``path``; shown only together with ``path``.
        setting: the config key at fault (e.g. ``"model.n_docs"``); the "where" when no ``path`` is given.
        fix: what the user should do, appended after the problem; omitted when None or empty.

    ``path`` (as a string), ``line`` and ``setting`` stay available as attributes; ``fix`` only in the message.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        setting: str | None = None,
        fix: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "")
        elif setting is not None:
            where = f"setting `{setting}`"
        message = f"{where}: {problem}" if where else problem
        if fix:
            message += f". {fix}"
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.setting = setting
