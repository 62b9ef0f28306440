"""The benchmark's report: ``summary.md`` in the paper's layout and the figures.

Both are derived from the finished cells (``results.csv``, ``robustness.csv``, the saved
predictions and latents), so they are rebuilt at the end of every run, resumed or not.

``summary.md`` holds, per cohort and protocol: the main table (one row per model, mean +/- sd
over (train, test) pairs and seeds of every headline metric, best in bold: lowest MSE, highest
correlation / ARI), the paper's layout with one column group per training slice (STEvs
Tables 1-2), one table per (train, test) pair, the ablation table (Tables 3-4), the blue-shift
table (Appendix J.1) and the runtime table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.evaluate.benchmark_layout import (
    CELL_DONE,
    LATENTS_FILE,
    cell_folder,
    model_label,
    prediction_path,
    safe_name,
)
from stinfer.evaluate.protocols import aggregate
from stinfer.io.slide_data import as_dense, slide_id

logger = logging.getLogger("stinfer")

__all__ = ["METRIC_LABELS", "format_table", "summary_markdown", "write_figures", "write_summary"]

METRIC_LABELS = {
    "mse": "MSE ↓",
    "pcc_median": "PCC ↑",
    "scc_median": "SCC ↑",
    "pcc_median_depthnorm": "PCC-dn ↑",
    "scc_median_depthnorm": "SCC-dn ↑",
    "pcc_mean": "mean PCC ↑",
    "hest_pcc_top50": "HEST PCC ↑",
    "ari": "ARI ↑",
    "ari_truth": "ARI of true counts",
    "train_seconds": "train s",
    "predict_seconds": "predict s",
    "cpu_seconds": "CPU s (train + test)",
    "peak_rss_mb": "peak RSS MiB",
    "rss_increase_mb": "RSS increase MiB",
}
MAIN_METRICS = (
    "mse",
    "pcc_median",
    "scc_median",
    "pcc_median_depthnorm",
    "scc_median_depthnorm",
    "hest_pcc_top50",
    "ari",
    "ari_truth",
)
PAPER_METRICS = ("mse", "pcc_median", "scc_median", "pcc_median_depthnorm", "scc_median_depthnorm")
RUNTIME_METRICS = (
    "train_seconds",
    "predict_seconds",
    "cpu_seconds",
    "peak_rss_mb",
    "rss_increase_mb",
)
LOWER_IS_BETTER = {"mse", *RUNTIME_METRICS}
NOT_RANKED = {"ari_truth", "runs", *RUNTIME_METRICS}  # a reference / a count / a cost
PROTOCOL_TITLES = {
    "cross_slice": "cross-slice (train on one slice, test on every other)",
    "intra_slice": "intra-slice (seeded 7:1:2 split of each slice's spots)",
    "leave_one_patient_out": "leave-one-patient-out",
}


# --------------------------------------------------------------------------- tables
def _cell(mean: float, sd: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" ± {sd:.{digits}f}"
    return text


def _best(values: pd.Series, lower: bool) -> pd.Series:
    """True where a value is the best of its column (ties all best; NaN never)."""
    values = values.astype(float)
    finite = values.dropna()
    if finite.empty:
        return pd.Series(False, index=values.index)
    target = finite.min() if lower else finite.max()
    return pd.Series(np.isclose(values.to_numpy(), target, rtol=0, atol=1e-12), index=values.index)


def format_table(
    stats: pd.DataFrame,
    row_key: str,
    columns: Sequence[tuple[str, str]],
    digits: int = 3,
    bold: bool = True,
) -> str:
    """A markdown table: one row per ``stats[row_key]``; ``columns`` are (metric, header).

    ``stats`` holds ``<metric>_mean`` and ``<metric>_sd`` (sd may be absent or NaN); the best
    mean of each ranked column is bold (:data:`LOWER_IS_BETTER`, :data:`NOT_RANKED`).
    """
    present = [
        (m, h) for m, h in columns if f"{m}_mean" in stats and stats[f"{m}_mean"].notna().any()
    ]
    header = "| " + " | ".join([row_key.replace("_", " "), *[h for _, h in present]]) + " |"
    lines = [header, "|" + "---|" * (len(present) + 1)]
    best = {
        metric: _best(stats[f"{metric}_mean"], metric in LOWER_IS_BETTER)
        for metric, _ in present
        if bold and metric not in NOT_RANKED and len(stats) > 1
    }
    for index, row in stats.iterrows():
        cells = [str(row[row_key])]
        for metric, _ in present:
            sd = row.get(f"{metric}_sd", float("nan"))
            if metric == "runs":
                text = str(int(row["runs_mean"]))
            else:
                text = _cell(row[f"{metric}_mean"], sd, 1 if metric in RUNTIME_METRICS else digits)
            if metric in best and bool(best[metric].loc[index]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_columns(metrics: Sequence[str]) -> list[tuple[str, str]]:
    return [(m, METRIC_LABELS.get(m, m)) for m in metrics]


def _ordered(stats: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    rank = {name: k for k, name in enumerate(order)}
    return stats.sort_values("model", key=lambda s: s.map(rank).fillna(len(rank))).reset_index(
        drop=True
    )


def _per_train_table(rows: pd.DataFrame, order: Sequence[str]) -> str:
    """The paper's layout (Tables 1-2): one column group per training slice."""
    trains = list(dict.fromkeys(rows["train_slice"]))
    per = aggregate(rows, by=("model", "train_slice"))
    header = ["model"] + [f"{train}: {METRIC_LABELS[m]}" for train in trains for m in PAPER_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for train in trains:
        part = per[per["train_slice"] == train].set_index("model")
        for metric in PAPER_METRICS:
            if len(part) > 1:
                best[(train, metric)] = _best(part[f"{metric}_mean"], metric in LOWER_IS_BETTER)
    for model in [m for m in order if m in set(per["model"])]:
        cells = [model]
        for train in trains:
            part = per[(per["train_slice"] == train) & (per["model"] == model)]
            for metric in PAPER_METRICS:
                if part.empty:
                    cells.append("–")
                    continue
                text = _cell(part[f"{metric}_mean"].iloc[0], part[f"{metric}_sd"].iloc[0], 3)
                flags = best.get((train, metric))
                if flags is not None and bool(flags.get(model, False)):
                    text = f"**{text}**"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair_tables(rows: pd.DataFrame, order: Sequence[str]) -> list[str]:
    parts = []
    for (train, test), pair in rows.groupby(["train_slice", "test_slice"], sort=False):
        stats = _ordered(aggregate(pair, by=("model",)), order)
        columns = _metric_columns([*PAPER_METRICS, "hest_pcc_top50", "ari", "train_seconds"])
        parts.append(f"**train {train} → test {test}**\n\n" + format_table(stats, "model", columns))
    return parts


def _robustness_table(sweep: pd.DataFrame, metric: str) -> str:
    table = sweep.groupby(["model", "alpha"], sort=False)[metric].mean().unstack("alpha")
    alphas = list(table.columns)
    header = ["model"] + [f"α={a:g}" for a in alphas]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, values in table.iterrows():
        lines.append("| " + " | ".join([str(model), *[f"{v:.3f}" for v in values]]) + " |")
    return "\n".join(lines)


def _expert_weight_table(rows: pd.DataFrame, order: Sequence[str]) -> list[str]:
    """Lines of the "which expert did fused STEvs trust" table: mean per-spot PoE weight of the
    image expert per model and test slice (a weight near 0 means the coordinates decided)."""
    if "image_expert_weight" not in rows or rows["image_expert_weight"].isna().all():
        return []
    weights = rows.dropna(subset=["image_expert_weight"])
    table = weights.pivot_table(
        index="model", columns="test_slice", values="image_expert_weight", aggfunc="mean"
    )
    table = table.reindex([m for m in order if m in table.index])
    table["all"] = weights.groupby("model")["image_expert_weight"].mean()
    header = "| model | " + " | ".join(f"test {c}" if c != "all" else c for c in table.columns)
    lines = [
        "",
        "Which expert the fused model trusted: mean per-spot image-expert weight of the product "
        "of experts (the coordinate expert has 1 minus it), by test slice:",
        "",
        header + " |",
        "|---" * (len(table.columns) + 1) + "|",
    ]
    for model, values in table.iterrows():
        lines.append(f"| {model} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def _uncertainty_table(rows: pd.DataFrame, order: Sequence[str]) -> list[str]:
    """Lines of the predictive-uncertainty table (config ``uncertainty``): PIT coverage of
    each interval before and after the calibration, plain coverage, width, sd-error Spearman,
    mean (min-max) over the (train, test) pairs per model."""
    levels = sorted(
        column.removeprefix("pit_coverage_")
        for column in rows.columns
        if column.startswith("pit_coverage_") and not column.endswith("_uncalibrated")
    )
    if not levels or rows[f"pit_coverage_{levels[0]}"].isna().all():
        return []
    scored = rows.dropna(subset=[f"pit_coverage_{levels[0]}"])

    def spread(values: pd.Series) -> str:
        return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"

    columns = []
    for level in levels:
        columns += [
            (f"PIT {level}% before", f"pit_coverage_{level}_uncalibrated"),
            (f"PIT {level}%", f"pit_coverage_{level}"),
            (f"counts in {level}%", f"coverage_{level}"),
            (f"width {level}%", f"width_{level}"),
        ]
    columns.append(("sd-error Spearman", "sd_error_spearman"))
    lines = [
        "",
        "Predictive uncertainty (calibrated on the training slides' validation spots): "
        "coverage of the central intervals on the test slice, as randomised-PIT coverage (the "
        "level itself when calibrated; `before` = without the calibration) and as the fraction "
        "of measured counts inside (at least the level for discrete counts); mean width in "
        "counts; median over genes of the Spearman correlation of predicted sd and |error|. "
        "Mean (min-max) over the (train, test) pairs:",
        "",
        "| model | " + " | ".join(label for label, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model in [m for m in order if m in set(scored["model"])]:
        values = scored[scored["model"] == model]
        lines.append(
            f"| {model} | " + " | ".join(spread(values[column]) for _, column in columns) + " |"
        )
    return lines


def summary_markdown(
    config: Any, results: pd.DataFrame, robustness: pd.DataFrame, command: str | None = None
) -> str:
    """The text of ``summary.md`` (see the module docstring)."""
    order = [
        m.name + suffix
        for m in config.models
        for suffix in ("", " (image only)", " (spatial only)")
    ]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Benchmark: {config.name}", "", f"Written {stamp} by `stinfer benchmark`."]
    if command:
        lines += ["", f"Reproduce: `{command}`"]
    lines += [
        "",
        "Metrics (docs/DESIGN.md, section Metrics): MSE of log1p counts; PCC / SCC = median "
        "over genes of the per-gene "
        "Pearson / Spearman correlation (constant genes count as 0); -dn = the same after "
        "normalising prediction and truth per spot over the panel (log1p CP10k); HEST PCC = mean "
        "PCC of the 50 most variable genes (normalised); ARI = k-means of the predicted "
        "expression vs the annotated domains (beside it, the same for the true counts). "
        "Cells: mean ± sd over (train, test) pairs and seeds; best in bold.",
    ]
    if results.empty:
        return "\n".join([*lines, "", "No finished cells yet."]) + "\n"
    for cohort, cohort_rows in results.groupby("cohort", sort=False):
        lines += ["", f"## Cohort {cohort}"]
        for protocol, rows in cohort_rows.groupby("protocol", sort=False):
            title = PROTOCOL_TITLES.get(protocol, protocol)
            models = rows[rows["group"] == "model"]
            ablations = rows[rows["group"] == "ablation"]
            n_pairs = rows.groupby(["train_slice", "test_slice", "seed"]).ngroups
            lines += [
                "",
                f"### {title}",
                "",
                f"{n_pairs} (train, test, seed) runs in this protocol; `runs` says how many of "
                "them each model has finished.",
            ]
            if not models.empty:
                stats = _ordered(aggregate(models, by=("model",)), order)
                stats["runs_mean"] = stats["n_runs"]
                columns = [*_metric_columns(MAIN_METRICS), ("runs", "runs")]
                lines += ["", format_table(stats, "model", columns)]
                lines += ["", "By training slice (the paper's layout):", ""]
                lines += [_per_train_table(models, order)]
                if protocol != "intra_slice":
                    lines += ["", "Per (train, test) pair:", ""]
                    lines += ["\n\n".join(_pair_tables(models, order))]
                lines += _expert_weight_table(models, order)
                lines += _uncertainty_table(models, order)
            if not ablations.empty:
                stats = _ordered(aggregate(ablations, by=("model",)), order)
                lines += ["", "Ablations (STEvs Tables 3-4):", ""]
                lines += [format_table(stats, "model", _metric_columns(MAIN_METRICS))]
        sweep = robustness[robustness["cohort"] == cohort] if not robustness.empty else robustness
        if not sweep.empty:
            metric = config.figures.robustness_metric
            lines += [
                "",
                f"### Robustness: blue shift of the test images (Appendix J.1), {METRIC_LABELS.get(metric, metric)}",
                "",
                _robustness_table(sweep, metric),
            ]
        runtime = aggregate(cohort_rows, by=("model", "protocol"))
        runtime = _ordered(runtime, order)
        runtime["model"] = runtime["model"] + ", " + runtime["protocol"].str.replace("_", "-")
        lines += [
            "",
            "### Runtime and memory per run",
            "",
            "Training and prediction wall seconds (per test slide), the CPU seconds of the whole "
            "cell (all threads; less sensitive to other load on a shared machine), and peak "
            "resident memory of the process (RSS increase: what the cell added over the "
            "process's memory at its start).",
            "",
            format_table(runtime, "model", _metric_columns(RUNTIME_METRICS), bold=False),
        ]
    return "\n".join(lines) + "\n"


def write_summary(
    out: Path,
    config: Any,
    results: pd.DataFrame,
    robustness: pd.DataFrame,
    command: str | None = None,
) -> Path:
    """Write ``out/summary.md`` (rebuilt every run) and return its path."""
    from stinfer.io.atomic import write_text

    path = Path(out) / "summary.md"
    write_text(summary_markdown(config, results, robustness, command), path, overwrite=True)
    return path


# --------------------------------------------------------------------------- figures
def _first_cell(cells: Sequence[Any], cohort: str, pair: tuple[str, str] | None):
    candidates = [c for c in cells if c.cohort == cohort]
    for protocol in ("cross_slice", "leave_one_patient_out", "intra_slice"):
        for cell in candidates:
            if cell.protocol != protocol:
                continue
            tests = [name for name, _ in cell.tests]
            if pair is None or (cell.train_name == pair[0] and pair[1] in tests):
                return cell.protocol, cell.train_name, pair[1] if pair else tests[0], cell.seed
    return None


def _load_predictions(
    out: Path, cells, cohort, protocol, train, test, seed
) -> dict[str, ad.AnnData]:
    predictions = {}
    for cell in cells:
        if (cell.cohort, cell.protocol, cell.train_name, cell.seed) != (
            cohort,
            protocol,
            train,
            seed,
        ):
            continue
        folder = cell_folder(out, cell.cell_id)
        if cell.model.group != "model" or not (folder / CELL_DONE).is_file():
            continue
        for mode in cell.model.modes:
            name = model_label(cell.model.name, mode)
            path = prediction_path(folder, name, test)
            if path.is_file():
                predictions[name] = ad.read_h5ad(path)
    return predictions


def _umap_groups(slides: Mapping[str, ad.AnnData], names: list[str], genes, domain_key):
    """Slice labels and domain labels (annotation, or k-means of the true counts) per spot."""
    from stinfer.evaluate.domains import domain_labels
    from stinfer.metrics import cluster_domains

    slice_labels, domains, source = [], [], "domain"
    annotated = all(domain_labels(slides[n], domain_key) is not None for n in names)
    for name in names:
        slide = slides[name]
        slice_labels += [name] * slide.n_obs
        if annotated:
            domains += list(domain_labels(slide, domain_key).fillna("unannotated"))
    if not annotated:
        source = "true-count cluster"
        stacked = np.concatenate([as_dense(slides[n][:, genes].X) for n in names])
        domains = [f"cluster {k}" for k in cluster_domains(stacked, min(5, len(stacked)))]
    return {"slice": np.array(slice_labels), source: np.array(domains)}


def write_figures(
    out: Path,
    config: Any,
    results: pd.DataFrame,
    robustness: pd.DataFrame,
    cells: Sequence[Any],
    cohort_data: Mapping[str, tuple[list[ad.AnnData], list[str]]],
) -> list[Path]:
    """Draw every figure into ``out/figures`` (replacing earlier ones); returns the paths."""
    from stinfer.metrics import evaluate_anndata
    from stinfer.plot import (
        plot_blue_shift_curves,
        plot_metric_bars,
        plot_spatial_maps,
        save_figure,
    )

    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = folder / name
        save_figure(fig, path, overwrite=True)
        written.append(path)

    figures = config.figures
    for cohort, rows in results.groupby("cohort", sort=False):
        stats = aggregate(rows, by=("model", "protocol"))
        save(
            plot_metric_bars(stats, figures.metrics, METRIC_LABELS),
            f"metrics_{safe_name(cohort)}.png",
        )
        slides, genes = cohort_data[cohort]
        by_id = {slide_id(s): s for s in slides}
        chosen = _first_cell(cells, cohort, figures.pair)
        if chosen is not None:
            protocol, train, test, seed = chosen
            predictions = _load_predictions(out, cells, cohort, protocol, train, test, seed)
            if predictions:
                some = next(iter(predictions.values()))
                truth = by_id[test][some.obs_names]
                map_genes = [g for g in (figures.genes or genes[:1]) if g in some.var_names]
                if map_genes:
                    # the per-gene PCC of the titles, by the metric path of the tables
                    gene_pcc = {
                        name: evaluate_anndata(
                            prediction[:, map_genes], truth[:, map_genes]
                        ).per_gene["pcc"]
                        for name, prediction in predictions.items()
                    }
                    fig = plot_spatial_maps(truth[:, genes], predictions, map_genes, gene_pcc)
                    fig.suptitle(
                        f"{protocol.replace('_', '-')}: train {train}, test {test}", fontsize=10
                    )
                    save(
                        fig, f"maps_{safe_name(cohort)}_{safe_name(train)}_to_{safe_name(test)}.png"
                    )
        if figures.umap:
            written += _umap_figures(out, cells, cohort, by_id, genes, config, save)
        sweep = robustness[robustness["cohort"] == cohort] if not robustness.empty else robustness
        if not sweep.empty:
            save(
                plot_blue_shift_curves(
                    sweep,
                    figures.robustness_metric,
                    METRIC_LABELS.get(figures.robustness_metric, figures.robustness_metric),
                ),
                f"blue_shift_{safe_name(cohort)}.png",
            )
    return written


def _umap_figures(out, cells, cohort, by_id, genes, config, save) -> list[Path]:
    from stinfer.plot import plot_latent_umap

    domain_key = config.domains.key if config.domains else "domain"
    done = set()
    for cell in cells:
        if cell.cohort != cohort or cell.protocol == "intra_slice" or cell.model.type != "stevs":
            continue
        if cell.model.group != "model" or cell.model.name in done:
            continue
        folder = cell_folder(out, cell.cell_id)
        path = folder / LATENTS_FILE
        if not (folder / CELL_DONE).is_file() or not path.is_file():
            continue
        done.add(cell.model.name)
        stored = np.load(path)
        names = [n for n in [cell.train_name, *[t for t, _ in cell.tests]] if n in by_id]
        for which in ("fused", "image", "spatial"):
            keys = [f"{which}/{n}" for n in names]
            if not all(k in stored for k in keys):
                continue
            latent = np.concatenate([stored[k] for k in keys])
            groups = _umap_groups(by_id, names, genes, domain_key)
            fig = plot_latent_umap(latent, groups, seed=cell.seed)
            fig.suptitle(
                f"{cell.model.name}: {which} latent, trained on {cell.train_name}", fontsize=10
            )
            save(fig, f"umap_{safe_name(cohort)}_{safe_name(cell.model.name)}_{which}.png")
    return []
