"""`stinfer demo`: synthetic sections -> STEvs -> metrics table and figures, end to end."""

from __future__ import annotations

import pandas as pd
import pytest

from stinfer.cli import main


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_trains_predicts_prints_metrics_beside_the_baseline_and_draws_figures(
    tmp_path, capsys
):
    out = tmp_path / "demo"
    command = f"demo --out {out} --spots 120 --epochs 2 --no-progress"
    assert main(command.split()) == 0
    printed = capsys.readouterr().out
    assert "pcc_median" in printed and "STEvs" in printed and "mean" in printed
    for name in ("overview.png", "spatial_maps.png", "latent_umap.png", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    assert {p.name for p in (out / "run").iterdir()} >= {"config.json", "weights.safetensors"}
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["model"]) == {"STEvs", "mean"}
    assert set(table["slide"]) == {"synthetic_section2", "synthetic_section3"}
    assert (table.loc[table["model"] == "mean", "pcc_median"] == 0).all()
    assert main(["demo", "--out", str(out)]) == 2  # never overwrites silently


def test_demo_never_writes_into_a_folder_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        assert main(["demo", "--out", str(out), *flags]) == 2
        assert "not a demo output stinfer wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
