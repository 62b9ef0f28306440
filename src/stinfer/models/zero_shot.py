"""Genes that no slide measured, predicted from H&E alone: STEvs, then the CoxFormer readout.

STEvs predicts a measured panel from histology; the CoxFormer spatial model predicts genes
that were never measured from the genes that were, through their embeddings. On a slide that
has only an image (and spot coordinates, e.g. a virtual grid from ``stinfer prepare --format
image``), :func:`predict_unmeasured_genes` joins them:

1. STEvs predicts its panel at every spot (expected counts, the slide's counts never read);
2. that predicted panel stands in for a measurement: a CoxFormer spatial model is trained on
   it (the panel genes with an embedding are its training genes, their predicted log1p CP10k
   its targets and its attention memory), learning on this very slide how a gene's embedding
   maps to its spatial profile;
3. the model imputes the requested genes from their embeddings.

Step 2 trains on predictions only, so the whole path reads no counts of the slide; the
requested genes need an embedding and must not be in the STEvs panel (those STEvs predicts
itself, ``stinfer predict``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.models.coxformer_spatial import (
    CoxFormerSpatial,
    coxformer_spatial_config,
    embedding_table,
)

logger = logging.getLogger("stinfer")

__all__ = ["panel_as_slide", "predict_unmeasured_genes"]


def panel_as_slide(predicted_panel: ad.AnnData) -> ad.AnnData:
    """A STEvs prediction as a slide the CoxFormer model can learn from.

    ``X`` = the predicted expected counts (float32, not whole numbers), the prediction's spots,
    ``obsm["spatial"]`` and ``uns["stinfer"]`` (image, pixel size), with
    ``uns["stinfer"]["counts_are_predicted"] = True`` so nothing downstream mistakes it for a
    measurement.
    """
    slide = ad.AnnData(
        X=np.clip(np.asarray(predicted_panel.X, dtype=np.float32), 0.0, None),
        obs=pd.DataFrame(index=predicted_panel.obs_names.copy()),
        var=pd.DataFrame(index=predicted_panel.var_names.copy()),
    )
    for column in predicted_panel.obs.columns:
        slide.obs[column] = predicted_panel.obs[column].to_numpy()
    slide.obsm["spatial"] = np.asarray(predicted_panel.obsm["spatial"], dtype=np.float64).copy()
    meta = dict(predicted_panel.uns.get("stinfer", {}))
    meta.pop("expression", None)
    meta["counts_are_predicted"] = True
    slide.uns["stinfer"] = meta
    return slide


def predict_unmeasured_genes(
    stevs: Any,
    slide: ad.AnnData,
    gene_embeddings: Any,
    genes: Sequence[str],
    mode: str = "fused",
    config: Any = "fast",
    patches: np.ndarray | None = None,
    predicted_panel: ad.AnnData | None = None,
) -> ad.AnnData:
    """Predict ``genes`` (unmeasured anywhere) on ``slide`` from its image and coordinates.

    Parameters
    ----------
    stevs
        A trained :class:`~stinfer.models.stevs.STEvs` model.
    slide
        A slide with an image (``mode`` ``image``/``fused``) and ``obsm["spatial"]``; its
        counts, if any, are never read.
    gene_embeddings
        Anything :class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial` accepts; must hold
        ``genes`` and at least two panel genes.
    genes
        Genes to predict; none may be in the STEvs panel.
    mode
        STEvs inference mode (``fused``; ``image`` when the coordinates mean nothing).
    config
        CoxFormer spatial config or preset name (its seed seeds the readout's training).
    patches
        Optional patches for STEvs instead of reading the image.
    predicted_panel
        The STEvs prediction of ``slide`` when already computed (e.g. by the evaluation,
        which scores baselines on it too).

    Returns
    -------
    AnnData
        Spots x ``genes`` in the prediction layout (:mod:`stinfer.io.prediction_layout`):
        ``layers["log1p_cp10k"]`` the predicted log1p CP10k, ``X`` expected counts with each
        spot's predicted panel total as its library; ``uns["stinfer"]["zero_shot"]`` records
        the STEvs panel size, mode and the readout's training genes.
    """
    genes = [str(gene) for gene in genes]
    if not genes:
        raise InputError("give at least one gene to predict.")
    table = embedding_table(gene_embeddings)
    in_panel = [gene for gene in genes if gene in set(stevs.genes)]
    if in_panel:
        raise InputError(
            f"{len(in_panel)} of the requested genes are in the STEvs panel "
            f"({', '.join(in_panel[:5])}): STEvs predicts those itself (`stinfer predict`)."
        )
    missing = [gene for gene in genes if gene not in table.index]
    if missing:
        raise InputError(
            f"no embedding for {len(missing)} of the requested genes ({', '.join(missing[:5])})."
        )
    readout_genes = [gene for gene in stevs.genes if gene in table.index]
    if len(readout_genes) < 2:
        raise InputError(
            f"only {len(readout_genes)} of the {len(stevs.genes)} STEvs panel genes have an "
            "embedding; the readout needs at least 2."
        )
    if predicted_panel is None:
        predicted_panel = stevs.predict(slide, mode=mode, patches=patches)
    pseudo = panel_as_slide(predicted_panel)
    config = coxformer_spatial_config(config)
    logger.info(
        "zero-shot: STEvs predicted %d panel genes (%s); training the CoxFormer readout on "
        "them (%d with an embedding) to predict %d unmeasured genes",
        predicted_panel.n_vars,
        mode,
        len(readout_genes),
        len(genes),
    )
    readout = CoxFormerSpatial(pseudo, table, readout_genes, "spatial", config)
    readout.train()
    result = readout.impute(genes)
    meta = dict(result.uns.get("stinfer", {}))
    meta.pop("counts_are_predicted", None)
    meta["zero_shot"] = {
        "stevs_mode": mode,
        "stevs_panel_genes": len(stevs.genes),
        "readout_genes": len(readout_genes),
        "readout_preset": config.preset,
        "library": "each spot's STEvs-predicted total over the panel",
    }
    result.uns["stinfer"] = meta
    result.uns["coxformer_spatial"]["kind"] = "zero_shot_from_histology"
    return result
