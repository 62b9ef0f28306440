"""The models a user holds, created and loaded through one registry.

- expression from histology and/or coordinates: :class:`STEvs`, :class:`STNet`, and the
  baselines :class:`MeanExpression`, :class:`CoordinateKNN`, :class:`PatchFeatureRidge`;
- genes never measured, from their embeddings: :class:`CoxFormerSpatial`, and the baselines
  of the held-out genes protocol :class:`GeneMeanProfile`, :class:`GeneKNN`;
- gene embeddings from co-expression corpora: :class:`CoxFormerEmbeddings` (and the SVD
  baseline :class:`SVDGeneEmbeddings`).

:func:`create_model` builds any of them by its registered type name (:data:`MODEL_TYPES`,
:func:`list_models`) from a preset and overrides; every model's ``save(path)`` writes one
folder format (``config.json`` naming the model type and format version,
``weights.safetensors``; :mod:`stinfer.models.persistence`) and :func:`load` returns the right
class for any saved folder.

Examples
--------
>>> import stinfer as st
>>> model = st.models.create_model("stevs", [slide], genes, preset="fast")  # doctest: +SKIP
>>> model.train(); model.save("runs/c2")                                      # doctest: +SKIP
>>> st.models.load("runs/c2").predict(other_slide)                            # doctest: +SKIP

The classes are imported on first use: ``import stinfer.models`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from stinfer.models.registry import (
    MODEL_TYPES,
    TASKS,
    ModelType,
    create_model,
    list_models,
    load,
    model_config,
    model_type,
)

_LAZY = {
    "STEvs": "stinfer.models.stevs",
    "STEvsModelConfig": "stinfer.models.stevs",
    "CoxFormerSpatial": "stinfer.models.coxformer_spatial",
    "CoxFormerSpatialConfig": "stinfer.models.coxformer_spatial",
    "CoxFormerEmbeddings": "stinfer.models.gene_embeddings",
    "GeneEmbeddingConfig": "stinfer.models.gene_embeddings",
    "SVDGeneEmbeddings": "stinfer.models.gene_embeddings",
    "MeanExpression": "stinfer.models.baselines",
    "MeanExpressionConfig": "stinfer.models.baselines",
    "CoordinateKNN": "stinfer.models.baselines",
    "CoordinateKNNConfig": "stinfer.models.baselines",
    "PatchFeatureRidge": "stinfer.models.baselines",
    "PatchFeatureRidgeConfig": "stinfer.models.baselines",
    "STNet": "stinfer.models.baselines",
    "STNetConfig": "stinfer.models.baselines",
    "GeneMeanProfile": "stinfer.models.imputation_baselines",
    "GeneMeanProfileConfig": "stinfer.models.imputation_baselines",
    "GeneKNN": "stinfer.models.imputation_baselines",
    "GeneKNNConfig": "stinfer.models.imputation_baselines",
}

__all__ = [
    "MODEL_TYPES",
    "TASKS",
    "ModelType",
    "create_model",
    "list_models",
    "load",
    "model_config",
    "model_type",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import a model class on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stinfer.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
