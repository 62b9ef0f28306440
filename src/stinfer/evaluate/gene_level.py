"""Gene-level evaluation of embeddings: binary gene classification ROC-AUC (CoxFormer Table S1).

The paper measures gene embeddings by how well a simple classifier separates two classes of
genes (dosage-sensitive vs insensitive transcription factors in Table S1) from the vectors
alone: logistic regression (LR) and a support vector machine (SVM), ROC-AUC under stratified
5-fold cross-validation. stinfer's protocol, for any embedding table (CoxFormer, GenePT,
scGPT, Gene2vec, ...) and any binary gene labels:

- genes labelled but absent from the table are dropped and counted (``n_missing``);
- ``StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)``, the same folds for both
  classifiers;
- features standardised within each training fold (``StandardScaler``); LR
  (``LogisticRegression``, L2, C = 1) and SVM (``SVC``, RBF kernel, C = 1), scored by ROC-AUC of
  the decision function on the held-out fold (the paper gives no classifier settings; these
  are scikit-learn's defaults);
- reported as mean and sample standard deviation (ddof = 1) over the folds, plus each fold.

:func:`k_sensitivity` reruns the CoxFormer pipeline for several top-K values and tabulates
the AUCs beside the training time, in Table S1's layout (:func:`format_table_s1`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

__all__ = [
    "CLASSIFIERS",
    "format_table_s1",
    "gene_level_auc",
    "k_sensitivity",
    "read_gene_labels",
]

CLASSIFIERS = {
    "lr": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
    "svm": lambda seed: make_pipeline(StandardScaler(), SVC(kernel="rbf", random_state=seed)),
}


def read_gene_labels(path: str | os.PathLike) -> pd.Series:
    """Read a ``gene,label`` CSV into a Series gene -> 0/1.

    Labels may be 0/1, true/false or yes/no (case-insensitive). Raises :class:`InputError` for
    missing columns, other label values, or a gene listed twice with different labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such labels file", str(path))
    frame = pd.read_csv(path, sep=None, engine="python", dtype=str)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"gene", "label"} <= set(frame.columns):
        raise InputError(f"{path}: needs columns 'gene' and 'label'; found {list(frame.columns)}.")
    return _binary_labels(
        pd.Series(frame["label"].to_numpy(), index=frame["gene"].str.strip()), str(path)
    )


_TRUE = {"1", "1.0", "true", "yes", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "negative", "neg"}


def _binary_labels(labels: pd.Series, source: str) -> pd.Series:
    text = labels.astype(str).str.strip().str.lower()
    unknown = sorted(set(text) - _TRUE - _FALSE)
    if unknown:
        raise InputError(
            f"{source}: labels must be binary (0/1, true/false, yes/no); found {unknown[:5]}."
        )
    values = pd.Series(text.isin(_TRUE).astype(int).to_numpy(), index=labels.index.astype(str))
    conflicting = values.groupby(level=0).nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise InputError(
            f"{source}: {len(conflicting)} genes are labelled both 0 and 1 "
            f"(e.g. {conflicting.index[0]})."
        )
    return values[~values.index.duplicated()]


def _embedding_frame(embeddings: ad.AnnData | pd.DataFrame) -> pd.DataFrame:
    if isinstance(embeddings, ad.AnnData):
        matrix = embeddings.X.toarray() if hasattr(embeddings.X, "toarray") else embeddings.X
        return pd.DataFrame(np.asarray(matrix), index=embeddings.obs_names.astype(str))
    if isinstance(embeddings, pd.DataFrame):
        return embeddings.set_axis(embeddings.index.astype(str), axis=0)
    raise InputError(
        f"embeddings must be an AnnData (genes x dims) or a DataFrame, got {type(embeddings).__name__}."
    )


def gene_level_auc(
    embeddings: ad.AnnData | pd.DataFrame,
    labels: pd.Series | Mapping[str, int],
    n_splits: int = 5,
    seed: int = 0,
    classifiers: Sequence[str] = ("lr", "svm"),
) -> dict:
    """ROC-AUC of LR and SVM classifying binary gene labels from embeddings (Table S1).

    Parameters
    ----------
    embeddings
        Gene embedding AnnData (obs = genes, X = vectors; see
        :mod:`stinfer.io.gene_embeddings`) or a DataFrame indexed by gene.
    labels
        Gene -> 0/1 (or booleans); genes without an embedding are dropped and counted.
    n_splits
        Folds of the stratified, shuffled cross-validation (5 in the paper).
    seed
        ``random_state`` of the folds (and of the SVM).
    classifiers
        Any of ``"lr"`` and ``"svm"``.

    Returns
    -------
    dict
        ``n_genes``, ``n_positive``, ``n_negative``, ``n_missing``, ``n_splits``, ``seed``, and
        per classifier ``{"auc_mean", "auc_sd", "auc_folds"}`` (sd with ddof = 1).

    Raises
    ------
    InputError
        Unknown classifier, non-binary labels, or fewer than ``n_splits`` genes of a class
        with an embedding.
    """
    unknown = sorted(set(classifiers) - set(CLASSIFIERS))
    if unknown:
        raise InputError(f"unknown classifier(s) {unknown}; choose from {sorted(CLASSIFIERS)}.")
    frame = _embedding_frame(embeddings)
    labels = _binary_labels(pd.Series(labels), "labels")
    shared = labels.index[labels.index.isin(frame.index)]
    y = labels.loc[shared].to_numpy()
    x = frame.loc[shared].to_numpy(dtype=np.float64)
    n_positive, n_negative = int(y.sum()), int((1 - y).sum())
    if min(n_positive, n_negative) < n_splits:
        raise InputError(
            f"{len(shared)} labelled genes have an embedding ({n_positive} positive, "
            f"{n_negative} negative); {n_splits}-fold stratified CV needs at least {n_splits} "
            f"of each ({len(labels) - len(shared)} labelled genes have no embedding: check "
            "that gene names match, e.g. symbols vs Ensembl ids)."
        )
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    result: dict = {
        "n_genes": len(shared),
        "n_positive": n_positive,
        "n_negative": n_negative,
        "n_missing": int(len(labels) - len(shared)),
        "n_splits": n_splits,
        "seed": seed,
    }
    for name in classifiers:
        scores = cross_val_score(CLASSIFIERS[name](seed), x, y, cv=folds, scoring="roc_auc")
        result[name] = {
            "auc_mean": float(np.mean(scores)),
            "auc_sd": float(np.std(scores, ddof=1)) if scores.size > 1 else 0.0,
            "auc_folds": [float(s) for s in scores],
        }
    return result


def k_sensitivity(
    corpora: Sequence[ad.AnnData] | Mapping[str, ad.AnnData],
    labels: pd.Series | Mapping[str, int],
    ks: Sequence[int] = (50, 100, 200, 300, 400, 500),
    config=None,
    label_corpora: Sequence[ad.AnnData] | Mapping[str, ad.AnnData] | None = None,
    n_splits: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Table S1: rerun the CoxFormer embedding pipeline for each top-K and score the embeddings.

    Parameters
    ----------
    corpora, label_corpora
        As for :meth:`stinfer.models.gene_embeddings.CoxFormerEmbeddings.train`.
    labels
        Binary gene labels for :func:`gene_level_auc`.
    ks
        Top-K values (Table S1: 50, 100, 200, 300, 400, 500).
    config
        A :class:`~stinfer.models.gene_embeddings.GeneEmbeddingConfig` (default: the ``paper``
        preset); only ``graph.top_k`` changes between rows.

    Returns
    -------
    pandas.DataFrame
        One row per K: ``K``, ``n_edges``, ``lr_auc_mean``, ``lr_auc_sd``, ``svm_auc_mean``,
        ``svm_auc_sd``, ``completion_seconds`` (the GNN training the paper times),
        ``total_seconds`` (graph + completion + autoencoder).
    """
    from stinfer.models.gene_embeddings import CoxFormerEmbeddings, GeneEmbeddingConfig

    config = config or GeneEmbeddingConfig.paper()
    rows = []
    for k in ks:
        run_config = replace(config, graph=replace(config.graph, top_k=int(k)))
        start = time.perf_counter()
        model = CoxFormerEmbeddings(run_config).train(corpora, label_corpora=label_corpora)
        total = time.perf_counter() - start
        scores = gene_level_auc(model.get_embeddings(), labels, n_splits=n_splits, seed=seed)
        rows.append(
            {
                "K": int(k),
                "n_edges": model.graph.n_edges,
                "lr_auc_mean": scores["lr"]["auc_mean"],
                "lr_auc_sd": scores["lr"]["auc_sd"],
                "svm_auc_mean": scores["svm"]["auc_mean"],
                "svm_auc_sd": scores["svm"]["auc_sd"],
                "completion_seconds": model.completion.scores["seconds"],
                "total_seconds": total,
            }
        )
        logger.info(
            "K=%d: LR AUC %.3f, SVM AUC %.3f, completion %.1f s",
            k,
            rows[-1]["lr_auc_mean"],
            rows[-1]["svm_auc_mean"],
            rows[-1]["completion_seconds"],
        )
    return pd.DataFrame(rows)


def format_table_s1(table: pd.DataFrame) -> str:
    """Markdown in Table S1's layout: ``K | LR | SVM | Training time``, AUCs as mean +/- sd."""
    lines = ["| K | LR | SVM | Training time (s) |", "| --- | --- | --- | --- |"]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.K} | {row.lr_auc_mean:.3f} ± {row.lr_auc_sd:.3f} | "
            f"{row.svm_auc_mean:.3f} ± {row.svm_auc_sd:.3f} | {row.completion_seconds:.1f} |"
        )
    return "\n".join(lines)
