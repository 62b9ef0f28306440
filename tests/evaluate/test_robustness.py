"""Blue-shift robustness (STEvs Appendix J.1, Eq. 40)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.errors import InputError
from stinfer.evaluate.metrics import evaluate_anndata
from stinfer.evaluate.robustness import BLUE_SHIFT_ALPHAS, blue_shift, blue_shift_sweep
from stinfer.models.baselines import (
    MeanExpression,
    PatchFeatureRidge,
    PatchFeatureRidgeConfig,
    prediction_anndata,
)

SMALL_PATCHES = PatchSpec(patch_size_um=160, target_pixel_size_um=8.0)


def test_blue_shift_follows_equation_40_and_clips_to_0_255():
    pixel = np.array([100, 20, 240], dtype=np.uint8).reshape(1, 3, 1, 1)
    shifted = blue_shift(pixel, 0.1).reshape(3)
    expected = np.clip(np.array([100.0, 20.0, 240.0]) + 255 * np.array([-0.1, -0.1, 0.1]), 0, 255)
    np.testing.assert_array_equal(shifted, np.rint(expected).astype(np.uint8))
    np.testing.assert_array_equal(shifted, [74, 0, 255])  # 74.5 rounds to even, G and B clip
    np.testing.assert_array_equal(blue_shift(pixel, 0.8).reshape(3), [0, 0, 255])


def test_blue_shift_of_zero_is_the_identity_and_never_modifies_its_input():
    patches = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    original = patches.copy()
    np.testing.assert_array_equal(blue_shift(patches, 0.0), patches)
    blue_shift(patches, 0.5)
    np.testing.assert_array_equal(patches, original)


def test_blue_shift_works_on_channel_last_images_and_rejects_floats():
    image = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    expected = np.moveaxis(blue_shift(np.moveaxis(image, -1, 0), 0.3), 0, -1)
    np.testing.assert_array_equal(blue_shift(image, 0.3, channel_axis=-1), expected)
    with pytest.raises(InputError, match="uint8"):
        blue_shift(image / 255.0, 0.3, channel_axis=-1)


def test_default_alphas_are_0_to_0_8_in_steps_of_0_1():
    assert BLUE_SHIFT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    config = SyntheticConfig(target_spots=100, n_genes=30, n_sections=2, seed=4)
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), config)


class RecordsPatches(MeanExpression):
    """Mean model that records the mean blue-minus-red of the patches it is given."""

    def __init__(self, slides, genes):
        super().__init__(slides, genes)
        self.blueness: list[float] = []

    def predict(self, slide, patches=None):
        self.blueness.append(float(patches[:, 2].mean()) - float(patches[:, 0].mean()))
        return prediction_anndata(slide, self.genes, np.ones((slide.n_obs, len(self.genes))))


def test_sweep_shifts_only_the_test_patches_and_reports_every_alpha(sections):
    genes = list(sections[0].var_names)
    model = RecordsPatches([sections[0]], genes)
    model.train()
    alphas = (0.0, 0.2, 0.4)
    df = blue_shift_sweep(model, [sections[1]], genes, alphas, patch_spec=SMALL_PATCHES)
    assert list(df["alpha"]) == list(alphas)
    assert (df["test_slice"] == "synthetic_section2").all()
    assert {"pcc_median", "mse", "pcc_median_depthnorm", "predict_seconds"} <= set(df.columns)
    assert np.all(np.diff(model.blueness) > 0)  # the model saw bluer patches as alpha grew


def test_sweep_degrades_an_image_model_and_leaves_the_original_patches_intact(sections):
    genes = list(sections[0].var_names)
    config = PatchFeatureRidgeConfig(patch=SMALL_PATCHES)
    model = PatchFeatureRidge([sections[0]], genes, config)
    model.train()
    originals = spot_patches(sections[1], SMALL_PATCHES)
    before = originals.copy()
    df = blue_shift_sweep(
        model, {"s2": sections[1]}, genes, (0.0, 0.8), patches={"s2": originals}
    ).set_index("alpha")
    np.testing.assert_array_equal(originals, before)
    assert df.loc[0.0, "mse"] < df.loc[0.8, "mse"]
    unshifted = model.predict(sections[1])
    assert df.loc[0.0, "pcc_median"] == pytest.approx(
        evaluate_anndata(unshifted, sections[1][:, genes]).pcc_median
    )
