"""`stinfer gene-eval`: does an embedding table carry co-expression and gene properties?

Scores a gene embedding table (stinfer's or anyone's) three ways, each beside the truncated-SVD
baseline of an expression corpus: LR/SVM ROC-AUC on binary gene labels (CoxFormer Table S1),
the ROC-AUC of cosine similarity separating a held-out corpus's most co-expressed gene pairs
from random pairs, and the geometry cosine sees (median pairwise cosine, effective rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stinfer.cli.options import (
    HelpFormatter,
    add_allow_pickle_argument,
    add_output_arguments,
    checked_output,
    int_at_least,
    non_negative_int,
    positive_int,
)
from stinfer.errors import InputError

EXAMPLES = """\
examples:
  stinfer gene-eval --embeddings genes.h5ad --labels labels.csv --out auc.json
  stinfer gene-eval --embeddings genes.h5ad --corpus D1.h5ad D2.h5ad \\
      --svd-corpus A1.h5ad A2.h5ad --labels labels.csv --out report.json
  stinfer gene-eval --embeddings GenePT.csv --corpus held_out.h5ad --out genept.json

labels.csv has columns `gene` and `label` (0/1, true/false or yes/no). Embeddings may be an
.h5ad (obs = genes), or a .csv/.tsv/.parquet table (gene column then dimensions), or a pickle
of a dict gene -> vector. Genes without an embedding are dropped and counted.

Label AUC: stratified, shuffled, seeded k-fold CV; features standardised per fold; logistic
regression and an RBF SVM; ROC-AUC mean and sd (ddof 1) over folds.
Pair AUC (--corpus, raw-count .h5ad, ideally sections the embedding never saw): the --pairs
most correlated gene pairs of the corpus (log1p-CP10k Pearson) against as many random pairs,
ROC-AUC of their cosine similarity; 0.5 means cosine says nothing about co-expression.
Baseline: the 64-d truncated SVD of --svd-corpus (give the corpus the embedding was learnt
from, for a like-for-like comparison); without --svd-corpus, each --corpus is split into two
random halves of its cells, one for the pairs and one for the baseline.
Geometry: median cosine between random gene pairs (near 1: one shared direction, cosine is
useless) and the effective rank of the raw vectors.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gene-eval",
        help="score gene embeddings: label AUC (Table S1), co-expressed-pair AUC, geometry, "
        "beside an SVD baseline",
        description="Score a gene embedding table on binary gene labels (LR/SVM ROC-AUC), on "
        "co-expressed gene pairs of a held-out corpus (cosine ROC-AUC) and by its geometry, "
        "beside the truncated SVD of an expression corpus.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--embeddings",
        required=True,
        type=Path,
        help="embedding table (.h5ad/.csv/.tsv/.parquet; .pkl with --allow-pickle)",
    )
    add_allow_pickle_argument(parser)
    parser.add_argument("--labels", type=Path, help="CSV with columns gene,label")
    parser.add_argument(
        "--corpus",
        nargs="+",
        type=Path,
        metavar="H5AD",
        help="raw-count corpora whose most co-expressed gene pairs are scored",
    )
    parser.add_argument(
        "--svd-corpus",
        nargs="+",
        type=Path,
        metavar="H5AD",
        help="raw-count corpora of the SVD baseline (default: half of each --corpus's cells)",
    )
    parser.add_argument(
        "--pairs",
        type=int_at_least(2),
        default=2000,
        help="co-expressed and random pairs (default 2000)",
    )
    parser.add_argument(
        "--n-components", type=positive_int, default=64, help="SVD baseline width (default 64)"
    )
    parser.add_argument(
        "--folds", type=int_at_least(2), default=5, help="cross-validation folds (default 5)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    add_output_arguments(parser, "results JSON")
    parser.set_defaults(func=run)


def _summary(name: str, entry: dict) -> str:
    parts = [f"{name}: median cosine {entry['geometry']['median_cosine']:.3f}"]
    if "pairs" in entry:
        parts.append(f"pair AUC {entry['pairs']['auc']:.3f}")
    if "labels" in entry:
        labels = entry["labels"]
        parts.append(
            f"LR AUC {labels['lr']['auc_mean']:.3f} ± {labels['lr']['auc_sd']:.3f}, "
            f"SVM AUC {labels['svm']['auc_mean']:.3f} ± {labels['svm']['auc_sd']:.3f}"
        )
    return ", ".join(parts)


def run(args: argparse.Namespace) -> None:
    from stinfer.cli.embed_genes import read_corpora
    from stinfer.evaluate.gene_level import embedding_report, read_gene_labels
    from stinfer.io.atomic import write_text
    from stinfer.io.gene_embeddings import read_gene_embeddings

    out = checked_output(args)
    if args.labels is None and args.corpus is None:
        raise InputError("give --labels, --corpus, or both: there is nothing to score.")
    embeddings = read_gene_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
    labels = read_gene_labels(args.labels) if args.labels is not None else None
    corpora = read_corpora(args.corpus) if args.corpus else None
    svd_corpora = read_corpora(args.svd_corpus) if args.svd_corpus else None
    report = embedding_report(
        embeddings,
        labels,
        corpora,
        svd_corpora,
        n_pairs=args.pairs,
        n_components=args.n_components,
        n_splits=args.folds,
        seed=args.seed,
    )
    result = {"embeddings": str(args.embeddings), "labels": str(args.labels), **report}
    if labels is not None:  # the Table S1 fields at the top level, as before
        result.update(report["embedding"]["labels"])
    write_text(json.dumps(result, indent=2) + "\n", out, overwrite=args.overwrite)
    lines = [f"wrote {out}", _summary("embeddings", report["embedding"])]
    if "svd_baseline" in report:
        lines.append(_summary(f"{args.n_components}-d SVD baseline", report["svd_baseline"]))
    print("\n".join(lines))
