"""Every setting of a composed rag-train / rag-eval config checked where it enters: key, type and range.

Three checks, each raising an InputError that names the setting and the fix:

- keys: a key the command does not read is an error, with the closest valid name suggested. The valid
  keys are those of the config composed *without* the user's ``+key=`` / ``++key=`` additions (so a key
  added to a YAML file is valid at once), plus the parameters of a node's ``_target_``; a new entry
  that is itself a component (a dict with ``_target_``, e.g. ``+callbacks.mine._target_=...``) is read.
- types: a value must fit the annotation of the parameter it fills (the ``_target_``'s signature, or
  `ROOT_TYPES` for the root keys): ``trainer.max_steps=abc`` and ``progress=maybe`` are refused.
- ranges: counts, lengths, sizes and rates by key name (`AT_LEAST`, `FRACTIONS`), e.g. ``n_docs=0``.
"""
from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from rag_models.errors import InputError
from rag_models.setting_types import describe, fits, parameter_types

# The root keys of each command that no `_target_` reads (rag-eval's are EvalJob's fields).
ROOT_TYPES: dict[str, dict[str, Any]] = {
    "train": {"name": str | int, "seed": int, "monitor": str, "monitor_mode": Literal["min", "max"],
              "ckpt_path": str | None, "init_from": str | None, "export": Literal["last", "best"], "test": bool},
    "eval": {"checkpoint": str, "questions": str, "split": str, "mode": Literal["rag", "closed_book"] | None,
             "n_docs": int | list[int] | None, "max_source_length": int | None, "max_question_length": int | None,
             "max_target_length": int | None, "batch_size": int, "recall_depth": int, "limit": int | None,
             "report_examples": int, "progress": bool, "out_dir": str, "trainer.devices": int,
             "trainer.accelerator": Literal["auto", "cpu", "gpu"], "verify": bool, "figures": bool,
             "abstain_below": float | str | None, "abstain_on": Literal["score", "posterior"] | None,
             "abstain_coverage": float | None,
             "trainer.precision": Literal["32-true", "32", "bf16-mixed", "16-mixed"]},
}
# Smallest meaningful value by key name (the last part of the path), wherever the key sits.
AT_LEAST: dict[str, int] = {
    **dict.fromkeys(("n_docs", "eval_n_docs", "batch_size", "eval_batch_size", "encode_batch_size", "max_length",
                     "max_question_length", "max_passage_length", "max_source_length", "max_target_length",
                     "num_beams", "num_return_sequences", "recall_depth", "limit", "nprobe", "ef_search",
                     "refine", "chunk_size", "train_sample", "max_train_examples", "max_val_examples",
                     "max_test_examples", "max_dev_examples", "log_every_n_steps",
                     "accumulate_grad_batches", "check_val_every_n_epoch", "recall_ks"), 1),
    **dict.fromkeys(("seed", "warmup_steps", "min_length", "num_workers", "report_examples", "hard_negatives",
                     "weight_decay", "gradient_clip_val", "lr", "lr_question_encoder", "lr_generator",
                     "lr_context_encoder", "limit_val_batches", "limit_test_batches", "label_smoothing",
                     "every_n_train_steps", "n"), 0),  # every_n_train_steps=0: no step checkpoints
    "max_steps": 1, "max_epochs": 1,  # -1: no limit (UNLIMITED)
}
# -1 means "no limit" / "every device" to Lightning; ddp.yaml ships devices: -1.
UNLIMITED = {"trainer.max_steps": -1, "trainer.max_epochs": -1, "trainer.devices": -1,
             "trainer.num_sanity_val_steps": -1}
FRACTIONS = ("final_lr_factor", "label_smoothing")  # within [0, 1]
# strictly above 0 (val_check_interval: batches when whole, a fraction of the epoch when below 1)
POSITIVE = ("lr", "lr_question_encoder", "lr_generator", "lr_context_encoder", "val_check_interval")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_DEVICES_TEXT = re.compile(r"auto|-1|\d+|\d+(,\d+)*,?")  # Lightning's "auto", a count, or "0,1" device ids
_UNRESOLVED = object()
_REFERENCE = re.compile(r"\$\{([\w.]+)\}")  # a value that is only another setting: `${retriever.pooling}`


def _items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, unresolved value) of every key below ``node``, depth first (lists are leaves)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path, value
            if isinstance(value, dict):
                yield from _items(value, path + ".")


def _resolved(cfg: DictConfig, path: str) -> Any:
    """The resolved value at ``path``; `_UNRESOLVED` for ``${hydra:...}``-style values known only in a run."""
    try:
        value = OmegaConf.select(cfg, path, throw_on_missing=False)
    except InterpolationResolutionError as err:
        if "hydra" in str(err) or "now" in str(err):
            return _UNRESOLVED
        raise InputError(f"cannot be resolved ({str(err).splitlines()[0]})", setting=path,
                         fix="fix the ${...} reference it holds") from None
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=False)
    return value


def _target_params(node: Any) -> tuple[dict[str, Any], bool] | None:
    """The parameter annotations of a node's ``_target_`` (None: no target)."""
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        return None
    return _params_of(node["_target_"])


@functools.lru_cache(maxsize=None)
def _params_of(target: str) -> tuple[dict[str, Any], bool]:
    """`parameter_types` of an importable target, once per target; InputError naming it when it does not import."""
    try:
        return parameter_types(get_method(target))
    except Exception as err:  # noqa: BLE001 - a bad target is reported by name
        raise InputError(f"cannot import {target!r} ({type(err).__name__})", setting="_target_",
                         fix="name an importable function or class") from None


def _parent(container: dict, path: str) -> Any:
    node: Any = container
    for part in path.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _suggest(key: str, candidates: list[str], parent: str) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"Did you mean {parent}{close[0]}?"
    valid = sorted({c for c in candidates if not c.startswith("_")})
    shown = ", ".join(valid[:30]) + (f", ... ({len(valid)} in all; `--cfg job` prints them)" if len(valid) > 30 else "")
    return f"Valid keys here: {shown}" if shown else "Remove it"


def check_keys(container: dict, reference: dict, command: str) -> None:
    """InputError for the first key of ``container`` absent from ``reference`` that no target reads."""
    for path, value in _items(container):
        parent_path, _, key = path.rpartition(".")
        ref_parent = _parent(reference, path)
        ref_keys = list(ref_parent.keys()) if isinstance(ref_parent, dict) else None
        if ref_keys is None or key in ref_keys or key.startswith("_"):
            continue  # inside a node the user added whole, or a known key
        params = _target_params(_parent(container, path))
        if params is not None and (key in params[0] or params[1]):
            continue  # a parameter of the node's target that the YAML leaves at its default
        if isinstance(value, dict) and "_target_" in value:
            continue  # a component added whole (a callback, a logger): instantiated like the shipped ones
        candidates = ref_keys + (list(params[0]) if params else [])
        raise InputError(f"unknown key: {command} does not read it", setting=path,
                         fix=_suggest(key, candidates, parent_path + "." if parent_path else ""))


def _check_range(path: str, value: Any) -> None:
    """InputError when a numeric setting is outside its meaningful range (rules by key name)."""
    name = path.rsplit(".", 1)[-1]
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if path in UNLIMITED and item == UNLIMITED[path]:
            continue
        if name in POSITIVE and item <= 0:
            raise InputError(f"{item} must be above 0", setting=path, fix="Give a positive number")
        if name in FRACTIONS and not 0 <= item <= 1:
            raise InputError(f"{item} must be within [0, 1]", setting=path, fix="Give a fraction")
        if name in AT_LEAST and item < AT_LEAST[name]:
            extra = f" (or {UNLIMITED[path]} for no limit)" if path in UNLIMITED else ""
            raise InputError(f"{item} must be at least {AT_LEAST[name]}{extra}", setting=path,
                             fix=f"Give {AT_LEAST[name]} or more")


def _check_type(path: str, value: Any, annotation: Any) -> None:
    if fits(value, annotation) is False:
        raise InputError(f"{value!r} is not accepted", setting=path, fix=f"Give {describe(annotation)}")


def _check_trainer(cfg: DictConfig) -> None:
    """``trainer.devices`` / ``trainer.accelerator``: values Lightning knows, and hardware this machine has."""
    devices, accelerator = OmegaConf.select(cfg, "trainer.devices"), OmegaConf.select(cfg, "trainer.accelerator")
    if isinstance(devices, str) and not _DEVICES_TEXT.fullmatch(devices.strip()):
        raise InputError(f"{devices!r} is not accepted", setting="trainer.devices",
                         fix="Give a number of devices, -1 (all), auto, or device ids such as '0,1'")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise InputError(f"{devices} must be at least 1 (or -1 for every device)", setting="trainer.devices",
                         fix="Give 1 or more")
    if isinstance(accelerator, str) and accelerator not in ACCELERATORS:
        raise InputError(f"unknown accelerator {accelerator!r}", setting="trainer.accelerator",
                         fix=f"Use one of {', '.join(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise InputError(f"accelerator {accelerator!r}, but this machine has no CUDA GPU",
                         setting="trainer.accelerator", fix="Use trainer=cpu (rag-eval: trainer.accelerator=cpu)")


def check_settings(cfg: DictConfig, command: str, reference: DictConfig | None = None) -> None:
    """Refuse unknown keys (given the ``reference`` config), mistyped values and out-of-range numbers.

    ``command``: "train" or "eval" (which root keys exist). Raises InputError naming the first bad setting.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    if reference is not None:
        check_keys(container, OmegaConf.to_container(reference, resolve=False), f"rag-{command}")
    roots = ROOT_TYPES.get(command, {})
    for path, raw in _items(container):
        if isinstance(raw, dict) or path.rsplit(".", 1)[-1].startswith("_"):
            continue
        value = _resolved(cfg, path)
        if value is _UNRESOLVED or raw == "???":  # a required value not given: the command names it
            continue
        parent_path = path.rpartition(".")[0]
        params = _target_params(_resolved_node(container, parent_path))
        name = path.rsplit(".", 1)[-1]
        origin = _REFERENCE.fullmatch(raw) if isinstance(raw, str) else None
        named = origin.group(1) if origin else path  # name the setting the user sets, not its copy
        if path in roots:
            _check_type(named, value, roots[path])
        elif params is not None and name in params[0]:
            _check_type(named, value, params[0][name])
        _check_range(named, value)
    _check_trainer(cfg)


def _resolved_node(container: dict, path: str) -> Any:
    """The unresolved dict at ``path`` (the root for ''), for its ``_target_``."""
    if not path:
        return container
    node = _parent(container, path + ".x")
    return node if isinstance(node, dict) else None
