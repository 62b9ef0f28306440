"""CoxFormer spatial model over AnnData: EMA stopping, imputation, super-resolution, save/load."""

from __future__ import annotations

import dataclasses

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from stinfer.errors import InputError
from stinfer.metrics import per_gene_pearson
from stinfer.models import model_config
from stinfer.models.coxformer_spatial import (
    CoxFormerSpatial,
    CoxFormerSpatialConfig,
    CoxFormerSpatialTask,
    aggregate_sub_spots,
    coxformer_spatial_config,
    fast_preset,
    paper_preset,
    slide_log1p_cp10k,
    sub_spot_offsets,
    upgrade_coxformer_spatial_config_dict,
    validation_split,
)
from stinfer.train import EMAEarlyStopping, TrainerConfig, fit

TINY_MODULE = dict(
    d_model=32,
    feedforward_dim=64,
    location_dim=32,
    image_dim=32,
    head_width=32,
    gene_hidden_dim=32,
    n_heads=4,
    rank=8,
)


def tiny_config(module=None, training=None, trainer=None):
    """The ``fast`` preset with a tiny module, trained on the CPU, and these fields set."""
    return coxformer_spatial_config(
        "fast",
        module={**TINY_MODULE, **(module or {})},
        training=training or {},
        trainer={"progress_bar": False, "accelerator": "cpu", **(trainer or {})},
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- EMA early stopping
class ScriptedLoss(L.LightningModule):
    """Logs a scripted loss per epoch; its one weight records the epoch it was set in."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = losses
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        value = torch.tensor(self.losses[self.current_epoch]) + 0.0 * self.weight
        self.log("train/loss", value, on_step=False, on_epoch=True)
        return value

    def on_train_epoch_start(self) -> None:
        self.weight.data.fill_(float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def reference_ema_stop(losses, beta, min_relative, patience):
    ema, best, best_epoch, wait = None, None, None, 0
    for epoch, value in enumerate(losses):
        ema = value if ema is None else beta * value + (1 - beta) * ema
        if best is None or ema < best - min_relative * abs(best):
            best, best_epoch, wait = ema, epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return best_epoch, epoch
    return best_epoch, len(losses) - 1


def test_ema_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    losses = [1.0, 0.6, 0.5, 0.45, 0.449, 0.4485, 0.6, 0.4, 0.6] + [0.7] * 11
    module = ScriptedLoss(losses)
    stopper = EMAEarlyStopping("train/loss", beta=0.2, min_relative_improvement=0.002, patience=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1)))
    config = TrainerConfig(max_epochs=len(losses), progress_bar=False, accelerator="cpu")
    fit(module, loader, None, config, callbacks=[stopper])
    best_epoch, stop_epoch = reference_ema_stop(losses, 0.2, 0.002, 3)
    assert stopper.best_epoch == best_epoch
    assert stopper.stopped_epoch == stop_epoch < len(losses) - 1
    assert float(module.weight) == best_epoch  # the best epoch's weights are back


# --------------------------------------------------------------------------- helpers
def test_sub_spot_aggregation_is_the_log1p_of_the_mean_cp10k():
    values = torch.log1p(torch.tensor([[1.0], [3.0], [0.0], [4.0], [10.0], [10.0], [10.0], [10.0]]))
    out = aggregate_sub_spots(values, 4)
    torch.testing.assert_close(out, torch.log1p(torch.tensor([[2.0], [10.0]])))
    offsets = sub_spot_offsets(2)
    np.testing.assert_allclose(
        offsets, [[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25]]
    )


def grid_slide(counts: np.ndarray, side: int, genes: list[str], pitch: float = 100.0) -> ad.AnnData:
    rows, cols = np.divmod(np.arange(side * side), side)
    slide = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(
            {"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(side * side)]
        ),
        var=pd.DataFrame(index=genes),
    )
    slide.obsm["spatial"] = np.stack([cols, rows], axis=1).astype(np.float64) * pitch
    return slide


# --------------------------------------------------------------------------- super-resolution
@pytest.mark.parametrize("conditioning", ["attention", "bilinear"])
def test_super_resolution_recovers_a_planted_sub_spot_pattern_better_than_upsampling(conditioning):
    rng = np.random.default_rng(0)
    side, grid, n_genes, n_features = 9, 2, 16, 6
    n_spots, n_sub = side * side, grid * grid
    pattern = rng.standard_normal((n_spots, n_sub))  # varies inside every spot
    loadings = rng.uniform(0.5, 1.5, n_genes) * rng.choice([-1, 1], n_genes)
    base = rng.uniform(1.0, 3.0, n_genes)
    sub_cp10k = np.exp(base + 0.6 * loadings * pattern[:, :, None])  # (spots, sub, genes)
    sub_cp10k *= 1e4 / sub_cp10k.sum(axis=2, keepdims=True)
    spot_cp10k = sub_cp10k.mean(axis=1)
    counts = rng.poisson(spot_cp10k * 5.0)  # deep spots: 50k counts
    genes = [f"g{i}" for i in range(n_genes)]
    slide = grid_slide(counts, side, genes)
    mixing = rng.standard_normal((1, n_features))
    features = pattern[:, :, None] * mixing + 0.1 * rng.standard_normal(
        (n_spots, n_sub, n_features)
    )
    embeddings = pd.DataFrame(rng.standard_normal((n_genes, 8)), index=genes)
    config = tiny_config(
        module={"gene_conditioning": conditioning},
        training={"sub_spot_grid": grid, "min_spot_fraction": 0.0},
        trainer={"max_epochs": 25},
    )
    model = CoxFormerSpatial(slide, embeddings, genes, "image", config, image_features=features)
    model.train()
    sub = model.super_resolve(genes)
    assert sub.n_obs == n_spots * n_sub and sub.obsm["spatial"].shape == (n_spots * n_sub, 2)
    assert list(sub.obs["spot"][:n_sub]) == ["s0"] * n_sub
    np.testing.assert_array_equal(sub.obs["array_row"], np.repeat(slide.obs["array_row"], n_sub))
    truth = np.log1p(sub_cp10k.reshape(n_spots * n_sub, n_genes))
    upsampled = np.repeat(np.log1p(spot_cp10k), n_sub, axis=0)
    model_pcc = np.median(per_gene_pearson(np.asarray(sub.layers["log1p_cp10k"]), truth)[0])
    upsampled_pcc = np.median(per_gene_pearson(upsampled, truth)[0])
    print(f"sub-spot median PCC: model {model_pcc:.3f}, upsampled spot values {upsampled_pcc:.3f}")
    assert model_pcc > upsampled_pcc + 0.1


# --------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def planted():
    """A 15 x 15 slide whose 60 genes follow 3 smooth spatial modules, embeddings = modules."""
    rng = np.random.default_rng(1)
    side, n_genes = 15, 60
    rows, cols = np.divmod(np.arange(side * side), side)
    u, v = cols / side, rows / side
    modules = np.stack([np.sin(3 * u), np.cos(3 * v), np.sin(2 * (u + v))], axis=1)
    module_of = np.arange(n_genes) % 3
    rate = np.exp(1.5 + 1.2 * modules[:, module_of])
    genes = [f"g{i}" for i in range(n_genes)]
    slide = grid_slide(rng.poisson(rate * 3), side, genes)
    slide.obs["domain"] = pd.Categorical(np.where(u < 0.5, "left", "right"))
    directions = np.linalg.qr(rng.standard_normal((8, 3)))[0].T
    vectors = directions[module_of] + 0.2 * rng.standard_normal((n_genes, 8))
    unmeasured = directions + 0.2 * rng.standard_normal((3, 8))
    embeddings = pd.DataFrame(
        np.vstack([vectors, unmeasured]), index=[*genes, "new0", "new1", "new2"]
    )
    config = tiny_config(training={"min_spot_fraction": 0.0}, trainer={"max_epochs": 8})
    model = CoxFormerSpatial(slide, embeddings, genes[:50], "location", config)
    model.train()
    return model, slide, embeddings


def test_impute_returns_genes_never_measured_on_the_slide(planted):
    model, slide, _ = planted
    imputed = model.impute(["g55", "new0", "new1"])
    assert imputed.shape == (slide.n_obs, 3)
    assert list(imputed.var["measured_on_slide"]) == [True, False, False]
    assert np.all(np.isfinite(imputed.X)) and np.all(imputed.X >= 0)
    assert imputed.uns["stinfer"]["expression"]["X"] == "expected_counts"
    with pytest.raises(InputError, match="no embedding"):
        model.impute(["NOT_A_GENE"])


def test_held_out_genes_are_predicted_from_their_module_mates(planted):
    model, slide, _ = planted
    held_out = [f"g{i}" for i in range(50, 60)]
    imputed = np.asarray(model.impute(held_out).layers["log1p_cp10k"])
    truth = np.log1p(slide[:, held_out].X.toarray() / slide.X.sum(axis=1).A * 1e4)
    pcc = per_gene_pearson(imputed, truth)[0]
    print("held-out planted genes, PCC:", np.round(pcc, 2))
    assert np.median(pcc) > 0.7


def test_a_new_slide_that_measures_the_training_genes_is_predicted_from_its_measurements(planted):
    model, slide, _ = planted
    order = np.random.default_rng(0).permutation(slide.n_obs)
    shuffled = slide[order].copy()  # same genes, each spot's counts moved to another spot
    shuffled.obsm["spatial"] = slide.obsm["spatial"]
    held_out = [f"g{i}" for i in range(50, 60)]
    on_new = np.asarray(model.predict(shuffled, held_out).layers["log1p_cp10k"])
    truth = np.log1p(shuffled[:, held_out].X.toarray() / shuffled.X.sum(axis=1).A * 1e4)
    assert np.median(per_gene_pearson(on_new, truth)[0]) > 0.7
    # without the training genes measured, the decoder's prediction of them stands in
    panel = shuffled[:, held_out].copy()
    from_decoder = np.asarray(model.predict(panel, held_out).layers["log1p_cp10k"])
    assert np.all(np.isfinite(from_decoder)) and not np.allclose(from_decoder, on_new)


def test_prediction_on_a_new_slide_uses_its_own_coordinates(planted):
    model, slide, _ = planted
    new_slide = slide[::2].copy()
    prediction = model.predict(new_slide, ["g1", "new2"])
    assert prediction.shape == (new_slide.n_obs, 2)
    assert list(prediction.obs_names) == list(new_slide.obs_names)
    np.testing.assert_array_equal(prediction.obs["array_row"], new_slide.obs["array_row"])
    np.testing.assert_array_equal(prediction.obs["array_col"], new_slide.obs["array_col"])


def test_region_detection_clusters_imputed_expression_and_scores_ari(planted):
    """The ARI returned is sklearn's ARI of the returned regions against the labels, so the
    regions reproduce a labelling they were derived from exactly (ARI 1)."""
    from sklearn.metrics import adjusted_rand_score

    model, slide, _ = planted
    imputed = model.impute()
    regions, ari = model.detect_regions(2, labels=slide.obs["domain"], imputed=imputed)
    assert regions.shape == (slide.n_obs,) and len(np.unique(regions)) == 2
    assert ari == pytest.approx(adjusted_rand_score(slide.obs["domain"].astype(str), regions))
    relabelled = np.where(regions == regions[0], "first", "second")  # other names, same sets
    assert model.detect_regions(2, labels=relabelled, imputed=imputed)[1] == pytest.approx(1.0)
    assert model.detect_regions(2, imputed=imputed)[1] is None


def test_save_load_round_trip_gives_identical_predictions(planted, tmp_path):
    model, slide, _ = planted
    model.save(tmp_path / "model")
    loaded = CoxFormerSpatial.load(tmp_path / "model", slide=slide)
    np.testing.assert_allclose(
        loaded.impute(["g3", "new1"]).X, model.impute(["g3", "new1"]).X, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InputError, match="already exists"):
        model.save(tmp_path / "model")
    with pytest.raises(InputError, match="not a saved"):
        CoxFormerSpatial.load(tmp_path)


def test_bad_inputs_raise_input_errors(planted):
    _, slide, embeddings = planted
    with pytest.raises(InputError, match="modality"):
        CoxFormerSpatial(slide, embeddings, modality="sound")
    with pytest.raises(InputError, match="has no image"):
        CoxFormerSpatial(
            slide, embeddings, modality="image", config=coxformer_spatial_config("fast")
        )
    with pytest.raises(InputError, match="unknown CoxFormer spatial preset"):
        CoxFormerSpatial(slide, embeddings, config="slow")


def test_training_on_a_random_subset_of_spots_per_step_runs_with_sub_spots(planted):
    _, slide, embeddings = planted
    config = tiny_config(
        training={"min_steps_per_epoch": 2, "max_spots_per_step": 30, "sub_spot_grid": 2},
        trainer={"max_epochs": 1},
    )
    model = CoxFormerSpatial(slide, embeddings, [f"g{i}" for i in range(20)], "location", config)
    model.train()
    assert model.fit_result.history and np.isfinite(model.fit_result.history[-1]["train/loss"])
    sub = model.super_resolve(["new0"])
    assert sub.shape == (4 * slide.n_obs, 1)
    spots = model.impute(["new0"]).layers["log1p_cp10k"][:, 0]
    expected = np.log1p(
        np.expm1(np.asarray(sub.layers["log1p_cp10k"][:, 0])).reshape(-1, 4).mean(axis=1)
    )
    np.testing.assert_allclose(spots, expected, rtol=1e-5, atol=1e-6)
    # expected counts add up too: each sub-spot holds an equal share of its spot's library
    sub_counts = np.asarray(sub.X[:, 0], dtype=np.float64).reshape(-1, 4).sum(axis=1)
    np.testing.assert_allclose(sub_counts, model.impute(["new0"]).X[:, 0], rtol=1e-4, atol=1e-6)


def test_config_has_module_training_and_trainer_and_takes_the_old_flat_names():
    fast = fast_preset()
    assert (fast.module.d_model, fast.training.lr, fast.trainer.max_epochs) == (128, 1e-3, 60)
    assert fast.trainer.gradient_clip_val == 1.0 and paper_preset().trainer.max_epochs == 200
    old = coxformer_spatial_config("fast", d_model=64, lr=0.5, max_epochs=3, progress_bar=False)
    assert (old.module.d_model, old.training.lr, old.trainer.max_epochs) == (64, 0.5, 3)
    assert not old.trainer.progress_bar
    both = upgrade_coxformer_spatial_config_dict({"max_epochs": 3, "trainer": {"max_epochs": 5}})
    assert both == {"trainer": {"max_epochs": 5}}  # the new name wins
    config = model_config("coxformer_spatial", "fast", max_epochs=3, seed=1, image_dim=16)
    assert (config.trainer.max_epochs, config.trainer.seed, config.module.image_dim) == (3, 1, 16)
    assert model_config("coxformer_spatial", "fast", epochs=4).trainer.max_epochs == 4
    flat = {
        **dataclasses.asdict(fast.module),
        **dataclasses.asdict(fast.training),
        "max_epochs": 60,
        "gradient_clip_val": 1.0,
        "seed": 0,
        "preset": "fast",
    }
    assert CoxFormerSpatialConfig.from_dict(flat) == fast  # a config.json of the flat layout
    assert CoxFormerSpatialConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(InputError, match=r"unknown options \['module\.d_modle'\]"):
        coxformer_spatial_config("fast", module={"d_modle": 3})


def test_validation_split_is_seeded_disjoint_and_empty_for_tiny_panels():
    fitted, validation = validation_split(50, 0.1, seed=2)
    assert len(validation) == 5 and len(fitted) == 45
    assert set(fitted) | set(validation) == set(range(50)) and not set(fitted) & set(validation)
    np.testing.assert_array_equal(validation_split(50, 0.1, seed=2)[1], validation)
    assert len(validation_split(3, 0.1)[1]) == 0 and len(validation_split(2, 0.5)[1]) == 0


def test_validation_genes_stay_out_of_the_attention_loss_but_train_the_decoder(planted):
    model, slide, _ = planted
    assert model.gene_level_best is not None and model.gene_level_best.best_epoch is not None
    kept = set(model.gene_level_best.best_state)
    assert kept == {  # top-k attention (the default): no temperature
        "module.readout.relevance",
        "module.readout.calibration.weight",
        "module.readout.calibration.bias",
        "module.readout.coexpression_logit",
    }
    location, _, _ = model._spot_inputs(slide, None, same_slide=True)
    is_validation = torch.zeros(len(model.train_genes), dtype=torch.bool)
    is_validation[0] = True
    task = CoxFormerSpatialTask(
        model.module,
        model.config,
        location,
        None,
        torch.from_numpy(model.targets),
        torch.from_numpy(model.gene_vectors(model.train_genes)),
        1,
        is_validation,
    ).train()
    torch.manual_seed(0)
    model.module.eval()  # no dropout: the same numbers for both batches
    task.training = True
    with_validation = task.losses(torch.tensor([0, 1, 2]), None)
    without = task.losses(torch.tensor([1, 2]), None)
    torch.testing.assert_close(with_validation[1], without[1])  # gene 0 not in the loss
    assert not torch.allclose(with_validation[0], without[0])  # but in the decoder's


def test_a_measured_training_gene_is_returned_as_measured(planted):
    model, slide, _ = planted
    measured = slide_log1p_cp10k(slide, ["g3", "g7"])
    imputed = np.asarray(model.impute(["g3", "g7"]).layers["log1p_cp10k"])
    np.testing.assert_allclose(imputed, measured + 0.01, rtol=1e-5, atol=1e-5)  # ELU offset


def test_attention_only_training_leaves_the_spot_decoder_untouched_and_predicts_held_out_genes(
    planted,
):
    _, slide, embeddings = planted
    genes = [f"g{i}" for i in range(50)]
    config = tiny_config(training={"min_spot_fraction": 0.0}, trainer={"max_epochs": 8})
    model = CoxFormerSpatial(slide, embeddings, genes, "location", config)
    decoder_before = {k: v.clone() for k, v in model.module.encoder.state_dict().items()}
    relevance_before = model.module.readout.relevance.detach().clone()
    model.train(spot_decoder=False)
    for name, value in model.module.encoder.state_dict().items():
        torch.testing.assert_close(value, decoder_before[name])
    assert not torch.equal(model.module.readout.relevance.detach(), relevance_before)
    held_out = [f"g{i}" for i in range(50, 60)]
    imputed = np.asarray(model.impute(held_out).layers["log1p_cp10k"])
    truth = np.log1p(slide[:, held_out].X.toarray() / slide.X.sum(axis=1).A * 1e4)
    assert np.median(per_gene_pearson(imputed, truth)[0]) > 0.7
    with pytest.raises(InputError, match="without its spot decoder"):
        model.predict(slide[:, held_out].copy(), held_out)  # no training gene measured there


def test_attention_only_training_is_refused_where_the_decoder_predicts(planted):
    _, slide, embeddings = planted
    config = tiny_config(
        module={"gene_conditioning": "bilinear"},
        training={"min_spot_fraction": 0.0},
        trainer={"max_epochs": 1},
    )
    model = CoxFormerSpatial(slide, embeddings, None, "location", config)
    with pytest.raises(InputError, match="spot_decoder=False"):
        model.train(spot_decoder=False)
