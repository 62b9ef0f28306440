"""The one training path: stochastic weight averaging through ``TrainerConfig``, and what
``fit`` logs."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from stinfer.errors import InputError
from stinfer.train import FitResult, TrainerConfig, check_accelerator, fit


class LinearRegression(L.LightningModule):
    """y = x w on noisy data, SGD; records its weight at the end of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1, bias=False)
        self.epoch_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x), y)

    def on_train_epoch_end(self) -> None:
        self.epoch_weights.append(self.linear.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + torch.randn(64, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=generator)


def test_weight_averaging_returns_the_mean_of_the_weights_of_the_averaged_epochs():
    module = LinearRegression()
    config = TrainerConfig(max_epochs=6, progress_bar=False, swa_epoch_start=0.5)
    fit(module, regression_loader(), config=config)
    # Lightning averages the weights at the end of epochs int(0.5 * 6) - 1 = 2 to 6 - 1 = 5
    # (1-based): it folds in the previous epoch's weights at the start of each averaged epoch.
    averaged_epochs = torch.stack(module.epoch_weights[1:5])
    torch.testing.assert_close(module.linear.weight, averaged_epochs.mean(0))
    assert not torch.allclose(module.linear.weight, module.epoch_weights[5])


def test_weight_averaging_never_returns_the_initial_weights_of_a_one_epoch_run():
    module = LinearRegression()
    initial = module.linear.weight.detach().clone()
    config = TrainerConfig(max_epochs=1, progress_bar=False, swa_epoch_start=0.5)
    fit(module, regression_loader(), config=config)
    torch.testing.assert_close(module.linear.weight, module.epoch_weights[-1])
    assert not torch.allclose(module.linear.weight, initial)


def test_training_runs_in_train_mode_even_after_the_model_was_put_in_eval_mode():
    class DropoutRegression(LinearRegression):
        def training_step(self, batch, batch_idx):
            assert self.training and self.linear.training
            return super().training_step(batch, batch_idx)

    module = DropoutRegression().eval()  # e.g. after a prediction
    fit(module, regression_loader(), config=TrainerConfig(max_epochs=1, progress_bar=False))
    assert len(module.epoch_weights) == 1


def test_without_weight_averaging_the_last_epoch_is_kept():
    module = LinearRegression()
    fit(module, regression_loader(), config=TrainerConfig(max_epochs=3, progress_bar=False))
    assert len(module.epoch_weights) == 3
    torch.testing.assert_close(module.linear.weight, module.epoch_weights[-1])


def test_best_weights_with_prefixes_restores_only_those_entries_at_their_own_best_epoch():
    from stinfer.train import BestWeights

    class TwoParts(LinearRegression):
        def __init__(self) -> None:
            super().__init__()
            self.other = torch.nn.Linear(4, 1, bias=False)
            self.scores = iter([3.0, 1.0, 2.0, 4.0])  # best (lowest) at epoch 1

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.linear(x) + self.other(x), y)

        def validation_step(self, batch, batch_idx):
            self.log("val/score", next(self.scores) if batch_idx == 0 else 0.0, reduce_fx="max")

        def on_train_epoch_end(self) -> None:
            self.epoch_weights.append(
                (self.linear.weight.detach().clone(), self.other.weight.detach().clone())
            )

    module = TwoParts()
    best = BestWeights("val/score", "min", prefixes=("linear.",))
    val = DataLoader(TensorDataset(torch.zeros(1, 4)), batch_size=1)
    config = TrainerConfig(max_epochs=4, progress_bar=False)
    fit(module, regression_loader(), val, config, callbacks=[best])
    assert best.best_epoch == 1 and set(best.best_state) == {"linear.weight"}
    torch.testing.assert_close(module.linear.weight, module.epoch_weights[1][0])
    torch.testing.assert_close(module.other.weight, module.epoch_weights[-1][1])  # untouched


def test_cpu_bf16_autocast_only_when_asked_and_the_cpu_has_native_bf16(monkeypatch):
    import stinfer.train as train_module

    monkeypatch.setattr(train_module.torch.cuda, "is_available", lambda: False)
    assert train_module.default_precision("cpu") == "32-true"
    for native in (True, False):
        monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda native=native: native)
        assert train_module.default_precision("auto", cpu_bf16=True) == (
            "bf16-mixed" if native else "32-true"
        )
        assert train_module.default_precision("cpu", cpu_bf16=False) == "32-true"


def test_zero_epochs_are_refused_so_an_untrained_model_is_never_saved_as_trained():
    from stinfer.models import model_config

    for epochs in (0, -3, 2.5, True):
        with pytest.raises(InputError, match=r"max_epochs \(--epochs\)"):
            TrainerConfig(max_epochs=epochs)
    with pytest.raises(InputError, match=r"max_epochs \(--epochs\) must be >= 1"):
        model_config("stevs", "fast", epochs=0)


def test_a_gpu_accelerator_without_a_gpu_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(InputError, match=f"--accelerator {accelerator} .*no GPU is visible"):
            check_accelerator(accelerator)
    check_accelerator("cpu")
    check_accelerator("auto")
    with pytest.raises(InputError, match="no GPU is visible"):
        fit(LinearRegression(), regression_loader(), config=TrainerConfig(accelerator="gpu"))


# --------------------------------------------------------------------------- what fit logs
class LoggedBatchNormRegression(L.LightningModule):
    """Linear -> BatchNorm -> linear on the regression data; logs its loss and a val metric."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Linear(8, 1)
        self.epochs_ended = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.head(self.hidden(x)), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", torch.nn.functional.mse_loss(self.head(self.hidden(x)), y))

    def on_train_epoch_end(self) -> None:
        self.epochs_ended += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def epoch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]


@pytest.mark.parametrize("swa_epoch_start", [None, 0.5])
def test_without_a_progress_bar_each_epoch_logs_one_line_and_weight_averaging_adds_none(
    caplog, swa_epoch_start
):
    caplog.set_level(logging.INFO)
    module = LoggedBatchNormRegression()
    config = TrainerConfig(max_epochs=4, progress_bar=False, swa_epoch_start=swa_epoch_start)
    validation = DataLoader(regression_loader().dataset, batch_size=16)
    result = fit(module, regression_loader(), validation, config)
    lines = epoch_lines(caplog)
    assert [line.split(":")[0] for line in lines] == [f"epoch {i}/4" for i in range(1, 5)]
    assert all("train/loss" in line and "val/mse" in line and " s)" in line for line in lines)
    assert module.epochs_ended == 4 and len(result.history) == 4  # no extra epoch, as asked
    assert "max_epochs=5" not in caplog.text
    assert fit(LinearRegression(), regression_loader(), config=TrainerConfig(max_epochs=1))
    assert len(epoch_lines(caplog)) == 4  # a progress bar: no epoch lines


def test_weight_averaging_recomputes_batch_norm_statistics_of_the_averaged_weights():
    module = LoggedBatchNormRegression()
    config = TrainerConfig(max_epochs=4, progress_bar=False, swa_epoch_start=0.5)
    loader = regression_loader()
    fit(module, loader, config=config)
    x = loader.dataset.tensors[0]
    linear, norm = module.hidden
    with torch.no_grad():
        activations = linear(x)
    # momentum None over equal batches: the mean of the batch means is the data's mean
    torch.testing.assert_close(norm.running_mean, activations.mean(0), rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1 and "log" not in vars(module)  # restored after the pass


def test_lightning_device_summary_and_tips_are_hidden_unless_stinfer_logs_debug(caplog):
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LoggedBatchNormRegression(), regression_loader(), config=TrainerConfig(max_epochs=1))
    for noise in ("GPU available", "TPU available", "Tip:", "litlogger"):
        assert noise not in caplog.text
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "LeafSpec" in m or "does not have many workers" in m]
    caplog.clear()
    caplog.set_level(logging.DEBUG)  # `stinfer -v`
    fit(LinearRegression(), regression_loader(), config=TrainerConfig(max_epochs=1))
    assert caplog.text.count("GPU available") == 1


def test_fit_result_reports_the_best_logged_value_when_no_monitor_chose_an_epoch():
    history = [{"epoch": 0.0, "val/pcc": 0.1}, {"epoch": 1.0, "val/pcc": 0.3}]
    history.append({"epoch": 2.0, "val/pcc": float("nan")})
    result = FitResult(history=history)
    assert result.best_logged("val/pcc") == (1, 0.3)
    assert result.best_logged("val/pcc", mode="min") == (0, 0.1)
    assert result.best_logged("val/other") is None
    assert result.describe_best("val/pcc", "val PCC") == (
        "best val PCC 0.3000 at epoch 2 of 3; the weights at the end of training kept"
    )
    monitored = FitResult(history=history, best_epoch=1, best_score=0.3, monitor="val/pcc")
    assert "epoch 2 of 3, its weights restored" in monitored.describe_best("val/pcc", "val PCC")
