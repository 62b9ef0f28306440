"""`stinfer impute`: predict genes from their embeddings on a slide (CoxFormer spatial model)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from stinfer.cli.options import (
    HelpFormatter,
    add_accelerator_argument,
    add_allow_pickle_argument,
    add_distributed_arguments,
    add_output_arguments,
    checked_output,
    fraction,
    non_negative_int,
    open_fraction,
    positive_int,
)
from stinfer.errors import InputError
from stinfer.modalities import MODALITY_ALIASES, canonical_modality

logger = logging.getLogger("stinfer")

EXAMPLES = """\
examples:
  stinfer impute --slide C2.h5ad --embeddings genes.h5ad --test-fraction 0.2 \\
      --modality spatial --preset fast --out C2_imputed.h5ad
  stinfer impute --slide C2.h5ad --embeddings genes.h5ad --genes ERBB2,GRB7 --out C2_genes.h5ad
  stinfer impute --slide HE_only.h5ad --run runs/stevs --embeddings genes.h5ad \\
      --genes ERBB2,GRB7 --out HE_genes.h5ad

Genes from H&E alone (--run STEVS_RUN with --genes): the slide needs an image and spot
coordinates only (e.g. `stinfer prepare --format image`); its counts, if any, are never read.
The STEvs run predicts its gene panel at every spot (--stevs-mode), a CoxFormer readout is
trained on that predicted panel (the panel genes with an embedding) and predicts the named
genes, which must not be in the STEvs panel. X = expected counts with each spot's predicted
panel total as its library; uns["stinfer"]["zero_shot"] records the path.

Held-out genes (--test-fraction): a seeded split of the slide's measured genes (with an
embedding, detected in at least --min-spot-fraction of the spots); the model learns from the
rest and predicts them. The output holds the model's predictions for the held-out genes
(layers["log1p_cp10k"], X their expected counts), the truth in layers["truth"] and each
baseline in its own layer (log1p CP10k over the visible genes' spot totals); the metrics
JSON beside it (<out>.metrics.json, or --metrics) holds pcc_median, pcc_mean, scc_median,
scc_mean, mse (log1p CP10k), n_test_genes for the model ("coxformer") and for each baseline:
"mean_profile", "knn" (k chosen by cross-validation over the training genes) and
"coxformer_shuffled" (the same model with the embedding rows permuted among genes).

Named genes (--genes, comma-separated or a file with one gene a line): the model learns from
every measured gene and predicts the named ones, measured on the slide or not; every one needs
an embedding. Embeddings: .h5ad from `stinfer embed-genes` or a table (.csv, .tsv, .parquet,
.pkl: gene -> vector).

What the output holds (the same convention as `stinfer predict`): X = expected counts on the
slide's count scale, expm1(log1p CP10k) x library / 1e4 with each spot's library
(obs["library_size"]: its total counts over the slide's measured genes; a sub-spot's is its
spot's over r x r); layers["log1p_cp10k"] = the model's prediction, log1p CP10k;
uns["stinfer"]["expression"] says what X and each layer hold and over which gene panel the
library is summed.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "impute",
        help="predict (unmeasured) genes on a slide from their gene embeddings (CoxFormer)",
        description="Train the CoxFormer spatial model on the measured genes of a slide and "
        "predict held-out or named genes from their embeddings. The output .h5ad has expected "
        "counts in X and the predicted log1p CP10k in layers['log1p_cp10k'] (see below).",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--slide", required=True, type=Path, help="slide .h5ad (stinfer prepare)")
    parser.add_argument(
        "--embeddings",
        required=True,
        type=Path,
        help="gene embeddings (.h5ad, .csv, .tsv, .parquet; .pkl with --allow-pickle)",
    )
    add_allow_pickle_argument(parser)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument(
        "--test-fraction",
        type=open_fraction,
        help="held-out genes protocol: fraction of genes held out, in (0, 1)",
    )
    task.add_argument("--genes", help="genes to predict: comma-separated, or a file of names")
    parser.add_argument(
        "--run",
        type=Path,
        help="a STEvs run folder (`stinfer train`): predict --genes on a slide that has only "
        "H&E (see below); the CoxFormer readout learns from the run's predicted panel",
    )
    parser.add_argument(
        "--stevs-mode",
        choices=["fused", "image", "spatial", *MODALITY_ALIASES],
        metavar="{fused,image,spatial}",
        default="fused",
        help="with --run: the STEvs inference mode (fused; image when the coordinates mean "
        "nothing)",
    )
    parser.add_argument(
        "--modality",
        choices=["spatial", "image", "fused", *MODALITY_ALIASES],
        metavar="{spatial,image,fused}",
        default="spatial",
        help="spot features: coordinates (spatial, the default), H&E image features (image), or "
        "both (fused); the older names location and both are accepted",
    )
    parser.add_argument(
        "--preset",
        choices=["auto", "paper", "fast"],
        default="auto",
        help="paper: the paper's hyperparameters (for a GPU); fast: a smaller model for a CPU; "
        "auto (default): paper on a GPU, fast on a CPU (--accelerator, else whether a CUDA GPU "
        "is available)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, help="override the preset's maximum epochs (>= 1)"
    )
    parser.add_argument(
        "--min-spot-fraction",
        type=fraction,
        help="training genes must be detected in this fraction of spots (default 0.1)",
    )
    parser.add_argument(
        "--sub-spot-grid",
        type=positive_int,
        default=1,
        help="r > 1: predict an r x r sub-spot grid per spot (super-resolution); with --genes "
        "the output then holds the sub-spots",
    )
    parser.add_argument(
        "--gene-conditioning",
        choices=["attention", "bilinear", "additive"],
        help="how the gene conditions the prediction: attention over the measured training "
        "genes (default), the decoder's bilinear readout alone, or the public code's additive "
        "token (ablations)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="split and training seed (default 0)"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip mean profile and k-NN")
    parser.add_argument(
        "--no-shuffled", action="store_true", help="skip the shuffled-embedding control"
    )
    parser.add_argument("--metrics", type=Path, help="metrics JSON (default <out>.metrics.json)")
    parser.add_argument("--save-model", type=Path, metavar="DIR", help="also save the model")
    add_accelerator_argument(parser, "auto, cpu or gpu (default auto)", default="auto")
    add_distributed_arguments(parser, "CoxFormer spatial training")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_output_arguments(parser, "predictions (.h5ad)")
    parser.set_defaults(func=run)


def read_gene_names(value: str) -> list[str]:
    """Gene names from ``A,B,C`` or from a file with one name a line."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
    else:
        names = [name.strip() for name in value.split(",")]
    names = [name for name in names if name]
    if not names:
        raise InputError(f"--genes {value!r}: no gene names given.")
    return list(dict.fromkeys(names))


def metrics_path(args: argparse.Namespace) -> Path:
    """``--metrics`` or ``<out stem>.metrics.json`` beside ``--out``."""
    if args.metrics is not None:
        return args.metrics
    return args.out.with_name(f"{args.out.stem}.metrics.json")


def build_config(args: argparse.Namespace):
    from stinfer.models.configs import auto_preset
    from stinfer.models.coxformer_spatial import coxformer_spatial_config

    args.preset = auto_preset(args.preset, args.accelerator)
    logger.info("CoxFormer spatial preset: %s", args.preset)
    trainer = {
        "seed": args.seed,
        "accelerator": args.accelerator,
        "progress_bar": not args.no_progress,
    }
    for name in ("devices", "strategy", "num_nodes"):  # DDP (add_distributed_arguments)
        if getattr(args, name, None) is not None:
            trainer[name] = getattr(args, name)
    training: dict[str, Any] = {"sub_spot_grid": args.sub_spot_grid}
    module = {}
    if args.epochs is not None:
        trainer["max_epochs"] = args.epochs
    if args.min_spot_fraction is not None:
        training["min_spot_fraction"] = args.min_spot_fraction
    if args.gene_conditioning is not None:
        module["gene_conditioning"] = args.gene_conditioning
    return coxformer_spatial_config(args.preset, module=module, training=training, trainer=trainer)


def run(args: argparse.Namespace) -> None:
    from stinfer.io.atomic import check_writable, write_h5ad, write_text
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.models.coxformer_spatial import CoxFormerSpatial, embedding_table
    from stinfer.models.persistence import check_model_destination
    from stinfer.train import check_accelerator, is_global_zero

    out = checked_output(args)
    if args.out.suffix.lower() != ".h5ad":
        raise InputError(f"{args.out}: --out must be a .h5ad file.")
    if args.test_fraction is not None:
        metrics_file = check_writable(metrics_path(args), args.overwrite)
    elif args.metrics is not None:
        raise InputError("--metrics is written by the held-out protocol (--test-fraction) only.")
    check_accelerator(args.accelerator)
    if args.save_model is not None:
        check_model_destination(args.save_model, args.overwrite)  # before any work
    for path, what in ((args.slide, "slide"), (args.embeddings, "embeddings")):
        if not path.is_file():
            raise FileNotFoundError(2, f"no such {what}", str(path))
    args.modality = canonical_modality(args.modality)
    if args.run is not None and args.genes is None:
        raise InputError("--run predicts named genes from H&E: give --genes, not --test-fraction.")
    if args.run is not None and (
        args.modality != "spatial" or args.sub_spot_grid > 1 or args.save_model is not None
    ):
        raise InputError(
            "--run: the readout learns from the predicted panel of this slide; --modality, "
            "--sub-spot-grid and --save-model do not apply."
        )
    config = build_config(args)
    slide = read_h5ad_slide(args.slide)
    table = embedding_table(args.embeddings, allow_pickle=args.allow_pickle)
    if args.run is not None:
        run_zero_shot(args, slide, table, config, out)
        return

    if args.test_fraction is not None:
        from stinfer.evaluate.held_out_genes import held_out_genes_evaluation, held_out_table

        result = held_out_genes_evaluation(
            slide,
            table,
            args.modality,
            config,
            test_fraction=args.test_fraction,
            seed=args.seed,
            baselines=not args.no_baselines,
            shuffled=not args.no_shuffled,
        )
        model, prediction = result["model"], result["prediction"]
        if not is_global_zero():
            return  # another DDP process of this run: rank 0 writes
        record = {
            "slide": str(args.slide),
            "embeddings": str(args.embeddings),
            "modality": args.modality,
            "preset": args.preset,
            "test_fraction": args.test_fraction,
            "seed": args.seed,
            "n_train_genes": len(result["train_genes"]),
            **result["metrics"]["coxformer"],
            "baselines": {k: v for k, v in result["metrics"].items() if k != "coxformer"},
        }
        logger.info("writing %s and %s", out, metrics_file)
        write_h5ad(prepare_for_h5ad(prediction), out, overwrite=args.overwrite)
        write_text(json.dumps(record, indent=2), metrics_file, overwrite=args.overwrite)
        n_top = prediction.uns["coxformer_spatial"]["n_top_variable"]
        print(
            f"wrote {out} ({len(result['test_genes'])} held-out genes x {slide.n_obs} spots) and "
            f"{metrics_file}; median PCC over the held-out genes (plain and depth-controlled, "
            f"all and the {int(prediction.var['highly_variable'].sum())} among the slide's "
            f"{n_top} most variable genes):\n"
            + held_out_table(result["metrics"]).round(3).to_string()
        )
    else:
        genes = read_gene_names(args.genes)
        missing = [gene for gene in genes if gene not in table.index]
        if missing:
            raise InputError(
                f"{args.embeddings}: no embedding for {len(missing)} of the --genes "
                f"({', '.join(missing[:10])}); only genes in the table can be imputed."
            )
        model = CoxFormerSpatial(slide, table, None, args.modality, config)
        model.train()
        if not is_global_zero():
            return  # another DDP process of this run: rank 0 predicts and writes
        prediction = model.super_resolve(genes) if args.sub_spot_grid > 1 else model.impute(genes)
        logger.info("writing %s", out)
        write_h5ad(prepare_for_h5ad(prediction), out, overwrite=args.overwrite)
        measured = int(prediction.var["measured_on_slide"].sum())
        print(
            f"wrote {out}: {len(genes)} genes ({measured} measured on the slide) x "
            f"{prediction.n_obs} {'sub-spots' if args.sub_spot_grid > 1 else 'spots'}, "
            f"expected counts in X, log1p CP10k in layers['log1p_cp10k']; trained on "
            f"{len(model.train_genes)} genes"
        )
    if args.save_model is not None:
        model.save(args.save_model, overwrite=args.overwrite)


def run_zero_shot(args: argparse.Namespace, slide, table, config, out: Path) -> None:
    """``--run``: genes from H&E alone (:func:`stinfer.models.zero_shot.predict_unmeasured_genes`)."""
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.models import load
    from stinfer.models.persistence import read_model_header
    from stinfer.models.zero_shot import predict_unmeasured_genes

    kind = read_model_header(args.run).model_type
    if kind != "stevs":
        raise InputError(
            f"--run {args.run}: holds a {kind} model; genes from H&E need a STEvs run."
        )
    stevs = load(args.run)
    genes = read_gene_names(args.genes)
    mode = canonical_modality(args.stevs_mode, "--stevs-mode")
    prediction = predict_unmeasured_genes(stevs, slide, table, genes, mode, config)
    from stinfer.train import is_global_zero

    if not is_global_zero():
        return  # another DDP process of this run: rank 0 writes
    logger.info("writing %s", out)
    write_h5ad(prepare_for_h5ad(prediction), out, overwrite=args.overwrite)
    print(
        f"wrote {out}: {len(genes)} genes x {prediction.n_obs} spots from H&E ({mode} STEvs "
        f"panel of {len(stevs.genes)} genes, readout trained on "
        f"{prediction.uns['stinfer']['zero_shot']['readout_genes']}); expected counts in X, "
        "log1p CP10k in layers['log1p_cp10k']"
    )
