"""The checks a Hydra command (rag-train, rag-eval) runs before Hydra starts its application.

Hydra reports an error of composition on its own (several lines, exit status 1) and wraps
one raised inside the application in "Error executing job" and a traceback. `precheck`
composes the command line itself first, so that a bad override, an unknown key or a
mistyped value is reported the project's way (one line naming the setting, exit status 2;
`rag_models.cli_errors`) before any run directory is created.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from rag_models.errors import InputError
from training.config import CONFIG_DIR, compose
from training.settings_check import check_settings

RUN_DIR_PLACEHOLDER = "<hydra run dir>"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _is_key_addition(override: str) -> bool:
    """True for ``+key=value`` / ``++key=value`` that add a key (not ``+group=option``, which selects a config)."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not (parsed.is_add() or parsed.is_force_add()):
        return False
    return not (CONFIG_DIR / parsed.key_or_group.replace(".", "/")).is_dir()


def _unknown_override(err: ConfigCompositionException, overrides: Sequence[str], config_name: str) -> InputError:
    """An override of a key that does not exist, with the closest existing key suggested."""
    full_key = getattr(err.__cause__, "full_key", None) or ""
    parent_path, _, key = full_key.rpartition(".")
    others = [o for o in overrides if not o.lstrip("+~").startswith(full_key)]
    paths: list[str] = []
    try:
        paths = _all_paths(compose(others, config_name))
    except Exception:  # noqa: BLE001 - the suggestion is a courtesy; the error stands without it
        pass
    siblings = [p for p in paths if p.rpartition(".")[0] == parent_path]
    close = difflib.get_close_matches(full_key, siblings, n=1, cutoff=0.6) or \
        [p for p in paths if difflib.get_close_matches(key, [p.rpartition(".")[2]], n=1, cutoff=0.8)][:1]
    fix = f"Did you mean {close[0]}?" if close else f"To add a key the command reads, write +{full_key}=..."
    return InputError(f"unknown key: not in the rag-{config_name} config", setting=full_key, fix=fix)


def _all_paths(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key path of a config (resolving nothing)."""
    paths = []
    for key in node.keys():
        path = f"{prefix}{key}"
        paths.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation():
            paths.extend(_all_paths(child, path + "."))
    return paths


def checked_compose(overrides: Sequence[str], config_name: str) -> DictConfig:
    """Compose as Hydra would, then refuse unknown keys, mistyped values and out-of-range numbers.

    Raises InputError naming the setting; Hydra's own errors for overrides that do not parse.
    """
    for override in overrides:
        try:
            OverridesParser.create().parse_overrides([override])
        except OverrideParseException as err:
            raise InputError(f"cannot read the override {override!r} ({_first_line(err)})",
                             setting=override.split("=")[0].lstrip("+~"),
                             fix="Write key=value; quote values with brackets, commas or spaces: "
                             "key='[1,2]' (see Hydra's override grammar)") from None
    try:
        cfg = compose(overrides, config_name)
    except ConfigCompositionException as err:
        if isinstance(err.__cause__, (ConfigKeyError, ConfigAttributeError)) and \
                getattr(err.__cause__, "full_key", None):
            raise _unknown_override(err, overrides, config_name) from err
        raise
    kept = [o for o in overrides if not _is_key_addition(o)]
    reference = cfg if len(kept) == len(overrides) else compose(kept, config_name)
    if OmegaConf.select(cfg, "paths.run_dir", default="") is None:
        with open_dict(cfg):
            cfg.paths.run_dir = RUN_DIR_PLACEHOLDER  # rag-train fills it with Hydra's run dir, after this check
    check_settings(cfg, config_name, reference)
    _check_output_dir(cfg, "out_dir" if config_name == "eval" else "paths.run_dir")
    return cfg


def _check_output_dir(cfg: DictConfig, setting: str) -> None:
    """InputError when the directory a run writes into is an existing file (Hydra would fail creating it)."""
    try:
        value = OmegaConf.select(cfg, setting, default=None)
    except Exception:  # noqa: BLE001 - an interpolation that only Hydra's run resolves: Hydra decides
        return
    if isinstance(value, str) and value != RUN_DIR_PLACEHOLDER and Path(value).exists() and not Path(value).is_dir():
        raise InputError(f"{value} is a file, not a directory", setting=setting,
                         fix="Give a directory path (it is created when missing)")


def precheck(argv: Sequence[str], config_name: str) -> None:
    """Check the overrides of a Hydra command line (``sys.argv[1:]``) before Hydra runs it.

    Skipped for Hydra's own modes (--help, --hydra-help, --info, --multirun, shell completion) and when
    another config is named (--config-name / --config-path / --config-dir): Hydra then decides alone.
    """
    args = get_args_parser().parse_args(list(argv))
    if args.help or args.hydra_help or args.info or args.multirun or args.shell_completion or \
            args.config_name or args.config_path or args.config_dir:
        return
    checked_compose(args.overrides, config_name)
