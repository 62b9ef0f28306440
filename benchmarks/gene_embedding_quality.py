"""Where do gene embeddings keep or lose co-expression? Stage by stage, on held-out sections.

Fits CoxFormer gene embeddings on the sections of one patient (``--tune``, e.g. HER2ST A1-A6)
and scores, on the sections of another patient (``--check``, D1-D6) that no stage saw:

- the vectors of every stage of the pipeline, one row per gene: the raw correlation rows of
  the tune corpus, the top-K graph rows, the completed top-K ``C_cox`` rows (the paper's
  autoencoder input), the dense completed rows (the ``fast`` preset's autoencoder input) and
  the autoencoder's bottleneck (the embeddings, as written), for each ``--variants`` preset;
- the baseline every embedding must beat: the 64-d truncated SVD of the same tune corpus
  (:class:`stinfer.models.gene_embeddings.SVDGeneEmbeddings`).

Columns: the ROC-AUC of cosine similarity separating the check corpus's 2,000 most correlated
gene pairs from 2,000 random pairs (:func:`stinfer.evaluate.gene_level.pair_auc`); LR ROC-AUC
(stratified 5-fold) for gene families defined by name (positives: the family; negatives: 4x
as many random other genes): collagens, keratins, HLA, mitochondrial ribosome, oxidative
phosphorylation, proteasome, histones, and their mean; the effective rank and the median
pairwise cosine of the raw vectors (:func:`stinfer.evaluate.gene_level.embedding_geometry`).

    python benchmarks/gene_embedding_quality.py --tune A --check D \\
        --out docs/results/gene_embeddings/A_to_D.md
    python benchmarks/gene_embedding_quality.py --tune D --check A \\
        --out docs/results/gene_embeddings/D_to_A.md

``--variants fast fast-top-k`` also fits the ``fast`` preset with the paper's autoencoder input
(top-K rows, no geometry term, 10 epochs: the ``fast`` preset before the fix). Runs one heavy
job at a time; the thread count and load average are written with the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings_her2st import read_sections

FAMILIES = {
    "collagen": r"^COL\d+A\d+$",
    "keratin": r"^KRT\d",
    "HLA": r"^HLA-",
    "mito-ribosome": r"^MRP[LS]\d",
    "oxphos": r"^(NDUF|ATP5|COX\d|UQCR|SDH[ABCD])",
    "proteasome": r"^PSM[ABCD]\d",
    "histone": r"^HIST",
}


def family_labels(genes: pd.Index, pattern: str, seed: int = 0) -> pd.Series:
    """1 for genes matching ``pattern``, 0 for a seeded sample of 4x as many other genes."""
    positive = genes.str.match(pattern)
    negatives = genes[~positive]
    size = min(len(negatives), 4 * int(positive.sum()))
    chosen = np.sort(np.random.default_rng(seed).choice(len(negatives), size, replace=False))
    return pd.concat([pd.Series(1, index=genes[positive]), pd.Series(0, index=negatives[chosen])])


def score(name: str, vectors, genes: pd.Index, pairs, families: dict) -> dict:
    """One table row: pair AUC, family LR AUCs, geometry of ``vectors`` (genes x dims)."""
    from stinfer.evaluate.gene_level import embedding_geometry, gene_level_auc, pair_auc

    dense = vectors.toarray() if sp.issparse(vectors) else np.asarray(vectors)
    frame = pd.DataFrame(dense.astype(np.float32, copy=False), index=genes)
    row = {"stage": name, "dims": frame.shape[1], "pair AUC": pair_auc(frame, *pairs)["auc"]}
    aucs = [
        gene_level_auc(frame, labels, classifiers=("lr",))["lr"]["auc_mean"]
        for labels in families.values()
    ]
    row.update(dict(zip(families, aucs, strict=True)))
    row["label AUC (mean)"] = float(np.mean(aucs))
    row.update(
        {
            key.replace("_", " "): value
            for key, value in embedding_geometry(frame).items()
            if key != "n_genes"
        }
    )
    logging.info("%s", row)
    return row


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table, numbers with 3 decimals (no tabulate dependency)."""

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * table.shape[1]]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def fit(corpora: dict, variant: str, seed: int):
    from stinfer.models.gene_embeddings import CoxFormerEmbeddings, gene_embedding_config

    config = gene_embedding_config("fast", top_k=50, trainer={"seed": seed, "progress_bar": False})
    if variant == "fast-top-k":  # the fast preset before the fix
        autoencoder = replace(config.autoencoder, geometry_weight=0.0, max_epochs=10, t_max=10)
        config = replace(config, autoencoder=autoencoder, autoencoder_input="top_k")
    start = time.perf_counter()
    model = CoxFormerEmbeddings(config).train(corpora)
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/her2st"))
    parser.add_argument("--tune", default="A", help="patient whose sections train (A)")
    parser.add_argument("--check", default="D", help="patient whose sections score (D)")
    parser.add_argument("--variants", nargs="+", default=["fast"], choices=["fast", "fast-top-k"])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="markdown table (.md; .csv beside)")
    parser.add_argument(
        "--save-embeddings",
        type=Path,
        metavar="DIR",
        help="also write each variant's embeddings as DIR/<tune>_<variant>.h5ad",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from stinfer.coexpression.completion import dense_completed_coexpression
    from stinfer.coexpression.graph import (
        CorrelationGraphConfig,
        as_corpora,
        correlation_blocks,
        standardise_corpora,
    )
    from stinfer.evaluate.gene_level import coexpressed_pairs
    from stinfer.models.gene_embeddings import SVDGeneEmbeddings

    if not args.data_root.is_dir():
        raise SystemExit(f"{args.data_root}: no HER2ST data (pass --data-root)")
    tune = read_sections(args.data_root, [f"{args.tune}{i}" for i in range(1, 7)])
    check = read_sections(args.data_root, [f"{args.check}{i}" for i in range(1, 7)])
    rows, timings = [], {}
    models = {}
    for variant in args.variants:
        models[variant], timings[variant] = fit(tune, variant, args.seed)
    first = models[args.variants[0]]
    genes = pd.Index(first.graph.gene_names)
    pairs = coexpressed_pairs(check, genes, n_pairs=args.pairs, seed=args.seed)
    families = {name: family_labels(genes, pattern) for name, pattern in FAMILIES.items()}
    counts = {name: int(labels.sum()) for name, labels in families.items()}

    config = CorrelationGraphConfig()
    standardised = standardise_corpora(as_corpora(tune), config, genes=genes)
    raw = np.zeros((len(genes), len(genes)), dtype=np.float32)
    for block_rows, block_cols, r in correlation_blocks(standardised, config.block_size):
        block = torch.nan_to_num(r, nan=0.0).numpy()
        raw[block_rows, block_cols] = block
        raw[block_cols, block_rows] = block.T
    np.fill_diagonal(raw, 0.0)
    rows.append(score("raw correlation rows (tune corpus)", raw, genes, pairs, families))
    del raw
    rows.append(score("top-K graph rows", first.graph.to_sparse(), genes, pairs, families))
    rows.append(
        score("completed top-K C_cox rows", first.completion.matrix, genes, pairs, families)
    )
    with tempfile.TemporaryDirectory() as scratch:
        dense = dense_completed_coexpression(
            standardised, first.graph, first.completion, os.path.join(scratch, "rows.npy")
        )
        rows.append(score("dense completed C_cox rows", dense, genes, pairs, families))
        del dense
    for variant, model in models.items():
        embeddings = model.get_embeddings()
        if args.save_embeddings is not None:
            from stinfer.io.gene_embeddings import write_gene_embeddings

            args.save_embeddings.mkdir(parents=True, exist_ok=True)
            target = args.save_embeddings / f"{args.tune}_{variant}.h5ad"
            write_gene_embeddings(embeddings, target, overwrite=True)
        assert list(embeddings.obs_names) == list(genes)
        rows.append(
            score(
                f"embeddings: {variant} ({timings[variant]:.0f} s)",
                embeddings.X,
                genes,
                pairs,
                families,
            )
        )
    start = time.perf_counter()
    svd = SVDGeneEmbeddings(64, seed=args.seed).train(tune).get_embeddings()
    svd_seconds = time.perf_counter() - start
    svd_genes = pd.Index(svd.obs_names)
    svd_vectors = pd.DataFrame(svd.X, index=svd_genes).reindex(genes).fillna(0.0).to_numpy()
    rows.append(
        score(f"64-d SVD baseline ({svd_seconds:.0f} s)", svd_vectors, genes, pairs, families)
    )

    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    header = (
        f"# Gene embeddings stage by stage: tune on {args.tune}1-{args.tune}6, "
        f"check on {args.check}1-{args.check}6\n\n"
        f"Command: `python benchmarks/gene_embedding_quality.py --tune {args.tune} --check "
        f"{args.check} --variants {' '.join(args.variants)} --out {args.out}`  \n"
        f"{len(genes)} genes; {args.pairs} co-expressed vs {args.pairs} random pairs of the "
        f"check sections; family sizes {counts}; torch threads {torch.get_num_threads()}, "
        f"load average before the run {load_before:.2f} (1 min).\n\n"
    )
    args.out.write_text(header + markdown_table(table))
    print(header + markdown_table(table))


if __name__ == "__main__":
    main()
