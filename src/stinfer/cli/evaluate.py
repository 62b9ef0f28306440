"""`stinfer evaluate`: the papers' metrics of a prediction against the truth."""

from __future__ import annotations

import argparse
import json

from stinfer.cli.options import add_output_arguments, checked_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics of predicted vs true expression (MSE, median PCC/SCC, depth-normalised)",
        description=(
            "Compare a prediction .h5ad with the true slide, spots matched by obs name and "
            "genes by var name. Writes a JSON with mse, pcc_median, pcc_mean, scc_median, "
            "scc_mean, the depth-normalised pcc/scc, hest_pcc_top50, n_genes, n_spots, "
            "n_constant_genes; and, beside it, a per-gene CSV."
        ),
        epilog="example:\n  stinfer evaluate --pred C3_pred.h5ad --truth C3.h5ad --out C3_metrics.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, help="prediction .h5ad (X = predicted counts)")
    parser.add_argument("--truth", required=True, help="true slide .h5ad (raw counts)")
    add_output_arguments(parser, "output metrics .json (a per-gene .csv is written beside it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import anndata as ad

    from stinfer.io.atomic import write_text
    from stinfer.metrics import evaluate_anndata

    out = checked_output(args)
    per_gene_path = out.with_suffix(".per_gene.csv")
    metrics = evaluate_anndata(ad.read_h5ad(args.pred), ad.read_h5ad(args.truth))
    summary = metrics.summary()
    write_text(metrics.per_gene.to_csv(), per_gene_path, args.overwrite)
    write_text(json.dumps(summary, indent=2), out, args.overwrite)
    for key in ("mse", "pcc_median", "scc_median", "pcc_median_depthnorm", "n_genes", "n_spots"):
        print(f"{key:>22}: {summary[key]}")
    print(f"wrote {out} and {per_gene_path}")
