"""Every paper figure script writes its PNG and the data behind it; the toy study and demo run end to end."""

import importlib
import json
import subprocess
import sys

import pytest

from rivervalley import cli
from rivervalley.figures import FIGURES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(paths, name):
    png = [p for p in paths if p.suffix == ".png"]
    data = [p for p in paths if p.suffix in (".json", ".csv")]
    assert [p.name for p in png] == [f"{name}.png"] and data
    assert png[0].read_bytes()[:8] == PNG_MAGIC and png[0].stat().st_size > 10_000
    for d in data:
        if d.suffix == ".json":
            assert json.loads(d.read_text())


@pytest.mark.parametrize("name", FIGURES)
def test_figure_writes_png_and_data(name, tmp_path):
    paths = importlib.import_module(f"rivervalley.figures.{name}").make(tmp_path, quick=True)
    _check_outputs(paths, name)


def test_figure_data_agrees_with_theory(tmp_path):
    """The data behind two figures carries its own check: closed form vs integral, simulation vs theory."""
    from rivervalley.figures import delta_loss_alpha, sma_ema_response

    sma_ema_response.make(tmp_path, quick=True)
    d = json.loads((tmp_path / "sma_ema_response.json").read_text())
    assert d["max_abs_gap_closed_vs_integral"] < 1e-6
    delta_loss_alpha.make(tmp_path, quick=True)
    d = json.loads((tmp_path / "delta_loss_alpha.json").read_text())
    assert max(abs(z) for z in d["simulated"]["z"]) < 4.5


def test_figure_script_entry_point(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "rivervalley.figures.pc_projection", "--out", str(tmp_path), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "pc_projection.png").exists() and (tmp_path / "pc_projection.json").exists()


def test_cli_figures_subset(tmp_path, capsys):
    out = tmp_path / "figs"
    assert cli.main(["figures", "-o", str(out), "--quick", "--only", "decay_vs_average"]) == 0
    names = [".rivervalley-output", "decay_vs_average.json", "decay_vs_average.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    # its own earlier output: replaced with --force only; a user's folder: never
    assert cli.main(["figures", "-o", str(out), "--quick", "--only", "decay_vs_average"]) == 2
    assert cli.main(["figures", "-o", str(out), "--quick", "--only", "decay_vs_average", "--force"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "decay_vs_average.png").write_bytes(b"my figure")
    assert cli.main(["figures", "-o", str(mine), "--quick", "--only", "decay_vs_average", "--force"]) == 2
    assert "not written by rivervalley" in capsys.readouterr().err
    assert (mine / "decay_vs_average.png").read_bytes() == b"my figure"


def test_demo_fast_runs_every_stage(tmp_path, capsys):
    from experiments import demo

    assert demo.main(["-o", str(tmp_path), "--fast"]) == 0
    toy = tmp_path / "toy"
    assert (toy / "simulate" / "checkpoints.npz").exists()
    merges = json.loads((toy / "simulate" / "merges.json").read_text())
    assert all(abs(m["z"]) < 4.5 for m in merges["methods"])
    assert json.loads((toy / "validate" / "validation_fast.json").read_text())["passed"]
    assert {p.stem for p in (toy / "figures").glob("*.png")} == set(FIGURES)
    lm = tmp_path / "lm"
    assert len(list((lm / "run").glob("step_*"))) == 9
    rep = json.loads((lm / "study" / "study.json").read_text())
    assert sum(rep["recommendation"]["weights"]) == pytest.approx(1) and len(rep["measured"]) > 20
    out = capsys.readouterr().out
    assert "Results in" in out and "demo done" in out and "recommended merge:" in out


def test_demo_never_writes_into_a_folder_it_did_not_write(tmp_path, capsys):
    from experiments import demo

    (tmp_path / "lm" / "run").mkdir(parents=True)
    (tmp_path / "lm" / "run" / "precious.txt").write_text("mine")  # the demo would retrain into lm/run
    assert demo.main(["-o", str(tmp_path), "--fast"]) == 2
    assert "not written by rivervalley" in capsys.readouterr().err
    assert (tmp_path / "lm" / "run" / "precious.txt").read_text() == "mine"
