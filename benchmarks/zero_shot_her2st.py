"""Genes never measured, predicted from H&E alone, on HER2ST sections: every ordered pair.

For each (training section, test section) pair of ``--sections`` runs
:func:`stinfer.evaluate.zero_shot.zero_shot_evaluation`: a seeded 80/20 split of the training
section's ``--n-panel`` most variable genes (with an embedding, measured on the test section for
the truth); STEvs learns the 80% on the training section; on the test section, stripped of its
counts, STEvs predicts the 80% and the CoxFormer readout (trained on that predicted panel) the
20%. Beside it: STEvs trained on the full panel (the oracle that saw the 20%), k-NN over
embeddings and the mean profile of the predicted panel, and the readout with shuffled
embeddings. One row per (pair, method): raw and depth-normalised median PCC of the 20%, SCC,
mean PCC, MSE, seconds; the mean over pairs in the markdown summary, with the thread count and
load average.

Inputs: prepared slides with images (``stinfer prepare --format legacy-st ... --out
DIR/C2.h5ad``) and a gene embedding table from a corpus that excludes the sections, e.g.
``stinfer embed-genes --method svd --corpus DIR/A1.h5ad ... DIR/D6.h5ad --out svd_AD.h5ad``.

    python benchmarks/zero_shot_her2st.py --slides DIR --embeddings svd_AD.h5ad \\
        --out docs/results/zero_shot_her2st.md
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from stinfer.evaluate.zero_shot import zero_shot_evaluation
from stinfer.io.atomic import check_writable, write_text
from stinfer.io.h5ad import read_h5ad_slide
from stinfer.models.coxformer_spatial import coxformer_spatial_config, embedding_table
from stinfer.models.stevs import fast_preset

SECTIONS = ("C2", "C3", "C4")
METHODS = ("zero_shot", "stevs_oracle", "knn", "mean_profile", "zero_shot_shuffled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, required=True, help="folder of <section>.h5ad")
    parser.add_argument("--embeddings", type=Path, required=True, help="gene embedding table")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS))
    parser.add_argument("--n-panel", type=int, default=300, help="panel size before the split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="fused", choices=["fused", "image"])
    parser.add_argument(
        "--panel",
        default="hvg",
        choices=["hvg", "svg"],
        help="most variable or spatially variable training genes (STEvs D.1.4)",
    )
    parser.add_argument("--out", type=Path, required=True, help="summary .md (and .csv beside)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    check_writable(args.out, args.overwrite)
    csv_path = check_writable(args.out.with_suffix(".csv"), args.overwrite)

    table = embedding_table(args.embeddings)
    slides = {name: read_h5ad_slide(args.slides / f"{name}.h5ad") for name in args.sections}
    stevs_config = fast_preset()
    stevs_config.trainer = replace(stevs_config.trainer, progress_bar=False)
    readout = coxformer_spatial_config("fast", trainer={"progress_bar": False, "seed": args.seed})
    rows = []
    for train, test in itertools.permutations(args.sections, 2):
        start = time.perf_counter()
        result = zero_shot_evaluation(
            [slides[train]],
            slides[test],
            table,
            args.n_panel,
            0.2,
            args.seed,
            stevs_config,
            readout,
            args.mode,
            args.panel,
        )
        for method, values in result["metrics"].items():
            rows.append({"train": train, "test": test, "method": method, **values})
        print(f"{train} -> {test}: {time.perf_counter() - start:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    write_text(frame.to_csv(index=False), csv_path, args.overwrite)
    text = summary_text(frame, args)
    write_text(text, args.out, args.overwrite)
    print(text)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` (index first), numbers to 3 decimals (no tabulate needed)."""
    names = [str(name) for name in (table.index.names or [""])]
    header = [" / ".join(n for n in names if n != "None"), *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for index, row in table.iterrows():
        label = " / ".join(map(str, index)) if isinstance(index, tuple) else str(index)
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def summary_text(frame: pd.DataFrame, args: argparse.Namespace) -> str:
    """The markdown summary: mean over pairs per method, then the per-pair table."""
    columns = ["pcc_median", "pcc_median_depthnorm", "scc_median", "mse", "seconds"]
    summary = (
        frame.groupby("method")[columns]
        .mean()
        .reindex([m for m in METHODS if m in set(frame["method"])])
    )
    per_pair = frame.pivot_table(
        index=["train", "test"], columns="method", values="pcc_median_depthnorm"
    )[[m for m in METHODS if m in set(frame["method"])]]
    load = os.getloadavg()
    return (
        f"# Zero-shot genes from H&E: HER2ST {', '.join(args.sections)}, every ordered pair\n\n"
        f"`python benchmarks/zero_shot_her2st.py --slides DIR --embeddings "
        f"{args.embeddings.name} --panel {args.panel} --out {args.out.name}` (mode {args.mode}, "
        f"seed {args.seed}, {args.panel} panel of {args.n_panel} -> 80/20; threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'all')}, load average {load[0]:.1f} at the end)\n\n"
        "Mean over the ordered pairs, held-out 20% of the panel (median over genes):\n\n"
        + markdown(summary)
        + "\n\nDepth-normalised median PCC per pair:\n\n"
        + markdown(per_pair)
        + "\n"
    )


if __name__ == "__main__":
    main()
