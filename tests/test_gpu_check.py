"""``benchmarks/gpu_check.py`` on a machine without a GPU: its CPU smoke run and its refusal.

The script is run as a user runs it (a subprocess, one torch thread): ``--cpu-smoke`` must go
through every section (environment, STEvs ``paper`` training, features) and write positive
throughputs; without ``--cpu-smoke`` it must say there is nothing to check and exit 0. The
DDP path (two gloo processes, about a minute on two cores) is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="these tests pin down the script's CPU-only behaviour"
)


def run_script(*arguments: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_training_figures(run: dict, world_size: int) -> None:
    assert run["backbone"].startswith("swin_tiny")  # the paper preset's Swin-T
    assert run["pretrained"] is None  # random initialisation: nothing downloads
    assert run["world_size"] == world_size
    assert run["steps_per_rank"] >= 2
    for name in ("wall_seconds", "fit_seconds", "steps_per_s", "spots_per_s", "steady_spots_per_s"):
        assert run[name] > 0, name
    assert run["peak_gpu_memory_gib"] is None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    done = run_script("--cpu-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stevs_paper" in done.stdout and "patches/s" in done.stdout
    return json.loads(out.read_text())


def test_cpu_smoke_reports_no_cuda_in_its_environment(smoke):
    environment = smoke["environment"]
    assert smoke["mode"] == "cpu-smoke"
    assert environment["cuda_available"] is False
    assert environment["gpus"] == []
    assert environment["torch"] == torch.__version__


def test_cpu_smoke_trains_the_paper_preset_and_skips_ddp_without_ddp_cpu(smoke):
    check_training_figures(smoke["stevs_paper"], world_size=1)
    assert smoke["stevs_paper"]["spots"] == smoke["sizes"]["spots"] > 0
    assert "skipped" in smoke["stevs_paper_ddp"]


def test_cpu_smoke_measures_feature_throughput(smoke):
    (features,) = smoke["features"]
    assert features["encoder"] == "vit_tiny_patch16_224"
    assert features["patches_per_s"] > 0
    assert features["n_features"] == 192  # ViT-Ti width
    assert features["input_px"] == [224, 224]  # 160-px patches resized for the ViT


def test_without_gpu_or_cpu_smoke_it_says_so_and_exits_zero(tmp_path):
    done = run_script("--out", str(tmp_path / "none.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA GPU: nothing to check" in done.stdout
    assert "--cpu-smoke" in done.stdout
    assert not (tmp_path / "none.json").exists()


def test_help_describes_every_option():
    done = run_script("--help")
    assert done.returncode == 0
    for option in ("--steps", "--spots", "--genes", "--out", "--cpu-smoke", "--ddp-cpu"):
        assert option in done.stdout


@pytest.mark.slow
def test_cpu_smoke_ddp_trains_with_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp.json"
    done = run_script("--cpu-smoke", "--ddp-cpu", "2", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    check_training_figures(figures["stevs_paper_ddp"], world_size=2)
