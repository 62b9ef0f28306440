"""CoxFormer gene embeddings on the HER2ST counts (A1-A6, D1-D6): timings, fit, a sanity check.

Runs :class:`stinfer.models.gene_embeddings.CoxFormerEmbeddings` with the sections' spots as
corpus and reports the correlation-graph build time, the completion's test R2 (beside the R2
of copying the graph correlation), the autoencoder's reconstruction loss, and a biological
sanity check: ERBB2 and GRB7 sit in the 17q12 amplicon, co-amplified in HER2+ tumours, so GRB7
should be among ERBB2's nearest neighbours in embedding space (cosine similarity). It also
reports the ranks of the other 17q12 amplicon genes (PGAP3, STARD3, TCAP, PNMT, MIEN1, ORMDL3,
PSMD3, MED24), which should be enriched near ERBB2.

    python benchmarks/embeddings_her2st.py --data-root ../shared/data/her2st --preset fast \
        --out her2st_embeddings.json

Label corpus: by default a seeded random half of each section's spots gives the completion
targets and the other half builds the graph (stinfer's default); ``--label-mode patients``
builds the graph on patient A (A1-A6) and takes targets from patient D (D1-D6).

K sensitivity (Table S1's layout): ``--k-sensitivity 50 100 200`` reruns the whole pipeline for
each K with :func:`stinfer.evaluate.gene_level.k_sensitivity` and scores the embeddings with
LR/SVM ROC-AUC (stratified, shuffled, seeded 5-fold CV) on ``--labels`` (CSV ``gene,label``).
Without ``--labels`` a built-in sanity label is used: the collagen genes (``COL<n>A<n>``, the
stromal/ECM program of fibroblasts; HER2ST's tables have no ribosomal or mitochondrial genes)
against a seeded random sample of four times as many other genes. It says whether the
embeddings keep a known co-expression family apart, not how they do on the paper's
dosage-sensitivity task (whose labels are not shipped here).

    python benchmarks/embeddings_her2st.py --preset fast --k-sensitivity 50 100 200 \
        --out her2st_k_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

AMPLICON_17Q12 = ("GRB7", "PGAP3", "STARD3", "TCAP", "PNMT", "MIEN1", "ORMDL3", "PSMD3", "MED24")
DEFAULT_SECTIONS = [f"{p}{i}" for p in "AD" for i in range(1, 7)]
COLLAGEN_PATTERN = r"^COL\d+A\d+$"  # collagen genes: stromal/ECM, co-expressed by fibroblasts


def read_sections(root: Path, sections: list[str]) -> dict:
    """Read legacy-ST sections with stinfer's reader (raw counts in X)."""
    from stinfer.io import read_legacy_st

    corpora = {}
    for name in sections:
        corpora[name] = read_legacy_st(
            counts=root / "counts" / f"{name}.tsv.gz",
            spots=root / "spots" / f"{name}_selection.tsv",
            sample_id=name,
        )
    return corpora


def neighbour_ranks(embeddings, gene: str, others: tuple[str, ...]) -> dict:
    """Rank (1 = nearest) of each of ``others`` among ``gene``'s neighbours by cosine."""
    names = list(embeddings.obs_names)
    if gene not in names:
        return {}
    vectors = np.asarray(embeddings.X, dtype=np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors @ vectors[names.index(gene)]
    similarity[names.index(gene)] = -np.inf
    order = np.argsort(-similarity)
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(1, len(names) + 1)
    return {
        other: {
            "rank": int(rank[names.index(other)]),
            "cosine": float(similarity[names.index(other)]),
        }
        for other in others
        if other in names
    }


def family_labels(
    genes, pattern: str = COLLAGEN_PATTERN, seed: int = 0, negatives_per_positive: int = 4
):
    """1 for the genes whose name matches ``pattern`` (a gene family), 0 for a seeded random
    sample of ``negatives_per_positive`` times as many other genes."""
    import pandas as pd

    genes = pd.Index(genes)
    positive = genes.str.match(pattern)
    negatives = genes[~positive]
    rng = np.random.default_rng(seed)
    size = min(len(negatives), negatives_per_positive * int(positive.sum()))
    chosen = np.sort(rng.choice(len(negatives), size, replace=False))
    return pd.concat([pd.Series(1, index=genes[positive]), pd.Series(0, index=negatives[chosen])])


def run_k_sensitivity(args, corpora, config) -> dict:
    """Table S1 on the HER2ST sections: one full pipeline per K, AUCs and training time."""
    from stinfer.evaluate.gene_level import format_table_s1, k_sensitivity, read_gene_labels

    if args.labels is not None:
        labels, label_name = read_gene_labels(args.labels), str(args.labels)
    else:
        shared = set.intersection(*(set(c.var_names) for c in corpora.values()))
        labels = family_labels(sorted(shared), seed=args.seed)
        label_name = f"built-in: collagen genes ({COLLAGEN_PATTERN}) vs 4x random other genes"
    table = k_sensitivity(corpora, labels, ks=args.k_sensitivity, config=config, seed=args.seed)
    markdown = format_table_s1(table)
    print(markdown)
    return {
        "sections": args.sections,
        "preset": args.preset,
        "labels": label_name,
        "n_labelled": len(labels),
        "n_positive": int(labels.sum()),
        "table": table.to_dict(orient="records"),
        "table_s1_markdown": markdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/her2st"))
    parser.add_argument("--sections", nargs="+", default=DEFAULT_SECTIONS)
    parser.add_argument("--preset", choices=["paper", "fast"], default="fast")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--label-mode", choices=["split", "patients"], default="split")
    parser.add_argument("--completion-epochs", type=int)
    parser.add_argument("--autoencoder-epochs", type=int)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument("--save-embeddings", type=Path, help="write the embeddings (.h5ad)")
    parser.add_argument(
        "--k-sensitivity",
        type=int,
        nargs="+",
        metavar="K",
        help="instead: rerun the pipeline for each K and print Table S1 (LR/SVM AUC, time)",
    )
    parser.add_argument("--labels", type=Path, help="gene,label CSV for --k-sensitivity")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    import torch

    from stinfer.models.gene_embeddings import CoxFormerEmbeddings, gene_embedding_config

    start = time.perf_counter()
    corpora = read_sections(args.data_root, args.sections)
    read_seconds = time.perf_counter() - start
    config = gene_embedding_config(
        args.preset,
        top_k=args.top_k,
        trainer={"seed": args.seed, "accelerator": args.accelerator, "progress_bar": False},
    )
    use_gpu = args.accelerator in ("gpu", "cuda") or (
        args.accelerator == "auto" and torch.cuda.is_available()
    )
    from dataclasses import replace

    config = replace(config, graph=replace(config.graph, device="cuda" if use_gpu else "cpu"))
    if args.completion_epochs:
        config = replace(
            config, completion=replace(config.completion, max_epochs=args.completion_epochs)
        )
    if args.autoencoder_epochs:
        config = replace(
            config, autoencoder=replace(config.autoencoder, max_epochs=args.autoencoder_epochs)
        )
    if args.k_sensitivity:
        report = run_k_sensitivity(args, corpora, config)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return
    if args.label_mode == "patients":
        graph_corpora = {k: v for k, v in corpora.items() if k.startswith("A")}
        label_corpora = {k: v for k, v in corpora.items() if k.startswith("D")}
    else:
        graph_corpora, label_corpora = corpora, None
    model = CoxFormerEmbeddings(config).train(graph_corpora, label_corpora=label_corpora)
    embeddings = model.get_embeddings()
    graph_partners = model.graph.neighbors("ERBB2") if "ERBB2" in model.graph.gene_names else None
    scores = model.completion.scores
    report = {
        "sections": args.sections,
        "spots": int(sum(c.n_obs for c in corpora.values())),
        "preset": args.preset,
        "label_mode": args.label_mode,
        "device": "cuda" if use_gpu else "cpu",
        "read_seconds": read_seconds,
        "n_genes": model.graph.n_genes,
        "n_edges": model.graph.n_edges,
        "graph_build_seconds": model.timings["graph_seconds"],
        "completion": {
            k: scores[k]
            for k in (
                "r2",
                "mse",
                "correlation_copy_r2",
                "mean_baseline_mse",
                "n_train",
                "n_test",
                "n_unmeasured",
                "epochs",
                "seconds",
            )
        },
        "autoencoder": {
            "final_mse": model.autoencoder_result.final_mse,
            "final_mse_nonzero": model.autoencoder_result.final_mse_nonzero,
            "first_epoch_loss": model.autoencoder_result.history[0].get("train/mse"),
            "last_epoch_loss": model.autoencoder_result.history[-1].get("train/mse"),
            "seconds": model.autoencoder_result.seconds,
        },
        "total_seconds": model.timings["total_seconds"],
        "erbb2_embedding_neighbours": neighbour_ranks(embeddings, "ERBB2", AMPLICON_17Q12),
        "erbb2_graph_partners": (
            {g: round(float(v), 3) for g, v in graph_partners.head(10).items()}
            if graph_partners is not None
            else {}
        ),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.save_embeddings:
        from stinfer.io.gene_embeddings import write_gene_embeddings

        write_gene_embeddings(embeddings, args.save_embeddings, overwrite=True)


if __name__ == "__main__":
    main()
