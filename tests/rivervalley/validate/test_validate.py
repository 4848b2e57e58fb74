"""`rivervalley validate` and the CLI: the fast grid passes, a perturbed formula fails, bad input exits 2."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rivervalley import cli, theory, validate


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fast_grid_passes_and_writes_json(tmp_path, capsys, backend):
    """Both noise backends: torch's float64 draws (the reference) and the compiled Philox kernel that the
    simulator uses by default."""
    path = tmp_path / "v.json"
    assert cli.main(["validate", "--fast", "--json", str(path), "-q", "--noise-backend", backend]) == 0
    report = json.loads(path.read_text())
    assert report["passed"] and report["n_failed"] == 0 and report["fast"]
    assert report["noise_backend"] == backend
    rows = report["rows"]
    assert len(rows) >= 20
    for r in rows:
        assert r["se"] > 0 and math.isfinite(r["mean"]), r
        if r["check"] == "=":
            assert abs(r["z"]) < validate.Z_MAX, r
        elif r["check"] == "≥":
            assert r["z"] > -validate.Z_MAX, r
        else:  # approximations are reported, never gated
            assert r["check"] == "≈" and not r["gated"]
    out = capsys.readouterr().out
    assert "simulated ± se" in out and "0 failed" in out
    assert path.with_suffix(".txt").read_text().startswith("§")


def test_full_grid_scenario_list_without_simulating():
    studies = validate.plan(fast=False)
    rows = [r for st in studies for r in st.rows]
    assert len(rows) >= 20
    assert {r.section for r in rows} >= {"§a", "§b", "§c", "§d", "§d'", "§e", "§f"}
    assert any("ρ=-" in r.scenario for r in rows), "negative ρ (ηλ > 1) must be covered"
    assert {"step", "exact"} <= {st.path for st in studies}
    assert all(math.isfinite(r.formula) for r in rows)
    # the full grid uses more seeds than the fast one for every study
    fast = {st.name: st.seeds for st in validate.plan(fast=True)}
    assert all(st.seeds > fast[st.name] for st in studies)
    assert len(validate.plan(fast=True)) == len(studies)


@pytest.mark.parametrize(
    "name, factor",
    [("sma_gain", 1.05), ("stationary_variance", 1.03)],
)
def test_perturbed_formula_is_detected(name, factor):
    """A formula off by a few % must fail the z-test: |z| > 4 is a real discrepancy detector."""
    true = getattr(theory, name)
    report = validate.run(fast=True, only=["ar1"], overrides={name: lambda *a, **k: factor * true(*a, **k)})
    assert not report.passed
    assert max(abs(r.z) for r in report.failures) > validate.Z_MAX
    unperturbed = validate.run(fast=True, only=["ar1"])
    assert unperturbed.passed


def test_row_checks():
    exact = validate.Row("§a", "q", "s", 1.0, mean=1.5, se=0.1)
    assert exact.z == pytest.approx(5.0) and not exact.passed
    bound = validate.Row("§e", "q", "s", 0.2, check="≥", mean=0.9, se=0.001)
    assert bound.z > 100 and bound.passed
    assert not validate.Row("§e", "q", "s", 0.9, check="≥", mean=0.8, se=0.01).passed
    assert validate.Row("§e", "q", "s", 0.4, check="≈", mean=0.6, se=0.001).passed
    assert not validate.Row("§a", "q", "s", 1.0).passed  # never measured: no pass by default


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="seeds"):
        validate.run(fast=True, seeds=1)
    with pytest.raises(ValueError, match="override"):
        validate.plan(overrides={"no_such_formula": lambda: 0})
    with pytest.raises(ValueError, match="unknown study"):
        validate.run(fast=True, only=["nope"])
    with pytest.raises(ValueError, match="noise_backend"):
        validate.run(fast=True, noise_backend="float16")


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "--seeds", "1"],
        ["validate", "--seeds", "abc"],
        ["validate", "--only", "nope"],
        ["simulate", "--lr", "-1", "--steps", "5"],
        ["simulate", "--curvatures", "1,x"],
        ["simulate", "--optimizer", "muon", "--steps", "5"],
        ["figures", "--only", "nope"],
        ["no-such-command"],
        [],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rivervalley: error:"), err
    assert "Traceback" not in err


def test_cli_bad_input_no_traceback_in_subprocess():
    p = subprocess.run(
        [sys.executable, "-m", "rivervalley", "validate", "--seeds", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_cli_simulate_writes_checkpoints_and_loss_curve(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = [
        "simulate",
        "--curvatures",
        "1,0.1",
        "--steps",
        "60",
        "--seeds",
        "3",
        "--ckpt-every",
        "20",
        "--schedule",
        "wsd",
        "--lr",
        "0.2",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 0
    z = np.load(out / "checkpoints.npz")
    assert z["checkpoints"].shape == (3, 4, 3) and list(z["ckpt_steps"]) == [0, 20, 40, 60]
    lines = (out / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,mean_loss" and len(lines) > 10
    assert json.loads((out / "config.json").read_text())["steps"] == 60
    # the exact path and another optimizer go through the same command (--force: its own earlier output)
    assert cli.main(["simulate", "--steps", "40", "--exact", "--init", "stationary", "-o", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (
        cli.main(["simulate", "--steps", "40", "--exact", "--init", "stationary", "-o", str(out), "--force"])
        == 0
    )
    assert (
        cli.main(["simulate", "--steps", "20", "--optimizer", "adamw", "--m", "4", "-o", str(out), "--force"])
        == 0
    )
    assert (
        cli.main(
            [
                "simulate",
                "--landscape",
                "matrix",
                "--shape",
                "3,4",
                "--optimizer",
                "muon",
                "--steps",
                "10",
                "--lr",
                "0.02",
                "-o",
                str(out),
                "--force",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out


def test_cli_validate_replaces_only_its_own_report(tmp_path, capsys):
    """Checked before the (long) run: a user's file at --json is never replaced; an earlier report is,
    with --force only."""
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    assert cli.main(["validate", "--fast", "--json", str(mine)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["validate", "--fast", "--json", str(mine), "--force"]) == 2
    assert "not written by rivervalley" in capsys.readouterr().err and mine.read_text() == '{"my": "notes"}'
    ours = tmp_path / "report.json"
    ours.write_text(json.dumps({"passed": True, "z_max": 4, "n_rows": 0, "rows": []}))
    (tmp_path / "report.txt").write_text("my table")
    assert cli.main(["validate", "--fast", "--json", str(ours)]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_cli_validate_refuses_seeds_that_cannot_fit_before_simulating(tmp_path, capsys):
    """``rivervalley validate --seeds 10**9``: the per-seed statistics alone would take terabytes; one line
    naming --seeds and the bytes, exit 2, nothing written, nothing simulated (it returns at once)."""
    import time

    t0 = time.perf_counter()
    rc = cli.main(["validate", "--fast", "--seeds", str(10**9), "-o", str(tmp_path / "v"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("rivervalley: error: validate with 1000000000 seeds (--seeds)"), err
    assert "needs about" in err
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "v").exists()
