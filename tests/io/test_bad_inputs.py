"""Bad inputs to the readers: each one is an InputError whose message names the problem and fix."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from stinfer.errors import InputError
from stinfer.io import read_h5ad_slide, read_hest, read_legacy_st, read_slide, read_visium
from stinfer.io.slide_image import open_slide, read_jpeg_reduced

# ---------------------------------------------------------------- a minimal Space Ranger folder

BARCODES = [f"ACGT{index:04d}-1" for index in range(6)]


def visium_positions() -> pd.DataFrame:
    """Six in-tissue spots at full-resolution pixels up to (900, 700), one spot off tissue."""
    return pd.DataFrame(
        {
            "barcode": [*BARCODES, "OFFT0000-1"],
            "in_tissue": [1, 1, 1, 1, 1, 1, 0],
            "array_row": [0, 0, 1, 1, 2, 2, 3],
            "array_col": [0, 2, 1, 3, 0, 2, 1],
            "pxl_row_in_fullres": [100.0, 100.0, 300.0, 300.0, 700.0, 700.0, 900.0],
            "pxl_col_in_fullres": [100.0, 500.0, 300.0, 900.0, 100.0, 500.0, 300.0],
        }
    )


def write_visium(
    folder: Path, counts: np.ndarray | None = None, positions: pd.DataFrame | None = None
) -> Path:
    """Write an mtx matrix (3 genes), 2.x positions, scale factors and a 100 x 80 hires PNG."""
    matrix_folder = folder / "filtered_feature_bc_matrix"
    matrix_folder.mkdir(parents=True)
    (folder / "spatial").mkdir()
    if counts is None:
        counts = np.arange(len(BARCODES) * 3).reshape(len(BARCODES), 3)
    field = "integer" if np.issubdtype(counts.dtype, np.integer) else "real"
    scipy.io.mmwrite(matrix_folder / "matrix.mtx", sp.coo_matrix(counts.T), field=field)
    pd.Series(BARCODES).to_csv(matrix_folder / "barcodes.tsv", header=False, index=False)
    pd.DataFrame(
        {"id": ["G1", "G2", "G3"], "name": ["A", "B", "C"], "type": ["Gene Expression"] * 3}
    ).to_csv(matrix_folder / "features.tsv", sep="\t", header=False, index=False)
    (visium_positions() if positions is None else positions).to_csv(
        folder / "spatial/tissue_positions.csv", index=False
    )
    (folder / "spatial/scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": 80.0,
                "tissue_hires_scalef": 0.1,
                "tissue_lowres_scalef": 0.03,
            }
        )
    )
    Image.new("RGB", (100, 80)).save(folder / "spatial/tissue_hires_image.png")
    return folder


def test_visium_folder_is_well_formed(tmp_path: Path) -> None:
    """The baseline the bad inputs below are derived from reads cleanly."""
    slide = read_visium(write_visium(tmp_path / "outs"))
    assert slide.shape == (6, 3)


def test_visium_missing_count_matrix_lists_the_folder(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    for child in (folder / "filtered_feature_bc_matrix").iterdir():
        child.unlink()
    (folder / "filtered_feature_bc_matrix").rmdir()
    with pytest.raises(
        InputError,
        match=r"filtered_feature_bc_matrix.h5: the count matrix .* not found; .* holds: spatial/",
    ):
        read_visium(folder)


def test_visium_missing_barcode_file_is_named(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "filtered_feature_bc_matrix/barcodes.tsv").unlink()
    with pytest.raises(InputError, match=r"barcodes.tsv.gz: the barcode list .* not found.*matrix"):
        read_visium(folder)


def test_visium_missing_positions_file(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "spatial/tissue_positions.csv").unlink()
    with pytest.raises(
        InputError,
        match=r"tissue_positions.csv: the spot positions file .* not found; .* holds: "
        r"scalefactors_json.json, tissue_hires_image.png",
    ):
        read_visium(folder)


def test_visium_missing_scalefactors(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "spatial/scalefactors_json.json").unlink()
    with pytest.raises(InputError, match=r"scalefactors_json.json: the Space Ranger scale factors"):
        read_visium(folder)


def test_visium_positions_with_wrong_columns(tmp_path: Path) -> None:
    positions = visium_positions().rename(columns={"pxl_row_in_fullres": "y"})
    folder = write_visium(tmp_path / "outs", positions=positions)
    with pytest.raises(InputError, match=r"missing columns pxl_row_in_fullres; found barcode,"):
        read_visium(folder)


def test_visium_headerless_positions_with_too_few_columns(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "spatial/tissue_positions.csv").unlink()
    visium_positions().iloc[:, :5].to_csv(
        folder / "spatial/tissue_positions_list.csv", header=False, index=False
    )
    with pytest.raises(
        InputError, match=r"header-less positions file must have 6 columns.*found 5"
    ):
        read_visium(folder)


def test_visium_duplicated_barcodes_in_positions(tmp_path: Path) -> None:
    positions = visium_positions()
    positions.loc[1, "barcode"] = positions.loc[0, "barcode"]
    folder = write_visium(tmp_path / "outs", positions=positions)
    with pytest.raises(InputError, match=r"1 barcodes occur more than once \(e.g. ACGT0000-1\)"):
        read_visium(folder)


def test_visium_no_overlapping_barcodes(tmp_path: Path) -> None:
    positions = visium_positions().assign(barcode=lambda t: t["barcode"].str.replace("-1", "-2"))
    folder = write_visium(tmp_path / "outs", positions=positions)
    with pytest.raises(
        InputError,
        match=r"no barcode is both in the count matrix .*e.g. ACGT0000-1.*e.g. ACGT0000-2",
    ):
        read_visium(folder)


def test_visium_negative_counts(tmp_path: Path) -> None:
    counts = np.ones((len(BARCODES), 3), dtype=np.int64)
    counts[2, 1] = -4
    folder = write_visium(tmp_path / "outs", counts=counts)
    with pytest.raises(
        InputError, match=r"negative values \(min -4\); raw UMI counts are expected"
    ):
        read_visium(folder)


def test_visium_non_integer_counts(tmp_path: Path) -> None:
    counts = np.full((len(BARCODES), 3), 2.0)
    counts[0, 0] = 0.693
    folder = write_visium(tmp_path / "outs", counts=counts)
    with pytest.raises(InputError, match=r"non-integer values \(e.g. 0.693\)"):
        read_visium(folder)


def test_visium_corrupt_h5(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "filtered_feature_bc_matrix.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix.h5: cannot be read as HDF5"):
        read_visium(folder)


def test_visium_hires_png_passed_as_full_resolution_image(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    with pytest.raises(
        InputError,
        match=r"reach x=900, y=700 full-resolution pixels but tissue_hires_image.png is 100 x 80 "
        r"px\. The coordinates look like full-resolution pixels but the image looks like the "
        r"hires PNG \(tissue_hires_scalef=0.1\); pass the full-resolution microscope image",
    ):
        read_visium(folder, image=folder / "spatial/tissue_hires_image.png")


def test_visium_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "matrix.h5").write_bytes(b"")
    with pytest.raises(InputError, match=r"expected a Space Ranger output folder, got a file"):
        read_visium(tmp_path / "matrix.h5")


# ---------------------------------------------------------------- legacy ST tables


def write_legacy(
    folder: Path, counts_text: str | None = None, spots: pd.DataFrame | None = None
) -> tuple[Path, Path]:
    """Write a 3-spot count table and its spot table (pixel coordinates on a 250 px grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    if counts_text is None:
        counts_text = "\tGENE1\tGENE2\n1x1\t0\t3\n2x1\t5\t0\n1x2\t1\t1\n"
    if spots is None:
        spots = pd.DataFrame(
            {
                "x": [1, 2, 1],
                "y": [1, 1, 2],
                "pixel_x": [250.0, 500, 250],
                "pixel_y": [250.0, 250, 500],
            }
        )
    counts_path = folder / "S.tsv"
    counts_path.write_text(counts_text)
    spots_path = folder / "S_selection.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    return counts_path, spots_path


def test_legacy_baseline_is_well_formed(tmp_path: Path) -> None:
    slide = read_legacy_st(*write_legacy(tmp_path))
    assert slide.shape == (3, 2)


def test_legacy_missing_counts_file(tmp_path: Path) -> None:
    _, spots_path = write_legacy(tmp_path)
    with pytest.raises(
        InputError, match=r"S2.tsv.gz: the legacy ST count table not found; .* holds: S.tsv"
    ):
        read_legacy_st(tmp_path / "S2.tsv.gz", spots_path)


def test_legacy_malformed_row_names(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path, counts_text="\tGENE1\nspot_1\t1\n2x1\t5\n1-2\t1\n")
    with pytest.raises(
        InputError,
        match=r"2 row names are not array coordinates '<x>x<y>' \(e.g. 'spot_1', '1-2'\)",
    ):
        read_legacy_st(*paths)


def test_legacy_nan_counts(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path, counts_text="\tGENE1\tGENE2\n1x1\t\t3\n2x1\t5\t0\n1x2\t1\t1\n")
    with pytest.raises(InputError, match=r"S.tsv: the count matrix holds NaN"):
        read_legacy_st(*paths)


def test_legacy_non_numeric_counts(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path, counts_text="\tGENE1\tGENE2\n1x1\tlow\t3\n2x1\t5\t0\n")
    with pytest.raises(
        InputError, match=r"1 gene columns hold non-numeric values \(e.g. column 'GENE1'\)"
    ):
        read_legacy_st(*paths)


def test_legacy_duplicated_spots_in_spot_table(tmp_path: Path) -> None:
    spots = pd.DataFrame(
        {"x": [1, 1], "y": [1, 1], "pixel_x": [250.0, 251], "pixel_y": [250.0, 250]}
    )
    paths = write_legacy(tmp_path, spots=spots)
    with pytest.raises(InputError, match=r"1 spots occur more than once \(e.g. x=1, y=1\)"):
        read_legacy_st(*paths)


def test_legacy_duplicated_spots_in_count_table(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path, counts_text="\tGENE1\n1x1\t1\n2x1\t5\n1x1\t2\n")
    with pytest.raises(InputError, match=r"S.tsv: 1 spots occur more than once \(e.g. 1x1\)"):
        read_legacy_st(*paths)


def test_legacy_spot_table_without_array_coordinates(tmp_path: Path) -> None:
    spots = pd.DataFrame({"row": [1], "col": [1], "pixel_x": [250.0], "pixel_y": [250.0]})
    paths = write_legacy(tmp_path, spots=spots)
    with pytest.raises(InputError, match=r"missing columns x, y; found row, col, pixel_x, pixel_y"):
        read_legacy_st(*paths)


def test_legacy_no_overlapping_spots(tmp_path: Path) -> None:
    spots = pd.DataFrame(
        {"x": [7, 8], "y": [7, 7], "pixel_x": [250.0, 500], "pixel_y": [250.0, 250]}
    )
    paths = write_legacy(tmp_path, spots=spots)
    with pytest.raises(
        InputError, match=r"no spot is in both the count table \(3 spots, e.g. 1x1\)"
    ):
        read_legacy_st(*paths)


def test_legacy_fractional_array_coordinates(tmp_path: Path) -> None:
    spots = pd.DataFrame(
        {"x": [1.02, 2], "y": [1, 1], "pixel_x": [250.0, 500], "pixel_y": [250.0, 250]}
    )
    paths = write_legacy(tmp_path, spots=spots)
    with pytest.raises(InputError, match=r"x, y must be whole array coordinates.*not the sub-spot"):
        read_legacy_st(*paths)


def test_legacy_pixel_size_from_collinear_spots_cannot_be_estimated(tmp_path: Path) -> None:
    spots = pd.DataFrame(
        {"x": [1, 2, 3], "y": [1, 1, 1], "pixel_x": [1.0, 2, 3], "pixel_y": [1.0, 1, 1]}
    )
    paths = write_legacy(tmp_path, "\tG\n1x1\t1\n2x1\t1\n3x1\t1\n", spots)
    with pytest.raises(
        InputError,
        match=r"cannot estimate the pixel size .* pass --pixel-size-um \(pixel_size_um=\)",
    ):
        read_legacy_st(*paths)


def test_legacy_spots_beyond_a_downscaled_image_give_the_size_ratio(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path)  # spots up to pixel (500, 500)
    Image.new("RGB", (100, 100)).save(tmp_path / "thumbnail.png")
    with pytest.raises(
        InputError,
        match=r"reach x=500, y=500 full-resolution pixels but thumbnail.png is 100 x 100 px\. "
        r"The spots reach about 5 times the image's size: the image is probably a downscaled copy",
    ):
        read_legacy_st(*paths, image=tmp_path / "thumbnail.png")


def test_legacy_image_that_is_not_an_image(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path)
    small_anndata().write_h5ad(tmp_path / "slide.h5ad")  # Pillow "identifies" HDF5 as 0 x 0
    with pytest.raises(InputError, match=r"slide.h5ad: not a readable image \(Pillow sees a HDF5"):
        read_legacy_st(*paths, image=tmp_path / "slide.h5ad")


def test_legacy_long_column_lists_are_cut_in_messages(tmp_path: Path) -> None:
    spots = pd.DataFrame({f"GENE{index}": [1] for index in range(500)})
    paths = write_legacy(tmp_path, spots=spots)
    with pytest.raises(InputError, match=r"missing columns x, y; found GENE0, .*\(500 in all\)"):
        read_legacy_st(*paths)


# ---------------------------------------------------------------- h5ad and HEST


def small_anndata() -> ad.AnnData:
    adata = ad.AnnData(
        X=sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0], [0.0, 4.0]])),
        obs=pd.DataFrame(index=["a", "b", "c"]),
        var=pd.DataFrame(index=["G1", "G2"]),
    )
    adata.obsm["spatial"] = np.array([[10.0, 10.0], [20.0, 10.0], [10.0, 20.0]])
    return adata


def test_h5ad_without_spatial_coordinates(tmp_path: Path) -> None:
    adata = small_anndata()
    adata.obsm["X_umap"] = adata.obsm.pop("spatial")
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(
        InputError, match=r"no spot coordinates: obsm has no 'spatial' \(obsm holds: X_umap\)"
    ):
        read_h5ad_slide(tmp_path / "s.h5ad")


def test_h5ad_normalised_x_without_counts_layer(tmp_path: Path) -> None:
    adata = small_anndata()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(
        InputError, match=r"X holds non-integer values and there is no layers\['counts'\]"
    ):
        read_h5ad_slide(tmp_path / "s.h5ad")


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_h5ad_duplicated_spot_ids(tmp_path: Path) -> None:
    adata = small_anndata()
    adata.obs_names = ["a", "b", "a"]
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(InputError, match=r"s.h5ad: 1 spot ids occur more than once \(e.g. a\)\."):
        read_h5ad_slide(tmp_path / "s.h5ad")


def test_h5ad_that_is_not_an_h5ad(tmp_path: Path) -> None:
    (tmp_path / "s.h5ad").write_text("barcode,count\n")
    with pytest.raises(InputError, match=r"s.h5ad: cannot be read as an AnnData h5ad file"):
        read_h5ad_slide(tmp_path / "s.h5ad")


def test_h5ad_stored_image_path_that_moved(tmp_path: Path) -> None:
    adata = small_anndata()
    adata.uns["stinfer"] = {"sample_id": "s", "image_path": "/nowhere/he.tif", "image_scale": 1.0}
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(
        InputError, match=r"uns\['stinfer'\]\['image_path'\] names /nowhere/he.tif.*pass the image"
    ):
        read_h5ad_slide(tmp_path / "s.h5ad")


def test_hest_metadata_without_pixel_size(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    small_anndata().write_h5ad(tmp_path / "st/TENX1.h5ad")
    (tmp_path / "metadata/TENX1.json").write_text(
        json.dumps({"pixel_size_um_estimated": None, "spot_diameter": 55.0})
    )
    with pytest.raises(
        InputError,
        match=r"TENX1.json: no pixel size: pixel_size_um_estimated and pixel_size_um_embedded "
        r"are missing or not positive \(keys found: pixel_size_um_estimated, spot_diameter\)",
    ):
        read_hest(tmp_path, "TENX1")


def test_hest_missing_expression_file(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    small_anndata().write_h5ad(tmp_path / "st/TENX1.h5ad")
    with pytest.raises(
        InputError, match=r"TENX2.h5ad: the HEST expression file of TENX2 not found; .* TENX1.h5ad"
    ):
        read_hest(tmp_path, "TENX2")


def test_unknown_format_in_read_slide() -> None:
    with pytest.raises(
        InputError,
        match=r"unknown slide format 'xenium'; choose one of visium, visium-hd, legacy-st, h5ad, hest",
    ):
        read_slide("xenium", path="x")


# ---------------------------------------------------------------- inputs that look fine but are not


def write_cut_in_half(path: Path) -> Path:
    """Replace ``path`` by its first half, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_refused_not_decoded_grey(tmp_path: Path, suffix: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"he{suffix}")
    path = write_cut_in_half(tmp_path / f"he{suffix}")
    with (
        pytest.raises(InputError, match=rf"he\{suffix}: the image is truncated or corrupt"),
        open_slide(path) as slide,
    ):
        slide.read_region(0, 0, 160, 120)


def test_truncated_jpeg_thumbnail_is_refused(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "he.jpg")
    path = write_cut_in_half(tmp_path / "he.jpg")
    with pytest.raises(InputError, match=r"he\.jpg: the image is truncated or corrupt"):
        read_jpeg_reduced(path, 8)


def write_png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR header is patched to declare ``width`` x ``height``."""
    Image.new("RGB", (2, 2)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_header_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STINFER_MAX_IMAGE_PIXELS", raising=False)
    path = write_png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(
        InputError,
        match=r"bomb\.png: the header declares 100000 x 100000 px .* above the cap .*"
        r"STINFER_MAX_IMAGE_PIXELS",
    ):
        open_slide(path)


def test_image_pixel_cap_can_be_raised_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "he.png")
    monkeypatch.setenv("STINFER_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(InputError, match=r"40 x 30 px .* above the cap"):
        open_slide(tmp_path / "he.png")
    monkeypatch.setenv("STINFER_MAX_IMAGE_PIXELS", "1200")
    with open_slide(tmp_path / "he.png") as slide:
        assert slide.dimensions == (40, 30)


def test_legacy_empty_gzipped_count_table(tmp_path: Path) -> None:
    _, spots_path = write_legacy(tmp_path)
    (tmp_path / "S.tsv.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match=r"S\.tsv\.gz: the count table is empty"):
        read_legacy_st(tmp_path / "S.tsv.gz", spots_path)


def test_legacy_gzipped_count_table_cut_in_half(tmp_path: Path) -> None:
    counts_path, spots_path = write_legacy(tmp_path)
    (tmp_path / "S.tsv.gz").write_bytes(gzip.compress(counts_path.read_bytes() * 50))
    write_cut_in_half(tmp_path / "S.tsv.gz")
    with pytest.raises(InputError, match=r"S\.tsv\.gz: cannot be read as a tab-separated count"):
        read_legacy_st(tmp_path / "S.tsv.gz", spots_path)


def test_legacy_empty_spot_table(tmp_path: Path) -> None:
    counts_path, spots_path = write_legacy(tmp_path)
    spots_path.write_bytes(b"")
    with pytest.raises(InputError, match=r"S_selection\.tsv: the spot table is empty"):
        read_legacy_st(counts_path, spots_path)


def test_legacy_binary_spot_table(tmp_path: Path) -> None:
    counts_path, spots_path = write_legacy(tmp_path)
    spots_path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InputError, match=r"S_selection\.tsv: the spot table cannot be read"):
        read_legacy_st(counts_path, spots_path)


def test_visium_empty_positions_file(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "spatial/tissue_positions.csv").write_bytes(b"")
    with pytest.raises(
        InputError, match=r"tissue_positions\.csv: the spot positions file is empty"
    ):
        read_visium(folder)


def test_visium_binary_positions_file(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "spatial/tissue_positions.csv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InputError, match=r"tissue_positions\.csv: the spot positions file is not"):
        read_visium(folder)


def test_visium_empty_barcode_list(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    (folder / "filtered_feature_bc_matrix/barcodes.tsv").write_bytes(b"")
    with pytest.raises(InputError, match=r"barcodes\.tsv: the barcode list is empty"):
        read_visium(folder)


def test_visium_truncated_h5_matrix(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs")
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as handle:
        handle["matrix/data"] = np.arange(1000)
    write_cut_in_half(folder / "filtered_feature_bc_matrix.h5")
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix\.h5: cannot be read as HDF5"):
        read_visium(folder)


@pytest.mark.parametrize("damage", ["zero bytes", "cut in half"])
def test_h5ad_empty_or_truncated(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.h5ad"
    small_anndata().write_h5ad(path)
    if damage == "zero bytes":
        path.write_bytes(b"")
    else:
        write_cut_in_half(path)
    with pytest.raises(InputError, match=r"s\.h5ad: cannot be read as an AnnData h5ad file"):
        read_h5ad_slide(path)


def test_all_zero_counts_are_refused(tmp_path: Path) -> None:
    folder = write_visium(tmp_path / "outs", counts=np.zeros((len(BARCODES), 3), dtype=np.int64))
    with pytest.raises(InputError, match=r"outs: every count is zero \(6 spots x 3 genes\)"):
        read_visium(folder)


def test_legacy_count_table_without_genes_is_refused(tmp_path: Path) -> None:
    paths = write_legacy(tmp_path, counts_text="\n1x1\n2x1\n1x2\n")
    with pytest.raises(InputError, match=r"S\.tsv: (no genes|the count table is empty)"):
        read_legacy_st(*paths)


def test_h5ad_without_spots_or_genes_is_refused(tmp_path: Path) -> None:
    no_spots = small_anndata()[:0].copy()
    no_spots.write_h5ad(tmp_path / "spots.h5ad")
    with pytest.raises(InputError, match=r"spots\.h5ad: no spots left after"):
        read_h5ad_slide(tmp_path / "spots.h5ad")
    no_genes = small_anndata()[:, :0].copy()
    no_genes.write_h5ad(tmp_path / "genes.h5ad")
    with pytest.raises(InputError, match=r"genes\.h5ad: no genes in the count matrix"):
        read_h5ad_slide(tmp_path / "genes.h5ad")


def test_swapped_pixel_axes_are_warned_about_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    positions = visium_positions()
    positions["pxl_row_in_fullres"], positions["pxl_col_in_fullres"] = (
        positions["pxl_col_in_fullres"],
        positions["pxl_row_in_fullres"],
    )
    folder = write_visium(tmp_path / "outs", positions=positions)
    Image.new("RGB", (100, 100)).save(folder / "spatial/tissue_hires_image.png")
    with caplog.at_level("WARNING", logger="stinfer"):
        slide = read_visium(folder)
    assert slide.n_obs == 6
    notes = " ".join(slide.uns["stinfer"]["notes"])
    assert "pixel x follows array_row and pixel y follows array_col" in notes
    assert "some scanners rotate the image" in notes


def test_cli_flag_sets_the_image_pixel_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from stinfer.cli import main

    monkeypatch.setenv("STINFER_MAX_IMAGE_PIXELS", "")  # restored (unset) after the test
    Image.new("RGB", (40, 30)).save(tmp_path / "he.png")
    argv = ["--max-image-pixels", "1000", "prepare", "--format", "image"]
    argv += ["--image", str(tmp_path / "he.png"), "--pixel-size-um", "1"]
    status = main([*argv, "--out", str(tmp_path / "out.h5ad")])
    assert status == 2
    assert "40 x 30 px" in capsys.readouterr().err
