"""The gene baselines of CoxFormer's held-out genes protocol, as models a user holds.

:class:`GeneMeanProfile` and :class:`GeneKNN` wrap the array functions of
:mod:`stinfer.models.gene_baselines` with the interface of
:class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial`: built from one slide and its
training genes, ``train()``, ``predict(slide, genes)`` / ``impute(genes)`` returning spots x
genes AnnData of log1p CP10k, and ``save(path)`` / ``load(path)`` in the one saved-model format
(:mod:`stinfer.models.persistence`). Both predict a gene from the training genes *measured on
the slide being predicted*, so a new slide must measure every training gene.
The array functions stay in their own module because
:class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial` also needs ``choose_knn_k`` and
this module imports ``coxformer_spatial``: one module would be an import cycle.

- :class:`GeneMeanProfile`: every gene gets the per-spot mean of the training genes' profiles;
- :class:`GeneKNN`: a gene's profile is the similarity-weighted mean of the profiles of its
  ``k`` nearest training genes by the cosine of their (standardised) embeddings, ``k`` chosen
  by cross-validation over the training genes (``k="auto"``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.io.prediction_layout import annotate_log1p_cp10k
from stinfer.io.slide_data import spot_obs
from stinfer.models.coxformer_spatial import (
    embedding_table,
    measured_genes,
    slide_library_sizes,
    slide_log1p_cp10k,
    standardise_embeddings,
)
from stinfer.models.gene_baselines import KNN_CANDIDATES, choose_knn_k, knn_profiles, mean_profile
from stinfer.train import FitResult

__all__ = ["GeneKNN", "GeneKNNConfig", "GeneMeanProfile", "GeneMeanProfileConfig"]


@dataclass
class GeneMeanProfileConfig:
    """Settings of :class:`GeneMeanProfile`."""

    min_spot_fraction: float = 0.1  # default training genes: detected in this share of spots


@dataclass
class GeneKNNConfig:
    """Settings of :class:`GeneKNN` (the ``knn`` baseline of the held-out genes protocol)."""

    k: int | str = "auto"  # "auto": n_folds-fold CV over the training genes (median PCC)
    candidates: tuple[int, ...] = KNN_CANDIDATES  # the k tried by "auto"
    n_folds: int = 5
    min_spot_fraction: float = 0.1  # default training genes: detected in this share of spots
    seed: int = 0  # seeds the CV folds

    def __post_init__(self) -> None:
        if self.k != "auto" and not (isinstance(self.k, int) and self.k >= 1):
            raise InputError(f"GeneKNNConfig.k must be 'auto' or an integer >= 1, got {self.k!r}.")


def _imputed(slide: ad.AnnData, genes: Sequence[str], values: np.ndarray, kind: str) -> ad.AnnData:
    """Spots x genes AnnData of predicted log1p CP10k ``values``, laid out as
    CoxFormerSpatial's predictions (``X`` expected counts, ``layers["log1p_cp10k"]``)."""
    result = ad.AnnData(
        X=np.asarray(values, dtype=np.float32),
        obs=spot_obs(slide),
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes])),
    )
    result.var["measured_on_slide"] = result.var_names.isin(slide.var_names)
    result.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    if "stinfer" in slide.uns:
        result.uns["stinfer"] = dict(slide.uns["stinfer"])
    result.uns["gene_baseline"] = {"model_type": kind}
    return annotate_log1p_cp10k(result, slide_library_sizes(slide), slide.n_vars)


def _training_genes(
    slide: ad.AnnData, train_genes: Sequence[str] | None, embedded: pd.Index | None, fraction: float
) -> list[str]:
    if train_genes is None:
        embedded = slide.var_names if embedded is None else embedded
        train_genes = measured_genes(slide, embedded, fraction)
    genes = [str(g) for g in train_genes]
    if len(genes) < 2 or len(set(genes)) != len(genes):
        raise InputError(
            f"a gene baseline needs at least 2 unique training genes, got {len(genes)}; lower "
            "--min-spot-fraction (min_spot_fraction=) or check the gene names."
        )
    return genes


class _GeneBaseline:
    """What both gene baselines share: the slide, the training genes, save and load."""

    model_type = ""
    config_class: type = GeneMeanProfileConfig

    def _targets(self, slide: ad.AnnData) -> np.ndarray:
        """log1p CP10k of the training genes on ``slide`` (the training slide's are cached)."""
        if slide is self.slide and self.targets is not None:
            return self.targets
        missing = pd.Index(self.train_genes).difference(slide.var_names)
        if len(missing):
            raise InputError(
                f"the slide measures {len(self.train_genes) - len(missing)} of the "
                f"{len(self.train_genes)} training genes (missing e.g. {list(missing[:3])}); a "
                "gene baseline predicts from the training genes measured on the slide."
            )
        return slide_log1p_cp10k(slide, self.train_genes)

    def predict_log1p(
        self, slide: ad.AnnData | None = None, genes: Sequence[str] | None = None
    ) -> np.ndarray:
        """``(n_spots, n_genes)`` float64 log1p CP10k of ``genes`` (default: the training genes)
        at every spot of ``slide`` (default: the training slide).

        The values :meth:`impute` stores, in float32, as ``layers["log1p_cp10k"]``; a protocol
        that scores the model (:func:`stinfer.evaluate.held_out_genes.held_out_genes_evaluation`)
        reads them here at full precision.
        """
        slide = self.slide if slide is None else slide
        if slide is None:
            raise InputError("impute: give slide= (a loaded model has no training slide).")
        genes = list(self.train_genes if genes is None else genes)
        if not genes:
            raise InputError("impute: give at least one gene.")
        return self._profiles(self._targets(slide), genes)

    def impute(self, genes: Sequence[str] | None = None, slide: ad.AnnData | None = None):
        """Predicted expression (``layers["log1p_cp10k"]``; ``X`` its expected counts) of
        ``genes`` (default: the training genes) at every spot of
        ``slide`` (default: the training slide)."""
        slide = self.slide if slide is None else slide
        values = self.predict_log1p(slide, genes)
        genes = list(self.train_genes if genes is None else genes)
        return _imputed(slide, genes, values, self.model_type)

    def predict(self, slide: ad.AnnData, genes: Sequence[str] | None = None) -> ad.AnnData:
        """:meth:`impute` on ``slide`` (same as ``impute(genes, slide=slide)``)."""
        return self.impute(genes, slide=slide)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"train_genes": self.train_genes}, {}

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` (config, training genes) and ``weights.safetensors``."""
        from stinfer.models.persistence import write_model_folder

        state, arrays = self._state()
        config = dataclasses.asdict(self.config)
        return write_model_folder(
            directory, self.model_type, config, state, None, arrays, overwrite
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, slide: ad.AnnData | None = None) -> Any:
        """Load a model written by :meth:`save`; ``slide`` becomes the default of :meth:`impute`."""
        from stinfer.models.configs import override_config
        from stinfer.models.persistence import read_saved_model

        saved = read_saved_model(directory, cls.model_type)
        model = cls.__new__(cls)
        model.config = override_config(cls.config_class(), saved.config, cls.model_type)
        model.slide = slide
        model.targets = None
        model.train_genes = [str(g) for g in saved.state["train_genes"]]
        model._restore(saved.state, saved.tensors())
        return model

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        return None


class GeneMeanProfile(_GeneBaseline):
    """Predict every gene as the per-spot mean of the training genes' log1p CP10k.

    The floor of the held-out genes protocol: it knows nothing of the gene asked for.

    Parameters
    ----------
    slide
        A slide with raw counts; targets are log1p CP10k over all its genes.
    gene_embeddings
        Optional; when given, the default training genes are those with an embedding.
    train_genes
        Default: genes detected in at least ``config.min_spot_fraction`` of the spots.
    config
        A :class:`GeneMeanProfileConfig`.
    """

    model_type = "gene_mean_profile"  # the registry name, saved in config.json
    config_class = GeneMeanProfileConfig

    def __init__(
        self,
        slide: ad.AnnData,
        gene_embeddings: Any = None,
        train_genes: Sequence[str] | None = None,
        config: GeneMeanProfileConfig | None = None,
    ) -> None:
        self.config = config or GeneMeanProfileConfig()
        self.slide = slide
        embedded = None if gene_embeddings is None else embedding_table(gene_embeddings).index
        self.train_genes = _training_genes(
            slide, train_genes, embedded, self.config.min_spot_fraction
        )
        self.targets: np.ndarray | None = None

    def train(self) -> FitResult:
        """Compute the training genes' targets on the slide (nothing is fitted)."""
        start = time.perf_counter()
        self.targets = slide_log1p_cp10k(self.slide, self.train_genes)
        return FitResult(train_seconds=time.perf_counter() - start)

    def _profiles(self, targets: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        return mean_profile(targets, len(genes))


class GeneKNN(_GeneBaseline):
    """Predict a gene as the weighted mean profile of its ``k`` most similar training genes.

    Similarity is the cosine of the genes' embeddings, standardised per dimension over every
    gene of the table (as :class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial` does);
    weights are the similarity clipped at 0 (:func:`~stinfer.models.gene_baselines.knn_profiles`).
    With ``config.k="auto"``, :meth:`train` picks ``k`` by cross-validation over the training
    genes only (:func:`~stinfer.models.gene_baselines.choose_knn_k`).

    Parameters
    ----------
    slide
        A slide with raw counts.
    gene_embeddings
        AnnData (obs = genes), DataFrame (genes x dims) or a file; any gene of the table can be
        predicted.
    train_genes
        Default: genes with an embedding detected in ``config.min_spot_fraction`` of the spots.
    config
        A :class:`GeneKNNConfig`.
    """

    model_type = "gene_knn"  # the registry name, saved in config.json
    config_class = GeneKNNConfig

    def __init__(
        self,
        slide: ad.AnnData,
        gene_embeddings: Any,
        train_genes: Sequence[str] | None = None,
        config: GeneKNNConfig | None = None,
    ) -> None:
        self.config = config or GeneKNNConfig()
        self.slide = slide
        table = embedding_table(gene_embeddings)
        self.embedding_genes = pd.Index(table.index)
        self.embeddings = standardise_embeddings(table)[0]
        self.train_genes = _training_genes(
            slide, train_genes, self.embedding_genes, self.config.min_spot_fraction
        )
        self.gene_vectors(self.train_genes)  # every training gene needs an embedding
        self.targets: np.ndarray | None = None
        self.k: int | None = None if self.config.k == "auto" else int(self.config.k)
        self.cv_scores: dict[int, float] | None = None

    def gene_vectors(self, genes: Sequence[str]) -> np.ndarray:
        """Standardised embeddings of ``genes``; :class:`InputError` naming genes without one."""
        rows = self.embedding_genes.get_indexer(list(genes))
        if (rows < 0).any():
            missing = [g for g, r in zip(genes, rows, strict=True) if r < 0]
            raise InputError(
                f"{len(missing)} genes have no embedding (e.g. {', '.join(missing[:5])})."
            )
        return self.embeddings[rows]

    def train(self) -> FitResult:
        """Compute the training targets and, with ``k="auto"``, choose ``k`` by CV."""
        start = time.perf_counter()
        self.targets = slide_log1p_cp10k(self.slide, self.train_genes)
        if self.config.k == "auto":
            self.k, self.cv_scores = choose_knn_k(
                self.targets,
                self.gene_vectors(self.train_genes),
                self.config.candidates,
                self.config.n_folds,
                self.config.seed,
            )
        history = [{"k": float(self.k)}]
        return FitResult(history=history, train_seconds=time.perf_counter() - start)

    def _profiles(self, targets: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        if self.k is None:
            raise RuntimeError("call train() before predict(): k is chosen in training.")
        train_vectors = self.gene_vectors(self.train_genes)
        return knn_profiles(targets, train_vectors, self.gene_vectors(genes), self.k)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        state = {
            "train_genes": self.train_genes,
            "embedding_genes": [str(g) for g in self.embedding_genes],
            "k": self.k,
            "cv_scores": None
            if self.cv_scores is None
            else {str(k): v for k, v in self.cv_scores.items()},
        }
        return state, {"embeddings": self.embeddings}

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.embedding_genes = pd.Index(state["embedding_genes"])
        self.embeddings = tensors["embeddings"].numpy()
        self.k = None if state.get("k") is None else int(state["k"])
        scores = state.get("cv_scores")
        self.cv_scores = None if scores is None else {int(k): v for k, v in scores.items()}
