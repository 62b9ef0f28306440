"""Figures a paper could use: slide overviews, spatial maps, latent UMAPs, benchmark bars.

Every function draws on matplotlib axes it creates or is given and returns the figure; saving
goes through :func:`save_figure` (atomic, refuses to overwrite). Spots are drawn over a
thumbnail of the H&E image read at a coarse pyramid level, never the whole slide at full
resolution when a coarser level exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stinfer.io.atomic import atomic_output
from stinfer.io.slide_data import slide_id, slide_meta
from stinfer.io.slide_image import open_slide


def slide_thumbnail(slide: ad.AnnData, max_size_px: int = 1024) -> tuple[np.ndarray, float] | None:
    """A thumbnail of the slide's image and its scale (thumbnail px per full-resolution px).

    Reads the coarsest pyramid level that is still at least ``max_size_px`` on its long side,
    then subsamples by striding. Returns ``None`` for a counts-only slide.
    """
    meta = slide_meta(slide)
    if meta["image_path"] is None:
        return None
    with open_slide(meta["image_path"]) as image:
        width, height = image.dimensions
        wanted = max(width, height) / max_size_px
        level = image.level_for_downsample(max(wanted, 1.0))
        downsample = image.level_downsamples[level]
        level_w, level_h = (int(np.ceil(width / downsample)), int(np.ceil(height / downsample)))
        pixels = image.read_level_region(0, 0, level_w, level_h, level=level)
    stride = max(1, int(np.floor(max(level_w, level_h) / max_size_px)))
    thumbnail = pixels[::stride, ::stride]
    return thumbnail, meta["image_scale"] / (downsample * stride)


def spot_scatter(
    ax: plt.Axes,
    slide: ad.AnnData,
    values: np.ndarray,
    title: str,
    categorical: bool = False,
    cmap: str = "viridis",
    thumbnail: tuple[np.ndarray, float] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Spots of ``slide`` coloured by ``values``, over its thumbnail when one is given."""
    scale = 1.0
    if thumbnail is not None:
        pixels, scale = thumbnail
        ax.imshow(pixels)
    xy = slide.obsm["spatial"] * scale
    if categorical:
        categories, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
        colours = plt.get_cmap("tab10")(codes % 10)
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=8, linewidths=0)
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=plt.get_cmap("tab10")(k % 10), label=c)
            for k, c in enumerate(categories)
        ]
        ax.legend(handles=handles, fontsize=6, loc="upper right", frameon=False)
    else:
        points = ax.scatter(
            xy[:, 0], xy[:, 1], c=values, s=8, cmap=cmap, linewidths=0, vmin=vmin, vmax=vmax
        )
        plt.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
    if thumbnail is None:
        ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_slide_overview(
    slide: ad.AnnData, gene: str, domain_key: str | None = "domain"
) -> matplotlib.figure.Figure:
    """Three panels: the H&E image, spots coloured by domain, and one gene's counts."""
    thumbnail = slide_thumbnail(slide)
    sample = slide_id(slide)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    if thumbnail is not None:
        axes[0].imshow(thumbnail[0])
    axes[0].set_title(f"{sample}: H&E", fontsize=9)
    axes[0].set_axis_off()
    if domain_key and domain_key in slide.obs:
        spot_scatter(
            axes[1], slide, slide.obs[domain_key].to_numpy(), "domain", True, thumbnail=thumbnail
        )
    else:
        axes[1].set_axis_off()
    counts = (
        np.asarray(slide[:, gene].X.todense()).ravel()
        if hasattr(slide.X, "todense")
        else slide[:, gene].X.ravel()
    )
    spot_scatter(axes[2], slide, counts, f"{gene} counts", thumbnail=thumbnail)
    fig.tight_layout()
    return fig


def plot_spatial_maps(
    truth: ad.AnnData,
    predictions: dict[str, ad.AnnData],
    genes: Sequence[str],
) -> matplotlib.figure.Figure:
    """True vs predicted spatial maps (STEvs Fig. 3): one row per gene, one column per model.

    Values are log1p counts; each row shares its colour scale with the truth.
    """
    columns = ["truth", *predictions]
    fig, axes = plt.subplots(
        len(genes), len(columns), figsize=(3.2 * len(columns), 3 * len(genes)), squeeze=False
    )
    for row, gene in enumerate(genes):
        true_values = np.log1p(_gene_values(truth, gene))
        vmax = float(np.quantile(true_values, 0.99)) or None
        for col, name in enumerate(columns):
            source = truth if name == "truth" else predictions[name][truth.obs_names]
            values = np.log1p(_gene_values(source, gene))
            spot_scatter(
                axes[row, col],
                truth,
                values,
                f"{gene}: {name}",
                vmin=0,
                vmax=vmax if name == "truth" else None,
            )
    fig.tight_layout()
    return fig


def plot_latent_umap(
    latent: np.ndarray, groups: dict[str, np.ndarray], seed: int = 0
) -> matplotlib.figure.Figure:
    """UMAP of latent vectors coloured by each grouping (STEvs Fig. 4: by slice, by domain)."""
    import umap

    embedding = umap.UMAP(random_state=seed, n_neighbors=15).fit_transform(latent)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (name, labels) in zip(axes[0], groups.items(), strict=True):
        categories, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        cmap = plt.get_cmap("tab10")
        for k, category in enumerate(categories):
            mask = codes == k
            ax.scatter(
                embedding[mask, 0], embedding[mask, 1], s=4, color=cmap(k % 10), label=category
            )
        ax.legend(fontsize=6, markerscale=2, frameon=False)
        ax.set_title(f"latent UMAP by {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def _gene_values(adata: ad.AnnData, gene: str) -> np.ndarray:
    column = adata[:, gene].X
    return np.asarray(
        column.todense() if hasattr(column, "todense") else column, dtype=float
    ).ravel()


def save_figure(
    fig: matplotlib.figure.Figure, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """Save ``fig`` atomically (PNG/PDF/SVG by suffix) at 150 dpi and close it."""
    with atomic_output(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- benchmark figures
def plot_metric_bars(
    summary, metrics: Sequence[str], labels: dict[str, str] | None = None
) -> matplotlib.figure.Figure:
    """Bars with error bars (mean +/- sd over runs) per metric: one panel per metric.

    ``summary`` is a table with columns ``model``, ``protocol`` and ``<metric>_mean``,
    ``<metric>_sd`` (as :func:`stinfer.evaluate.protocols.aggregate` returns); bars are grouped
    by protocol, one colour per model.
    """
    labels = labels or {}
    metrics = [m for m in metrics if f"{m}_mean" in summary.columns]
    models = list(dict.fromkeys(summary["model"]))
    protocols = list(dict.fromkeys(summary["protocol"]))
    width = 0.8 / max(1, len(models))
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(max(3.5, 0.35 * len(models) * len(protocols) + 1.5) * len(metrics) / 1.6, 3.6),
        squeeze=False,
    )
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, model in enumerate(models):
            rows = summary[summary["model"] == model].set_index("protocol").reindex(protocols)
            positions = np.arange(len(protocols)) + (k - (len(models) - 1) / 2) * width
            ax.bar(
                positions,
                rows[f"{metric}_mean"].to_numpy(dtype=float),
                width,
                yerr=np.nan_to_num(rows[f"{metric}_sd"].to_numpy(dtype=float)),
                color=cmap(k % 20),
                label=model,
                capsize=2,
                error_kw={"linewidth": 0.8},
            )
        ax.set_xticks(np.arange(len(protocols)))
        ax.set_xticklabels([p.replace("_", "-") for p in protocols], fontsize=8)
        ax.set_title(labels.get(metric, metric), fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.tick_params(axis="y", labelsize=7)
    axes[0, -1].legend(fontsize=6, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_blue_shift_curves(sweep, metric: str = "pcc_median") -> matplotlib.figure.Figure:
    """``metric`` against the blue-shift intensity alpha (STEvs Fig. J.1), one line per model.

    ``sweep`` holds rows of :func:`stinfer.evaluate.robustness.blue_shift_sweep` (columns
    ``model``, ``alpha``, ``metric``), possibly over several test slides and runs: the line is
    their mean and the band +/- one sd.
    """
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    cmap = plt.get_cmap("tab10")
    for k, (model, rows) in enumerate(sweep.groupby("model", sort=False)):
        stats = rows.groupby("alpha")[metric].agg(["mean", "std"]).sort_index()
        alphas = stats.index.to_numpy(dtype=float)
        mean = stats["mean"].to_numpy(dtype=float)
        sd = np.nan_to_num(stats["std"].to_numpy(dtype=float))
        ax.plot(alphas, mean, marker="o", markersize=3, color=cmap(k % 10), label=model)
        ax.fill_between(alphas, mean - sd, mean + sd, color=cmap(k % 10), alpha=0.15, linewidth=0)
    ax.set_xlabel("blue-shift intensity alpha (Eq. 40)", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, frameon=False)
    ax.set_title("robustness to a spectral blue shift of the test images", fontsize=9)
    fig.tight_layout()
    return fig
