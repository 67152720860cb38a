"""`fits` / `describe` / `parameter_types`: the type check behind every setting (tables: test_bad_input_table.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import pytest

from rag_models.setting_types import describe, fits, parameter_types


@pytest.mark.parametrize("value,annotation,expected", [
    (3, int, True), ("abc", int, False), (True, int, False), (2.5, int, False),
    (3, float, True), ("1e-3", float, False), (False, bool, True), ("maybe", bool, False),
    (None, Optional[int], True), ("auto", Union[int, str], True), ([1, 2], list[int], True),
    ([1, "x"], list[int], False), ("bf16-mixed", Literal["bf16-mixed", "32-true"], True),
    ("fp16", Literal["bf16-mixed", "32-true"], False), (16, Literal["16", 16], True), ("x", Path, True),
    (3, object, None),  # a class plain values cannot be judged against: let it pass
])
def test_fits(value, annotation, expected):
    assert fits(value, annotation) is expected


def test_describe_flattens_unions_of_literals():
    annotation = Optional[Union[Literal[16, 32], Literal["bf16-mixed"]]]
    assert describe(annotation) == "one of 16, 32, 'bf16-mixed' or null"
    assert describe(Optional[int]) == "a whole number or null"


def test_parameter_types_take_a_none_default_as_optional():
    def target(a: int, b: str = None, **rest) -> None:  # noqa: RUF013 - as some libraries annotate
        """A callable with a None default its annotation leaves out."""

    params, takes_any = parameter_types(target)
    assert takes_any and fits(None, params["b"]) and not fits(None, params["a"])
