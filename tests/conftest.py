"""Shared test fixtures: where the real data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

# pytest-xdist runs the suite in one process per core (pyproject's addopts): each worker gets
# its share of the cores before torch starts its thread pools, so workers never oversubscribe
# the machine (two multi-threaded torch processes on two cores slow each other down many-fold).
# The CLI subprocesses of the tests inherit the same limit.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_variable] = _THREADS

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STINFER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
HER2ST = SHARED_DATA / "her2st"
VISIUM = SHARED_DATA / "visium"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The HER2ST folder (`../shared/data/her2st`); the test is skipped when it is absent."""
    if not (HER2ST / "counts").is_dir():
        pytest.skip(f"real HER2ST data not found at {HER2ST} (set STINFER_SHARED_DATA)")
    return HER2ST


@pytest.fixture(scope="session")
def visium_dir() -> Path:
    """The real Space Ranger folders (`../shared/data/visium`); skipped when absent."""
    if not VISIUM.is_dir():
        pytest.skip(f"real Visium data not found at {VISIUM} (set STINFER_SHARED_DATA)")
    return VISIUM


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core CPU run far faster single-threaded than oversubscribed.

    The one thread-limit fixture of the suite: use it with ``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`` for a whole module, or by name for one test
    (module-scoped: the module's later tests stay on one thread). The previous thread count is
    restored when the module ends.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
