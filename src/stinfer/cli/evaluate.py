"""`stinfer evaluate`: the papers' metrics of a prediction against the truth."""

from __future__ import annotations

import argparse
import json
import textwrap

from stinfer.cli.options import HelpFormatter, add_output_arguments, checked_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics of predicted vs true expression (MSE, median PCC/SCC, depth-normalised)",
        description="\n\n".join(
            textwrap.fill(paragraph, 79)
            for paragraph in (
                "Compare a prediction .h5ad with the true slide, spots matched by obs name and "
                "genes by var name. Writes a JSON with mse, pcc_median, pcc_mean, scc_median, "
                "scc_mean, the depth-normalised pcc/scc, hest_pcc_top50, n_genes, n_spots, "
                "n_constant_genes; and, beside it, a per-gene CSV.",
                "Checks before scoring (exit status 2 with a one-line message): --truth must "
                "hold raw counts (whole non-negative numbers; a prediction there means --pred "
                "and --truth were swapped), and both files must be of the same section: the "
                "sample ids (uns['stinfer']['sample_id']) must agree and the spot names (which "
                "carry the sample id) must overlap. --force scores two sections anyway, "
                "pairing spots by obs['spot_id'] (the same array position or barcode).",
                "A prediction written with `stinfer predict --uncertainty` is also scored for "
                "its uncertainty: coverage_<pct> (measured counts inside the interval; at "
                "least the level for discrete counts), pit_coverage_<pct> (randomised PIT "
                "inside the interval's probabilities: the level itself when calibrated), "
                "width_<pct> (mean interval width, counts) and sd_error_spearman (median over "
                "genes of the Spearman correlation of predicted sd and |error| across spots).",
            )
        ),
        epilog="example:\n  stinfer evaluate --pred C3_pred.h5ad --truth C3.h5ad --out C3_metrics.json",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--pred", required=True, help="prediction .h5ad (X = predicted counts)")
    parser.add_argument("--truth", required=True, help="true slide .h5ad (raw counts)")
    parser.add_argument(
        "--force",
        action="store_true",
        help=(
            "score a prediction of one section against the truth of another (different "
            "sample ids or no shared spot names) instead of refusing; spots are paired by "
            "obs['spot_id']"
        ),
    )
    add_output_arguments(parser, "output metrics .json (a per-gene .csv is written beside it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import anndata as ad

    from stinfer.errors import InputError
    from stinfer.io.atomic import check_writable, write_text
    from stinfer.metrics import count_violation, evaluate_anndata, section_mismatch

    out = checked_output(args)
    per_gene_path = check_writable(out.with_suffix(".per_gene.csv"), args.overwrite)
    prediction, truth = ad.read_h5ad(args.pred), ad.read_h5ad(args.truth)
    violation = count_violation(truth.X)
    if violation is not None:
        raise InputError(
            f"--truth must hold raw counts; did you swap --pred and --truth? ({args.truth} "
            f"holds {violation})"
        )
    mismatch = section_mismatch(prediction, truth)
    if mismatch is not None and not args.force:
        raise InputError(
            f"{mismatch} (--pred {args.pred}, --truth {args.truth}); pass --force to score "
            "them anyway."
        )
    metrics = evaluate_anndata(prediction, truth, force=args.force)
    summary = metrics.summary()
    keys = ["mse", "pcc_median", "scc_median", "pcc_median_depthnorm", "n_genes", "n_spots"]
    if "predictive_sd" in prediction.layers and not args.force:
        from stinfer.evaluate.uncertainty import uncertainty_metrics

        uncertainty = uncertainty_metrics(prediction, truth)
        summary["uncertainty"] = uncertainty
        keys += [key for key in uncertainty if "coverage" in key or key == "sd_error_spearman"]
    write_text(metrics.per_gene.to_csv(), per_gene_path, args.overwrite)
    write_text(json.dumps(summary, indent=2), out, args.overwrite)
    for key in keys:
        value = summary[key] if key in summary else summary["uncertainty"][key]
        print(f"{key:>22}: {value}")
    print(f"wrote {out} and {per_gene_path}")
