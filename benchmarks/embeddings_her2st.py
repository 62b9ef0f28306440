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
        seed=args.seed,
        accelerator=args.accelerator,
        progress_bar=False,
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
