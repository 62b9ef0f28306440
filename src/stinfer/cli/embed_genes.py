"""`stinfer embed-genes`: CoxFormer gene embeddings from expression corpora (.h5ad)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from stinfer.cli.options import (
    HelpFormatter,
    add_accelerator_argument,
    add_output_arguments,
    checked_output,
    fraction_in,
    non_negative_int,
    positive_int,
)
from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

EXAMPLES = """\
examples:
  stinfer embed-genes --corpus A1.h5ad A2.h5ad D1.h5ad --top-k 50 --preset fast --out genes.h5ad
  stinfer embed-genes --corpus atlas.h5ad --label-corpus st_cohort.h5ad --preset paper \\
      --accelerator gpu --out genes.parquet --save-model coxformer_genes/
  stinfer embed-genes --method svd --corpus A1.h5ad A2.h5ad D1.h5ad --out svd_genes.h5ad

What it does (CoxFormer Suppl. S1-S2): (1) log1p-CP10k Pearson correlation of every gene pair
over the corpora (genes aligned by name; per-corpus correlations averaged), keeping each
gene's top-K partners as a graph; (2) GraphSAGE completion of the co-expression on the graph's
edges, trained on the correlations measured in the label corpus (default: a held-out random
half of each corpus's cells); (3) a Transformer autoencoder over each gene's completed
co-expression vector, whose 512-d bottleneck is the gene embedding. --preset fast completes
the vector for every gene pair (not only the top-K) and keeps its cosine geometry in the
embedding, so cosine similarity between embeddings tracks co-expression.

--method svd writes the baseline every learned embedding should beat: the 64-d truncated SVD
of the same standardised log1p-CP10k corpus (gene i -> V_k[i] S_k); compare both with
`stinfer gene-eval --corpus HELD_OUT.h5ad`.

Corpora are .h5ad files of cells or spots with raw counts in X (as written by
`stinfer prepare`), or in the layer named by --layer. The output holds one row per gene
(obs = genes, X = vectors); its format follows the suffix of --out: .h5ad (with provenance in
uns["gene_embeddings"]: corpora, K, preset, completion R2, autoencoder loss, timings), .csv,
.tsv, .parquet or .pkl. `stinfer gene-eval` scores any such table on binary gene labels.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed-genes",
        help="learn CoxFormer gene embeddings from co-expression in .h5ad corpora",
        description="Build a top-K gene correlation graph, complete the co-expression with "
        "GraphSAGE and compress each gene's co-expression vector with a Transformer "
        "autoencoder into a gene embedding.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        type=Path,
        metavar="H5AD",
        help="expression corpora (.h5ad, cells/spots x genes, raw counts)",
    )
    parser.add_argument(
        "--label-corpus",
        nargs="+",
        type=Path,
        metavar="H5AD",
        help="corpora giving the co-expression targets of the completion (default: a held-out "
        "random fraction of each --corpus's cells, see --label-fraction)",
    )
    parser.add_argument(
        "--method",
        choices=["coxformer", "svd"],
        default="coxformer",
        help="coxformer: the CoxFormer pipeline (default); svd: the truncated-SVD baseline",
    )
    parser.add_argument(
        "--n-components",
        type=positive_int,
        default=64,
        help="with --method svd: embedding width (default 64)",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=50, help="partners kept per gene (default 50)"
    )
    parser.add_argument(
        "--preset",
        choices=["auto", "paper", "fast"],
        default="auto",
        help="paper: the paper's hyperparameters (GPU); fast: fewer epochs and a smaller "
        "autoencoder for a CPU; auto (default): paper on a GPU, fast on a CPU (--accelerator, "
        "else whether a CUDA GPU is available)",
    )
    parser.add_argument("--layer", help="layer holding the raw counts (default X)")
    parser.add_argument(
        "--correlation",
        dest="correlation_method",
        choices=["pearson", "spearman"],
        default="pearson",
        help="correlation of the graph (default pearson)",
    )
    parser.add_argument(
        "--gene-join",
        choices=["inner", "outer"],
        default="inner",
        help="inner: genes every corpus measures (default); outer: the union, a gene missing "
        "from a corpus is absent there",
    )
    parser.add_argument(
        "--combine",
        choices=["mean", "cells"],
        default="mean",
        help="mean: average per-corpus correlations (default); cells: weight corpora by their "
        "cells (= pooling cells after per-corpus standardisation)",
    )
    parser.add_argument(
        "--min-cells",
        type=non_negative_int,
        default=10,
        help="drop genes detected in fewer cells (default 10)",
    )
    parser.add_argument(
        "--label-fraction",
        type=fraction_in(include_one=False),
        default=0.5,
        help="without --label-corpus: fraction of each corpus's cells held out for the "
        "targets (default 0.5; 0 = use the corpora themselves)",
    )
    parser.add_argument(
        "--completion-epochs", type=positive_int, help="override the preset's GNN epochs"
    )
    parser.add_argument(
        "--autoencoder-epochs", type=positive_int, help="override the preset's AE epochs"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    add_accelerator_argument(
        parser,
        "auto (GPU when present), cpu, gpu; also runs the graph GEMMs on the GPU",
        default="auto",
    )
    parser.add_argument(
        "--save-model", type=Path, metavar="DIR", help="also save the trained model in this folder"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_output_arguments(parser, "gene embeddings (.h5ad, .csv, .tsv, .parquet or .pkl)")
    parser.set_defaults(func=run)


def read_corpora(paths: list[Path]) -> dict:
    """Read .h5ad corpora, named by file stem (``A1.h5ad`` -> ``A1``)."""
    import anndata as ad

    corpora = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(2, "no such corpus", str(path))
        if path.suffix.lower() != ".h5ad":
            raise InputError(
                f"{path}: corpora must be .h5ad files; convert other formats with `stinfer prepare`."
            )
        name = path.stem
        while name in corpora:
            name = f"{name}_"
        corpora[name] = ad.read_h5ad(path)
    return corpora


def build_config(args: argparse.Namespace):
    """The preset with the command-line overrides applied."""
    import torch

    from stinfer.models.configs import auto_preset
    from stinfer.models.gene_embeddings import gene_embedding_config
    from stinfer.train import check_accelerator

    check_accelerator(args.accelerator)
    args.preset = auto_preset(args.preset, args.accelerator)
    use_gpu = args.accelerator in ("gpu", "cuda") or (
        args.accelerator == "auto" and torch.cuda.is_available()
    )
    config = gene_embedding_config(
        args.preset,
        top_k=args.top_k,
        label_fraction=args.label_fraction,
        trainer={
            "seed": args.seed,
            "accelerator": args.accelerator,
            "progress_bar": not args.no_progress,
        },
    )
    graph = replace(
        config.graph,
        method=args.correlation_method,
        gene_join=args.gene_join,
        combine=args.combine,
        min_cells=args.min_cells,
        device="cuda" if use_gpu else "cpu",
    )
    completion = replace(config.completion, seed=args.seed)
    if args.completion_epochs is not None:
        completion = replace(completion, max_epochs=args.completion_epochs)
    autoencoder = replace(config.autoencoder, seed=args.seed)
    if args.autoencoder_epochs is not None:
        autoencoder = replace(autoencoder, max_epochs=args.autoencoder_epochs)
    return replace(config, graph=graph, completion=completion, autoencoder=autoencoder)


def run(args: argparse.Namespace) -> None:
    from stinfer.io.gene_embeddings import embedding_format, write_gene_embeddings
    from stinfer.models.gene_embeddings import CoxFormerEmbeddings
    from stinfer.models.persistence import check_model_destination

    out = checked_output(args)
    embedding_format(out)
    if args.method == "svd":
        run_svd(args, out)
        return
    if args.save_model is not None:
        check_model_destination(args.save_model, args.overwrite)  # before any work
    config = build_config(args)
    corpora = read_corpora(args.corpus)
    label_corpora = read_corpora(args.label_corpus) if args.label_corpus else None
    model = CoxFormerEmbeddings(config).train(
        corpora, label_corpora=label_corpora, layer=args.layer
    )
    write_gene_embeddings(model.get_embeddings(), out, overwrite=args.overwrite)
    if args.save_model is not None:
        model.save(args.save_model, overwrite=args.overwrite)
    scores = model.completion.scores
    print(
        f"wrote {out}: {model.graph.n_genes} genes x {config.autoencoder.latent_dim} dims "
        f"(top-{model.graph.top_k} graph of {model.graph.n_edges} edges built in "
        f"{model.timings['graph_seconds']:.1f} s; completion test R2 {scores['r2']:.3f}, "
        f"MSE {scores['mse']:.4g}; autoencoder MSE {model.autoencoder_result.final_mse:.4g}; "
        f"total {model.timings['total_seconds']:.0f} s)"
    )


def run_svd(args: argparse.Namespace, out: Path) -> None:
    """``--method svd``: the truncated-SVD baseline embeddings of the corpora."""
    from stinfer.io.gene_embeddings import write_gene_embeddings
    from stinfer.models.gene_embeddings import SVDGeneEmbeddings

    if args.save_model is not None or args.label_corpus:
        raise InputError("--save-model and --label-corpus apply to --method coxformer only.")
    config = build_config(args)
    model = SVDGeneEmbeddings(args.n_components, graph=config.graph, seed=args.seed)
    embeddings = model.train(read_corpora(args.corpus), layer=args.layer).get_embeddings()
    write_gene_embeddings(embeddings, out, overwrite=args.overwrite)
    info = embeddings.uns["gene_embeddings"]
    print(
        f"wrote {out}: {embeddings.n_obs} genes x {embeddings.n_vars} dims (truncated SVD of "
        f"{int(sum(info['corpus_cells'])):,} spots or cells in {len(info['corpora'])} corpora, "
        f"{info['seconds']:.1f} s)"
    )
