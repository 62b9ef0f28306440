"""Image-only slides: tissue detection, the virtual spot grid, the CLI and a prediction on it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from stinfer import cli
from stinfer.errors import InputError
from stinfer.io import read_image_slide, read_slide
from stinfer.io.image_only import TissueDetectionConfig, detect_tissue, otsu_threshold, spot_grid
from stinfer.io.slide_data import slide_meta

PIXEL_SIZE_UM = 2.0
HEIGHT_PX, WIDTH_PX = 1600, 2000  # 3.2 x 4 mm
DISC_CENTRE_PX = (1000, 800)  # (x, y)
DISC_RADIUS_PX = 600  # 1.2 mm: 4.5 mm^2 of tissue
WORKING_PIXEL_UM = TissueDetectionConfig().working_pixel_size_um


def tissue_mask() -> np.ndarray:
    rows, cols = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX]
    x0, y0 = DISC_CENTRE_PX
    return (cols - x0) ** 2 + (rows - y0) ** 2 < DISC_RADIUS_PX**2


def he_image(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """White glass with pink stroma and purple nuclei on ``mask``, plus scanner noise."""
    rng = np.random.default_rng(seed)
    image = np.full((*mask.shape, 3), 242, dtype=np.float64)
    image[mask] = (225, 140, 190)  # eosin pink
    nuclei = mask & (rng.random(mask.shape) < 0.05)
    image[nuclei] = (120, 70, 150)  # haematoxylin purple
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pyramid_tiff(path: Path, image: np.ndarray, pixel_size_um: float) -> Path:
    """A tiled pyramidal TIFF (levels 1, 1/2, 1/4) with its resolution in centimetres."""
    options = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    pixels_per_cm = 1e4 / pixel_size_um
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(
            image,
            subifds=2,
            resolution=(pixels_per_cm, pixels_per_cm),
            resolutionunit="CENTIMETER",
            **options,
        )
        for factor in (2, 4):
            tiff.write(
                image[::factor, ::factor],
                subfiletype=1,
                resolution=(pixels_per_cm / factor, pixels_per_cm / factor),
                resolutionunit="CENTIMETER",
                **options,
            )
    return path


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("image_only")
    image = he_image(tissue_mask())
    Image.fromarray(image).save(folder / "disc.jpg", quality=90)
    blank = he_image(np.zeros((HEIGHT_PX, WIDTH_PX), dtype=bool), seed=1)
    return {
        "tiff": write_pyramid_tiff(folder / "disc.tif", image, PIXEL_SIZE_UM),
        "jpeg": folder / "disc.jpg",
        "blank": write_pyramid_tiff(folder / "blank.tif", blank, PIXEL_SIZE_UM),
    }


def centres_um(slide: ad.AnnData) -> np.ndarray:
    return np.asarray(slide.obsm["spatial"]) * slide_meta(slide)["pixel_size_um"]


def assert_spots_cover_the_disc(slide: ad.AnnData, area_per_spot_um2: float) -> None:
    """Every centre on the tissue (within one detection pixel), the count ~ area / spot area."""
    x0, y0 = (value * PIXEL_SIZE_UM for value in DISC_CENTRE_PX)
    radius_um = DISC_RADIUS_PX * PIXEL_SIZE_UM
    distance = np.hypot(*(centres_um(slide) - [x0, y0]).T)
    assert np.all(distance < radius_um + 2 * WORKING_PIXEL_UM)
    assert np.mean(distance < radius_um) > 0.98
    expected = np.pi * radius_um**2 / area_per_spot_um2
    assert abs(slide.n_obs - expected) < 0.1 * expected


def nearest_neighbour_um(slide: ad.AnnData) -> np.ndarray:
    distances, _ = cKDTree(centres_um(slide)).query(centres_um(slide), k=2)
    return distances[:, 1]


def test_visium_grid_lays_hexagonal_spots_100_um_apart_over_the_tissue(slide_files):
    slide = read_image_slide(slide_files["tiff"], grid="visium")
    meta = slide_meta(slide)
    assert slide.shape == (slide.n_obs, 0) and slide.n_obs > 0
    assert meta["source_format"] == "image" and meta["pixel_size_um"] == PIXEL_SIZE_UM
    assert meta["spot_diameter_px"] == pytest.approx(55.0 / PIXEL_SIZE_UM)
    assert meta["image_path"] == str(slide_files["tiff"].resolve())
    assert_spots_cover_the_disc(slide, 100.0**2 * np.sqrt(3) / 2)
    np.testing.assert_allclose(nearest_neighbour_um(slide), 100.0, atol=1e-6)

    rows, cols = slide.obs["array_row"].to_numpy(), slide.obs["array_col"].to_numpy()
    assert np.all((rows + cols) % 2 == 0)
    on_grid = set(zip(rows.tolist(), cols.tolist(), strict=True))
    offsets = [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    neighbours = np.array(
        [sum((r + dr, c + dc) in on_grid for dr, dc in offsets) for r, c in on_grid]
    )
    x0, y0 = (value * PIXEL_SIZE_UM for value in DISC_CENTRE_PX)
    interior = np.hypot(*(centres_um(slide) - [x0, y0]).T) < DISC_RADIUS_PX * PIXEL_SIZE_UM - 200
    by_spot = dict(zip(on_grid, neighbours, strict=True))
    interior_counts = [by_spot[(r, c)] for r, c in zip(rows[interior], cols[interior], strict=True)]
    assert interior_counts and set(interior_counts) == {6}
    # (r, c) -> (r, c + 2) is one pitch along x; (r, c) -> (r + 1, c + 1) one pitch diagonally
    position = {
        (r, c): xy for r, c, xy in zip(rows.tolist(), cols.tolist(), centres_um(slide), strict=True)
    }
    r, c = rows[interior][0], cols[interior][0]
    np.testing.assert_allclose(position[(r, c + 2)] - position[(r, c)], [100.0, 0.0])
    np.testing.assert_allclose(
        position[(r + 1, c + 1)] - position[(r, c)], [50.0, 50.0 * np.sqrt(3)]
    )


def test_st_and_numeric_grids_are_square_with_their_pitch(slide_files):
    st = read_slide("image", image=slide_files["tiff"], grid="st")
    assert_spots_cover_the_disc(st, 200.0**2)
    np.testing.assert_allclose(nearest_neighbour_um(st), 200.0, atol=1e-6)
    assert slide_meta(st)["spot_diameter_px"] == pytest.approx(100.0 / PIXEL_SIZE_UM)
    assert st.obs["in_tissue_fraction"].between(0, 1).all()
    strict = read_image_slide(
        slide_files["tiff"], grid="st", tissue=TissueDetectionConfig(min_spot_tissue_fraction=0.5)
    )
    assert strict.obs["in_tissue_fraction"].min() >= 0.5
    assert set(strict.obs_names) <= set(st.obs_names)
    custom = read_image_slide(slide_files["tiff"], grid="150")
    np.testing.assert_allclose(nearest_neighbour_um(custom), 150.0, atol=1e-6)
    assert spot_grid(150).spot_diameter_um == 75.0
    with pytest.raises(InputError, match="--grid"):
        spot_grid("hexagon")


def test_a_jpeg_needs_the_pixel_size_and_then_gives_the_same_grid(slide_files):
    with pytest.raises(InputError, match="--pixel-size-um"):
        read_image_slide(slide_files["jpeg"])
    slide = read_image_slide(slide_files["jpeg"], pixel_size_um=PIXEL_SIZE_UM, sample_id="he")
    assert slide.obs_names[0].startswith("he_")
    assert_spots_cover_the_disc(slide, 100.0**2 * np.sqrt(3) / 2)


def test_a_blank_slide_has_no_tissue(slide_files):
    with pytest.raises(InputError, match="no tissue found"):
        read_image_slide(slide_files["blank"])


def test_detection_drops_specks_and_fills_small_holes():
    mask = np.zeros((400, 400), dtype=bool)
    mask[100:300, 100:300] = True
    mask[190:195, 190:195] = False  # a 5 x 5 px hole (2,500 um^2 at 10 um/px)
    mask[20:23, 20:23] = True  # a 3 x 3 px speck
    found, threshold = detect_tissue(he_image(mask), pixel_size_um=10.0)
    assert 0.05 <= threshold < 0.5
    assert found[190:195, 190:195].all() and not found[15:30, 15:30].any()
    expected = ndimage.binary_fill_holes(mask)
    expected[:50, :50] = False
    assert (found ^ expected).sum() < 0.03 * expected.sum()
    assert otsu_threshold(np.zeros(10)) == 0.0


def test_prepare_writes_an_h5ad_that_opens_with_its_scanpy_images(
    slide_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("prepare",))
    out = tmp_path / "disc.h5ad"
    status = cli.main(
        ["prepare", "--format", "image", "--image", str(slide_files["tiff"]), "--grid", "st",
         "--out", str(out)]
    )  # fmt: skip
    assert status in (0, None)
    written = ad.read_h5ad(out)
    assert written.n_vars == 0 and written.n_obs > 0
    assert written.uns["stinfer"]["source_format"] == "image"
    library = written.uns["spatial"]["disc"]
    assert set(library["images"]) == {"hires", "lowres"}
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(50.0)
    wrong_format = ["--format", "visium", "--path", "x", "--grid", "st", "--out", "o.h5ad"]
    assert cli.main(["prepare", *wrong_format]) == 2
    assert "--grid is for --format image" in capsys.readouterr().err


def test_a_trained_stevs_model_predicts_on_an_image_only_slide(slide_files, tmp_path, monkeypatch):
    import torch

    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
    from stinfer.models.stevs import STEvs, fast_preset

    torch.set_num_threads(1)
    section = make_synthetic_sections(
        tmp_path / "synthetic", SyntheticConfig(seed=2, target_spots=120, n_genes=20, n_sections=1)
    )[0]
    config = fast_preset()
    config.training.test_time_augmentation = False
    config.trainer = dataclasses.replace(config.trainer, max_epochs=1, progress_bar=False)
    model = STEvs([section], genes=list(section.var_names), config=config)
    model.train()
    model.save(tmp_path / "run")

    slide_path = tmp_path / "disc.h5ad"
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("prepare", "predict"))
    status = cli.main(
        ["prepare", "--format", "image", "--image", str(slide_files["tiff"]), "--grid", "st",
         "--out", str(slide_path)]
    )  # fmt: skip
    assert status in (0, None)
    for mode in ("image", "fused"):
        out = tmp_path / f"prediction_{mode}.h5ad"
        status = cli.main(
            ["predict", "--run", str(tmp_path / "run"), "--slide", str(slide_path), "--mode",
             mode, "--out", str(out)]
        )  # fmt: skip
        assert status in (0, None)
        prediction = ad.read_h5ad(out)
        assert prediction.shape == (ad.read_h5ad(slide_path).n_obs, len(model.genes))
        assert np.all(np.isfinite(prediction.X)) and "spatial" in prediction.uns
