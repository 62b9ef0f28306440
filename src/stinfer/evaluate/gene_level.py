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

Co-expression and geometry (stinfer's checks; the way users compare gene embeddings is by
cosine similarity, as in GenePT, scGPT and Gene2vec tables):

- :func:`coexpressed_pairs` takes the ``n_pairs`` most correlated gene pairs of an expression
  corpus (ideally one the embedding never saw) and as many uniformly random pairs;
  :func:`pair_auc` is the ROC-AUC of the cosine similarity separating the two sets (0.5: the
  embedding says nothing about co-expression; 1: every co-expressed pair is closer than every
  random pair);
- :func:`embedding_geometry`: the median cosine between random gene pairs (near 1 when the
  vectors share one dominant direction, and cosine then says nothing) and the effective rank
  (``exp`` of the entropy of the normalised singular values, Roy & Vetterli 2007) of the raw,
  uncentred vectors.

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
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from stinfer.coexpression.graph import (
    CorrelationGraphConfig,
    as_corpora,
    correlation_blocks,
    edge_correlations,
    standardise_corpora,
)
from stinfer.errors import InputError
from stinfer.io.slide_data import as_dense

logger = logging.getLogger("stinfer")

__all__ = [
    "CLASSIFIERS",
    "coexpressed_pairs",
    "embedding_geometry",
    "format_table_s1",
    "gene_level_auc",
    "k_sensitivity",
    "pair_auc",
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
        return pd.DataFrame(as_dense(embeddings.X), index=embeddings.obs_names.astype(str))
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
    from stinfer.models.gene_embeddings import CoxFormerEmbeddings, paper_preset

    config = config or paper_preset()
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


# --------------------------------------------------------------------------- co-expression
def _top_pairs_of_block(
    rows: slice, cols: slice, r: np.ndarray, n_pairs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_pairs`` largest correlations of one block (upper triangle when diagonal)."""
    r = np.nan_to_num(r, nan=-np.inf)
    if rows == cols:
        r = np.where(np.triu(np.ones(r.shape, dtype=bool), k=1), r, -np.inf)
    flat = r.ravel()
    take = min(n_pairs, flat.size)
    best = np.argpartition(-flat, take - 1)[:take]
    best = best[np.isfinite(flat[best])]
    a, b = np.divmod(best, r.shape[1])
    return a + rows.start, b + cols.start, flat[best]


def coexpressed_pairs(
    corpora,
    genes: Sequence[str],
    n_pairs: int = 2000,
    seed: int = 0,
    layer: str | None = None,
    config: CorrelationGraphConfig | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n_pairs`` most co-expressed gene pairs of ``corpora`` and as many random pairs.

    Correlations are those of the correlation graph (log1p-CP10k Pearson, per-corpus
    correlations averaged; ``config``), computed block by block over the genes of ``genes``
    that the corpora measure, so no ``genes x genes`` matrix is held.

    Parameters
    ----------
    corpora
        Raw-count AnnData (or a mapping / list of them), e.g. sections the embedding never saw.
    genes
        Candidate genes, usually the embedding table's.

    Returns
    -------
    (top, random) : tuple of pandas.DataFrame
        Columns ``gene_a``, ``gene_b``, ``correlation``; ``top`` sorted by decreasing
        correlation; ``random`` drawn uniformly (seeded) among pairs of distinct measured genes.

    Raises
    ------
    InputError
        Fewer than 3 shared genes.
    """
    config = config or CorrelationGraphConfig()
    parts = as_corpora(corpora, layer)
    standardised = standardise_corpora(parts, config, genes=[str(g) for g in genes])
    measured = standardised.present.any(axis=0)
    if measured.sum() < 3:
        raise InputError(
            f"the corpora measure {int(measured.sum())} of the {len(genes)} embedded genes; "
            "check that gene names match (symbols vs Ensembl ids)."
        )
    if not measured.all():  # keep measured genes only, in the embedding's order
        names = standardised.gene_names[measured]
        standardised = standardise_corpora(parts, config, genes=list(names))
    names = standardised.gene_names
    best_a, best_b, best_r = (np.zeros(0, dtype=np.int64),) * 2 + (np.zeros(0, np.float32),)
    for rows, cols, r in correlation_blocks(standardised, config.block_size, config.device):
        a, b, values = _top_pairs_of_block(rows, cols, r.cpu().numpy(), n_pairs)
        best_a, best_b = np.r_[best_a, a], np.r_[best_b, b]
        best_r = np.r_[best_r, values]
        if best_r.size > n_pairs:  # keep the running top n_pairs
            keep = np.argpartition(-best_r, n_pairs - 1)[:n_pairs]
            best_a, best_b, best_r = best_a[keep], best_b[keep], best_r[keep]
    order = np.argsort(-best_r, kind="stable")
    top = pd.DataFrame(
        {
            "gene_a": names[best_a[order]],
            "gene_b": names[best_b[order]],
            "correlation": best_r[order],
        }
    )
    rng = np.random.default_rng(seed)
    n_genes = len(names)
    a = rng.integers(0, n_genes, 2 * n_pairs + 16)
    b = rng.integers(0, n_genes - 1, a.size)
    b = b + (b >= a)  # a uniformly random partner other than a
    a, b = a[:n_pairs], b[:n_pairs]
    values = edge_correlations(standardised, a, b, config.block_size, config.device)
    random = pd.DataFrame({"gene_a": names[a], "gene_b": names[b], "correlation": values})
    return top, random


def _pair_cosines(frame: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    vectors = frame.to_numpy(dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    a = frame.index.get_indexer(pairs["gene_a"].astype(str))
    b = frame.index.get_indexer(pairs["gene_b"].astype(str))
    dots = np.einsum("ij,ij->i", vectors[a], vectors[b])
    return dots / np.maximum(norms[a] * norms[b], 1e-12)


def pair_auc(
    embeddings: ad.AnnData | pd.DataFrame, top: pd.DataFrame, random: pd.DataFrame
) -> dict:
    """ROC-AUC of the cosine similarity separating co-expressed from random gene pairs.

    Parameters
    ----------
    embeddings
        Gene embedding table (AnnData obs = genes, or a DataFrame indexed by gene).
    top, random
        Pair tables of :func:`coexpressed_pairs`; pairs with a gene missing from the table are
        dropped and counted.

    Returns
    -------
    dict
        ``auc``, ``n_top``, ``n_random``, ``n_dropped``, ``median_cosine_top``,
        ``median_cosine_random``.
    """
    frame = _embedding_frame(embeddings)
    known = frame.index

    def usable(pairs: pd.DataFrame) -> pd.DataFrame:
        return pairs[pairs["gene_a"].isin(known) & pairs["gene_b"].isin(known)]

    top_kept, random_kept = usable(top), usable(random)
    if len(top_kept) < 2 or len(random_kept) < 2:
        raise InputError(
            f"only {len(top_kept)} co-expressed and {len(random_kept)} random pairs have both "
            "genes in the embedding table; check that gene names match."
        )
    positive, negative = _pair_cosines(frame, top_kept), _pair_cosines(frame, random_kept)
    truth = np.r_[np.ones(positive.size), np.zeros(negative.size)]
    return {
        "auc": float(roc_auc_score(truth, np.r_[positive, negative])),
        "n_top": int(positive.size),
        "n_random": int(negative.size),
        "n_dropped": int(len(top) + len(random) - positive.size - negative.size),
        "median_cosine_top": float(np.median(positive)),
        "median_cosine_random": float(np.median(negative)),
    }


def embedding_geometry(
    embeddings: ad.AnnData | pd.DataFrame, n_genes: int = 2000, seed: int = 0
) -> dict:
    """Median pairwise cosine and effective rank of (a seeded sample of) the raw vectors.

    Returns
    -------
    dict
        ``median_cosine`` over all pairs of up to ``n_genes`` sampled genes, and
        ``effective_rank`` ``exp(-sum p log p)`` with ``p`` the singular values of the sampled
        ``(genes, dims)`` matrix divided by their sum (1 = one direction; the dimension = all
        directions equally used). Nothing is centred: this is what cosine similarity sees.
    """
    vectors = _embedding_frame(embeddings).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    if vectors.shape[0] > n_genes:
        vectors = vectors[np.sort(rng.choice(vectors.shape[0], n_genes, replace=False))]
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    upper = cosine[np.triu_indices(cosine.shape[0], k=1)]
    singular = np.linalg.svd(vectors, compute_uv=False)
    p = singular / max(singular.sum(), 1e-300)
    p = p[p > 0]
    return {
        "median_cosine": float(np.median(upper)) if upper.size else float("nan"),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "n_genes": int(vectors.shape[0]),
    }


def embedding_report(
    embeddings: ad.AnnData | pd.DataFrame,
    labels: pd.Series | Mapping[str, int] | None = None,
    corpora=None,
    svd_corpora=None,
    n_pairs: int = 2000,
    n_components: int = 64,
    n_splits: int = 5,
    seed: int = 0,
) -> dict:
    """Everything ``stinfer gene-eval`` reports for one embedding table, beside an SVD baseline.

    Parameters
    ----------
    embeddings
        The table to score.
    labels
        Binary gene labels for :func:`gene_level_auc` (optional).
    corpora
        Raw-count expression corpora defining the co-expressed pairs (:func:`coexpressed_pairs`),
        ideally sections the embedding never saw (optional).
    svd_corpora
        Corpora for the baseline: the :class:`~stinfer.models.gene_embeddings.SVDGeneEmbeddings`
        of ``n_components`` dimensions, ideally of the corpus the embedding was learnt from.
        Without them, and with ``corpora``, each corpus's cells are split at random (seeded)
        into halves: the pairs come from one half and the baseline from the other, so the
        baseline is never scored on its own data.

    Returns
    -------
    dict
        ``embedding`` and (when a baseline could be built) ``svd_baseline``, each with
        ``geometry`` (:func:`embedding_geometry`), ``pairs`` (:func:`pair_auc`) and ``labels``
        (:func:`gene_level_auc`) where requested; ``pairs_from`` and ``baseline_from`` say
        which cells were used.
    """
    from stinfer.models.gene_embeddings import SVDGeneEmbeddings, split_corpus_cells

    if labels is None and corpora is None:
        raise InputError("give gene labels, expression corpora for co-expressed pairs, or both.")
    frame = _embedding_frame(embeddings)
    tables = {"embedding": frame}
    report: dict = {}
    pair_corpora = None
    if corpora is not None:
        pair_corpora = as_corpora(corpora)
        if svd_corpora is None:
            pair_corpora, baseline_corpora = split_corpus_cells(pair_corpora, 0.5, seed)
            report["baseline_from"] = "a random half of each --corpus's cells (seeded)"
            report["pairs_from"] = "the other half of each --corpus's cells"
        else:
            baseline_corpora = as_corpora(svd_corpora)
            report["baseline_from"] = [c.name for c in baseline_corpora]
            report["pairs_from"] = [c.name for c in pair_corpora]
    elif svd_corpora is not None:
        baseline_corpora = as_corpora(svd_corpora)
        report["baseline_from"] = [c.name for c in baseline_corpora]
    else:
        baseline_corpora = None
    if baseline_corpora is not None:
        baseline = SVDGeneEmbeddings(n_components, seed=seed).train(baseline_corpora)
        tables["svd_baseline"] = _embedding_frame(baseline.get_embeddings())
    pairs = None
    if pair_corpora is not None:
        pairs = coexpressed_pairs(pair_corpora, frame.index, n_pairs=n_pairs, seed=seed)
    for name, table in tables.items():
        entry: dict = {"n_genes": int(table.shape[0]), "n_dims": int(table.shape[1])}
        entry["geometry"] = embedding_geometry(table, seed=seed)
        if pairs is not None:
            entry["pairs"] = pair_auc(table, *pairs)
        if labels is not None:
            entry["labels"] = gene_level_auc(table, labels, n_splits=n_splits, seed=seed)
        report[name] = entry
    return report
