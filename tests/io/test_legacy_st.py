"""read_legacy_st: generated sections, and the real HER2ST sections compared with pandas."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stinfer.errors import InputError
from stinfer.io import read_legacy_st, read_slide
from stinfer.io.legacy_st import estimate_pixel_size_um


def write_section(
    folder: Path,
    um_per_px: float = 0.8,
    angle_deg: float = 0.0,
    seed: int = 0,
) -> dict:
    """Write a small legacy ST section: a 5x4 grid, one spot only in each table.

    Pixel coordinates follow a 200 um pitch at ``um_per_px``, optionally rotated.
    """
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(5, 10), np.arange(10, 14), indexing="ij")
    array_xy = np.column_stack([xs.ravel(), ys.ravel()])
    step_px = 200.0 / um_per_px
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pixel_xy = 400.0 + (array_xy * step_px) @ rotation.T + rng.normal(0, 2, array_xy.shape)
    spots = pd.DataFrame(
        {
            "x": array_xy[:, 0],
            "y": array_xy[:, 1],
            "new_x": array_xy[:, 0] + rng.normal(0, 0.01, len(array_xy)),
            "new_y": array_xy[:, 1] + rng.normal(0, 0.01, len(array_xy)),
            "pixel_x": pixel_xy[:, 0],
            "pixel_y": pixel_xy[:, 1],
            "selected": 1,
        }
    )
    genes = ["ERBB2", "ACTB", "GAPDH", "ACTB", "KRT8"]
    names = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(
        rng.poisson(4.0, size=(len(names), len(genes))), index=names, columns=genes
    )
    # one spot only in the counts, one only in the spot table
    counts = pd.concat(
        [counts.iloc[1:], pd.DataFrame([[1, 2, 3, 4, 5]], index=["30x30"], columns=genes)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    counts_path = folder / "S1.tsv.gz"
    counts.to_csv(counts_path, sep="\t")
    spots_path = folder / "S1_selection.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    return {"counts": counts, "spots": spots, "counts_path": counts_path, "spots_path": spots_path}


def test_generated_section_joins_on_array_coordinates(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    slide = read_legacy_st(written["counts_path"], written["spots_path"])

    kept = written["counts"].index[:-1]  # all but the counts-only spot 30x30, in count order
    assert list(slide.obs_names) == [f"S1_{name}" for name in kept]
    assert list(slide.obs["spot_id"]) == list(kept)
    assert set(slide.obs["sample_id"]) == {"S1"}
    assert list(slide.var_names) == ["ERBB2", "ACTB", "GAPDH", "ACTB-1", "KRT8"]
    np.testing.assert_array_equal(slide.X.toarray(), written["counts"].loc[kept].to_numpy())
    spots = written["spots"].assign(name=lambda t: t.x.astype(str) + "x" + t.y.astype(str))
    matched = spots.set_index("name").loc[kept]
    np.testing.assert_array_equal(slide.obsm["spatial"], matched[["pixel_x", "pixel_y"]])
    np.testing.assert_array_equal(slide.obs["array_col"], matched["x"])
    np.testing.assert_array_equal(slide.obs["array_row"], matched["y"])

    meta = slide.uns["stinfer"]
    assert meta["sample_id"] == "S1"
    assert meta["image_path"] is None
    assert meta["source_format"] == "legacy-st"
    assert meta["pixel_size_um"] == pytest.approx(0.8, rel=0.01)
    assert meta["spot_diameter_px"] == pytest.approx(100 / meta["pixel_size_um"])
    assert any(
        "dropped 1 count rows without a spot-table row and 1 spot-table rows without counts" in note
        for note in meta["notes"]
    )


def test_two_sections_with_the_same_spot_ids_concatenate_with_unique_names(
    tmp_path: Path,
) -> None:
    first, second = (write_section(tmp_path / name, seed=seed) for seed, name in enumerate("ab"))
    slides = [
        read_legacy_st(written["counts_path"], written["spots_path"], sample_id=sample_id)
        for written, sample_id in ((first, "C2"), (second, "C3"))
    ]
    assert list(slides[0].obs["spot_id"]) == list(slides[1].obs["spot_id"])  # e.g. both 5x11

    both = ad.concat(slides)

    assert both.obs_names.is_unique and both.n_obs == slides[0].n_obs + slides[1].n_obs
    assert "C2_5x11" in both.obs_names and "C3_5x11" in both.obs_names
    from_c3 = (both.obs["sample_id"] == "C3").to_numpy()
    assert from_c3.sum() == slides[1].n_obs
    np.testing.assert_array_equal(both[from_c3].X.toarray(), slides[1].X.toarray())


@pytest.mark.parametrize("angle_deg", [0.0, 7.0, 90.0])
def test_pixel_size_estimate_is_rotation_invariant(angle_deg: float) -> None:
    array_xy = np.array([[x, y] for x in range(6) for y in range(5)])
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pixel_xy = 50 + (array_xy * 250.0) @ rotation.T
    assert estimate_pixel_size_um(array_xy, pixel_xy, Path("spots.tsv")) == pytest.approx(0.8)


def test_given_pixel_size_and_spot_diameter_are_used(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    meta = read_legacy_st(
        written["counts_path"], written["spots_path"], pixel_size_um=0.5, spot_diameter_um=55
    ).uns["stinfer"]
    assert meta["pixel_size_um"] == 0.5
    assert meta["spot_diameter_px"] == pytest.approx(110.0)


def test_image_inside_bounds_is_recorded(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    image = tmp_path / "S1.jpg"
    Image.new("RGB", (3000, 4000)).save(image)
    slide = read_slide(
        "legacy_st", counts=written["counts_path"], spots=written["spots_path"], image=image
    )
    assert slide.uns["stinfer"]["image_path"] == str(image.resolve())
    assert slide.uns["stinfer"]["image_scale"] == 1.0


def test_downscaled_image_is_rejected(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    image = tmp_path / "S1_small.jpg"
    Image.new("RGB", (500, 450)).save(image)
    with pytest.raises(InputError, match=r"S1_small.jpg is 500 x 450 px.*downscaled copy"):
        read_legacy_st(written["counts_path"], written["spots_path"], image=image)


def test_unselected_spots_are_dropped_and_noted(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    spots = written["spots"].copy()
    spots.loc[:2, "selected"] = 0
    spots.to_csv(written["spots_path"], sep="\t", index=False)
    slide = read_legacy_st(written["counts_path"], written["spots_path"])
    assert slide.n_obs == len(written["counts"]) - 1 - 2  # 30x30 and two unselected (one was 5x10)
    assert any(
        "dropped 3 spots with selected != 1" in note for note in slide.uns["stinfer"]["notes"]
    )


def test_spot_table_without_pixels_gives_micron_grid(tmp_path: Path) -> None:
    written = write_section(tmp_path)
    written["spots"][["x", "y"]].to_csv(written["spots_path"], sep="\t", index=False)
    slide = read_legacy_st(written["counts_path"], written["spots_path"])
    np.testing.assert_array_equal(
        slide.obsm["spatial"], slide.obs[["array_col", "array_row"]].to_numpy() * 200.0
    )
    assert slide.uns["stinfer"]["pixel_size_um"] == 1.0


HER2ST_IMAGED = ["C2", "C3", "C4"]


@pytest.fixture(scope="module", params=HER2ST_IMAGED)
def her2st_section(request: pytest.FixtureRequest, her2st_dir: Path) -> tuple:
    section = request.param
    slide = read_legacy_st(
        her2st_dir / "counts" / f"{section}.tsv.gz",
        her2st_dir / "spots" / f"{section}_selection.tsv",
        image=her2st_dir / "images" / f"{section}.jpg",
    )
    counts = pd.read_csv(
        her2st_dir / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0, low_memory=False
    )
    spots = pd.read_csv(her2st_dir / "spots" / f"{section}_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    return section, slide, counts, spots


@pytest.mark.slow
def test_real_her2st_sections_match_the_tsv_files(her2st_section: tuple, her2st_dir: Path) -> None:
    section, slide, counts, spots = her2st_section
    common = counts.index.intersection(spots.index)
    assert slide.n_obs == len(common)
    assert set(slide.obs["spot_id"]) == set(common)
    assert set(slide.obs_names) == {f"{section}_{name}" for name in common}
    assert list(slide.var_names) == list(counts.columns)

    spot_ids = slide.obs["spot_id"]
    np.testing.assert_array_equal(slide.X.toarray(), counts.loc[spot_ids].to_numpy())
    matched = spots.loc[spot_ids]
    np.testing.assert_array_equal(slide.obsm["spatial"], matched[["pixel_x", "pixel_y"]])
    np.testing.assert_array_equal(slide.obs["array_col"], matched["x"])
    np.testing.assert_array_equal(slide.obs["array_row"], matched["y"])

    meta = slide.uns["stinfer"]
    assert meta["sample_id"] == section
    assert meta["image_path"] == str((her2st_dir / "images" / f"{section}.jpg").resolve())
    assert 0.6 < meta["pixel_size_um"] < 1.0  # patient C: about 0.69 um per pixel
    assert meta["spot_diameter_px"] == pytest.approx(100 / meta["pixel_size_um"])


@pytest.mark.slow
def test_real_her2st_a1_is_counts_only(her2st_dir: Path) -> None:
    slide = read_legacy_st(her2st_dir / "counts/A1.tsv.gz", her2st_dir / "spots/A1_selection.tsv")
    spots = pd.read_csv(her2st_dir / "spots/A1_selection.tsv", sep="\t")
    assert slide.n_obs == 346  # 348 spots in the table, 2 without counts
    assert slide.uns["stinfer"]["image_path"] is None
    assert any("2 spot-table rows without counts" in note for note in slide.uns["stinfer"]["notes"])
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    np.testing.assert_array_equal(
        slide.obsm["spatial"], spots.loc[slide.obs["spot_id"], ["pixel_x", "pixel_y"]]
    )
