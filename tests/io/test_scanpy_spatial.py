"""scanpy's ``uns["spatial"]``: written by prepare_for_h5ad, read back by read_h5ad_slide."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import tifffile
from PIL import Image

from stinfer import cli
from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.errors import InputError
from stinfer.io import make_slide, prepare_for_h5ad, read_h5ad_slide, scanpy_spatial
from stinfer.io.atomic import write_h5ad
from stinfer.io.pyramidal_tiff import write_pyramidal_tiff
from stinfer.io.scanpy_spatial import (
    HIRES_MAX_PX,
    LOWRES_MAX_PX,
    SPOT_DIAMETER_PER_PITCH,
    image_thumbnail,
)
from stinfer.io.slide_data import slide_meta
from stinfer.io.slide_image import (
    PillowSlide,
    TiffSlide,
    h5ad_image_reference,
    open_slide,
    split_h5ad_image_reference,
    to_rgb_uint8,
)
from stinfer.io.visium import matrix_h5_writer
from stinfer.plot import slide_thumbnail

GENES = ["ERBB2", "GRB7", "ACTB", "KRT8"]


@pytest.fixture(autouse=True)
def _fresh_thumbnails():
    """Thumbnails are cached by file; each test writes its own files under tmp_path."""
    scanpy_spatial._cached_thumbnail.cache_clear()
    yield
    plt.close("all")


def gradient_image(width: int, height: int) -> np.ndarray:
    """A smooth RGB image: red along x, green along y, so nearby pixels differ little."""
    xs = np.linspace(0, 255, width)
    ys = np.linspace(0, 255, height)
    red = np.broadcast_to(xs[None, :], (height, width))
    green = np.broadcast_to(ys[:, None], (height, width))
    blue = np.full((height, width), 128.0)
    return np.rint(np.stack([red, green, blue], axis=2)).astype(np.uint8)


def grid_spots(width: int, height: int, pitch: float) -> np.ndarray:
    """Spot centres (x, y) on a square grid of ``pitch`` px inside a ``width`` x ``height`` image."""
    xs = np.arange(pitch / 2, width - pitch / 2, pitch)
    ys = np.arange(pitch / 2, height - pitch / 2, pitch)
    return np.array([(x, y) for y in ys for x in xs], dtype=np.float64)


def slide_on(
    spatial_xy: np.ndarray,
    image_path: Path | None,
    image_scale: float = 1.0,
    spot_diameter_px: float | None = 40.0,
    sample_id: str = "S1",
) -> ad.AnnData:
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (len(spatial_xy), len(GENES)))
    return make_slide(
        counts,
        [f"spot{index}" for index in range(len(spatial_xy))],
        GENES,
        spatial_xy,
        sample_id=sample_id,
        source_format="synthetic",
        source="test",
        image_path=None if image_path is None else str(image_path),
        image_scale=image_scale,
        pixel_size_um=1.0,
        spot_diameter_px=spot_diameter_px,
    )


def pixels_at(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``image``'s pixels at (x, y) positions (rounded, clipped to the image)."""
    cols = np.clip(np.floor(xy[:, 0] + 0.5).astype(int), 0, image.shape[1] - 1)
    rows = np.clip(np.floor(xy[:, 1] + 0.5).astype(int), 0, image.shape[0] - 1)
    return image[rows, cols].astype(np.float64)


def written_and_read(slide: ad.AnnData, path: Path) -> ad.AnnData:
    write_h5ad(prepare_for_h5ad(slide), path)
    return ad.read_h5ad(path)


# ---------------------------------------------------------------- writing uns["spatial"]


def test_written_slide_opens_in_sc_pl_spatial_and_its_hires_matches_the_image(tmp_path):
    image = gradient_image(2100, 700)  # long side > HIRES_MAX_PX: the hires is a downsample
    Image.fromarray(image).save(tmp_path / "he.png")
    slide = slide_on(grid_spots(2100, 700, 100.0), tmp_path / "he.png")

    adata = written_and_read(slide, tmp_path / "S1.h5ad")

    assert sc.pl.spatial(adata, color="ERBB2", show=False) is not None
    library = adata.uns["spatial"]["S1"]
    hires, lowres = library["images"]["hires"], library["images"]["lowres"]
    assert hires.dtype == lowres.dtype == np.uint8
    assert hires.shape[2] == lowres.shape[2] == 3
    assert max(hires.shape[:2]) <= HIRES_MAX_PX
    assert max(lowres.shape[:2]) <= LOWRES_MAX_PX
    scalefactors = library["scalefactors"]
    assert scalefactors["spot_diameter_fullres"] == 40.0
    assert scalefactors["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / 2100, rel=0.01)
    xy = adata.obsm["spatial"]
    truth = pixels_at(image, xy)
    for key in ("hires", "lowres"):
        seen = pixels_at(library["images"][key], xy * scalefactors[f"tissue_{key}_scalef"])
        assert np.abs(seen - truth).mean() < 3.0, key
    # the file still reads back as the same slide
    assert slide_meta(read_h5ad_slide(tmp_path / "S1.h5ad"))["image_path"] == str(
        tmp_path / "he.png"
    )


def test_scale_factors_account_for_a_downscaled_image_file(tmp_path):
    image = gradient_image(400, 300)  # a "hires PNG" at 0.25 of full resolution
    Image.fromarray(image).save(tmp_path / "hires.png")
    spots_full_res = grid_spots(1600, 1200, 200.0)
    slide = slide_on(spots_full_res, tmp_path / "hires.png", image_scale=0.25)

    library = written_and_read(slide, tmp_path / "S1.h5ad").uns["spatial"]["S1"]

    assert library["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.25)
    hires = library["images"]["hires"]
    np.testing.assert_array_equal(hires, image)  # small enough to keep every pixel
    seen = pixels_at(hires, spots_full_res * 0.25)
    assert np.abs(seen - pixels_at(image, spots_full_res * 0.25)).max() == 0


def test_thumbnail_reads_a_coarse_pyramid_level_of_a_tiff(tmp_path, monkeypatch):
    def paint(top, left, height, width, downsample):
        xs = (left + np.arange(width)) * downsample
        ys = (top + np.arange(height)) * downsample
        tile = np.zeros((height, width, 3), np.uint8)
        tile[..., 0] = np.clip(xs / 8, 0, 255)[None, :]
        tile[..., 1] = np.clip(ys / 4, 0, 255)[:, None]
        return tile

    path = write_pyramidal_tiff(
        tmp_path / "he.tif", paint, 2048, 1024, level_downsamples=(1, 4), compression="zlib"
    )
    levels_read = []
    read_window = TiffSlide._read_window

    def spy(self, level, *window):
        levels_read.append(level)
        return read_window(self, level, *window)

    monkeypatch.setattr(TiffSlide, "_read_window", spy)

    pixels, scale = image_thumbnail(path, 1.0, 300)

    assert set(levels_read) == {1}  # level 0 (2048 px wide) is never decoded
    assert max(pixels.shape[:2]) <= 300
    assert scale == pytest.approx(1 / 8)  # level 1 (1/4), every 2nd pixel
    xy = grid_spots(2048, 1024, 128.0)
    expected = np.stack([np.clip(xy[:, 0] / 8, 0, 255), np.clip(xy[:, 1] / 4, 0, 255)], axis=1)
    assert np.abs(pixels_at(pixels, xy * scale)[:, :2] - expected).mean() < 5.0


def test_a_jpeg_thumbnail_is_decoded_reduced_never_whole(tmp_path, monkeypatch):
    image = gradient_image(1700, 900)
    Image.fromarray(image).save(tmp_path / "he.jpg", quality=95)

    def no_full_decode(self, *window):
        raise AssertionError("the whole JPEG was decoded")

    monkeypatch.setattr(PillowSlide, "_read_window", no_full_decode)

    pixels, scale = image_thumbnail(tmp_path / "he.jpg", 1.0, 400)

    assert max(pixels.shape[:2]) <= 400
    assert scale == pytest.approx(1 / 8)  # decoded at 1/4, every 2nd pixel
    xy = grid_spots(1700, 900, 100.0)
    assert np.abs(pixels_at(pixels, xy * scale) - pixels_at(image, xy)).mean() < 6.0


def test_thumbnail_of_a_large_level_is_read_in_bands(tmp_path, monkeypatch):
    image = gradient_image(900, 500)
    tifffile.imwrite(tmp_path / "he.tif", image, tile=(64, 64))
    monkeypatch.setattr(scanpy_spatial, "BAND_BYTES", 3 * 900 * 40)  # bands of ~40 rows

    pixels, scale = image_thumbnail(tmp_path / "he.tif", 0.5, 300)

    np.testing.assert_array_equal(pixels, image[::3, ::3])
    assert scale == pytest.approx(0.5 / 3)


def test_plot_thumbnail_is_the_io_thumbnail(tmp_path):
    Image.fromarray(gradient_image(640, 480)).save(tmp_path / "he.png")
    slide = slide_on(grid_spots(640, 480, 80.0), tmp_path / "he.png")
    pixels, scale = slide_thumbnail(slide, max_size_px=200)
    expected, expected_scale = image_thumbnail(tmp_path / "he.png", 1.0, 200)
    np.testing.assert_array_equal(pixels, expected)
    assert scale == expected_scale == pytest.approx(1 / 4)
    assert slide_thumbnail(slide_on(grid_spots(640, 480, 80.0), None)) is None


def test_counts_only_slide_gets_a_blank_canvas_and_plots_without_arguments(tmp_path):
    spots = grid_spots(1000, 600, 100.0)
    slide = slide_on(spots, None, spot_diameter_px=None)

    adata = written_and_read(slide, tmp_path / "S1.h5ad")

    library = adata.uns["spatial"]["S1"]
    diameter = library["scalefactors"]["spot_diameter_fullres"]
    assert diameter == pytest.approx(SPOT_DIAMETER_PER_PITCH * 100.0)
    assert "nearest-neighbour" in library["metadata"]["spot_diameter_source"]
    assert library["metadata"]["blank_canvas"]
    assert "counts-only" in library["metadata"]["blank_canvas_reason"]
    scalefactors = library["scalefactors"]
    for key in ("hires", "lowres"):
        canvas = library["images"][key]
        assert canvas.dtype == np.uint8 and canvas.shape[2] == 3
        assert max(canvas.shape[:2]) <= LOWRES_MAX_PX
        assert np.all(canvas == 255)
        # the canvas covers every spot with a spot diameter to spare
        far_corner = (spots.max(axis=0) + 0.99 * diameter) * scalefactors[f"tissue_{key}_scalef"]
        assert canvas.shape[1] >= far_corner[0] and canvas.shape[0] >= far_corner[1]
    assert sc.pl.spatial(adata, color="ERBB2", show=False) is not None


def test_a_counts_only_slide_read_back_stays_counts_only_and_plots(tmp_path):
    slide = slide_on(grid_spots(1000, 600, 100.0), None)
    write_h5ad(prepare_for_h5ad(slide), tmp_path / "S1.h5ad")
    # the same file as a scanpy-style h5ad: uns["spatial"] (a blank canvas), no uns["stinfer"]
    scanpy_style = ad.read_h5ad(tmp_path / "S1.h5ad")
    del scanpy_style.uns["stinfer"]
    scanpy_style.write_h5ad(tmp_path / "scanpy_style.h5ad")

    for path in (tmp_path / "S1.h5ad", tmp_path / "scanpy_style.h5ad"):
        read_back = read_h5ad_slide(path)
        assert slide_meta(read_back)["image_path"] is None, path
        assert slide_thumbnail(read_back) is None
        rewritten = written_and_read(read_back, tmp_path / f"re_{path.name}")
        (library,) = rewritten.uns["spatial"].values()
        assert library["metadata"]["blank_canvas"]
        assert slide_meta(read_h5ad_slide(tmp_path / f"re_{path.name}"))["image_path"] is None
        assert sc.pl.spatial(rewritten, color="ERBB2", show=False) is not None
    notes = slide_meta(read_h5ad_slide(tmp_path / "scanpy_style.h5ad"))["notes"]
    assert any("blank canvas" in note for note in notes)
    assert "spatial" not in read_h5ad_slide(tmp_path / "scanpy_style.h5ad").uns


def test_a_blank_canvas_does_not_stand_in_for_an_image_given_on_reading(tmp_path):
    slide = slide_on(grid_spots(400, 300, 100.0), None)
    write_h5ad(prepare_for_h5ad(slide), tmp_path / "S1.h5ad")
    scanpy_style = ad.read_h5ad(tmp_path / "S1.h5ad")
    del scanpy_style.uns["stinfer"]
    scanpy_style.write_h5ad(tmp_path / "scanpy_style.h5ad")
    Image.fromarray(gradient_image(400, 300)).save(tmp_path / "he.png")

    with_image = read_h5ad_slide(tmp_path / "scanpy_style.h5ad", image=tmp_path / "he.png")

    (library,) = written_and_read(with_image, tmp_path / "with_image.h5ad").uns["spatial"].values()
    assert "blank_canvas" not in library["metadata"]
    assert library["images"]["hires"].shape[:2] == (300, 400)


def test_a_moved_image_still_lets_the_file_be_written(tmp_path, caplog):
    Image.fromarray(gradient_image(200, 100)).save(tmp_path / "he.png")
    slide = slide_on(grid_spots(200, 100, 50.0), tmp_path / "he.png")
    (tmp_path / "he.png").unlink()

    adata = written_and_read(slide, tmp_path / "S1.h5ad")

    library = adata.uns["spatial"]["S1"]
    assert library["metadata"]["blank_canvas"]
    assert "could not be read" in library["metadata"]["blank_canvas_reason"]
    assert np.all(library["images"]["hires"] == 255)
    assert library["scalefactors"]["spot_diameter_fullres"] == 40.0
    assert "could not be read" in caplog.text
    assert sc.pl.spatial(adata, color="ERBB2", show=False) is not None


def test_an_existing_uns_spatial_is_kept(tmp_path):
    slide = slide_on(grid_spots(400, 300, 100.0), None)
    theirs = {
        "lib": {
            "images": {"hires": np.zeros((30, 40, 3), np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 0.1, "spot_diameter_fullres": 7.0},
        }
    }
    slide.uns["spatial"] = theirs

    prepared = prepare_for_h5ad(slide)

    assert list(prepared.uns["spatial"]) == ["lib"]
    assert prepared.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"] == 7.0


def test_an_anndata_without_spot_coordinates_gets_no_uns_spatial():
    slide = slide_on(grid_spots(400, 300, 100.0), None)
    del slide.obsm["spatial"]
    assert "spatial" not in prepare_for_h5ad(slide).uns


# ---------------------------------------------------------------- reading scanpy's files


def scanpy_visium_anndata(metadata: dict | None = None, hexagonal: bool = True) -> ad.AnnData:
    """What ``sc.read_visium(...).write_h5ad`` holds: counts, obsm spatial, uns['spatial'].

    Images are float32 0-1 (scanpy reads the PNGs with matplotlib); the full-resolution
    frame is 2000 x 1600 px, the hires image 0.2 of it, the lowres 0.05.
    """
    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 10, 2), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if hexagonal:
        cols = cols + rows % 2  # Visium: odd rows shifted by one column
    spatial = np.column_stack([200.0 + cols * 80.0, 200.0 + rows * 140.0])
    rng = np.random.default_rng(1)
    adata = ad.AnnData(
        X=rng.poisson(2.0, (len(rows), len(GENES))).astype(np.float32),
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": rows, "array_col": cols},
            index=[f"AAAC{index:04d}-1" for index in range(len(rows))],
        ),
        var=pd.DataFrame(index=GENES),
    )
    adata.obsm["spatial"] = spatial
    hires = gradient_image(400, 320).astype(np.float32) / 255.0
    library = {
        "images": {"hires": hires, "lowres": hires[::4, ::4].copy()},
        "scalefactors": {
            "tissue_hires_scalef": 0.2,
            "tissue_lowres_scalef": 0.05,
            "spot_diameter_fullres": 88.0,
            "fiducial_diameter_fullres": 143.0,
        },
    }
    if metadata is not None:
        library["metadata"] = metadata
    adata.uns["spatial"] = {"lib": library}
    return adata


SPACE_RANGER_METADATA = {
    "chemistry_description": "Spatial 3' v1",
    "software_version": "spaceranger-1.3.0",
}


def test_scanpy_visium_h5ad_keeps_its_image_and_pixel_size(tmp_path):
    adata = scanpy_visium_anndata(SPACE_RANGER_METADATA)
    adata.write_h5ad(tmp_path / "visium.h5ad")

    slide = read_h5ad_slide(tmp_path / "visium.h5ad")

    meta = slide_meta(slide)
    assert meta["image_path"] == h5ad_image_reference(
        tmp_path / "visium.h5ad", "uns/spatial/lib/images/hires"
    )
    assert meta["image_scale"] == 0.2
    assert meta["pixel_size_um"] == pytest.approx(55.0 / 88.0)
    assert meta["spot_diameter_px"] == 88.0
    with open_slide(meta["image_path"]) as image:
        assert image.dimensions == (400, 320)
        pixels = image.read_region(0, 0, 400, 320)
    np.testing.assert_array_equal(
        pixels, to_rgb_uint8(adata.uns["spatial"]["lib"]["images"]["hires"])
    )
    # patches come from the stored image, cached by the .h5ad's size and time
    patches = spot_patches(slide, PatchSpec(patch_size_px=16), cache_dir=tmp_path / "cache")
    assert patches.shape == (slide.n_obs, 3, 16, 16)
    centre = pixels_at(
        to_rgb_uint8(adata.uns["spatial"]["lib"]["images"]["hires"]), slide.obsm["spatial"] * 0.2
    )
    assert np.abs(patches[:, :, 8, 8].astype(float) - centre).mean() < 3.0
    # the library entry is kept as scanpy wrote it (lowres included) and written back
    written = written_and_read(slide, tmp_path / "prepared.h5ad")
    assert list(written.uns["spatial"]) == ["lib"]
    assert written.uns["spatial"]["lib"]["scalefactors"]["tissue_lowres_scalef"] == 0.05
    assert sc.pl.spatial(written, color="ERBB2", show=False) is not None
    again = read_h5ad_slide(tmp_path / "prepared.h5ad")  # uns["stinfer"] wins
    assert slide_meta(again)["image_path"] == meta["image_path"]
    assert slide_meta(again)["pixel_size_um"] == pytest.approx(55.0 / 88.0)


def test_visium_is_recognised_by_its_hexagonal_grid_without_metadata(tmp_path):
    scanpy_visium_anndata(metadata=None, hexagonal=True).write_h5ad(tmp_path / "hex.h5ad")
    assert slide_meta(read_h5ad_slide(tmp_path / "hex.h5ad"))["pixel_size_um"] == pytest.approx(
        55.0 / 88.0
    )


def test_non_visium_scanpy_h5ad_keeps_its_image_but_no_pixel_size(tmp_path):
    scanpy_visium_anndata(metadata=None, hexagonal=False).write_h5ad(tmp_path / "grid.h5ad")

    meta = slide_meta(read_h5ad_slide(tmp_path / "grid.h5ad"))

    assert meta["pixel_size_um"] is None
    assert any("pixel size unknown" in note for note in meta["notes"])
    assert split_h5ad_image_reference(meta["image_path"]) is not None


def test_what_sc_read_visium_writes_reads_back_with_its_image(tmp_path):
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    rows = np.repeat(np.arange(4), 4)
    cols = np.tile(np.arange(0, 8, 2), 4) + rows % 2
    barcodes = [f"AAAC{index:04d}-1" for index in range(16)]
    genes = GENES[:3]
    with matrix_h5_writer(
        outs / "filtered_feature_bc_matrix.h5", barcodes, ["E1", "E2", "E3"], genes
    ) as append:
        append(sp.csr_matrix(np.random.default_rng(0).poisson(3, (16, 3))))
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": 200 + rows * 140,
            "pxl_col_in_fullres": 200 + cols * 80,
        }
    )
    positions.to_csv(outs / "spatial/tissue_positions_list.csv", header=False, index=False)
    scalefactors = {
        "spot_diameter_fullres": 88.0,
        "tissue_hires_scalef": 0.2,
        "tissue_lowres_scalef": 0.05,
        "fiducial_diameter_fullres": 143.0,
    }
    (outs / "spatial/scalefactors_json.json").write_text(json.dumps(scalefactors))
    hires = gradient_image(400, 320)
    Image.fromarray(hires).save(outs / "spatial/tissue_hires_image.png")
    Image.fromarray(hires[::4, ::4]).save(outs / "spatial/tissue_lowres_image.png")
    sc.read_visium(outs, library_id="lib").write_h5ad(tmp_path / "scanpy.h5ad")

    slide = read_h5ad_slide(tmp_path / "scanpy.h5ad")

    meta = slide_meta(slide)
    assert meta["image_path"].endswith("scanpy.h5ad#uns/spatial/lib/images/hires")
    assert meta["image_scale"] == pytest.approx(0.2)
    assert meta["pixel_size_um"] == pytest.approx(55.0 / 88.0)  # the hexagonal grid
    with open_slide(meta["image_path"]) as image:
        np.testing.assert_array_equal(image.read_region(0, 0, 400, 320), hires)


def test_visium_hd_bins_are_not_taken_for_55_um_spots(tmp_path):
    metadata = {"chemistry_description": "Visium HD v1", "software_version": "spaceranger-3.0.0"}
    scanpy_visium_anndata(metadata, hexagonal=False).write_h5ad(tmp_path / "hd.h5ad")
    assert slide_meta(read_h5ad_slide(tmp_path / "hd.h5ad"))["pixel_size_um"] is None


def test_of_several_libraries_the_one_named_by_sample_id_gives_the_image(tmp_path):
    adata = scanpy_visium_anndata(SPACE_RANGER_METADATA)
    adata.uns["spatial"]["other"] = adata.uns["spatial"]["lib"]
    adata.write_h5ad(tmp_path / "two.h5ad")

    chosen = read_h5ad_slide(tmp_path / "two.h5ad", sample_id="other")
    unchosen = read_h5ad_slide(tmp_path / "two.h5ad")

    assert slide_meta(chosen)["image_path"].endswith("#uns/spatial/other/images/hires")
    assert list(chosen.uns["spatial"]) == ["other"]
    assert slide_meta(unchosen)["image_path"] is None
    assert any("holds 2 libraries" in note for note in slide_meta(unchosen)["notes"])


def test_image_reference_to_a_missing_dataset_is_a_clear_error(tmp_path):
    scanpy_visium_anndata(SPACE_RANGER_METADATA).write_h5ad(tmp_path / "visium.h5ad")
    reference = h5ad_image_reference(tmp_path / "visium.h5ad", "uns/spatial/other/images/hires")
    with pytest.raises(InputError, match=r"uns/spatial/other/images/hires is not an image array"):
        open_slide(reference)


# ---------------------------------------------------------------- the CLI


def test_stinfer_prepare_output_opens_in_sc_pl_spatial(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("prepare",))
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(3, 8), np.arange(10, 14), indexing="ij")
    array_xy = np.column_stack([xs.ravel(), ys.ravel()])
    pixel_xy = 60.0 + (array_xy - [3, 10]) * 80.0
    pd.DataFrame(
        {
            "x": array_xy[:, 0],
            "y": array_xy[:, 1],
            "pixel_x": pixel_xy[:, 0],
            "pixel_y": pixel_xy[:, 1],
            "selected": 1,
        }
    ).to_csv(tmp_path / "C2_selection.tsv", sep="\t", index=False)
    names = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.poisson(3, (len(names), len(GENES))), index=names, columns=GENES)
    counts.to_csv(tmp_path / "C2.tsv.gz", sep="\t")
    Image.fromarray(gradient_image(500, 420)).save(tmp_path / "C2.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    line = (
        "prepare --format legacy-st --counts C2.tsv.gz --spots C2_selection.tsv --image C2.jpg "
        "--sample-id C2 --out C2.h5ad"
    )
    assert cli.main(line.split()) == 0

    adata = ad.read_h5ad("C2.h5ad")

    assert list(adata.uns["spatial"]) == ["C2"]
    assert sc.pl.spatial(adata, color="ERBB2", show=False) is not None
    scalefactors = adata.uns["spatial"]["C2"]["scalefactors"]
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(
        slide_meta(adata)["spot_diameter_px"]
    )
