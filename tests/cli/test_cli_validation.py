"""Bad command-line values fail where they enter, before any file is read or written.

Numeric options are checked by the argparse ``type=`` functions of :mod:`stinfer.cli.options`:
argparse prints ``argument --FLAG: ...`` and exits with status 2. Values that need more than
the string (a GPU that is not there, an output that cannot be written) are refused by the
command before it reads its inputs, as one ``stinfer CMD: error: ...`` line with status 2.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from stinfer import cli
from stinfer.cli import options

# (command and its required arguments, the bad flag and value); every case names its flag
ARGPARSE_CASES = [
    (["prepare", "--format", "visium", "--path", "S"], ["--bin-size", "0"]),
    (["prepare", "--format", "visium", "--path", "S"], ["--bin-size", "eight"]),
    (["prepare", "--format", "legacy-st"], ["--pixel-size-um", "0"]),
    (["prepare", "--format", "legacy-st"], ["--pixel-size-um", "-0.5"]),
    (["prepare", "--format", "legacy-st"], ["--pixel-size-um", "nan"]),
    (["train", "--train", "C2.h5ad"], ["--epochs", "0"]),
    (["train", "--train", "C2.h5ad"], ["--epochs", "-3"]),
    (["train", "--train", "C2.h5ad"], ["--epochs", "2.5"]),
    (["train", "--train", "C2.h5ad"], ["--n-genes", "0"]),
    (["train", "--train", "C2.h5ad"], ["--seed", "-1"]),
    (["train", "--train", "C2.h5ad"], ["--devices", "abc"]),
    (["train", "--train", "C2.h5ad"], ["--devices", "0"]),
    (["train", "--train", "C2.h5ad"], ["--devices", "0,0"]),
    (["train", "--train", "C2.h5ad"], ["--devices", "1,x"]),
    (["train", "--train", "C2.h5ad"], ["--accelerator", "tpu"]),
    (["predict", "--run", "r", "--slide", "s.h5ad"], ["--mode", "both_ways"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--top-k", "0"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--n-components", "0"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--min-cells", "-1"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--label-fraction", "1"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--label-fraction", "-0.1"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--completion-epochs", "0"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--autoencoder-epochs", "-2"]),
    (["embed-genes", "--corpus", "A1.h5ad"], ["--accelerator", "quantum"]),
    (["gene-eval", "--embeddings", "g.h5ad"], ["--pairs", "1"]),
    (["gene-eval", "--embeddings", "g.h5ad"], ["--folds", "1"]),
    (["gene-eval", "--embeddings", "g.h5ad"], ["--n-components", "0"]),
    (["gene-eval", "--embeddings", "g.h5ad"], ["--seed", "x"]),
    (["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad"], ["--test-fraction", "0"]),
    (["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad"], ["--test-fraction", "1.5"]),
    (
        ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--genes", "A"],
        ["--epochs", "0"],
    ),
    (
        ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--genes", "A"],
        ["--min-spot-fraction", "2"],
    ),
    (
        ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--genes", "A"],
        ["--sub-spot-grid", "0"],
    ),
    (
        ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--genes", "A"],
        ["--seed", "-5"],
    ),
    (["predict", "--run", "r", "--slide", "s.h5ad"], ["--samples", "0"]),
    (["predict", "--run", "r", "--slide", "s.h5ad"], ["--seed", "-1"]),
    (["predict", "--run", "r", "--slides", "s.h5ad"], ["--workers", "0"]),
    (["demo"], ["--epochs", "0"]),
    (["demo"], ["--spots", "10"]),
    (["demo"], ["--seed", "-1"]),
]


def _case_id(case) -> str:
    command, (flag, value) = case
    return f"{command[0]} {flag} {value}"


@pytest.mark.parametrize("case", ARGPARSE_CASES, ids=[_case_id(c) for c in ARGPARSE_CASES])
def test_a_bad_number_fails_at_parse_time_naming_its_flag(tmp_path, capsys, case):
    command, (flag, value) = case
    out = tmp_path / "out" / ("run" if command[0] in ("train", "demo") else "result.h5ad")
    with pytest.raises(SystemExit) as caught:
        cli.main([*command, flag, value, "--out", str(out)])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: " in error, error
    assert not (tmp_path / "out").exists()


def test_the_cases_cover_every_numeric_option_of_every_command():
    """A new ``type=int``/``type=float`` option would skip the checks: none is left."""
    parser = cli.build_parser()
    bare = []
    for action in parser._subparsers._group_actions[0].choices.items():
        name, subparser = action
        for option in subparser._actions:
            if option.type in (int, float):
                bare.append(f"{name} {option.option_strings[0]}")
    assert bare == []


def test_the_types_accept_what_they_should():
    assert options.positive_int("3") == 3
    assert options.non_negative_int("0") == 0
    assert options.fraction("0") == 0.0 and options.fraction("1") == 1.0
    assert options.open_fraction("0.2") == 0.2
    assert options.positive_float("1e-3") == 0.001
    assert options.devices("auto") == "auto"
    assert options.devices("4") == 4
    assert options.devices("0, 2") == "0,2"
    with pytest.raises(argparse.ArgumentTypeError):
        options.positive_float("inf")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--model", "stevs", "--train", "C2.h5ad", "--accelerator", "gpu"],
        ["embed-genes", "--corpus", "A1.h5ad", "--accelerator", "cuda"],
        ["embed-genes", "--method", "svd", "--corpus", "A1.h5ad", "--accelerator", "gpu"],
        [
            "impute",
            "--slide",
            "s.h5ad",
            "--embeddings",
            "e.h5ad",
            "--genes",
            "A",
            "--accelerator",
            "gpu",
        ],
    ],
    ids=["train", "embed-genes", "embed-genes svd", "impute"],
)
def test_a_gpu_accelerator_without_a_gpu_is_refused_before_reading(
    tmp_path, capsys, no_gpu, command
):
    out = tmp_path / "out" / ("run" if command[0] == "train" else "result.h5ad")
    assert cli.main([*command, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    accelerator = command[command.index("--accelerator") + 1]
    assert f"--accelerator {accelerator}" in error and "no GPU is visible" in error
    assert "use --accelerator cpu or auto" in error
    assert "file not found" not in error  # refused before the inputs are looked at
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_out_that_is_a_file_before_reading_slides(tmp_path, capsys):
    out = tmp_path / "run.txt"
    out.write_text("mine\n")
    code = cli.main(["train", "--model", "mean", "--train", "C2.h5ad", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert str(out) in error and "folder" in error and "file not found" not in error
    assert out.read_text() == "mine\n"


def test_train_refuses_a_non_empty_run_folder_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    code = cli.main(["train", "--model", "mean", "--train", "C2.h5ad", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "--overwrite" in error and "file not found" not in error
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_evaluate_checks_the_per_gene_csv_before_reading(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    per_gene = tmp_path / "metrics.per_gene.csv"
    per_gene.write_text("mine\n")
    code = cli.main(["evaluate", "--pred", "p.h5ad", "--truth", "t.h5ad", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "metrics.per_gene.csv" in error and "--overwrite" in error
    assert not out.exists() and per_gene.read_text() == "mine\n"


def test_impute_checks_the_metrics_file_before_reading(tmp_path, capsys):
    out = tmp_path / "held_out.h5ad"
    metrics = tmp_path / "held_out.metrics.json"
    metrics.write_text("{}")
    command = ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--test-fraction", "0.2"]
    assert cli.main([*command, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "held_out.metrics.json" in error and "--overwrite" in error
    assert "no such slide" not in error and not out.exists()


def test_impute_refuses_metrics_without_the_held_out_protocol(tmp_path, capsys):
    command = ["impute", "--slide", "s.h5ad", "--embeddings", "e.h5ad", "--genes", "A"]
    out = tmp_path / "o.h5ad"
    assert cli.main([*command, "--metrics", str(tmp_path / "m.json"), "--out", str(out)]) == 2
    assert "--metrics" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_non_empty_folder_before_generating(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_benchmark_checks_the_publish_folder_before_any_cell(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\ncohorts: [{name: c, format: synthetic}]\nmodels: [{type: mean}]\n"
    )
    published = tmp_path / "docs" / "tiny"
    published.mkdir(parents=True)
    (published / "summary.md").write_text("my notes\n")
    out = tmp_path / "results"
    code = cli.main(
        [
            "benchmark",
            "--config",
            str(config),
            "--out",
            str(out),
            "--publish",
            str(published.parent),
        ]
    )
    assert code == 2
    assert "--publish" in capsys.readouterr().err
    assert not out.exists()


def test_every_commands_help_fits_the_terminal_and_rewraps_its_prose(monkeypatch):
    """``--help`` of every command fits 100 columns, and its description follows the width."""
    from stinfer.cli import build_parser

    def commands() -> dict:
        parser = build_parser()
        (subparsers,) = [a for a in parser._actions if a.dest == "command"]
        return {"stinfer": parser, **subparsers.choices}

    monkeypatch.setenv("COLUMNS", "100")
    for name, parser in commands().items():
        long_lines = [line for line in parser.format_help().splitlines() if len(line) > 100]
        assert not long_lines, (name, long_lines)
    monkeypatch.setenv("COLUMNS", "70")
    description = commands()["impute"].format_help().split("options:")[0]
    prose = [line for line in description.splitlines()[3:] if not line.startswith(" ")]
    assert prose and max(len(line) for line in prose) <= 70
