"""The `extramerge` CLI end to end on tiny runs: inspect, analyze, merge, and its error contract."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ckpt_factory import load_state, make_safetensors_files, reference_merge
from safetensors.torch import save_file

from extramerge import trajectory as T
from extramerge.cli import main
from rivervalley import analysis as A
from rivervalley import weights as W


@pytest.fixture(scope="module")
def run6(tmp_path_factory) -> list[Path]:
    return make_safetensors_files(tmp_path_factory.mktemp("run6"), n=6, seed=3)


def _write_run(folder: Path, states: list[dict]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, state in enumerate(states, start=1):
        p = folder / f"step_{100 * k:06d}.safetensors"
        save_file({n: v.contiguous() for n, v in state.items()}, str(p))
        paths.append(p)
    return paths


def _line_run(folder: Path, n=6, noise=0.0, seed=0, dtype=torch.float64):
    """θ_k = a + b·k (+ noise), two tensors, exactly representable geometry in float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer.weight": (3, 4), "layer.bias": (5,)}
    a = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    states = [
        {k: (a[k] + b[k] * j + noise * torch.randn(a[k].shape, generator=g, dtype=torch.float64)).to(dtype)
         for k in shapes}
        for j in range(n)
    ]  # fmt: skip
    return _write_run(folder, states), a, b


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1, err
    assert lines[0].startswith("extramerge: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_table_and_json(capsys, run6):
    rc, out, _ = _cli(capsys, "inspect", *run6)
    assert rc == 0 and "consistent: yes" in out and "float32×7" in out and "step" in out
    rc, out, _ = _cli(capsys, "inspect", run6[0].parent, "--json")
    info = json.loads(out)
    assert rc == 0 and info["consistent"] and [c["step"] for c in info["checkpoints"]][:2] == [100, 200]
    assert info["checkpoints"][0]["parameters"] == sum(v.numel() for v in load_state(run6[0]).values())


def test_inspect_reports_mismatch_with_exit_2(capsys, run6, tmp_path):
    state = load_state(run6[-1])
    state["transformer.ln_f.weight"] = torch.zeros(9)
    bad = _write_run(tmp_path / "bad", [state])[0]
    rc, out, err = _cli(capsys, "inspect", run6[0], bad)
    assert rc == 2 and "consistent: NO" in out
    assert "transformer.ln_f.weight" in _one_error_line(err)


# ---------------------------------------------------------------------------------------------- analyze


def test_analyze_writes_report_figures_and_grams(capsys, run6, tmp_path):
    out_dir = tmp_path / "report"
    rc, out, _ = _cli(capsys, "analyze", *run6, "--windows", "1,2,4,8", "-o", out_dir, "--quiet")
    assert rc == 0 and "FVE1" in out and "SMA K=4" in out and "windows [8] skipped" in out
    for f in ("analysis.json", "gram.npz", "spectrum.png", "trajectory_pc12.png", "per_layer_fve1.png"):
        assert (out_dir / f).stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # temp folder renamed away
    rep = json.loads((out_dir / "analysis.json").read_text())
    assert rep["windows"] == [1, 2, 4] and rep["skipped_tensors"] == ["transformer.h.0.attn.counter",
                                                                        "transformer.mask"]  # fmt: skip
    data = T.load_gram(out_dir / "gram.npz")
    np.testing.assert_allclose(data.per_tensor.sum(0), data.gram, rtol=1e-12)
    # the streamed Gram equals an explicit one over the float tensors (differences from the newest)
    states = [load_state(p) for p in run6]
    X = np.stack([np.concatenate([s[k].double().reshape(-1).numpy() for k in data.names]) for s in states])
    np.testing.assert_allclose(data.gram, A.gram(X - X[-1]), rtol=1e-10, atol=1e-12)
    # a second run replaces an earlier analysis with --force only; other non-empty folders never
    assert _cli(capsys, "analyze", *run6, "-o", out_dir, "--quiet")[0] == 2
    assert _cli(capsys, "analyze", *run6, "-o", out_dir, "--quiet", "--force")[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    rc, _, err = _cli(capsys, "analyze", *run6, "-o", other, "--quiet")
    assert rc == 2 and "not empty" in _one_error_line(err) and (other / "keep.txt").exists()


def test_analyze_exact_line_and_noisy_line(tmp_path):
    paths, _, _ = _line_run(tmp_path / "line", n=7)
    rep = T.analyze(paths, progress=False)
    assert abs(rep["raw"]["fve1"] - 1) < 1e-9 and all(
        abs(g["fve1"] - 1) < 1e-9 for g in rep["merged"].values()
    )
    paths, _, _ = _line_run(tmp_path / "noisy", n=16, noise=1.0, seed=1)
    rep = T.analyze(paths, windows=(2, 4, 8), progress=False)
    fves = [rep["raw"]["fve1"]] + [rep["merged"][k]["fve1"] for k in ("2", "4", "8")]
    assert fves[0] < fves[1] < fves[2] < fves[3]


def test_analyze_small_spread_float32_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    base = 1 + 0.1 * rng.normal(size=20_000)
    states = [{"w": torch.from_numpy((base + 1e-4 * rng.normal(size=base.size)).astype(np.float32))}
              for _ in range(6)]  # fmt: skip
    paths = _write_run(tmp_path / "flat", states)
    X = np.stack([s["w"].double().numpy() for s in states])
    exact = np.linalg.svd(X - X.mean(0), compute_uv=False)[:5] ** 2
    rep = T.analyze(paths, windows=(1,), progress=False)
    np.testing.assert_allclose(rep["raw"]["variances"][:5], exact, rtol=1e-10)


def test_analyze_nan_input_is_one_line_error(capsys, run6, tmp_path):
    state = load_state(run6[2])
    state["transformer.wte.weight"][0, 0] = float("nan")
    paths = [run6[0], run6[1], _write_run(tmp_path / "nan", [state])[0]]
    rc, _, err = _cli(capsys, "analyze", *paths, "--quiet")
    line = _one_error_line(err)
    assert rc == 2 and "transformer.wte.weight" in line and "NaN" in line


# ------------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize(
    "method, extra",
    [
        ("sma", ["--window", "4"]),
        ("ema", ["--decay", "0.6"]),
        ("wma", []),
        ("extra", ["--window", "3", "--offset", "2", "--alpha", "0.5"]),
        ("trend", ["--window", "5", "--ahead", "1"]),
        ("pc1", ["--window", "3"]),
        ("custom", ["--weights", "0,0,0,0.25,0.25,0.5"]),
    ],
)
def test_merge_each_method_matches_reference(capsys, run6, tmp_path, method, extra):
    out = tmp_path / "merged"
    rc, stdout, _ = _cli(capsys, "merge", *run6, "--method", method, *extra, "-o", out, "--quiet")
    assert rc == 0 and "weights (oldest first" in stdout and "peak memory" in stdout
    rec = json.loads((out / "merge.json").read_text())
    assert rec["method"] == method and len(rec["weights"]) == 6
    assert sum(rec["weights"]) == pytest.approx(1)
    merged = load_state(out)  # the one weights file beside merge.json
    ref = reference_merge(run6, rec["weights"])
    for name, v in ref.items():
        torch.testing.assert_close(merged[name].double(), v.double(), rtol=1e-5, atol=1e-5)


def test_merge_extra_default_alpha_is_match(capsys, run6, tmp_path):
    rc, _, _ = _cli(capsys, "merge", *run6, "--method", "extra", "-o", tmp_path / "o", "--quiet")
    rec = json.loads((tmp_path / "o" / "merge.json").read_text())
    assert rc == 0 and (rec["window"], rec["offset"], rec["alpha"]) == (3, 3, pytest.approx(1 / 3))
    np.testing.assert_allclose(rec["weights"], W.extra(6, 3, 3, 1 / 3))


def test_dry_run_validates_and_writes_nothing(capsys, run6, tmp_path):
    out = tmp_path / "never"
    rc, stdout, _ = _cli(capsys, "merge", *run6, "--method", "sma", "--dry-run", "-o", out)
    assert rc == 0 and not out.exists() and "would write" in stdout and "projected" in stdout
    assert "+0.166667" in stdout  # the weight vector
    assert not list(tmp_path.iterdir())


def test_pc1_ahead_lands_on_the_line(capsys, tmp_path):
    paths, a, b = _line_run(tmp_path / "line", n=6)
    h = 2.0
    out = tmp_path / "ahead"
    rc, _, _ = _cli(capsys, "merge", *paths, "--method", "pc1", "--ahead", h, "-o", out, "--quiet",
                    "--accumulate", "float64")  # fmt: skip
    assert rc == 0
    merged = load_state(out)
    for k in a:
        torch.testing.assert_close(merged[k], a[k] + b[k] * (5 + h), rtol=1e-9, atol=1e-9)


def test_pc1_reuses_gram_from_analyze(capsys, run6, tmp_path):
    assert _cli(capsys, "analyze", *run6, "-o", tmp_path / "rep", "--quiet")[0] == 0
    rc, out, _ = _cli(capsys, "merge", *run6, "--method", "pc1", "--gram", tmp_path / "rep" / "gram.npz",
                      "--ahead", "1", "--dry-run", "-o", tmp_path / "o")  # fmt: skip
    assert rc == 0 and "read from" in out
    rc, out2, _ = _cli(capsys, "merge", *run6, "--method", "pc1", "--ahead", "1", "--dry-run", "--quiet",
                       "-o", tmp_path / "o")  # fmt: skip
    weights = [line for line in out.splitlines() if "step " in line and "safetensors" in line]
    assert weights == [line for line in out2.splitlines() if "step " in line and "safetensors" in line]


# ----------------------------------------------------------------------------------------------- errors


def test_errors_exit_2_with_one_line(capsys, run6, tmp_path):
    cases = [
        (["--method", "extra", "--window", "4", "--offset", "4"], "needs K + d = 8 checkpoints, got 6"),
        (["--method", "custom", "--weights", "0.5,0.5"], "got 2 weights for 6 checkpoints"),
        (["--method", "sma", "--decay", "0.5"], "does not apply"),
        (["--method", "sma", "--shard-size", "lots"], "invalid size"),
    ]
    for flags, needle in cases:
        rc, _, err = _cli(capsys, "merge", *run6, *flags, "-o", tmp_path / "x", "--quiet")
        assert rc == 2 and needle in _one_error_line(err), (flags, err)
    hf = []
    for p in run6[:2]:  # two HF-style folders (model.safetensors inside)
        (tmp_path / p.stem).mkdir()
        shutil.copy(p, tmp_path / p.stem / "model.safetensors")
        hf.append(tmp_path / p.stem)
    rc, _, err = _cli(capsys, "merge", *hf, "--method", "sma", "-o", hf[1] / "merged", "--quiet")
    assert rc == 2 and "input" in _one_error_line(err) and not (hf[1] / "merged").exists()
    rc, _, err = _cli(capsys, "merge", *run6, "--method", "sma", "-o", run6[-1], "--quiet", "--force")
    assert rc == 2 and "input" in _one_error_line(err)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    rc, _, err = _cli(capsys, "merge", *run6, "--method", "sma", "-o", busy, "--quiet")
    assert rc == 2 and "not empty" in _one_error_line(err)
    rc, _, err = _cli(capsys, "merge", *run6, "--method", "sma", "-o", busy, "--quiet", "--force")
    assert rc == 2 and "not written by an extramerge merge" in _one_error_line(err)
    assert (busy / "file").read_text() == "x"  # a user's folder survives --force
    merged = tmp_path / "merged"
    assert _cli(capsys, "merge", *run6, "--method", "sma", "-o", merged, "--quiet")[0] == 0
    assert _cli(capsys, "merge", *run6, "--method", "ema", "-o", merged, "--quiet", "--force")[0] == 0
    rc, _, err = _cli(
        capsys, "merge", tmp_path / "missing.safetensors", "--method", "sma", "-o", tmp_path / "y"
    )
    assert rc == 2 and "missing.safetensors" in _one_error_line(err)


def test_mismatched_and_nan_inputs_exit_2(capsys, run6, tmp_path):
    state = load_state(run6[-1])
    del state["transformer.ln_f.weight"]
    bad = _write_run(tmp_path / "bad", [state])[0]
    rc, _, err = _cli(capsys, "merge", run6[0], bad, "--method", "sma", "-o", tmp_path / "o", "--quiet")
    assert rc == 2 and "transformer.ln_f.weight" in _one_error_line(err)
    state = load_state(run6[-1])
    state["transformer.h.0.mlp.c_fc.weight"][1, 2] = float("inf")
    nan = _write_run(tmp_path / "nan", [state])[0]
    rc, _, err = _cli(capsys, "merge", run6[0], nan, "--method", "sma", "-o", tmp_path / "o2", "--quiet")
    assert rc == 2 and "transformer.h.0.mlp.c_fc.weight" in _one_error_line(err)
    assert not (tmp_path / "o2").exists()


def test_non_summing_weights_warn_but_merge(capsys, run6, tmp_path):
    rc, _, err = _cli(capsys, "merge", *run6, "--method", "custom", "--weights", "0,0,0,0,1,1",
                      "-o", tmp_path / "o", "--quiet")  # fmt: skip
    assert rc == 0 and "extramerge: warning: custom weights sum to 2" in err
    assert len(err.strip().splitlines()) == 1


def test_console_entry_point_in_a_subprocess(run6, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "extramerge", "merge", *map(str, run6), "--method", "extra", "--window", "5",
           "--offset", "5", "-o", str(tmp_path / "o")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    expected = "method 'extra' with window K=5 and offset d=5 needs K + d = 10 checkpoints, got 6"
    assert p.stderr.strip() == f"extramerge: error: {expected}"


def test_safetensors_commands_never_import_torch(tmp_path):
    """inspect, analyze and merge (safetensors files and HF folders, bfloat16 through ml_dtypes, every
    output dtype, sharded output, a reused gram.npz) run in a fresh interpreter without importing torch
    (or scipy)."""
    from _ckpt_factory import make_hf_run

    make_safetensors_files(tmp_path / "bf16", n=4, dtype=torch.bfloat16)
    hf = make_hf_run(tmp_path / "hf", "llama", n=3)
    out = tmp_path / "out"
    code = f"""
import sys
from extramerge.cli import main
bf16, hf, out = {str(tmp_path / "bf16")!r}, {[str(p) for p in hf]!r}, {str(out)!r}
runs = [
    ["inspect", bf16],
    ["inspect", *hf, "--json"],
    ["analyze", bf16, "-o", out + "/a", "--quiet"],
    ["merge", bf16, "--method", "sma", "--dtype", "float32", "-o", out + "/m1.safetensors", "--quiet"],
    ["merge", bf16, "--method", "pc1", "--gram", out + "/a/gram.npz", "-o", out + "/m2", "--quiet"],
    ["merge", *hf, "--method", "ema", "--dtype", "bfloat16", "--shard-size", "20KB", "-o", out + "/m3",
     "--quiet"],
    ["analyze", *hf, "--quiet"],
]
for argv in runs:
    assert main(argv) == 0, argv
print("TORCH:", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
print("SCIPY:", sorted(m for m in sys.modules if m == "scipy" or m.startswith("scipy.")))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "TORCH: []" in p.stdout
    assert "SCIPY: []" in p.stdout  # scipy costs a merge 0.4 s and 20 MB at start-up
    assert (out / "m3" / "model.safetensors.index.json").is_file()
    got = load_state(out / "m1.safetensors")
    assert got["transformer.wte.weight"].dtype == torch.float32
