"""STEvs ablations (Tables 3-4) as configuration variants, built from one list.

An ablation is a STEvs run whose config differs from a base config (a preset name or a
:class:`~stinfer.models.stevs.STEvsModelConfig`) in a few fields. A variant is either the name
of one of the paper's variants (:data:`PAPER_VARIANTS`) or a mapping with its own name and the
overrides, nested as the config is::

    ablations:
      base: fast
      variants:
        - w/o image decoder                 # a paper variant, by name
        - name: fourier, 64 frequencies     # an explicit one
          module: {coord_encoder: fourier, fourier_num_frequencies: 64}
        - name: no TTA
          training: {test_time_augmentation: false}

:func:`ablation_configs` turns such a list into ``{name: STEvsModelConfig}``, each built by
:func:`stevs_variant_config`, the registry's STEvs config (:func:`stinfer.models.model_config`:
the overrides applied field by field, so a misspelt field is an :class:`InputError` naming it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

__all__ = [
    "PAPER_VARIANTS",
    "ablation_configs",
    "deep_merge",
    "deep_merge_loose",
    "stevs_variant_config",
    "variant_overrides",
]

# The variants of STEvs Tables 3-4 that map onto configuration values. "Gaussian Process"
# (a GP spatial encoder) has no counterpart in stinfer and is left out.
PAPER_VARIANTS: dict[str, dict[str, Any]] = {
    "w/o image decoder": {"module": {"image_decoder": False}},  # Table 3-4, component
    "w/o spatial encoder": {"module": {"coord_encoder": "none"}},  # Table 3-4, component
    "w/o alignment loss": {"module": {"alignment": False}},  # Table 3-4, component
    "concat": {"module": {"fusion": "concat"}},  # Table 3-4, fusion
    "deterministic": {"module": {"fusion": "mean"}},  # Table 3-4, fusion
    "cross-attention": {"module": {"fusion": "cross_attention"}},  # Table 3-4, fusion
    "mlp w/ fourier": {"module": {"coord_encoder": "fourier"}},  # Table 3-4, spatial encoder
    # the paper's own MLP coordinate encoder, the ablation of the ``fast`` preset's Fourier one
    "mlp": {"module": {"coord_encoder": "mlp"}},
    "convolutional": {"module": {"backbone": "resnet18"}},  # Table 3-4, architecture (a CNN)
    "vit": {  # Table 3-4, architecture: a ViT sized for the 160-px patch
        "module": {
            "backbone": "vit_tiny_patch16_224",
            "backbone_kwargs": {"img_size": 160},
        }
    },
    "w/o pretrained": {"module": {"pretrained": None}},  # Table 3-4, architecture
}


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str = "") -> dict:
    """``base`` with ``overrides`` merged in, recursively for nested mappings (inputs untouched).

    A key of ``overrides`` that ``base`` lacks is an :class:`InputError` naming its path, so a
    typo in a config fails loudly instead of being ignored.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in merged:
            raise InputError(f"unknown config field {path!r}; known here: {sorted(merged)}.")
        if isinstance(value, Mapping) and isinstance(merged[key], Mapping) and merged[key]:
            merged[key] = deep_merge(merged[key], value, path)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def stevs_variant_config(base: Any = "fast", overrides: Mapping[str, Any] | None = None):
    """A :class:`~stinfer.models.stevs.STEvsModelConfig`: ``base`` with nested ``overrides``.

    Parameters
    ----------
    base
        A preset name (``"fast"``, ``"paper"``) or a ``STEvsModelConfig``.
    overrides
        ``{"module": {...}, "training": {...}}`` in the config's own field names, plus the
        shorthand ``epochs`` (sets ``trainer.max_epochs``).

    The registry's STEvs config (:func:`stinfer.models.model_config`), so an ablation and a
    ``type: stevs`` model with the same overrides are the same run.
    """
    from stinfer.models import model_config

    return model_config("stevs", base, **dict(overrides or {}))


def variant_overrides(entry: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, overrides)`` of one list entry: a paper variant's name or ``{name, ...}``.

    A mapping whose name is a paper variant starts from that variant's overrides.
    """
    if isinstance(entry, str):
        key = entry.strip().lower()
        if key not in PAPER_VARIANTS:
            raise InputError(
                f"unknown ablation {entry!r}; name one of {sorted(PAPER_VARIANTS)} or give "
                "`{name: ..., module: {...}, training: {...}}`."
            )
        return key, copy.deepcopy(PAPER_VARIANTS[key])
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise InputError(f"an ablation variant needs a name: got {entry!r}.")
    entry = dict(entry)
    name = str(entry.pop("name"))
    overrides = copy.deepcopy(PAPER_VARIANTS.get(name.strip().lower(), {}))
    return name, deep_merge_loose(overrides, entry)


def deep_merge_loose(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge that accepts new keys (for combining override dicts, not configs)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge_loose(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def ablation_configs(
    variants: Sequence[str | Mapping[str, Any]],
    base: Any = "fast",
    common: Mapping[str, Any] | None = None,
    include_base: bool = True,
) -> dict[str, Any]:
    """``{name: STEvsModelConfig}`` of every variant, in list order (the base first, as "full").

    Parameters
    ----------
    variants
        Names of :data:`PAPER_VARIANTS` and/or mappings ``{name, module, training, epochs}``.
    base
        The preset or config every variant starts from.
    common
        Overrides applied to the base and every variant (e.g. ``{"epochs": 20}``).
    include_base
        Also return the unmodified base under ``"full"`` (the paper's "STEvs (Ours)" row).

    Raises
    ------
    InputError
        On an unknown variant name, a misspelt config field, or two variants with one name.
    """
    common = dict(common or {})
    base_config = stevs_variant_config(base, common)
    configs: dict[str, Any] = {"full": base_config} if include_base else {}
    for entry in variants:
        name, overrides = variant_overrides(entry)
        if name in configs:
            raise InputError(f"two ablation variants are named {name!r}.")
        configs[name] = stevs_variant_config(base, deep_merge_loose(common, overrides))
        if configs[name].to_dict() == base_config.to_dict():
            logger.warning(
                "ablation %r changes nothing in base %r: it repeats the base.", name, base
            )
    return configs
