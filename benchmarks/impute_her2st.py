"""Held-out genes on HER2ST sections C2, C3, C4: CoxFormer spatial model vs the baselines.

For every section and modality (``spatial``, ``image``, ``fused``; the older ``location`` and
``both`` are accepted and written under the new names) runs
:func:`stinfer.evaluate.held_out_genes.held_out_genes_evaluation` (seeded 80/20 split of the
measured genes; mean profile, k-NN with k chosen by CV over the training genes, the model with
shuffled embeddings) and writes one row per (section, modality, method) with median/mean PCC
and SCC on log1p CP10k, the depth-controlled PCC (``pcc_partial_*``: partial correlation
given the log spot total), the same medians over the held-out genes among the slide's 1,000
most variable genes (``hvg_*``), log1p MSE, genes, seconds, and the machine's load average.

Inputs: prepared slides (``stinfer prepare --format legacy-st ... --out DIR/C2.h5ad``, with the
image for ``image``/``fused``) and a gene embedding table, e.g. from
``stinfer embed-genes --corpus DIR/A1.h5ad ... DIR/D6.h5ad --preset fast --out genes.h5ad``.

Example::

    python benchmarks/impute_her2st.py --slides /tmp/her2st --embeddings genes.h5ad \\
        --preset fast --out impute_her2st.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import pandas as pd

from stinfer.evaluate.held_out_genes import held_out_genes_evaluation
from stinfer.io.atomic import check_writable, write_text
from stinfer.io.h5ad import read_h5ad_slide
from stinfer.modalities import MODALITIES, canonical_modality
from stinfer.models.coxformer_spatial import coxformer_spatial_config, embedding_table

SECTIONS = ("C2", "C3", "C4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, required=True, help="folder of <section>.h5ad")
    parser.add_argument("--embeddings", type=Path, required=True, help="gene embedding table")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS))
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES))
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"])
    parser.add_argument("--epochs", type=int, help="override the preset's maximum epochs")
    parser.add_argument(
        "--gene-conditioning",
        choices=["attention", "bilinear", "additive"],
        help="override the readout (ablations; default: the preset's, attention)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="results .csv (and .json)")
    parser.add_argument(
        "--no-shuffled",
        action="store_true",
        help="skip the shuffled-embedding control (it does not depend on the modality)",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    check_writable(args.out, args.overwrite)
    trainer = {"progress_bar": False}
    if args.epochs:
        trainer["max_epochs"] = args.epochs
    module = {}
    if args.gene_conditioning:
        module["gene_conditioning"] = args.gene_conditioning
    config = coxformer_spatial_config(args.preset, module=module, trainer=trainer)
    table = embedding_table(args.embeddings)
    rows = []
    for section in args.sections:
        slide = read_h5ad_slide(args.slides / f"{section}.h5ad")
        for modality in map(canonical_modality, args.modalities):
            start = time.perf_counter()
            result = held_out_genes_evaluation(
                slide,
                table,
                modality,
                config,
                args.test_fraction,
                args.seed,
                shuffled=not args.no_shuffled,
            )
            for method, values in result["metrics"].items():
                row = {"section": section, "modality": modality, "method": method}
                row["seed"] = args.seed
                row.update({k: v for k, v in values.items() if k != "cv_pcc_median"})
                row["load_average_1min"] = os.getloadavg()[0]
                rows.append(row)
            print(
                f"{section} {modality} ({time.perf_counter() - start:.0f} s): "
                + ", ".join(
                    f"{m} PCC {v['pcc_median']:.3f} (depth-controlled "
                    f"{v['pcc_partial_median']:.3f}, top-variable {v['hvg_pcc_median']:.3f}) "
                    f"MSE {v['mse']:.3f}"
                    for m, v in result["metrics"].items()
                ),
                flush=True,
            )
            frame = pd.DataFrame(rows)
            write_text(frame.to_csv(index=False), args.out, overwrite=True)  # checked above
    write_text(
        json.dumps(
            {
                "embeddings": str(args.embeddings),
                "seed": args.seed,
                "preset": args.preset,
                "gene_conditioning": config.module.gene_conditioning,
                "rows": rows,
            },
            indent=2,
        ),
        args.out.with_suffix(".json"),
        overwrite=True,
    )
    print(
        pd.DataFrame(rows)
        .pivot_table(
            index=["section", "modality"],
            columns="method",
            values=[
                "pcc_median",
                "pcc_partial_median",
                "hvg_pcc_median",
                "hvg_pcc_partial_median",
                "mse",
            ],
            sort=False,
        )
        .round(3)
        .to_string()
    )


if __name__ == "__main__":
    main()
