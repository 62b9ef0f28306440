"""read_h5ad_slide and read_hest on generated files; read_slide dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from stinfer.errors import InputError
from stinfer.io import make_slide, prepare_for_h5ad, read_h5ad_slide, read_hest, read_slide
from stinfer.io.atomic import write_h5ad


def make_anndata(n_spots: int = 30, n_genes: int = 8, seed: int = 0) -> ad.AnnData:
    """A scanpy-style spatial AnnData: integer counts, obsm['spatial'] within 1000 x 800 px."""
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_spots, n_genes)).astype(np.float32))
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {
                "array_row": np.arange(n_spots) // 6,
                "array_col": np.arange(n_spots) % 6,
                "domain": pd.Categorical(rng.choice(["tumour", "stroma"], n_spots)),
            },
            index=[f"spot{index}" for index in range(n_spots)],
        ),
        var=pd.DataFrame(
            {"gene_ids": [f"ENSG{index}" for index in range(n_genes)]},
            index=[f"GENE{index}" for index in range(n_genes)],
        ),
    )
    adata.obsm["spatial"] = rng.uniform([50, 50], [950, 750], size=(n_spots, 2))
    return adata


def test_plain_h5ad_with_image_argument(tmp_path: Path) -> None:
    adata = make_anndata()
    adata.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": 42.0}}}
    adata.write_h5ad(tmp_path / "slide.h5ad")
    image = tmp_path / "he.png"
    Image.new("RGB", (1000, 800)).save(image)

    slide = read_h5ad_slide(tmp_path / "slide.h5ad", image=image, pixel_size_um=0.5)

    np.testing.assert_array_equal(slide.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(slide.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(slide.obs["array_row"], adata.obs["array_row"])
    assert list(slide.obs["domain"]) == list(adata.obs["domain"])
    assert list(slide.var["gene_ids"]) == list(adata.var["gene_ids"])
    meta = slide.uns["stinfer"]
    assert meta["sample_id"] == "slide"
    assert meta["source_format"] == "h5ad"
    assert meta["image_path"] == str(image.resolve())
    assert meta["image_scale"] == 1.0
    assert meta["pixel_size_um"] == 0.5
    assert meta["spot_diameter_px"] == 42.0


def test_stinfer_written_h5ad_round_trips_its_metadata(tmp_path: Path) -> None:
    adata = make_anndata()
    image = tmp_path / "hires.png"
    Image.new("RGB", (500, 400)).save(image)
    original = make_slide(
        adata.X,
        adata.obs_names,
        adata.var_names,
        adata.obsm["spatial"],
        sample_id="patient-7",
        source_format="visium",
        source="test",
        image_path=str(image),
        image_scale=0.5,
        pixel_size_um=0.8,
        spot_diameter_px=68.75,
        notes=["kept 30 spots."],
    )
    write_h5ad(prepare_for_h5ad(original), tmp_path / "prepared.h5ad")

    slide = read_h5ad_slide(tmp_path / "prepared.h5ad")

    meta = slide.uns["stinfer"]
    assert meta["sample_id"] == "patient-7"
    assert meta["image_path"] == str(image.resolve())
    assert meta["image_scale"] == 0.5
    assert meta["pixel_size_um"] == pytest.approx(0.8)
    assert meta["spot_diameter_px"] == pytest.approx(68.75)
    assert "kept 30 spots." in meta["notes"]
    np.testing.assert_array_equal(slide.X.toarray(), original.X.toarray())
    # re-reading keeps the names: the sample id prefix is not added twice
    assert list(original.obs_names) == [f"patient-7_spot{index}" for index in range(30)]
    assert list(slide.obs_names) == list(original.obs_names)
    assert list(slide.obs["spot_id"]) == [f"spot{index}" for index in range(30)]
    assert set(slide.obs["sample_id"]) == {"patient-7"}


def _write_prepared_slide(path: Path, sample_id: str = "C2") -> ad.AnnData:
    adata = make_anndata()
    spots = [f"{index}x{index + 1}" for index in range(adata.n_obs)]
    slide = make_slide(
        adata.X,
        spots,
        adata.var_names,
        adata.obsm["spatial"],
        sample_id=sample_id,
        source_format="st",
        source="test",
    )
    write_h5ad(prepare_for_h5ad(slide), path)
    return slide


def test_a_prepared_slide_read_under_another_sample_id_is_named_from_its_spot_ids(
    tmp_path: Path,
) -> None:
    original = _write_prepared_slide(tmp_path / "prepared.h5ad")
    spots = list(original.obs["spot_id"])
    assert list(original.obs_names) == [f"C2_{spot}" for spot in spots]

    renamed = read_h5ad_slide(tmp_path / "prepared.h5ad", sample_id="P7")

    assert list(renamed.obs_names) == [f"P7_{spot}" for spot in spots]
    assert list(renamed.obs["spot_id"]) == spots
    assert set(renamed.obs["sample_id"]) == {"P7"}
    assert renamed.uns["stinfer"]["sample_id"] == "P7"
    same = read_h5ad_slide(tmp_path / "prepared.h5ad", sample_id="C2")
    assert list(same.obs_names) == list(original.obs_names)


def test_repeated_spot_ids_fall_back_to_the_obs_names_with_a_note(tmp_path: Path) -> None:
    original = _write_prepared_slide(tmp_path / "prepared.h5ad")
    adata = ad.read_h5ad(tmp_path / "prepared.h5ad")
    adata.obs["spot_id"] = "0x1"
    adata.write_h5ad(tmp_path / "repeated.h5ad")

    slide = read_h5ad_slide(tmp_path / "repeated.h5ad", sample_id="P7")

    assert list(slide.obs_names) == [f"P7_{name}" for name in original.obs_names]
    assert any(
        "obs['spot_id'] cannot name the spots" in note for note in slide.uns["stinfer"]["notes"]
    )


def test_relative_stored_image_path_is_resolved_next_to_the_h5ad(tmp_path: Path) -> None:
    adata = make_anndata()
    Image.new("RGB", (1000, 800)).save(tmp_path / "he.jpg")
    adata.uns["stinfer"] = {"sample_id": "s", "image_path": "he.jpg", "image_scale": 1.0}
    adata.write_h5ad(tmp_path / "slide.h5ad")
    slide = read_h5ad_slide(tmp_path / "slide.h5ad")
    assert slide.uns["stinfer"]["image_path"] == str((tmp_path / "he.jpg").resolve())


def test_normalised_x_falls_back_to_counts_layer_with_a_note(tmp_path: Path) -> None:
    adata = make_anndata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "normalised.h5ad")

    slide = read_h5ad_slide(tmp_path / "normalised.h5ad")

    np.testing.assert_array_equal(slide.X.toarray(), adata.layers["counts"].toarray())
    assert any("layers['counts']" in note for note in slide.uns["stinfer"]["notes"])
    assert slide.uns["stinfer"]["image_path"] is None


def test_obs_pixel_columns_stand_in_for_obsm_spatial(tmp_path: Path) -> None:
    adata = make_anndata()
    adata.obs["pxl_col_in_fullres"] = adata.obsm["spatial"][:, 0]
    adata.obs["pxl_row_in_fullres"] = adata.obsm["spatial"][:, 1]
    expected = adata.obsm["spatial"].copy()
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "slide.h5ad")
    slide = read_h5ad_slide(tmp_path / "slide.h5ad")
    np.testing.assert_array_equal(slide.obsm["spatial"], expected)


def write_hest_sample(
    root: Path, sample_id: str = "TENX99", metadata: dict | None = None, wsi: bool = True
) -> ad.AnnData:
    """Write the HEST-1k layout for one sample: st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json."""
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    adata = make_anndata()
    adata.obs["in_tissue"] = 1
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    if wsi:
        tifffile.imwrite(root / "wsis" / f"{sample_id}.tif", np.zeros((800, 1000, 3), np.uint8))
    if metadata is None:
        metadata = {
            "st_technology": "Visium",
            "pixel_size_um_embedded": 0.2738,
            "pixel_size_um_estimated": 0.25,
            "spot_diameter": 55.0,
            "inter_spot_dist": 100.0,
        }
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(metadata))
    return adata


def test_hest_sample_reads_pixel_size_spot_size_and_wsi(tmp_path: Path) -> None:
    adata = write_hest_sample(tmp_path)
    slide = read_hest(tmp_path, "TENX99")

    np.testing.assert_array_equal(slide.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(slide.obsm["spatial"], adata.obsm["spatial"])
    meta = slide.uns["stinfer"]
    assert meta["sample_id"] == "TENX99"
    assert meta["source_format"] == "hest"
    assert meta["image_path"] == str((tmp_path / "wsis/TENX99.tif").resolve())
    assert meta["image_scale"] == 1.0
    assert meta["pixel_size_um"] == 0.25  # the estimated pixel size wins over the embedded one
    assert meta["spot_diameter_px"] == pytest.approx(55.0 / 0.25)
    assert any("pixel_size_um_estimated" in note for note in meta["notes"])


def test_hest_falls_back_to_embedded_pixel_size_and_counts_only(tmp_path: Path) -> None:
    write_hest_sample(tmp_path, metadata={"pixel_size_um_embedded": "0.5"}, wsi=False)
    slide = read_slide("hest", root=tmp_path, sample_id="TENX99")
    meta = slide.uns["stinfer"]
    assert meta["pixel_size_um"] == 0.5
    assert meta["spot_diameter_px"] is None
    assert meta["image_path"] is None
    assert any("TENX99.tif not found" in note for note in meta["notes"])


def test_hest_spots_outside_the_wsi_are_rejected(tmp_path: Path) -> None:
    write_hest_sample(tmp_path, wsi=False)
    tifffile.imwrite(tmp_path / "wsis/TENX99.tif", np.zeros((80, 100, 3), np.uint8))
    with pytest.raises(InputError, match=r"TENX99.tif is 100 x 80 px"):
        read_hest(tmp_path, "TENX99")


def test_read_slide_names_the_reader_arguments_on_a_wrong_keyword(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"format 'h5ad'.*takes path, image, sample_id"):
        read_slide("h5ad", file=tmp_path / "slide.h5ad")
