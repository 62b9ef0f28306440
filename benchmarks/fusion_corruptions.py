"""Does the STEvs fusion stop trusting an image that is not tissue? Corrupted patches, synthetic.

Trains STEvs ``fast`` on one synthetic section (known answer: :mod:`stinfer.data.synthetic`)
and predicts the two serial sections with their own patches and with corrupted ones: uniform
noise, a blank grey patch, inverted colours, red and blue swapped, and a 4x box blur. For each
(test section, patches) it records the mean image-expert weight of the fused prediction
(``obs["stevs_image_expert_weight"]``), the median PCC (raw counts) of the fused, image-only and
spatial-only predictions, the mean posterior variance of the image-only prediction's latent
(``obsm["stevs_posterior_var"]``: how uncertain an H&E-only prediction says it is), and the
fused PCC and image weight of the same experts under the
paper's plain product (the distance-aware fusion switched off, ``distance_fitted = False``).
What a user should see: the image weight falls, fused stays near spatial-only and the
image-only posterior widens when the image is not tissue, while the real patches keep their
weight.

Example (alone on the machine, ~3 min per seed with 2 threads)::

    python benchmarks/fusion_corruptions.py --seeds 0 1 2 --threads 2 \\
        --out docs/results/fusion_corruptions.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stinfer.data.patches import spot_patches
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.io.atomic import check_writable, write_text
from stinfer.metrics import evaluate_anndata
from stinfer.models.stevs import STEvs, fast_preset


def corruptions(rng: np.random.Generator) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> function of ``(N, 3, H, W)`` uint8 patches (H, W multiples of 4)."""

    def blur(patches: np.ndarray) -> np.ndarray:
        n, c, h, w = patches.shape
        pooled = patches.reshape(n, c, h // 4, 4, w // 4, 4).mean((3, 5))
        return pooled.repeat(4, axis=2).repeat(4, axis=3).astype(np.uint8)

    return {
        "real": lambda patches: patches,
        "uniform noise": lambda patches: rng.integers(0, 256, patches.shape, dtype=np.uint8),
        "blank grey": lambda patches: np.full_like(patches, 128),
        "inverted colours": lambda patches: 255 - patches,
        "red/blue swapped": lambda patches: np.ascontiguousarray(patches[:, ::-1]),
        "4x blur": blur,
    }


@contextlib.contextmanager
def plain_product(model: STEvs) -> Iterator[None]:
    """The same experts fused by the paper's plain product (distance-aware fusion off)."""
    fusion = model.module.fusion
    fitted = bool(fusion.distance_fitted)
    fusion.distance_fitted.fill_(False)
    try:
        yield
    finally:
        fusion.distance_fitted.fill_(fitted)


def run_seed(seed: int, spots: int, genes: int, data_dir: Path) -> list[dict]:
    """Train on section 1 of a seed's synthetic cohort; every corruption of sections 2 and 3."""
    sections = make_synthetic_sections(
        data_dir / f"seed{seed}",
        SyntheticConfig(seed=seed, target_spots=spots, n_genes=genes),
        overwrite=True,
    )
    config = fast_preset()
    config.trainer = dataclasses.replace(config.trainer, progress_bar=False, seed=seed)
    model = STEvs([sections[0]], list(sections[0].var_names), config)
    model.train()
    rng = np.random.default_rng(seed)
    rows = []
    for section in sections[1:]:
        real = spot_patches(section, config.training.patch)
        spatial = evaluate_anndata(model.predict(section, mode="spatial"), section).pcc_median
        for name, corrupt in corruptions(rng).items():
            patches = corrupt(real)
            fused = model.predict(section, patches=patches)
            image = model.predict(section, mode="image", patches=patches)
            with plain_product(model):
                plain = model.predict(section, patches=patches)
            rows.append(
                {
                    "seed": seed,
                    "test": section.obs["sample_id"].iloc[0],
                    "patches": name,
                    "image_weight": float(fused.obs["stevs_image_expert_weight"].mean()),
                    "fused": evaluate_anndata(fused, section).pcc_median,
                    "image_only": evaluate_anndata(image, section).pcc_median,
                    "image_only_latent_var": float(image.obsm["stevs_posterior_var"].mean()),
                    "spatial_only": spatial,
                    "plain_image_weight": float(plain.obs["stevs_image_expert_weight"].mean()),
                    "plain_fused": evaluate_anndata(plain, section).pcc_median,
                }
            )
    return rows


def summary_text(frame: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    """Markdown: the mean over test sections and seeds per kind of patch."""
    order = list(dict.fromkeys(frame["patches"]))
    columns = [
        "image_weight",
        "fused",
        "image_only",
        "image_only_latent_var",
        "spatial_only",
        "plain_image_weight",
        "plain_fused",
    ]
    table = frame.groupby("patches")[columns].mean().reindex(order)
    lines = [
        "| patches | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in table.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    load = os.getloadavg()
    return (
        "# STEvs `fast` fusion on corrupted patches (synthetic serial sections)\n\n"
        f"`python benchmarks/fusion_corruptions.py --seeds {' '.join(map(str, args.seeds))} "
        f"--threads {args.threads}` ({args.spots} spots, {args.genes} genes; trained on "
        "section 1, tested on sections 2 and 3; mean over test sections and seeds; median "
        f"PCC of raw counts; {seconds:.0f} s, load average {load[0]:.1f} at the end). "
        "`plain_*`: the same experts under the paper's plain product.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--spots", type=int, default=600, help="spots per synthetic section")
    parser.add_argument("--genes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="summary .md (and .csv beside)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    check_writable(args.out, args.overwrite)
    csv_path = check_writable(args.out.with_suffix(".csv"), args.overwrite)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="stinfer_corruptions_") as data_dir:
        for seed in args.seeds:
            rows.extend(run_seed(seed, args.spots, args.genes, Path(data_dir)))
    frame = pd.DataFrame(rows)
    write_text(frame.to_csv(index=False), csv_path, args.overwrite)
    text = summary_text(frame, args, time.perf_counter() - start)
    write_text(text, args.out, args.overwrite)
    print(text)


if __name__ == "__main__":
    main()
