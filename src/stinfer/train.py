"""The one training path: every stinfer model trains through :func:`fit` (Lightning).

A model supplies a ``LightningModule`` (its ``training_step``, ``validation_step`` and
``configure_optimizers``) and data loaders; :func:`fit` builds the ``lightning.Trainer`` with
the project's conventions: seeded, device auto-selected (cuda, mps, cpu), bf16/fp16 autocast on
GPU, multi-GPU DDP through ``devices``/``strategy``, a progress bar (or, without one, one log
line per epoch: :class:`EpochLog`), per-epoch metric history, and the best weights by a monitored
validation metric restored at the end. Third-party noise is kept out of the log
(:func:`stinfer.logs.quiet_third_party`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from stinfer.errors import InputError
from stinfer.logs import quiet_third_party, verbose

logger = logging.getLogger("stinfer")


@dataclass
class TrainerConfig:
    """How to run training; independent of the model's own hyperparameters."""

    max_epochs: int = 100
    accelerator: str = "auto"  # "auto" picks cuda, then mps, then cpu
    devices: int | str = "auto"  # e.g. 4 for four GPUs (DDP); 2 with accelerator "cpu": gloo
    strategy: str = "auto"  # e.g. "ddp"; batch sizes are per process (Lightning's convention)
    num_nodes: int = 1  # machines of a multi-node DDP run (each with `devices` processes)
    precision: str | None = None  # None: bf16-mixed (or 16-mixed) on GPU, else see cpu_bf16
    # With precision None on a CPU that computes bf16 in hardware (AVX512-BF16 / AMX-BF16):
    # bf16 autocast ("bf16-mixed") instead of fp32. Off by default; a preset turns it on only
    # where bf16 was measured to leave its accuracy unchanged.
    cpu_bf16: bool = False
    seed: int = 0
    progress_bar: bool = True
    gradient_clip_val: float | None = None
    monitor: str | None = None  # metric logged by the module, e.g. "val/pcc_median"
    monitor_mode: str = "max"  # "max" or "min"
    early_stopping_patience: int | None = None  # epochs without improvement of `monitor`
    check_val_every_n_epoch: int = 1
    deterministic: bool = False
    # Stochastic weight averaging (Izmailov et al. 2018, Lightning's callback): the final weights
    # are the mean of the weights at the end of epochs int(f * max_epochs) - 1 to max_epochs - 1
    # (1-based), BatchNorm statistics recomputed with one extra pass over the training data.
    swa_epoch_start: float | None = None
    swa_lr: float | None = None  # learning rate during averaging (None: the optimiser's)

    def __post_init__(self) -> None:
        # a run of 0 epochs would save an untrained model as if it were trained
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int):
            raise InputError(
                f"max_epochs (--epochs) must be a whole number >= 1, got {self.max_epochs!r}."
            )
        if self.max_epochs < 1:
            raise InputError(
                f"max_epochs (--epochs) must be >= 1, got {self.max_epochs}: a model trained "
                "for no epochs is not trained."
            )
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int):
            raise InputError(
                f"num_nodes (--num-nodes) must be a whole number, got {self.num_nodes!r}."
            )
        if self.num_nodes < 1:
            raise InputError(f"num_nodes (--num-nodes) must be >= 1, got {self.num_nodes}.")


GPU_ACCELERATORS = ("gpu", "cuda")


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator when no CUDA GPU is visible, before any data is read.

    Called by :func:`fit` (every model trains through it) and by the CLI commands before they
    read their inputs, so ``--accelerator gpu`` on a CPU machine fails in a second with a fix
    instead of deep inside Lightning.
    """
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise InputError(
            f"--accelerator {accelerator} (accelerator={accelerator!r}): no GPU is visible "
            "(torch.cuda.is_available() is False); use --accelerator cpu or auto."
        )


def global_rank() -> int:
    """This process's rank in a (DDP) run: 0 in a single-process run and on the main process.

    Lightning's launcher starts the other processes of ``devices=N`` by running the same command
    again with ``LOCAL_RANK``/``NODE_RANK`` set; they train alongside rank 0 and must not write
    what rank 0 writes. The rank is Lightning's own (set from the environment at import and
    by the strategy at setup).
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return global_rank() == 0


def gather_rows(module: L.LightningModule, rows: torch.Tensor, n_total: int) -> torch.Tensor:
    """The rows of every rank's validation shard, in the dataset's order: ``(n_total, ...)``.

    Under DDP Lightning hands each of the ``W`` ranks a :class:`DistributedSampler` shard of
    the (unshuffled) validation set: rank ``r`` gets items ``r, r + W, r + 2W, ...``, the list
    padded by repeating the first items so every shard has ``ceil(n_total / W)`` rows.
    Gathering the shards (``(W, L, ...)``), interleaving them (item ``i * W + r`` is shard
    ``r``'s row ``i``) and dropping the padding gives back exactly the single-process rows, so
    a validation metric computed from them (a median of per-gene correlations, which does not
    decompose into per-rank parts) is the same as on one process. Returns ``rows`` itself on
    one process.
    """
    trainer = module._trainer
    world = 1 if trainer is None else int(trainer.world_size)
    if world == 1:
        return rows
    gathered = module.all_gather(rows.contiguous())  # (W, L, ...)
    interleaved = gathered.transpose(0, 1).reshape(-1, *rows.shape[1:])
    return interleaved[:n_total]


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch metrics, the best epoch and the wall time."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None  # 0-based, of the monitored metric (weights restored)
    best_score: float | None = None
    train_seconds: float = 0.0
    monitor: str | None = None  # the metric of best_epoch/best_score when a monitor chose them
    world_size: int = 1  # processes that trained together (DDP), 1 without

    def best_logged(self, metric: str, mode: str = "max") -> tuple[int, float] | None:
        """``(epoch, value)`` of the best value of ``metric`` in :attr:`history` (epoch 0-based),
        ``None`` when it was never logged; NaN epochs never count. What a run reports when no
        monitor chose (and restored) a best epoch."""
        logged = [
            (int(row["epoch"]), row[metric])
            for row in self.history
            if metric in row and not math.isnan(row[metric])
        ]
        if not logged:
            return None
        pick = max if mode == "max" else min
        return pick(logged, key=lambda epoch_value: epoch_value[1])

    def describe_best(self, metric: str, label: str, mode: str = "max") -> str:
        """The best value of ``metric`` (called ``label``) and its epoch, for a log line.

        With a monitor (:attr:`best_score` set, of that metric) the restored epoch; without,
        the best epoch of :attr:`history`, saying that the final weights were kept. Epochs are
        1-based here, as in :class:`EpochLog`'s lines.
        """
        epochs = len(self.history)
        if self.monitor == metric and self.best_score is not None and self.best_epoch is not None:
            return (
                f"best {label} {self.best_score:.4f} at epoch {self.best_epoch + 1} of {epochs}, "
                "its weights restored"
            )
        best = self.best_logged(metric, mode)
        if best is None:
            return f"{epochs} epochs, no {label} logged"
        epoch, value = best
        return (
            f"best {label} {value:.4f} at epoch {epoch + 1} of {epochs}; "
            "the weights at the end of training kept"
        )


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic in hardware (the ``avx512_bf16`` or ``amx_bf16``
    flag of ``/proc/cpuinfo``); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_precision(accelerator: str, cpu_bf16: bool = False) -> str:
    """bf16 autocast on GPUs that support it, fp16 on older GPUs; on a CPU, bf16 autocast when
    ``cpu_bf16`` and the CPU has native bf16 (:func:`cpu_has_native_bf16`), else fp32."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if cpu_bf16 and accelerator in ("auto", "cpu") and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def with_cosine_schedule(optimizer: torch.optim.Optimizer, t_max: int, eta_min: float) -> dict:
    """Lightning's ``configure_optimizers`` value: ``optimizer`` with cosine annealing of the
    learning rate to ``eta_min`` over ``t_max`` epochs, stepped once per epoch."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(int(t_max), 1), eta_min=eta_min
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class MetricHistory(L.Callback):
    """Record every logged epoch-level metric as one dict per epoch."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": float(trainer.current_epoch)}
        for name, value in trainer.callback_metrics.items():
            if torch.is_tensor(value) and value.numel() == 1:
                row[name] = float(value)
        self.history.append(row)


class EpochLog(L.Callback):
    """One INFO line per training epoch, for runs without a progress bar (logs, schedulers).

    ``epoch 3/15: train/loss 0.512, val/pcc_median 0.231 (4.2 s)``: the training loss (every
    ``train/`` metric when none is called ``train/loss``, and with ``stinfer -v``), every
    validation metric, and the epoch's wall time. ``fit`` adds it when
    ``TrainerConfig.progress_bar`` is off.
    """

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        scalars = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if torch.is_tensor(value) and value.numel() == 1
        }
        if "train/loss" in scalars and not verbose():
            scalars = {k: v for k, v in scalars.items() if not k.startswith("train/")} | {
                "train/loss": scalars["train/loss"]
            }
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in sorted(scalars.items()))
        logger.info(
            "epoch %d/%d: %s (%.1f s)",
            trainer.current_epoch + 1,
            self.max_epochs,
            metrics or "no metrics logged",
            time.perf_counter() - self._epoch_start,
        )


def _mean_over_ranks(trainer: L.Trainer, value: torch.Tensor | float) -> torch.Tensor:
    """``value`` averaged over the DDP ranks (itself on one process)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach()
    if trainer.world_size == 1:
        return tensor
    return trainer.strategy.reduce(tensor.to(trainer.strategy.root_device), reduce_op="mean").cpu()


class BestWeights(L.Callback):
    """Keep a CPU copy of the weights at the best value of ``monitor``; restore it at the end.

    Held in memory rather than in Lightning checkpoint files so no pickle is ever loaded back
    and nothing is left on disk; the models save their own weights with ``weights_only`` in mind.
    ``prefixes`` restricts it to the state entries whose names start with one of them (a part
    of the model with its own best epoch); restored after callbacks listed before it.
    """

    def __init__(
        self, monitor: str, mode: str = "max", prefixes: tuple[str, ...] | None = None
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.prefixes = None if prefixes is None else tuple(prefixes)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        # under DDP every rank must take the same decision (and so hold the same weights):
        # the ranks' values are averaged (equal when the metric was gathered over all ranks)
        score = float(_mean_over_ranks(trainer, trainer.callback_metrics[self.monitor]))
        if self._improved(score):
            self.best_score = score
            self.best_epoch = trainer.current_epoch
            self.best_state = {
                k: v.detach().cpu().clone()
                for k, v in pl_module.state_dict().items()
                if self.prefixes is None or k.startswith(self.prefixes)
            }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state, strict=self.prefixes is None)


class EMAEarlyStopping(L.Callback):
    """Stop when the smoothed ``monitor`` stops improving; restore the weights of its best epoch.

    CoxFormer Suppl. S3: early stopping when the exponential moving average of the training
    loss fails to improve by at least 0.2%. After every training epoch (validation included)
    ``ema = beta * value + (1 - beta) * ema`` (``beta`` weighs the newest epoch: 0.2 smooths
    over about five epochs; the first epoch starts the average); an epoch *improves* when
    ``ema`` beats the best so far by more than ``min_relative_improvement`` of it (lower is
    better for ``mode="min"``). After ``patience`` epochs without improvement training stops,
    and at the end a CPU copy of the weights of the best-EMA epoch is loaded back.
    """

    def __init__(
        self,
        monitor: str = "train/loss",
        beta: float = 0.2,  # CoxFormer Suppl. S3
        min_relative_improvement: float = 0.002,  # CoxFormer Suppl. S3: 0.2%
        patience: int = 10,
        mode: str = "min",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.monitor = monitor
        self.beta = beta
        self.min_relative_improvement = min_relative_improvement
        self.patience = patience
        self.mode = mode
        self.ema: float | None = None
        self.best_ema: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def update(self, value: float) -> bool:
        """Fold one epoch's ``value`` into the average; True when it is a new best."""
        self.ema = value if self.ema is None else self.beta * value + (1 - self.beta) * self.ema
        if self.best_ema is None:
            return True
        margin = self.min_relative_improvement * abs(self.best_ema)
        if self.mode == "min":
            return self.ema < self.best_ema - margin
        return self.ema > self.best_ema + margin

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        # one value for all DDP ranks, so every rank stops at the same epoch with the same best
        value = float(_mean_over_ranks(trainer, trainer.callback_metrics[self.monitor]))
        if math.isnan(value):
            return
        if self.update(value):
            self.best_ema = self.ema
            self.best_epoch = trainer.current_epoch
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
            }
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)


class WeightAveraging(L.pytorch.callbacks.StochasticWeightAveraging):
    """Lightning's SWA, with its BatchNorm pass after training instead of as an extra epoch.

    Two changes. Lightning recomputes the BatchNorm statistics of the averaged weights in an
    epoch it adds to ``max_epochs`` (no backward pass, but shown, logged and validated as epoch
    ``max_epochs + 1``); here the same pass (every training batch through ``training_step`` in
    train mode, without gradients or logging, as ``torch.optim.swa_utils.update_bn`` does)
    runs once training has ended, so ``--epochs 15`` trains, shows and logs 15 epochs. And
    BatchNorm layers kept in eval mode are left alone: a frozen backbone stays in eval mode
    during that pass, so statistics reset before it (zero mean, unit variance) would stay
    reset and the backbone's features would change.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._model_contains_batch_norm and self._max_epochs != -1:
            trainer.fit_loop.max_epochs -= 1  # undo Lightning's extra epoch: see on_train_end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # loads the averaged weights after the last epoch
        averaged = trainer.current_epoch - 1 == self.swa_end and self._average_model is not None
        if self._model_contains_batch_norm and self._max_epochs != -1 and averaged:
            self.update_batch_norm(trainer, pl_module)

    @torch.no_grad()
    def update_batch_norm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Recompute the BatchNorm statistics of the current weights over the training data."""
        self.reset_batch_norm_and_save_state(pl_module)  # momentum None: an exact mean
        was_training = pl_module.training
        pl_module.train()
        # the pass is not an epoch: nothing it computes is logged
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
        try:
            for batch_index, batch in enumerate(trainer.train_dataloader):
                batch = trainer.strategy.batch_to_device(batch)
                with trainer.precision_plugin.train_step_context():
                    pl_module.training_step(batch, batch_index)
        finally:
            del pl_module.log, pl_module.log_dict
            pl_module.train(was_training)
            self.reset_momenta()
        if trainer.world_size > 1:
            # each rank saw its shard: the single-process statistics are the mean over all
            # batches, i.e. over ranks of equal shards, so every rank ends with the same buffers
            for module in pl_module.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # frozen: equal
                    for name in ("running_mean", "running_var"):
                        buffer = getattr(module, name)
                        buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))

    def reset_batch_norm_and_save_state(self, pl_module: L.LightningModule) -> None:
        frozen = [
            (module, module.running_mean.clone(), module.running_var.clone())
            for module in pl_module.modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not module.training
        ]
        super().reset_batch_norm_and_save_state(pl_module)
        for module, mean, var in frozen:
            module.running_mean, module.running_var = mean, var
            module.momentum = self.momenta.pop(module)


def swa_callback(module: L.LightningModule, config: TrainerConfig) -> L.Callback | None:
    """Lightning's weight averaging from ``config.swa_epoch_start``, at ``config.swa_lr``.

    ``None`` when training is too short to average anything but the initial weights (Lightning
    folds in the previous epoch's weights, so averaging must start at epoch 2 or later).
    """
    start = max(int(config.max_epochs * config.swa_epoch_start), 2)
    if start > config.max_epochs:
        return None
    swa_lr = config.swa_lr
    if swa_lr is None:
        optimizer = module.configure_optimizers()
        optimizer = optimizer[0] if isinstance(optimizer, (list, tuple)) else optimizer
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        swa_lr = optimizer.param_groups[0]["lr"]
    return WeightAveraging(swa_lrs=swa_lr, swa_epoch_start=start, annealing_epochs=1)


def lightning_strategy(
    strategy: str, module: L.LightningModule
) -> str | L.pytorch.strategies.Strategy:
    """The Lightning strategy for ``TrainerConfig.strategy`` and ``module``.

    ``"ddp"`` is Lightning's DDP, told to look for parameters without a gradient when the
    module says a step may leave some (``find_unused_parameters = True`` on the module:
    CoxFormer's gene-level parameters sit outside some of its losses, STEvs' modality dropout
    trains one expert alone), which plain DDP refuses as an error; the search costs a pass
    over the autograd graph per step, so modules that use every parameter skip it. Every
    other name is Lightning's own.
    """
    if strategy != "ddp":
        return strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(
        find_unused_parameters=bool(getattr(module, "find_unused_parameters", False))
    )


def fit(
    module: L.LightningModule,
    train_loader,
    val_loader=None,
    config: TrainerConfig | None = None,
    callbacks: list[L.Callback] | None = None,
) -> FitResult:
    """Train ``module`` with Lightning and return its metric history.

    When ``config.monitor`` is set and a validation loader is given, the weights of the best
    validation epoch are restored into ``module`` before returning (and training stops early
    after ``config.early_stopping_patience`` epochs without improvement, if set).
    """
    config = config or TrainerConfig()
    check_accelerator(config.accelerator)
    L.seed_everything(config.seed, workers=True, verbose=False)
    history = MetricHistory()
    all_callbacks: list[L.Callback] = [history, *(callbacks or [])]
    if not config.progress_bar:
        all_callbacks.append(EpochLog(config.max_epochs))
    best = None
    if config.monitor and val_loader is not None:
        best = BestWeights(config.monitor, config.monitor_mode)
        all_callbacks.append(best)
        if config.early_stopping_patience is not None:
            all_callbacks.append(
                L.pytorch.callbacks.EarlyStopping(
                    monitor=config.monitor,
                    mode=config.monitor_mode,
                    patience=config.early_stopping_patience,
                    check_finite=False,
                )
            )
    swa = swa_callback(module, config) if config.swa_epoch_start is not None else None
    if swa is not None:
        all_callbacks.append(swa)
    with quiet_third_party():  # the Trainer logs its device summary when it is built
        trainer = L.Trainer(
            max_epochs=config.max_epochs,
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=lightning_strategy(config.strategy, module),
            num_nodes=config.num_nodes,
            precision=config.precision or default_precision(config.accelerator, config.cpu_bf16),
            gradient_clip_val=config.gradient_clip_val,
            callbacks=all_callbacks,
            enable_progress_bar=config.progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=config.check_val_every_n_epoch,
            deterministic=config.deterministic,
        )
        module.train()  # Lightning keeps the mode it is given: a model that predicted is in eval
        start = time.perf_counter()
        trainer.fit(module, train_loader, val_loader)
    result = FitResult(
        history=history.history,
        train_seconds=time.perf_counter() - start,
        world_size=int(trainer.world_size),
    )
    if best is not None:
        result.best_epoch, result.best_score = best.best_epoch, best.best_score
        result.monitor = config.monitor
    return result
