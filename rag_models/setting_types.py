"""Does a setting's value fit a parameter's type annotation? The check behind every typed setting.

Settings arrive as plain YAML / JSON values (bool, int, float, str, None, lists, dicts); the
parameters they fill are annotated (``int``, ``float | None``, ``Literal["min", "max"]``,
``list[int]``, ...). `fits` answers True / False, or None when the annotation names a class
plain values cannot be judged against (a Tensor, an Accelerator): the caller then lets it pass.
"""
from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

_SEQUENCES = (list, tuple, Sequence, typing.List, typing.Tuple)


def _fits_union(value: Any, members: tuple[Any, ...]) -> bool | None:
    """True when any member fits; False when every member says no; None when undecidable."""
    answers = [fits(value, member) for member in members]
    if any(answer is True for answer in answers):
        return True
    return None if any(answer is None for answer in answers) else False


def fits(value: Any, annotation: Any) -> bool | None:
    """Whether a plain value (bool, int, float, str, None, list, dict) fits ``annotation`` (None: cannot say)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _fits_union(value, typing.get_args(annotation))
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (PurePath, os.PathLike) or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
        return isinstance(value, str)
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
        if len(args) != 1:
            return None if args else True
        answers = [fits(item, args[0]) for item in value]
        return False if False in answers else (None if None in answers else True)
    if annotation in (dict, Mapping) or origin in (dict, Mapping):
        return isinstance(value, dict) or None
    return None  # a class, a Callable, a TypeVar: plain values cannot be judged here


def describe(annotation: Any) -> str:
    """A short reader's name of an annotation: 'an integer', 'true or false', 'one of 'min', 'max''..."""
    origin = typing.get_origin(annotation)
    choices = _literals(annotation)
    if choices is not None and origin is not typing.Literal:
        nullable = type(None) in typing.get_args(annotation)
        return "one of " + ", ".join(repr(choice) for choice in choices) + (" or null" if nullable else "")
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        text = " or ".join(describe(arg) for arg in members)
        return text + (" or null" if len(members) < len(typing.get_args(annotation)) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        return "a list"
    return getattr(annotation, "__name__", str(annotation))


def _optional_if_none(annotation: Any, default: Any) -> Any:
    """``annotation | None`` when the parameter defaults to None (some libraries leave out the Optional)."""
    if default is None and annotation is not inspect.Parameter.empty and fits(None, annotation) is False:
        return typing.Optional[annotation]
    return annotation


def _literals(annotation: Any) -> list[Any] | None:
    """Every choice of a Literal or of a union of Literals (None when something else is in it)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [_literals(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        if parts and all(part is not None for part in parts):
            return [choice for part in parts for choice in part]
    return None


def parameter_types(target: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """``({name: annotation}, takes_any_keyword)`` of a callable or class; empty when it cannot be inspected."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names only, not types
        hints = {}
    params = {name: _optional_if_none(hints.get(name, inspect.Parameter.empty), param.default)
              for name, param in signature.parameters.items()
              if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}
    takes_any = any(param.kind == param.VAR_KEYWORD for param in signature.parameters.values())
    return params, takes_any
