"""One table from several ``impute_her2st.py`` runs: methods x sections, mean and seed spread.

Each input is a CSV written by ``benchmarks/impute_her2st.py``; its label (``LABEL=FILE``)
names the gene embedding table the run used; the seed is read from the CSV's ``seed`` column
(older runs: from the JSON beside it). Rows of the embedding-free mean profile are the same in
every run of one seed and are kept once; the rows of methods that read the embeddings (the
model, the k-NN, the shuffled control) are named ``METHOD (LABEL)``.

    python benchmarks/summarise_held_out_genes.py \\
        new=docs/results/held_out_genes/C_D-fast_seed0.csv \\
        new=docs/results/held_out_genes/C_D-fast_seed1.csv \\
        old=docs/results/held_out_genes/C_D-fast-top-k_seed0.csv \\
        old=docs/results/held_out_genes/C_D-fast-top-k_seed1.csv \\
        --out docs/results/held_out_genes/C_D.md

The table gives, per section and method, the median PCC over held-out genes (log1p CP10k) for
each seed, their mean and their spread (max - min over seeds), and the mean log1p MSE; then,
per section and label, the model's margin over the k-NN and over the shuffled control, taken
seed by seed (the same genes and split), with its mean, smallest and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from stinfer.io.atomic import check_writable, write_text
from stinfer.modalities import canonical_modality

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gene_embedding_quality import markdown_table

EMBEDDING_FREE = ("mean_profile",)


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


def margins(runs: pd.DataFrame) -> pd.DataFrame:
    """``(section, label, over)`` rows: the model's median PCC minus that of the k-NN or the
    shuffled control of the same run (same seed, split and embeddings): per seed, mean,
    smallest and spread (max - min) over seeds."""
    runs = runs.drop_duplicates(["section", "modality", "method", "seed"])
    pcc = runs.pivot_table(
        index=["section", "modality", "seed"], columns="method", values="pcc_median"
    )
    rows = []
    for model in [m for m in pcc.columns if m.startswith("coxformer (")]:
        label = model[len("coxformer (") : -1]
        for over in ("knn", "coxformer_shuffled"):
            reference = f"{over} ({label})"
            if reference not in pcc.columns:
                continue
            difference = (pcc[model] - pcc[reference]).dropna().unstack("seed")
            for (section, modality), values in difference.iterrows():
                values = values.dropna()
                row = {"section": section, "modality": modality, "embeddings": label}
                row["over"] = over
                row.update({f"seed {seed}": value for seed, value in values.items()})
                row.update(
                    {
                        "mean": values.mean(),
                        "smallest": values.min(),
                        "spread": values.max() - values.min() if len(values) > 1 else float("nan"),
                    }
                )
                rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=CSV")
    parser.add_argument("--out", type=Path, required=True, help="markdown table (.md)")
    args = parser.parse_args()
    check_writable(args.out, overwrite=True)
    frames = []
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item}: expected LABEL=CSV")
        frames.append(read_run(label, Path(path)))
    runs = pd.concat(frames, ignore_index=True)
    text = (
        "# Held-out genes, median PCC per section (mean and spread over seeds)\n\n"
        f"Command: `python benchmarks/summarise_held_out_genes.py {' '.join(args.runs)} "
        f"--out {args.out}`\n\n" + markdown_table(summarise(runs)) + "\n"
    )
    margin_table = margins(runs)
    if len(margin_table):
        text += (
            "\n## The model's margin, seed by seed (median PCC of the model minus that of the "
            "k-NN or the shuffled control of the same run)\n\n"
            + markdown_table(margin_table)
            + "\n"
        )
    write_text(text, args.out, overwrite=True)
    print(text)


if __name__ == "__main__":
    main()
