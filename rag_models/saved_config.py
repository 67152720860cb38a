"""The checks of a saved RagModel's ``rag_config.json``: an object of known keys with values of the right type.

The file is read by `rag_models.checkpoint.saved_settings` (rag-eval, rag-ask, rag-export, init_from);
a hand-edited or foreign file must be refused naming the file, the key and the fix, never turned into
a TypeError deep inside the model or silently read as another mode.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

from rag_models.errors import InputError
from rag_models.setting_types import describe, fits, parameter_types

MODES = ("rag", "closed_book")
# Keys of build_rag_model that a saved directory supplies itself (its sub-directories), never rag_config.json.
NOT_SAVED = ("question_encoder", "generator", "context_encoder", "init_from")
FIX = "Correct it (rag-train and rag-import write this file), or re-save the model"


def check_saved_config(settings: Any, path: str | Path, build: Callable[..., Any]) -> dict[str, Any]:
    """``settings`` (the parsed JSON) when valid for ``build`` (build_rag_model); InputError otherwise.

    Raises InputError naming ``path`` and the key: not a JSON object, an unknown key (closest one
    suggested), a value of the wrong type, or a ``mode`` other than "rag" / "closed_book".
    """
    if not isinstance(settings, dict):
        raise InputError(f"expected a JSON object of settings, got {type(settings).__name__}", path=path, fix=FIX)
    params, _ = parameter_types(build)
    known = {name: annotation for name, annotation in params.items() if name not in NOT_SAVED}
    for key, value in settings.items():
        if key == "mode":
            if value not in MODES:
                close = difflib.get_close_matches(str(value), MODES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise InputError(f"unknown mode {value!r}", path=path,
                                 fix=f"{hint}`mode` must be one of {', '.join(MODES)}")
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"Did you mean {close[0]!r}? " if close else f"Known keys: {', '.join(sorted(known))}. "
            raise InputError(f"unknown key {key!r}", path=path, fix=hint + FIX)
        if fits(value, known[key]) is False:
            raise InputError(f"{key!r} is {value!r}, expected {describe(known[key])}", path=path, fix=FIX)
        if key in ("n_docs", "max_question_length", "max_passage_length", "max_source_length",
                   "max_target_length") and value < 1:
            raise InputError(f"{key!r} is {value}, must be at least 1", path=path, fix=FIX)
    return settings
