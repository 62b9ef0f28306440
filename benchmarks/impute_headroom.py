"""How much of a held-out gene's profile can any predictor recover? Ceilings for imputation.

The held-out-genes protocol (:mod:`stinfer.evaluate.held_out_genes`) scores a predictor by the
median PCC, over the held-out genes, between its log1p CP10k profile and the measured one. On
small, shallow sections much of a held-out gene's measured profile is counting noise, so every
method may sit near the same ceiling. This script measures the ceiling with predictors that are
allowed to cheat in ways no real method can, beside the ones the protocol runs, on the same
seeded gene split (:func:`~stinfer.evaluate.held_out_genes.split_genes`) and spot totals:

- ``mean_profile`` and ``knn`` (the embedding k-NN, ``k`` by CV over the training genes,
  :func:`~stinfer.models.gene_baselines.choose_knn_k`): the protocol's baselines;
- ``embedding_ridge``: the held-out gene's profile as a linear function of its embedding,
  ``y_g = mean profile + W e_g``, ``W`` by ridge over the training genes (the penalty by 5-fold
  CV over the training genes): the best *linear* readout of the embedding, which CoxFormer's
  bilinear readout is one parameterisation of;
- cross-fitted over random halves of the spots (each half predicted from the other, repeated
  ``--repeats`` times; every row in this group is scored on the same held-out halves):
  ``halves_knn`` (the embedding k-NN, for reference on the half-spots), ``halves_slide_knn``
  (the k-NN with the held-out gene's neighbours chosen by its *measured* correlation with the
  training genes on the other half of this very slide: perfect knowledge of its co-expression
  here, up to sampling noise), and ``halves_pc_regression_r`` (the held-out gene's measured
  profile regressed on the slide's top ``r`` principal components on the other half: a
  per-gene supervised fit, impossible in practice).

If the cheating predictors do no better than the k-NN, the k-NN is at the ceiling this section
allows and no embedding or readout can beat it by much.

Example::

    python benchmarks/impute_headroom.py --slides /tmp/her2st --embeddings genes.h5ad \\
        --sections C2 C3 C4 --seeds 0 1 2 --out docs/results/held_out_genes_headroom.csv
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stinfer.evaluate.held_out_genes import split_genes
from stinfer.io.atomic import check_writable, write_text
from stinfer.io.h5ad import read_h5ad_slide
from stinfer.io.slide_data import panel_counts
from stinfer.metrics import per_gene_pearson
from stinfer.models.coxformer_spatial import (
    embedding_table,
    measured_genes,
    slide_log1p_cp10k,
    standardise_embeddings,
)
from stinfer.models.gene_baselines import (  # the k-NN baseline's neighbour and weight rule
    _knn_weights,
    _nearest,
    choose_knn_k,
    knn_profiles,
    mean_profile,
)
from stinfer.preprocess import normalise_log1p_cp10k

RIDGE_PENALTIES = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PC_RANKS = (1, 2, 3, 5, 10)


def median_pcc(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Median over genes of the PCC across spots (constant genes score 0, as in the protocol)."""
    return float(np.median(per_gene_pearson(prediction, truth)[0]))


def ridge_readout(
    targets: np.ndarray, train_vectors: np.ndarray, query_vectors: np.ndarray, penalty: float
) -> np.ndarray:
    """``(S, n_query)``: mean profile + ``W e``, ``W = R E (E^T E + penalty I)^-1`` (R: the
    training targets minus their per-spot mean); one ``D x D`` solve for every spot."""
    base = targets.mean(axis=1, keepdims=True)
    gram = train_vectors.T @ train_vectors + penalty * np.eye(train_vectors.shape[1])
    weights = np.linalg.solve(gram, train_vectors.T @ (targets - base).T)  # (D, S)
    return base + (query_vectors @ weights).T


def choose_ridge_penalty(targets: np.ndarray, vectors: np.ndarray, seed: int) -> float:
    """The penalty of :data:`RIDGE_PENALTIES` with the best mean 5-fold CV median PCC over
    the training genes (folds of genes, as the k-NN's ``k``)."""
    folds = np.array_split(np.random.default_rng([seed, 7]).permutation(targets.shape[1]), 5)
    scores = {}
    for penalty in RIDGE_PENALTIES:
        values = []
        for fold in folds:
            inner = np.setdiff1d(np.arange(targets.shape[1]), fold)
            prediction = ridge_readout(targets[:, inner], vectors[inner], vectors[fold], penalty)
            values.append(median_pcc(prediction, targets[:, fold]))
        scores[penalty] = float(np.mean(values))
    return max(scores, key=scores.get)


def zscore_columns(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-12)


def slide_correlation_knn(
    train: np.ndarray, test: np.ndarray, fit: np.ndarray, score: np.ndarray, k: int
) -> np.ndarray:
    """k-NN profiles on the ``score`` spots, neighbours by measured correlation on ``fit``
    (the k-NN baseline's own neighbour and weight rule, on that correlation)."""
    correlation = zscore_columns(test[fit]).T @ zscore_columns(train[fit]) / len(fit)
    index, values = _nearest(correlation, k)
    return train[score] @ _knn_weights(index, values, k, correlation.shape[1]).T


def section_rows(slide, table, section: str, seed: int, repeats: int) -> list[dict]:
    genes = measured_genes(slide, table.index, 0.1)
    train_genes, test_genes = split_genes(genes, 0.2, seed)
    visible = slide[:, ~slide.var_names.isin(test_genes)].copy()
    totals = np.asarray(visible.X.sum(axis=1), dtype=np.float64).ravel()
    train = slide_log1p_cp10k(visible, train_genes).astype(np.float64)
    test = normalise_log1p_cp10k(
        panel_counts(slide, test_genes, dtype=np.float64), spot_totals=totals
    )
    vectors, _, _ = standardise_embeddings(table)
    rows_of = table.index.get_indexer
    train_vectors = vectors[rows_of(train_genes)].astype(np.float64)
    test_vectors = vectors[rows_of(test_genes)].astype(np.float64)

    k, _ = choose_knn_k(train, train_vectors, seed=seed)
    penalty = choose_ridge_penalty(train, train_vectors, seed)
    # row-wise linear in the spots: its rows on any half-spots are that half's k-NN profiles
    knn = knn_profiles(train, train_vectors, test_vectors, k)
    scores = {
        "mean_profile": median_pcc(mean_profile(train, len(test_genes)), test),
        "knn": median_pcc(knn, test),
        "embedding_ridge": median_pcc(
            ridge_readout(train, train_vectors, test_vectors, penalty), test
        ),
    }
    components = np.linalg.svd(train - train.mean(axis=0), full_matrices=False)[0]
    halves: dict[str, list[float]] = {}
    rng = np.random.default_rng([seed, 17])
    for _ in range(repeats):
        order = rng.permutation(slide.n_obs)
        first, second = order[: slide.n_obs // 2], order[slide.n_obs // 2 :]
        for fit, score in ((first, second), (second, first)):
            halves.setdefault("halves_knn", []).append(median_pcc(knn[score], test[score]))
            halves.setdefault("halves_slide_knn", []).append(
                median_pcc(slide_correlation_knn(train, test, fit, score, k), test[score])
            )
            for rank in PC_RANKS:
                design = np.hstack([np.ones((slide.n_obs, 1)), components[:, :rank]])
                beta = np.linalg.lstsq(design[fit], test[fit], rcond=None)[0]
                halves.setdefault(f"halves_pc_regression_{rank}", []).append(
                    median_pcc(design[score] @ beta, test[score])
                )
    scores.update({name: float(np.mean(values)) for name, values in halves.items()})
    common = {
        "section": section,
        "seed": seed,
        "n_spots": slide.n_obs,
        "n_train_genes": len(train_genes),
        "n_test_genes": len(test_genes),
        "knn_k": k,
        "ridge_penalty": penalty,
        "load_average_1min": os.getloadavg()[0],
    }
    return [{**common, "method": name, "pcc_median": value} for name, value in scores.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, required=True, help="folder of <section>.h5ad")
    parser.add_argument("--embeddings", type=Path, required=True, help="gene embedding table")
    parser.add_argument("--sections", nargs="+", default=["C2", "C3", "C4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--repeats", type=int, default=3, help="random halvings of the spots")
    parser.add_argument("--out", type=Path, required=True, help="results .csv (and .md)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    check_writable(args.out, args.overwrite)
    check_writable(args.out.with_suffix(".md"), args.overwrite)
    table = embedding_table(args.embeddings)
    rows = []
    for section in args.sections:
        slide = read_h5ad_slide(args.slides / f"{section}.h5ad")
        for seed in args.seeds:
            start = time.perf_counter()
            rows.extend(section_rows(slide, table, section, seed, args.repeats))
            print(f"{section} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    write_text(frame.to_csv(index=False), args.out, overwrite=True)  # checked above
    summary = frame.pivot_table(
        index="method", columns="section", values="pcc_median", aggfunc=["mean", "std"], sort=False
    )
    lines = [
        "# Held-out genes: how much can any predictor recover?",
        "",
        f"Median PCC over the held-out genes; mean and sd over seeds {args.seeds}; "
        f"embeddings `{args.embeddings.name}`. Written by `python benchmarks/impute_headroom.py` "
        "(see its docstring for each row).",
        "",
        "| method | " + " | ".join(args.sections) + " |",
        "| --- | " + " | ".join("---" for _ in args.sections) + " |",
    ]
    for method in summary.index:
        cells = [
            f"{summary.loc[method, ('mean', s)]:.3f} ± {summary.loc[method, ('std', s)]:.3f}"
            if len(args.seeds) > 1
            else f"{summary.loc[method, ('mean', s)]:.3f}"
            for s in args.sections
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    write_text("\n".join(lines) + "\n", args.out.with_suffix(".md"), overwrite=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
