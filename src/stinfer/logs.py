"""What a run prints: each message once, and no third-party noise unless asked for.

Two things made a run's log hard to read. Lightning prints its lines through its own console
handler *and* passes them on to the root logger's handler, so each line appeared twice (once
as ``INFO: ...``); :func:`route_lightning_logs` leaves them to the root's handlers alone. And
third-party packages add lines that are not about the run: a device summary on a CPU, an
advertisement for a cloud logger, deprecation notices addressed to their own maintainers, a
"does not have many workers" hint that does not apply to in-memory data. :data:`NOISE_WARNINGS`
and :data:`NOISE_LOG_MESSAGES` name each one narrowly (by message, module and logger), in this
one place.

The `stinfer` command calls :func:`configure_logging` and every :func:`stinfer.train.fit` calls
:func:`quiet_third_party`; both let the noise through again when the ``stinfer`` logger is at
DEBUG level (``stinfer -v``), so nothing is hidden from someone who asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

logger = logging.getLogger("stinfer")

# (message regex, category, module regex) of each warning that says nothing about the run
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # lightning's own pytree helper calls an API torch deprecated; nothing a user can change
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", Warning, ""),
    # our loaders read arrays in memory or a memory-mapped cache: worker processes do not help
    (r".*does not have many workers", Warning, ""),
    (r".*number of training batches", Warning, ""),  # log_every_n_steps: no step-level logger
    (r".*validation_step. but have no .val_dataloader", Warning, ""),  # validation is optional
    (r"n_jobs value .* overridden to 1 by setting random_state", UserWarning, ""),  # umap, seeded
    # a frozen backbone stays in eval mode on purpose (stinfer.nn.encoders.ImageEncoder.train)
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning, ""),
    (r"", FutureWarning, r"(anndata|scanpy)(\.|$)"),  # their API changes, not our data
)

# logger name -> message regexes of log lines that say nothing about the run (records are
# filtered at the logger that creates them: Lightning's rank-zero helpers log through these)
_LIGHTNING_NOISE = (
    r"GPU available: ",
    r"TPU available: ",
    r"HPU available: ",
    r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r"💡 Tip: ",  # advertisements for Lightning's cloud services
    r"You are using a CUDA device .* that has Tensor Cores",
    r"Swapping scheduler `.*` for `SWALR`",  # weight averaging, configured by stinfer
)
NOISE_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": _LIGHTNING_NOISE,
    "lightning.fabric.utilities.rank_zero": _LIGHTNING_NOISE,
    "lightning_utilities.core.rank_zero": _LIGHTNING_NOISE,
    "anndata": (r"\.\.\. storing .* as categorical",),  # on every h5ad write
}

LOG_FORMAT = "%(levelname)s %(message)s"


def verbose() -> bool:
    """True when the ``stinfer`` logger is at DEBUG level (``stinfer -v``): show everything."""
    return logger.isEnabledFor(logging.DEBUG)


class NoiseFilter(logging.Filter):
    """Drops the records whose message matches one of ``patterns``, unless :func:`verbose`."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or not self.pattern.match(record.getMessage())


def install_log_filters() -> None:
    """Attach a :class:`NoiseFilter` to each logger of :data:`NOISE_LOG_MESSAGES` (once)."""
    for name, patterns in NOISE_LOG_MESSAGES.items():
        named = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in named.filters):
            named.addFilter(NoiseFilter(patterns))


def ignore_noise_warnings() -> None:
    """Add a ``warnings`` filter for each of :data:`NOISE_WARNINGS` (unless :func:`verbose`)."""
    if verbose():
        return
    for message, category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def route_lightning_logs() -> None:
    """Print Lightning's log lines once: through the root logger's handlers when it has some.

    Lightning gives its ``lightning`` (and, when nothing is configured at import, its
    ``lightning.pytorch``) logger a console handler of its own and still passes each record on
    to the root logger, whose handler prints it a second time. Only plain console handlers are
    removed; a file handler someone added stays.
    """
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        named = logging.getLogger(name)
        for handler in list(named.handlers):
            if type(handler) is logging.StreamHandler:  # exactly: not a FileHandler
                named.removeHandler(handler)
        named.propagate = True


DDP_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK")  # set by Lightning's DDP launcher


def configure_logging(debug: bool = False) -> None:
    """The `stinfer` command's logging: ``LEVEL message`` lines on stderr, INFO or DEBUG
    (``debug``, from ``-v``), each line once, third-party noise filtered unless ``debug``.

    In the other processes of a DDP run (started by Lightning with ``LOCAL_RANK``,
    ``NODE_RANK`` or ``RANK`` set, see :func:`stinfer.train.global_rank`) only warnings and
    errors are printed: rank 0 tells the run's story once."""
    level = logging.DEBUG if debug else logging.INFO
    if any(os.environ.get(name, "0") not in ("", "0") for name in DDP_RANK_VARIABLES):
        level = logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT)
    install_log_filters()
    ignore_noise_warnings()
    if "lightning" in sys.modules:
        route_lightning_logs()


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within: each of Lightning's lines printed once, the noise of :data:`NOISE_WARNINGS` and
    :data:`NOISE_LOG_MESSAGES` hidden (unless :func:`verbose`); the warning filters are
    restored on exit. Used by :func:`stinfer.train.fit` around the Trainer."""
    install_log_filters()
    route_lightning_logs()
    with warnings.catch_warnings():
        ignore_noise_warnings()
        yield
