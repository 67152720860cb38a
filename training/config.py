"""The Hydra configs of every command line (rag-train, rag-eval, rag-demo's stages) and of the tests.

`compose` gives exactly the config ``rag-train OVERRIDES`` (``config_name="train"``)
or ``rag-eval OVERRIDES`` (``"eval"``) would run with, without starting Hydra's
application; `instantiate` builds a config node and lets our InputError through
unwrapped, so a bad setting reads the same from Python and from the command line.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig

from rag_models.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # configs/ at the top of the checkout
CONFIG_NAMES = ("train", "eval")  # the root configs: configs/train.yaml, configs/eval.yaml


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``rag-train OVERRIDES`` (or ``rag-eval``, with ``config_name="eval"``) would use.

    Raises InputError for an unknown ``config_name``; Hydra's own errors for bad overrides.
    """
    if config_name not in CONFIG_NAMES:
        raise InputError(f"unknown config {config_name!r}", setting="config_name", fix=f"use one of {CONFIG_NAMES}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a bad setting surfaces as our InputError, not wrapped in Hydra's exception."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-components group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
