"""One table from several ``impute_her2st.py`` runs: methods x sections, mean and seed spread.

Each input is a CSV written by ``benchmarks/impute_her2st.py``; its label (``LABEL=FILE``)
names the gene embedding table the run used; the seed is read from the CSV's ``seed`` column
(older runs: from the JSON beside it). Rows of the embedding-free methods (mean profile, k-NN)
are the same in every run of one seed and are kept once; the CoxFormer rows are named
``coxformer (LABEL)``.

    python benchmarks/summarise_held_out_genes.py \\
        new=docs/results/held_out_genes/C_D-fast_seed0.csv \\
        new=docs/results/held_out_genes/C_D-fast_seed1.csv \\
        old=docs/results/held_out_genes/C_D-fast-top-k_seed0.csv \\
        old=docs/results/held_out_genes/C_D-fast-top-k_seed1.csv \\
        --out docs/results/held_out_genes/C_D.md

The table gives, per section and method, the median PCC over held-out genes (log1p CP10k) for
each seed, their mean and their spread (max - min over seeds), and the mean log1p MSE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from stinfer.modalities import canonical_modality

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gene_embedding_quality import markdown_table

EMBEDDING_FREE = ("mean_profile", "knn")


def read_run(label: str, path: Path) -> pd.DataFrame:
    """The rows of one run, with ``seed`` and the method renamed by the embedding label."""
    frame = pd.read_csv(path)
    frame["modality"] = frame["modality"].map(canonical_modality)  # older runs: location/both
    if "seed" not in frame:
        seed = json.loads(path.with_suffix(".json").read_text()).get("seed")
        if seed is None:
            raise SystemExit(f"{path}: no seed in the CSV or in its JSON")
        frame["seed"] = seed
    embedding_rows = ~frame["method"].isin(EMBEDDING_FREE)
    frame.loc[embedding_rows, "method"] = frame.loc[embedding_rows, "method"] + f" ({label})"
    return frame


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """``(section, method)`` rows: median PCC per seed, its mean and spread, mean MSE."""
    runs = runs.drop_duplicates(["section", "modality", "method", "seed"])
    per_seed = runs.pivot_table(
        index=["section", "modality", "method"], columns="seed", values="pcc_median"
    )
    per_seed.columns = [f"PCC seed {seed}" for seed in per_seed.columns]
    table = per_seed.assign(
        **{
            "PCC mean": per_seed.mean(axis=1),
            "PCC spread": per_seed.max(axis=1) - per_seed.min(axis=1),
            "MSE mean": runs.groupby(["section", "modality", "method"])["mse"].mean(),
        }
    )
    return table.reset_index().sort_values(["section", "modality", "PCC mean"], ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=CSV")
    parser.add_argument("--out", type=Path, required=True, help="markdown table (.md)")
    args = parser.parse_args()
    frames = []
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item}: expected LABEL=CSV")
        frames.append(read_run(label, Path(path)))
    table = summarise(pd.concat(frames, ignore_index=True))
    text = (
        "# Held-out genes, median PCC per section (mean and spread over seeds)\n\n"
        f"Command: `python benchmarks/summarise_held_out_genes.py {' '.join(args.runs)} "
        f"--out {args.out}`\n\n" + markdown_table(table) + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
