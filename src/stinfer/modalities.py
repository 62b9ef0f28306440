"""The one vocabulary for what a model reads at a spot: the image, the position, or both.

``fused`` (image and coordinates together), ``image`` (the H&E patch only) and ``spatial``
(the spot coordinates only) are STEvs's inference modes (STEvs Table 5) and CoxFormer's spot
modalities alike. CoxFormer's public code and earlier versions of stinfer's CoxFormer model called the last two
``both`` and ``location``; those names are still accepted everywhere (arguments, the CLI,
configs and saved models) through :func:`canonical_modality`, which every entry point calls,
so code past it only ever sees the canonical names.

Examples
--------
>>> canonical_modality("location")
'spatial'
>>> canonical_modality("fused")
'fused'
"""

from __future__ import annotations

from typing import Literal

from stinfer.errors import InputError

__all__ = ["MODALITIES", "MODALITY_ALIASES", "Modality", "canonical_modality"]

Modality = Literal["fused", "image", "spatial"]
MODALITIES: tuple[str, ...] = ("fused", "image", "spatial")
MODALITY_ALIASES: dict[str, str] = {"both": "fused", "location": "spatial"}
"""Older names (CoxFormer's public code) and the canonical modality each one means."""


def canonical_modality(name: str, what: str = "modality") -> Modality:
    """The canonical name of modality ``name`` (``both`` -> ``fused``, ``location`` -> ``spatial``).

    Parameters
    ----------
    name
        A canonical modality (:data:`MODALITIES`) or an alias (:data:`MODALITY_ALIASES`).
    what
        What the caller calls the value (``"modality"``, ``"mode"``), named in the error.

    Raises
    ------
    InputError
        When ``name`` is neither a modality nor an alias; the message lists both.
    """
    if name in MODALITIES:
        return name  # type: ignore[return-value]
    if name in MODALITY_ALIASES:
        return MODALITY_ALIASES[name]  # type: ignore[return-value]
    aliases = ", ".join(f"{alias} = {canonical}" for alias, canonical in MODALITY_ALIASES.items())
    raise InputError(
        f"{what} must be one of {', '.join(MODALITIES)} (older names: {aliases}); got {name!r}."
    )
