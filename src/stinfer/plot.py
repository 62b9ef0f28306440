"""Figures a paper could use: slide overviews, spatial maps, latent UMAPs, benchmark bars.

Every function draws on matplotlib axes it creates or is given and returns the figure; saving
goes through :func:`save_figure` (atomic, refuses to overwrite). Spots are drawn over a
thumbnail of the H&E image read at a coarse pyramid level, never the whole slide at full
resolution when a coarser level exists, as discs of the slide's spot diameter (the
``spot_diameter_fullres`` that scanpy's ``uns["spatial"]`` holds), so they keep their true
size at any figure size.

Conventions of the spatial panels, so that figures can go into a paper as they are:

- every colourbar names its values and their unit (``COUNTS_LABEL``, ``LOG1P_LABEL``);
- count panels end their colour scale at the 99th percentile (:func:`robust_limit`), so one
  spot of 500 counts cannot darken the rest; the colourbar's arrow marks the clipped spots;
- the true and predicted maps of one gene share one colour scale (one colourbar per gene);
- titles name the gene, the slide and, for a prediction, the model and its per-gene PCC;
- a scale bar in microns (or millimetres) when the slide's pixel size is known
  (``uns["stinfer"]["pixel_size_um"]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.font_manager import FontProperties
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from stinfer.io.atomic import atomic_output
from stinfer.io.scanpy_spatial import image_thumbnail, spot_diameter_fullres
from stinfer.io.slide_data import slide_id, slide_meta

COUNTS_LABEL = "counts"
"""Colourbar label of measured raw counts."""

LOG1P_LABEL = "log1p(counts)\nmeasured | predicted mean"
"""Colourbar label of a spatial-map row: log1p of the measured counts and of the predicted
mean counts, on one scale."""

ROBUST_QUANTILE = 0.99
"""Quantile of the spot values where a count panel's colour scale ends (:func:`robust_limit`)."""

SCALE_BAR_GID = "scale_bar"
"""``gid`` of the scale-bar artist :func:`add_scale_bar` adds (how tests and users find it)."""

TITLE_SIZE = 9
LABEL_SIZE = 8
TICK_SIZE = 7


def slide_thumbnail(slide: ad.AnnData, max_size_px: int = 1024) -> tuple[np.ndarray, float] | None:
    """A thumbnail of the slide's image and its scale (thumbnail px per full-resolution px).

    :func:`stinfer.io.scanpy_spatial.image_thumbnail`: the coarsest pyramid level that is
    still at least ``max_size_px`` on its long side, subsampled by striding to at most
    ``max_size_px``. Returns ``None`` for a counts-only slide.
    """
    meta = slide_meta(slide)
    if meta["image_path"] is None:
        return None
    return image_thumbnail(meta["image_path"], meta["image_scale"], max_size_px)


def robust_limit(values: np.ndarray, quantile: float = ROBUST_QUANTILE) -> float:
    """Upper end of a colour scale that a few outlying spots cannot set.

    The ``quantile`` of the finite values; their maximum when that quantile is 0 (a gene
    detected in under 1% of spots), and 1.0 when every value is 0, so the scale never
    collapses.
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 1.0
    limit = float(np.quantile(finite, quantile))
    if limit <= 0:
        limit = float(finite.max())
    return limit if limit > 0 else 1.0


def category_colours(n_categories: int) -> np.ndarray:
    """``(n_categories, 4)`` RGBA colours, distinct as far as the palettes go.

    ``tab10`` up to 10 categories, ``tab20`` up to 20, then evenly spaced ``turbo`` colours.
    """
    if n_categories <= 10:
        return plt.get_cmap("tab10")(np.arange(n_categories))
    if n_categories <= 20:
        return plt.get_cmap("tab20")(np.arange(n_categories))
    return plt.get_cmap("turbo")(np.linspace(0.05, 0.95, n_categories))


def nice_length(upper: float) -> float:
    """The largest 1, 2 or 5 x 10^k that is not above ``upper`` (> 0): a scale-bar length."""
    base = 10.0 ** np.floor(np.log10(upper))
    return next(float(m * base) for m in (5, 2, 1) if m * base <= upper)


def add_scale_bar(ax: plt.Axes, um_per_unit: float, fraction: float = 0.2) -> AnchoredSizeBar:
    """A scale bar in the lower left corner of ``ax``, about ``fraction`` of its width long.

    ``um_per_unit`` is microns per data unit of ``ax`` (e.g. ``pixel_size_um / scale`` over a
    thumbnail); call it after the axis limits are set. The length is a round number
    (:func:`nice_length`) labelled in µm, or mm from 1,000 µm.
    """
    left, right = ax.get_xlim()
    bottom, top = ax.get_ylim()
    width_units = abs(right - left)
    length_um = nice_length(width_units * um_per_unit * fraction)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        length_um / um_per_unit,
        label,
        loc="lower left",
        pad=0.3,
        borderpad=0.4,
        sep=2,
        frameon=True,
        size_vertical=abs(top - bottom) * 0.012,
        color="black",
        fontproperties=FontProperties(size=TICK_SIZE),
    )
    bar.patch.set(facecolor="white", alpha=0.75, edgecolor="none")
    bar.set_gid(SCALE_BAR_GID)
    ax.add_artist(bar)
    return bar


def _slide_frame(
    ax: plt.Axes, slide: ad.AnnData, thumbnail: tuple[np.ndarray, float] | None
) -> tuple[np.ndarray, float, float]:
    """Draw the thumbnail (if any) and frame ``ax`` on the spots, image-style (y down).

    Returns the spot centres and the spot diameter in ``ax`` data units, and microns per data
    unit (NaN when the pixel size is unknown).
    """
    scale = 1.0
    if thumbnail is not None:
        pixels, scale = thumbnail
        ax.imshow(pixels)
    xy_px = np.asarray(slide.obsm["spatial"], dtype=float)
    meta = slide_meta(slide)
    diameter = spot_diameter_fullres(meta["spot_diameter_px"], xy_px)[0] * scale
    xy = xy_px * scale
    low, high = xy.min(axis=0), xy.max(axis=0)
    margin = diameter + 0.03 * float((high - low).max())
    ax.set_xlim(low[0] - margin, high[0] + margin)
    ax.set_ylim(high[1] + margin, low[1] - margin)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    pixel_size_um = meta["pixel_size_um"]
    um_per_unit = float("nan") if pixel_size_um is None else float(pixel_size_um) / scale
    return xy, diameter, um_per_unit


def _spot_discs(ax: plt.Axes, xy: np.ndarray, diameter: float, **style) -> EllipseCollection:
    """Spots as discs of ``diameter`` data units centred at ``xy`` (one collection, fast)."""
    sizes = np.full(len(xy), diameter)
    discs = EllipseCollection(
        sizes,
        sizes,
        np.zeros(len(xy)),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        linewidths=0,
        **style,
    )
    ax.add_collection(discs, autolim=False)
    return discs


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
    colorbar_label: str | None = None,
    scale_bar: bool = True,
) -> EllipseCollection:
    """Spots of ``slide`` coloured by ``values``, over its thumbnail when one is given.

    Continuous ``values`` use ``cmap`` between ``vmin`` and ``vmax`` (default: their minimum
    and maximum); with ``colorbar_label`` a colourbar so labelled is drawn beside ``ax`` (an
    arrow at its top when values exceed ``vmax``). Categorical ``values`` get ``tab10``
    colours and a legend to the right of ``ax``. A scale bar is added when ``scale_bar`` and
    the slide's pixel size is known. Returns the spots' collection (its ``norm`` holds the
    colour scale).
    """
    xy, diameter, um_per_unit = _slide_frame(ax, slide, thumbnail)
    values = np.asarray(values)
    if categorical:
        categories, codes = np.unique(values.astype(str), return_inverse=True)
        colours = category_colours(len(categories))
        discs = _spot_discs(ax, xy, diameter, facecolors=colours[codes])
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=colours[k], label=category)
            for k, category in enumerate(categories)
        ]
        ax.legend(
            handles=handles,
            fontsize=TICK_SIZE,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            handletextpad=0.2,
        )
    else:
        values = values.astype(float)
        discs = _spot_discs(ax, xy, diameter, cmap=cmap)
        discs.set_array(values)
        discs.set_clim(
            np.nanmin(values) if vmin is None else vmin,
            np.nanmax(values) if vmax is None else vmax,
        )
        if colorbar_label is not None:
            extend = "max" if np.nanmax(values) > discs.norm.vmax else "neither"
            _colorbar(ax.figure, discs, ax, colorbar_label, extend)
    if scale_bar and np.isfinite(um_per_unit):
        add_scale_bar(ax, um_per_unit)
    ax.set_title(title, fontsize=TITLE_SIZE)
    return discs


def _colorbar(fig, mappable, ax, label: str, extend: str = "neither"):
    colorbar = fig.colorbar(mappable, ax=ax, shrink=0.8, pad=0.02, aspect=18, extend=extend)
    colorbar.set_label(label, fontsize=LABEL_SIZE)
    colorbar.ax.tick_params(labelsize=TICK_SIZE)
    return colorbar


def plot_slide_overview(
    slide: ad.AnnData, gene: str, domain_key: str | None = "domain"
) -> matplotlib.figure.Figure:
    """Three panels: the H&E image, spots coloured by domain, and one gene's counts.

    The counts' colour scale ends at their 99th percentile (:func:`robust_limit`).
    """
    thumbnail = slide_thumbnail(slide)
    sample = slide_id(slide)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    _, _, um_per_unit = _slide_frame(axes[0], slide, thumbnail)
    if thumbnail is None:
        axes[0].text(0.5, 0.5, "no image", ha="center", va="center", transform=axes[0].transAxes)
    elif np.isfinite(um_per_unit):
        add_scale_bar(axes[0], um_per_unit)
    axes[0].set_title(f"H&E · {sample}", fontsize=TITLE_SIZE)
    if domain_key and domain_key in slide.obs:
        spot_scatter(
            axes[1],
            slide,
            slide.obs[domain_key].to_numpy(),
            f"{domain_key} · {sample}",
            True,
            thumbnail=thumbnail,
            scale_bar=False,
        )
    else:
        axes[1].set_axis_off()
    counts = _gene_values(slide, gene)
    spot_scatter(
        axes[2],
        slide,
        counts,
        f"{gene} · {sample}",
        thumbnail=thumbnail,
        vmin=0,
        vmax=robust_limit(counts),
        colorbar_label=COUNTS_LABEL,
        scale_bar=False,
    )
    return fig


def plot_spatial_maps(
    truth: ad.AnnData,
    predictions: dict[str, ad.AnnData],
    genes: Sequence[str],
    gene_pcc: Mapping[str, Mapping[str, float]] | None = None,
    max_columns: int = 5,
) -> matplotlib.figure.Figure:
    """True vs predicted spatial maps (STEvs Fig. 3): per gene, the measured map then each model's.

    Values are log1p of the measured counts (first panel) and of each model's predicted mean
    counts, drawn on the spots of ``truth`` without the H&E image (the colours alone carry the
    comparison). Each gene has one colour scale, shared by the measured and every predicted
    map and shown by one colourbar spanning all of the gene's panels: from the 1st to the 99th
    percentile of the measured values (:func:`robust_limit`; from 0 when those meet), so every
    model is judged on the measurement's scale, a highly expressed gene keeps its contrast, and
    values outside are clipped (the colourbar's arrows).

    A gene's panels (measured + one per model) fill rows of at most ``max_columns`` panels, so
    a benchmark of many models wraps onto several consecutive rows instead of one very wide
    row; the measured map is always the first panel of the gene's first row, and the unused
    panels of the gene's last row are hidden. The figure is ``min(1 + len(predictions),
    max_columns)`` panels wide (3 inches each, plus the colourbar).

    Parameters
    ----------
    truth
        The test slide (raw counts in ``X``).
    predictions
        Model name -> predicted AnnData holding ``truth``'s spots (``obs_names``).
    genes
        Genes to draw, one block of rows each.
    gene_pcc
        Model name -> gene -> per-gene Pearson correlation, shown in the titles (e.g.
        ``evaluate_anndata(prediction, truth).per_gene["pcc"]`` or
        :func:`stinfer.metrics.per_gene_pearson`); titles go without it when it is missing.
    max_columns
        Most panels per row (at least 1).

    Raises
    ------
    ValueError
        When ``max_columns`` is below 1.
    """
    if max_columns < 1:
        raise ValueError(f"plot_spatial_maps: max_columns must be at least 1, got {max_columns}")
    gene_pcc = gene_pcc or {}
    sample = slide_id(truth)
    columns = ["truth", *predictions]
    panels_per_row = min(len(columns), max_columns)
    rows_per_gene = -(-len(columns) // panels_per_row)
    fig, axes = plt.subplots(
        len(genes) * rows_per_gene,
        panels_per_row,
        figsize=(3.0 * panels_per_row + 0.9, 3.0 * len(genes) * rows_per_gene),
        squeeze=False,
        layout="constrained",
    )
    for gene_index, gene in enumerate(genes):
        gene_axes = axes[gene_index * rows_per_gene : (gene_index + 1) * rows_per_gene].ravel()
        true_values = np.log1p(_gene_values(truth, gene))
        vmax = robust_limit(true_values)
        vmin = float(np.quantile(true_values, 1 - ROBUST_QUANTILE))
        vmin = vmin if vmin < vmax else 0.0
        below = above = False
        for panel, (ax, name) in enumerate(zip(gene_axes[: len(columns)], columns, strict=True)):
            if panel == 0:
                values, title = true_values, f"{gene} · {sample}\nmeasured"
            else:
                values = np.log1p(_gene_values(predictions[name][truth.obs_names], gene))
                pcc = _lookup(gene_pcc.get(name), gene)
                title = f"{gene} · {sample}\n{name}" + (
                    f" · PCC {pcc:.2f}" if pcc is not None else ""
                )
            discs = spot_scatter(
                ax,
                truth,
                values,
                title,
                vmin=vmin,
                vmax=vmax,
                scale_bar=panel == 0,
            )
            below |= bool(np.nanmin(values) < vmin)
            above |= bool(np.nanmax(values) > vmax)
        for unused in gene_axes[len(columns) :]:
            unused.set_visible(False)
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}
        _colorbar(
            fig,
            discs,
            gene_axes[: len(columns)],
            LOG1P_LABEL,
            extend.get((below, above), "both"),
        )
    return fig


def plot_uncertainty_maps(
    truth: ad.AnnData,
    prediction: ad.AnnData,
    genes: Sequence[str],
    gene_pcc: Mapping[str, float] | None = None,
    model: str = "STEvs",
) -> matplotlib.figure.Figure:
    """Truth, prediction, predictive sd and absolute error per gene, side by side.

    One row per gene: the measured counts, the predictive mean (``layers["predictive_mean"]``)
    on the measured counts' colour scale (0 to the 99th percentile of both, :func:`robust_limit`),
    then the predictive sd (``layers["predictive_sd"]``) and ``|measured - mean|`` on one
    shared scale, so a spot where the model says it is unsure can be checked against where it
    is wrong. Counts throughout; titles name the gene, the slide and the per-gene PCC.
    """
    gene_pcc = gene_pcc or {}
    sample = slide_id(truth)
    matched = prediction[truth.obs_names]
    fig, axes = plt.subplots(
        len(genes), 4, figsize=(12.9, 3.0 * len(genes)), squeeze=False, layout="constrained"
    )
    for row, gene in enumerate(genes):
        measured = _gene_values(truth, gene)
        column = list(matched.var_names).index(gene)
        mean = np.asarray(matched.layers["predictive_mean"][:, column], dtype=float).ravel()
        sd = np.asarray(matched.layers["predictive_sd"][:, column], dtype=float).ravel()
        error = np.abs(measured - mean)
        count_max = max(robust_limit(measured), robust_limit(mean), 1e-6)
        spread_max = max(robust_limit(sd), robust_limit(error), 1e-6)
        pcc = _lookup(gene_pcc, gene)
        panels = [
            (measured, "measured", count_max, "viridis"),
            (
                mean,
                f"{model} predictive mean" + (f" · PCC {pcc:.2f}" if pcc else ""),
                count_max,
                "viridis",
            ),
            (sd, "predictive sd", spread_max, "magma"),
            (error, "|measured - mean|", spread_max, "magma"),
        ]
        for col, (values, what, vmax, cmap) in enumerate(panels):
            discs = spot_scatter(
                axes[row, col],
                truth,
                values,
                f"{gene} · {sample}\n{what}",
                cmap=cmap,
                vmin=0.0,
                vmax=vmax,
                scale_bar=col == 0,
            )
            if col in (1, 3):
                both = panels[col - 1][0], values
                extend = "max" if max(float(np.nanmax(v)) for v in both) > vmax else "neither"
                label = COUNTS_LABEL if col == 1 else "counts (sd | error)"
                _colorbar(fig, discs, axes[row, col - 1 : col + 1], label, extend)
    return fig


def _lookup(table: Mapping[str, float] | None, gene: str) -> float | None:
    if table is None or gene not in table:
        return None
    value = float(table[gene])
    return value if np.isfinite(value) else None


def plot_latent_umap(
    latent: np.ndarray, groups: dict[str, np.ndarray], seed: int = 0
) -> matplotlib.figure.Figure:
    """UMAP of latent vectors coloured by each grouping (STEvs Fig. 4: by slice, by domain).

    One panel per grouping, its legend to the right of the panel; the spots are drawn in one
    random order (``seed``), so no group hides another by being drawn last.
    """
    import umap

    embedding = umap.UMAP(random_state=seed, n_neighbors=15).fit_transform(latent)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False, layout="constrained"
    )
    point_size = float(np.clip(2e4 / max(len(embedding), 1), 2.0, 20.0))  # fewer spots, bigger
    # one random drawing order for all groups, so the last group drawn hides none of the others
    order = np.random.default_rng(seed).permutation(len(embedding))
    for ax, (name, labels) in zip(axes[0], groups.items(), strict=True):
        categories, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        colours = category_colours(len(categories))
        ax.scatter(
            embedding[order, 0],
            embedding[order, 1],
            s=point_size,
            color=colours[codes[order]],
            linewidths=0,
            rasterized=True,
        )
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=colours[k], label=category)
            for k, category in enumerate(categories)
        ]
        ax.legend(
            handles=handles,
            fontsize=TICK_SIZE,
            frameon=False,
            ncols=1 if len(categories) <= 16 else 2,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            title=name,
            title_fontsize=LABEL_SIZE,
        )
        ax.set_title(f"latent UMAP by {name}", fontsize=TITLE_SIZE)
        ax.set_xlabel("UMAP 1", fontsize=LABEL_SIZE)
        ax.set_ylabel("UMAP 2", fontsize=LABEL_SIZE)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _gene_values(adata: ad.AnnData, gene: str) -> np.ndarray:
    column = adata[:, gene].X
    return np.asarray(
        column.todense() if hasattr(column, "todense") else column, dtype=float
    ).ravel()


def save_figure(
    fig: matplotlib.figure.Figure, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """Save ``fig`` atomically (PNG/PDF/SVG by suffix) at 200 dpi and close it."""
    with atomic_output(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=200, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- benchmark figures
def plot_metric_bars(
    summary, metrics: Sequence[str], labels: dict[str, str] | None = None
) -> matplotlib.figure.Figure:
    """Bars with error bars (mean +/- sd over runs) per metric: one panel per metric.

    ``summary`` is a table with columns ``model``, ``protocol`` and ``<metric>_mean``,
    ``<metric>_sd`` (as :func:`stinfer.evaluate.protocols.aggregate` returns); bars are grouped
    by protocol, one colour per model (:func:`category_colours`), the legend to the right.
    """
    labels = labels or {}
    metrics = [m for m in metrics if f"{m}_mean" in summary.columns]
    models = list(dict.fromkeys(summary["model"]))
    protocols = list(dict.fromkeys(summary["protocol"]))
    width = 0.8 / max(1, len(models))
    panel_width = max(2.6, 0.22 * len(models) * len(protocols) + 1.0)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(panel_width * len(metrics) + 1.6, 3.2),
        squeeze=False,
        layout="constrained",
    )
    colours = category_colours(len(models))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, model in enumerate(models):
            rows = summary[summary["model"] == model].set_index("protocol").reindex(protocols)
            positions = np.arange(len(protocols)) + (k - (len(models) - 1) / 2) * width
            ax.bar(
                positions,
                rows[f"{metric}_mean"].to_numpy(dtype=float),
                width,
                yerr=np.nan_to_num(rows[f"{metric}_sd"].to_numpy(dtype=float)),
                color=colours[k],
                label=model,
                capsize=2,
                error_kw={"linewidth": 0.8},
            )
        ax.set_xticks(np.arange(len(protocols)))
        ax.set_xticklabels([p.replace("_", "-") for p in protocols], fontsize=LABEL_SIZE)
        ax.set_title(labels.get(metric, metric), fontsize=TITLE_SIZE)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.tick_params(axis="y", labelsize=TICK_SIZE)
        ax.spines[["top", "right"]].set_visible(False)
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(),
        fontsize=TICK_SIZE,
        frameon=False,
        loc="outside right center",
        title="mean ± sd over runs",
        title_fontsize=TICK_SIZE,
    )
    return fig


def plot_blue_shift_curves(
    sweep, metric: str = "pcc_median", label: str | None = None
) -> matplotlib.figure.Figure:
    """``metric`` against the blue-shift intensity alpha (STEvs Fig. J.1), one line per model.

    ``sweep`` holds rows of :func:`stinfer.evaluate.robustness.blue_shift_sweep` (columns
    ``model``, ``alpha``, ``metric``), possibly over several test slides and runs: the line is
    their mean and the band +/- one sd. ``label`` names the metric on the y axis (default
    ``metric``).
    """
    fig, ax = plt.subplots(figsize=(5.4, 3.6), layout="constrained")
    models = list(dict.fromkeys(sweep["model"]))
    colours = category_colours(len(models))
    for k, (model, rows) in enumerate(sweep.groupby("model", sort=False)):
        stats = rows.groupby("alpha")[metric].agg(["mean", "std"]).sort_index()
        alphas = stats.index.to_numpy(dtype=float)
        mean = stats["mean"].to_numpy(dtype=float)
        sd = np.nan_to_num(stats["std"].to_numpy(dtype=float))
        ax.plot(alphas, mean, marker="o", markersize=3, color=colours[k], label=model)
        ax.fill_between(alphas, mean - sd, mean + sd, color=colours[k], alpha=0.15, linewidth=0)
    ax.set_xlabel("blue-shift intensity α (STEvs Eq. 40)", fontsize=LABEL_SIZE)
    ax.set_ylabel(label or metric, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(
        fontsize=TICK_SIZE,
        frameon=False,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="mean ± sd",
        title_fontsize=TICK_SIZE,
    )
    ax.set_title("robustness to a spectral blue shift of the test images", fontsize=TITLE_SIZE)
    return fig
