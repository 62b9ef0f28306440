"""`stinfer demo`: the main job on the built-in synthetic data, end to end."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stinfer.cli.options import checked_output_folder, int_at_least, non_negative_int, positive_int

logger = logging.getLogger("stinfer")

DEMO_EPOCHS = 15  # enough for the fast preset to learn the planted programs on a laptop CPU
METRIC_COLUMNS = ("mse", "pcc_median", "scc_median", "pcc_median_depthnorm")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train STEvs on synthetic section 1, predict sections 2-3, print metrics, draw figures",
        description=(
            "Generate three synthetic serial sections with known domains (H&E-like images, "
            "spot grid, negative-binomial counts), write them as prepared .h5ad slides with "
            "cached spot patches, train STEvs (fast preset) on section 1, predict sections 2 "
            "and 3, print a metrics table beside a mean-expression baseline (metrics.csv), and "
            "draw figures: an overview, true vs predicted spatial maps of three genes "
            "(spatial_maps.png) and latent UMAPs by slice and by domain (latent_umap.png). "
            "Needs no data and no internet; a few minutes on two CPU cores."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("stinfer_demo"),
        help="output folder (default: ./stinfer_demo); must be new or empty unless --overwrite",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's outputs"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the synthetic tissue"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=DEMO_EPOCHS, help=f"training epochs ({DEMO_EPOCHS})"
    )
    parser.add_argument(
        "--spots",
        type=int_at_least(50),
        default=1000,
        help="approximate spots per synthetic section (1000)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


DEMO_MANIFEST = "stinfer_demo.json"  # marks a folder as a demo's output


def check_demo_folder(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` the demo may not write: a non-empty folder without
    :data:`DEMO_MANIFEST` (not an earlier demo: with or without ``--overwrite``), or an earlier
    demo without ``--overwrite``. The demo's files are replaced one by one (``run/`` whole);
    other files in the folder are never touched."""
    from stinfer.io.atomic import check_replaceable_folder, visible_entries
    from stinfer.models.persistence import check_model_destination

    is_own = (out / DEMO_MANIFEST).is_file()
    # the demo deletes nothing, so a user's file beside its outputs does not block --overwrite
    check_replaceable_folder(out, overwrite, is_own, visible_entries(out), "demo output")
    check_model_destination(out / "run", overwrite)


def metrics_table(rows: list[dict]) -> str:
    """Fixed-width text table of metric rows (``model``, ``slide`` and METRIC_COLUMNS)."""
    header = f"{'model':<12}{'slide':<22}" + "".join(f"{c:>22}" for c in METRIC_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = "".join(f"{row[c]:>22.3f}" for c in METRIC_COLUMNS)
        lines.append(f"{row['model']:<12}{row['slide']:<22}{values}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    import numpy as np
    import pandas as pd

    from stinfer.data.patches import PatchSpec, spot_patches
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
    from stinfer.io.atomic import write_h5ad, write_text
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.metrics import evaluate_anndata
    from stinfer.models.baselines import MeanExpression
    from stinfer.models.stevs import STEvs, fast_preset
    from stinfer.plot import plot_latent_umap, plot_slide_overview, plot_spatial_maps, save_figure

    check_demo_folder(args.out, args.overwrite)
    out: Path = checked_output_folder(args.out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"tool": "stinfer demo"}) + "\n", out / DEMO_MANIFEST, overwrite=True)
    patch_cache = out / "patch_cache"

    print(f"[1/5] generating synthetic sections into {out}/images")
    slides = make_synthetic_sections(
        out / "images", SyntheticConfig(seed=args.seed, target_spots=args.spots), overwrite=True
    )
    print(f"[2/5] preparing {len(slides)} slides (validated .h5ad + cached 160-px patches)")
    for slide in slides:
        sample_id = slide.uns["stinfer"]["sample_id"]
        patches = spot_patches(slide, PatchSpec(), cache_dir=patch_cache)
        write_h5ad(prepare_for_h5ad(slide), out / f"{sample_id}.h5ad", overwrite=args.overwrite)
        print(
            f"      {sample_id}: {slide.n_obs} spots x {slide.n_vars} genes, patches {patches.shape}"
        )
    train, tests = slides[0], slides[1:]
    genes = list(train.var_names)
    names = [s.uns["stinfer"]["sample_id"] for s in slides]

    print(f"[3/5] training STEvs (fast preset, {args.epochs} epochs) on {names[0]}")
    config = fast_preset()
    config.training.patch_cache_dir = str(patch_cache)
    config.trainer = dataclasses.replace(
        config.trainer, max_epochs=args.epochs, progress_bar=not args.no_progress
    )
    model = STEvs([train], genes, config)
    result = model.train()
    model.save(out / "run", overwrite=args.overwrite)
    baseline = MeanExpression([train], genes)
    baseline.train()
    print(f"      trained in {result.train_seconds:.1f} s; model saved to {out / 'run'}")

    print(f"[4/5] predicting {', '.join(names[1:])}")
    rows, predictions = [], {}
    for slide, name in zip(tests, names[1:], strict=True):
        predictions[name] = model.predict(slide)
        for model_name, prediction in (
            ("STEvs", predictions[name]),
            ("mean", baseline.predict(slide)),
        ):
            summary = evaluate_anndata(prediction, slide).summary()
            rows.append({"model": model_name, "slide": name, **summary})
    table = metrics_table(rows)
    print(table)
    write_text(pd.DataFrame(rows).to_csv(index=False), out / "metrics.csv", args.overwrite)

    print("[5/5] drawing figures")
    programs = train.var["program"].astype(str)
    shown = [
        str(train.var_names[programs.str.startswith(kind)][0])
        for kind in ("domain", "gradient", "texture")
        if programs.str.startswith(kind).any()
    ][:3]
    test, test_name = tests[0], names[1]
    save_figure(plot_slide_overview(train, shown[0]), out / "overview.png", args.overwrite)
    # the per-gene PCC of the titles, by the metric path of the table above
    shown_pcc = evaluate_anndata(predictions[test_name][:, shown], test[:, shown]).per_gene["pcc"]
    save_figure(
        plot_spatial_maps(test, {"STEvs": predictions[test_name]}, shown, {"STEvs": shown_pcc}),
        out / "spatial_maps.png",
        args.overwrite,
    )
    latents = [model.get_latent(slide) for slide in slides]
    labels = {
        "slice": np.concatenate([[n] * s.n_obs for n, s in zip(names, slides, strict=True)]),
        "domain": np.concatenate([s.obs["domain"].astype(str).to_numpy() for s in slides]),
    }
    umap_figure = plot_latent_umap(np.concatenate(latents), labels, seed=args.seed)
    umap_figure.suptitle(f"STEvs fused latent (posterior mean), trained on {names[0]}", fontsize=10)
    save_figure(umap_figure, out / "latent_umap.png", args.overwrite)
    for name in ("overview.png", "spatial_maps.png", "latent_umap.png", "metrics.csv"):
        print(f"wrote {out / name}")
