"""Every Hydra config group composes offline, and every `_target_` names a real callable."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "retriever", "index", "data", "trainer", "decoding", "experiment"]
# `${hydra:...}` and run-dir interpolations only resolve inside a Hydra run.
_UNRESOLVABLE_HERE = ("hydra", "now")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _targets(node: object) -> list[str]:
    """All `_target_` strings in a config tree."""
    found: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            value = node._get_node(key)._value() if key != "_target_" else node[key]
            if key == "_target_":
                found.append(str(value))
            else:
                found.extend(_targets(node._get_node(key)))
    elif isinstance(node, ListConfig):
        for item in node:
            found.extend(_targets(item))
    return found


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"configs/{group}/ has no option"


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_group_option_composes_and_targets_import(group: str, option: str):
    override = f"{group}={option}"
    cfg = _compose("train", [override])
    # Everything but run-time interpolations resolves to plain values.
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict) and group in container or group == "experiment"
    for target in _targets(cfg):
        assert callable(get_method(target)), f"{group}={option}: {target} is not callable"


def test_eval_config_composes_with_each_decoding():
    for option in _options("decoding"):
        cfg = _compose("eval", [f"decoding={option}", "index.path=/some/index"])
        assert cfg.index.path == "/some/index"
        assert cfg.decoding is not None
