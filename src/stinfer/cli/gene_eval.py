"""`stinfer gene-eval`: ROC-AUC of LR and SVM on binary gene labels (CoxFormer Table S1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stinfer.cli.options import add_output_arguments, checked_output

EXAMPLES = """\
examples:
  stinfer gene-eval --embeddings genes.h5ad --labels labels.csv --out auc.json
  stinfer gene-eval --embeddings GenePT.pickle --labels tf_dosage.csv --folds 5 --seed 1 \\
      --out genept_auc.json

labels.csv has columns `gene` and `label` (0/1, true/false or yes/no). Embeddings may be an
.h5ad (obs = genes), or a .csv/.tsv/.parquet table (gene column then dimensions), or a pickle
of a dict gene -> vector. Genes without an embedding are dropped and counted. Protocol:
stratified, shuffled, seeded k-fold CV; features standardised per fold; logistic regression
and an RBF SVM; ROC-AUC mean and sd (ddof 1) over folds, and each fold, written as JSON.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gene-eval",
        help="score gene embeddings by LR/SVM ROC-AUC on binary gene labels (Table S1)",
        description="Cross-validated ROC-AUC of logistic regression and an SVM classifying "
        "binary gene labels from a gene embedding table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--embeddings",
        required=True,
        type=Path,
        help="embedding table (.h5ad/.csv/.tsv/.parquet/.pkl)",
    )
    parser.add_argument("--labels", required=True, type=Path, help="CSV with columns gene,label")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="fold shuffling seed (default 0)")
    add_output_arguments(parser, "results JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.evaluate.gene_level import gene_level_auc, read_gene_labels
    from stinfer.io.atomic import write_text
    from stinfer.io.gene_embeddings import read_gene_embeddings

    out = checked_output(args)
    embeddings = read_gene_embeddings(args.embeddings)
    labels = read_gene_labels(args.labels)
    result = gene_level_auc(embeddings, labels, n_splits=args.folds, seed=args.seed)
    result = {"embeddings": str(args.embeddings), "labels": str(args.labels), **result}
    write_text(json.dumps(result, indent=2) + "\n", out, overwrite=args.overwrite)
    print(
        f"wrote {out}: {result['n_genes']} genes ({result['n_positive']} positive, "
        f"{result['n_missing']} labelled genes without embedding); "
        f"LR AUC {result['lr']['auc_mean']:.3f} ± {result['lr']['auc_sd']:.3f}, "
        f"SVM AUC {result['svm']['auc_mean']:.3f} ± {result['svm']['auc_sd']:.3f}"
    )
