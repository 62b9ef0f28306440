"""Config dataclasses from plain mappings: a preset with overrides, a saved model's config.

:func:`resolve_preset` turns a preset name into a fresh config, the same way for every model
with presets (each model module holds ``paper_preset()``/``fast_preset()`` constructors and a
``PRESETS`` dict of them); :func:`auto_preset` resolves ``"auto"`` (paper on a GPU, fast on a
CPU) for every command and model. One function, :func:`override_config`, applies a mapping (a YAML entry, ``create_model``'s
keyword arguments, the ``config`` of a saved ``config.json``) onto a config dataclass, field by
field and recursively into nested configs, so every model reads its options and its saved
config the same way, and a misspelt field fails loudly with its dotted path;
:func:`move_fields` first moves the fields of a model's older config layouts to their place
now (each model's upgrade function lists its moves).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from stinfer.errors import InputError

__all__ = ["AUTO_PRESET", "auto_preset", "move_fields", "override_config", "resolve_preset"]

AUTO_PRESET = "auto"
logger = logging.getLogger("stinfer")


def auto_preset(preset: str | None, accelerator: str | None = None) -> str | None:
    """The preset ``"auto"`` stands for: ``"paper"`` on a GPU, ``"fast"`` on a CPU.

    The one place ``auto`` (the default ``--preset`` of ``train``, ``embed-genes`` and
    ``impute``) is resolved: the papers' hyperparameters train in minutes on a CUDA GPU and
    take hours on a laptop CPU, where ``fast`` is the usable model. ``accelerator`` (the
    ``--accelerator`` given, if any) decides when it names a device (``cpu``: fast; ``gpu``,
    ``cuda``: paper); otherwise whether torch sees a CUDA GPU. Any other name (or ``None``)
    is returned as it is. Logs which preset ``auto`` chose.
    """
    if preset != AUTO_PRESET:
        return preset
    if accelerator in ("gpu", "cuda"):
        on_gpu, why = True, f"--accelerator {accelerator}"
    elif accelerator in ("cpu", "mps"):
        on_gpu, why = False, f"--accelerator {accelerator}"
    else:
        import torch

        on_gpu = torch.cuda.is_available()
        why = "a CUDA GPU is available" if on_gpu else "no CUDA GPU is available"
    chosen = "paper" if on_gpu else "fast"
    logger.info("preset auto: %s (%s)", chosen, why)
    return chosen


def resolve_preset(
    presets: Mapping[str, Callable[[], Any]], preset: Any, config_class: type, where: str
) -> Any:
    """A config of ``config_class`` from a preset name, a config, or ``None`` (``"paper"``).

    ``presets`` maps each name to its constructor (a model module's ``PRESETS``); every call
    builds a new config, so a caller's changes never reach another's. A config object is
    returned as it is; ``"auto"`` is :func:`auto_preset`'s choice; an unknown name is an
    :class:`InputError` listing the names.
    """
    if preset is None:
        preset = "paper"
    if preset == AUTO_PRESET:
        preset = auto_preset(preset)
    if isinstance(preset, config_class):
        return preset
    if isinstance(preset, str) and preset in presets:
        return presets[preset]()
    raise InputError(f"unknown {where} preset {preset!r}; choose one of {sorted(presets)}")


def override_config(config: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """A copy of the config dataclass ``config`` with ``overrides`` (field -> value) applied.

    A mapping given for a field that holds a dataclass (``training.patch``, ``trainer``) or a
    dict overrides inside it, recursively; a list given for a tuple field becomes a tuple. An
    unknown field or a value the config rejects is an :class:`InputError` naming its dotted
    path under ``where`` (e.g. ``"stevs: unknown options ['module.fusoin']"``).
    """
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown and not fields:
        raise InputError(f"{where} takes no options; got {unknown}.")
    if unknown:
        path = where.partition(".")[2]
        dotted = [f"{path}.{key}" if path else key for key in unknown]
        raise InputError(
            f"{where.partition('.')[0]}: unknown options {dotted}; valid"
            f"{f' in {path}' if path else ''}: {sorted(fields)}."
        )
    changes = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            value = override_config(current, value, f"{where}.{key}")
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            value = {**current, **copy.deepcopy(dict(value))}
        elif isinstance(value, list) and isinstance(current, tuple):
            value = tuple(value)
        changes[key] = copy.deepcopy(value)
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{where}: {error}") from error


def move_fields(values: Mapping[str, Any], moves: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``values`` (a saved ``config`` or nested overrides) with fields moved.

    ``moves`` maps an old dotted path to its new one (``"training.trainer": "trainer"``,
    ``"max_epochs": "trainer.max_epochs"``), applied in order, so list a newer layout's moves
    before an older one's. A value already at the new path wins over the moved one (two
    mappings are merged key by key, the new keys winning); an old parent left empty is
    dropped. A path through a value that is not a mapping (a config object given whole) is
    left alone, so :func:`override_config` names any old field that remains. ``values`` is
    not modified.
    """
    values = _copied_mappings(values)
    for old, new in moves.items():
        *old_parents, old_name = old.split(".")
        chain = _mapping_chain(values, old_parents)
        if chain is None or old_name not in chain[-1]:
            continue
        *new_parents, new_name = new.split(".")
        target = _mapping_at(values, new_parents)
        if target is None:
            continue
        value = chain[-1].pop(old_name)
        target[new_name] = _merged(target[new_name], value) if new_name in target else value
        for parent, name, child in zip(
            reversed(chain[:-1]), reversed(old_parents), reversed(chain[1:]), strict=True
        ):
            if child or parent.get(name) is not child:
                break
            del parent[name]
    return values


def _copied_mappings(value: Any) -> Any:
    """``value`` with every nested mapping copied into a new dict (other values shared)."""
    if isinstance(value, Mapping):
        return {key: _copied_mappings(item) for key, item in value.items()}
    return value


def _mapping_chain(values: dict[str, Any], parents: list[str]) -> list[dict[str, Any]] | None:
    """The dicts from ``values`` down along ``parents``; None where one is missing or is not
    a mapping."""
    chain = [values]
    for name in parents:
        child = chain[-1].get(name)
        if not isinstance(child, dict):
            return None
        chain.append(child)
    return chain


def _mapping_at(values: dict[str, Any], parents: list[str]) -> dict[str, Any] | None:
    """The dict at ``parents`` under ``values``, created where missing; None where a value on
    the way is not a mapping."""
    for name in parents:
        child = values.setdefault(name, {})
        if not isinstance(child, dict):
            return None
        values = child
    return values


def _merged(current: Any, moved: Any) -> Any:
    """``current`` (at the new path) over ``moved`` (from the old one): mappings key by key."""
    if isinstance(current, dict) and isinstance(moved, dict):
        merged = dict(moved)
        for key, value in current.items():
            merged[key] = _merged(value, merged[key]) if key in merged else value
        return merged
    return current
