"""Exit statuses a scheduler can trust: SIGTERM -> 143, SIGINT -> 130, one line, no output.

Each test runs a real `python -m stinfer train` in a subprocess on a tiny synthetic slide with
far more epochs than it will get through, and signals it once Lightning is training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stinfer.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
from stinfer.io.atomic import TEMP_TAG, write_h5ad
from stinfer.io.slide_data import prepare_for_h5ad
from stinfer.models.persistence import write_model_folder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slide")
    section = make_synthetic_sections(
        folder / "images", SyntheticConfig(seed=3, target_spots=100, n_genes=20, n_sections=1)
    )[0]
    (folder / "genes.txt").write_text("\n".join(section.var_names[:10]) + "\n")  # no selection
    return write_h5ad(prepare_for_h5ad(section), folder / "a.h5ad")


def _default_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def train_and_signal(slide_file: Path, out: Path, signum: int, *flags: str):
    """Start `python -m stinfer train`, send ``signum`` once training runs; (status, stderr)."""
    command = [
        sys.executable, "-m", "stinfer", "train", "--model", "stevs", "--train", str(slide_file),
        "--genes", str(slide_file.with_name("genes.txt")), "--preset", "fast", "--epochs", "100000",
        "--no-progress", "--out", str(out), *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a test suite started in the background (`cmd &`, nohup) passes SIGINT on ignored,
        # and stinfer rightly keeps a signal its caller ignores: give the child the default
        preexec_fn=_default_signal_handlers,
    )
    try:
        first = process.stdout.readline()  # printed once the slides are read and work begins
        assert first.startswith("training"), first + process.communicate(timeout=60)[1]
        time.sleep(1.5)  # patches extracted, Lightning's fit under way
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def stinfer_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_TAG in p.name]


def test_sigterm_during_training_exits_143_with_one_line_and_no_output(slide_file, tmp_path):
    out = tmp_path / "run"
    status, err = train_and_signal(slide_file, out, signal.SIGTERM)
    assert status == EXIT_TERMINATED == 143, err
    lines = err.strip().splitlines()
    assert lines[-1] == "stinfer train: terminated (SIGTERM); no output was left half-written."
    assert sum("stinfer train:" in line for line in lines) == 1 and "Traceback" not in err
    assert not out.exists() and stinfer_temporaries(tmp_path) == []


def test_sigint_exits_130_and_an_earlier_run_being_overwritten_is_kept(slide_file, tmp_path):
    out = tmp_path / "run"
    write_model_folder(out, "mean", {}, {"genes": ["g1"]}, arrays={"mean_counts": np.ones(1)})
    (out / "train_history.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, err = train_and_signal(slide_file, out, signal.SIGINT, "--overwrite")
    assert status == EXIT_INTERRUPTED == 130, err
    assert err.strip().splitlines()[-1] == (
        "stinfer train: interrupted; no output was left half-written."
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old run, whole
    assert json.loads((out / "config.json").read_text())["model_type"] == "mean"
    assert stinfer_temporaries(tmp_path) == []


def test_a_signal_the_caller_ignores_stays_ignored():
    """`nohup stinfer ...` or a background job: SIGINT ignored by the caller is not re-armed."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from stinfer.cli import _stop_on_signals

        replaced = _stop_on_signals()
        assert signal.SIGINT not in replaced and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_top_level_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("exit status", "0 ", "2 ", "130", "143", "SIGTERM", "SIGINT"):
        assert phrase in text, phrase


def test_main_restores_the_signal_handlers_it_replaced():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["train", "--model", "mean", "--train", "missing.h5ad", "--out", "x"]) == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
