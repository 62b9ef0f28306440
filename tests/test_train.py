"""The one training path: stochastic weight averaging through ``TrainerConfig``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from stinfer.train import TrainerConfig, fit


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
