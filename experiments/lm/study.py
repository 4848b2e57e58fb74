"""The LM study: Extra-Merge on a real run's checkpoints, the theory's prediction next to the measurement.

    python -m experiments.lm.study --run RUN [-o RUN/study] [--alphas ...] [--offsets ...] [--device cuda]

On the step_XXXXXX/ checkpoints of a run made by ``experiments.lm.train``:

1. rank-1 analysis of raw versus SMA-merged trajectories (``extramerge.analyze``: one Gram pass), with the
   theory's FVE₁ (THEORY.md §e) from the geometric river estimate (drift, valley variance V, ρ);
2. calibration on the *validation* split: the loss of every checkpoint, of points on the least-squares line
   through them, and of consecutive midpoints; ``experiments.lm.estimate`` fits the river profile F, the
   valley loss ω and ρ (twice: ρ fitted from those losses, and ρ fixed to the geometric estimate);
3. measurement on the *test* split (loss, bits per byte, cloze accuracy): last checkpoint; SMA, EMA, WMA;
   Extra-Merge over a grid of α and d; trend and pc1 extrapolation; the theory-optimal weight vector and
   Extra-Merge at the predicted α*. Every merge is a ``rivervalley.weights`` vector applied in memory; one of
   them is also written by extramerge's streaming engine and re-evaluated, to show the two agree;
4. the report: ``study.json``, ``study.md`` (tables: predicted vs measured ΔL and α*, with the errors), and
   figures (loss vs α with the predicted curves, FVE₁ vs K, the PC1–PC2 trajectory, the loss curve).

The output is written to a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.lm import estimate as E
from extramerge import outputs
from extramerge.checkpoints import publish, staging_dir
from rivervalley import analysis as A
from rivervalley import theory
from rivervalley import weights as W
from rivervalley._publish import interruptible

DEFAULT_ALPHAS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class StudyConfig:
    run: Path
    out: Path | None = None  # default RUN/study
    windows: tuple[int, ...] = (2, 4, 8)  # SMA / WMA windows (and the rank-1 analysis)
    ema_decays: tuple[float, ...] = (0.5, 0.8, 0.9)
    extra_window: int | None = None  # K of Extra-Merge; default min(4, N // 2)
    offsets: tuple[int, ...] | None = None  # d grid; default {K/2, K} (those that fit in N)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    cloze_items: int = 200
    candidates: int = 8
    split: str = "test"  # where the merges are measured (calibration always uses 'val')
    batch_size: int = 16
    device: str = "cpu"
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    seed: int = 0
    force: bool = False
    progress: bool = True
    engine_check: bool = True


class StudyError(ValueError):
    """Bad input to the study: one line naming the run, file or flag at fault."""


# ----------------------------------------------------------------------------------------------- inputs


def _read_run(run: Path) -> tuple[dict, list, dict]:
    """run.json (or {}), the step_XXXXXX checkpoints oldest first, and their common tensor infos."""
    from extramerge.checkpoints import check_compatible, load_checkpoints

    if not run.is_dir():
        raise StudyError(f"{run}: no such run folder")
    meta_path = run / "run.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise StudyError(f"{meta_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, dict):
        meta = {}
    steps = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if not steps:
        raise StudyError(
            f"{run}: no step_XXXXXX checkpoints (train with --ckpt-every, or point --run at a run)"
        )
    ckpts = load_checkpoints([str(p) for p in steps])
    if len(ckpts) < 4:
        raise StudyError(f"{run}: the study needs at least 4 checkpoints, found {len(ckpts)}")
    try:
        infos = check_compatible(ckpts)
    except ValueError as e:
        raise StudyError(f"{run}: checkpoints of different architectures: {e}") from None
    return meta, ckpts, infos


def _data_dir(run: Path, meta: dict) -> Path:
    """The run's held-out data: run.json's data_dir (a relative one is relative to the run), else RUN/data."""
    for cand in (meta.get("data_dir"), "data"):
        if not isinstance(cand, str | Path):
            continue
        p = Path(cand)
        p = p if p.is_absolute() else run / p
        if (p / "val.jsonl").is_file():
            return p
    raise StudyError(f"{run}: no held-out data (expected {run / 'data'}/val.jsonl and test.jsonl)")


def _methods(n: int, cfg: StudyConfig, G: np.ndarray) -> tuple[list[tuple], int, list]:
    """(group, name, weights, α or None) of every merge the study measures, plus K and the d grid of
    Extra-Merge."""
    last = np.eye(n)[-1]
    out = [("last", "last", last, None)]
    for K in cfg.windows:
        if 2 <= K <= n:
            out.append(("sma", f"SMA K={K}", W.sma(n, K), None))
    for b in cfg.ema_decays:
        out.append(("ema", f"EMA β={b:g}", W.ema(n, b), None))
    for K in cfg.windows:
        if 2 <= K <= n:
            out.append(("wma", f"WMA K={K}", W.wma(n, K), None))
    K = cfg.extra_window or max(2, min(4, n // 2))
    if K + 1 > n:
        raise StudyError(f"--extra-window {K} needs at least {K + 1} checkpoints, the run has {n}")
    offsets = cfg.offsets or tuple(sorted({max(1, K // 2), K}))
    offsets = [d for d in offsets if d >= 1 and K + d <= n]
    if not offsets:
        raise StudyError(f"--offsets: no offset d fits K + d <= N = {n} (K = {K})")
    if not cfg.alphas:
        raise StudyError("--alphas: the α grid is empty")
    for d in offsets:
        for a in cfg.alphas:
            out.append((f"extra d={d}", f"Extra K={K} d={d} α={a:g}", W.extra(n, K, d, a), float(a)))
    out.append(("trend", f"trend K={n}", W.trend(n, n), None))
    out.append(("trend", f"trend K={n} ahead=1", W.trend(n, n, ahead=1.0), None))
    out.append(("pc1", f"pc1 K={K}", A.pc1_trend_weights(G, K), None))
    out.append(("pc1", f"pc1 K={K} ahead=1", A.pc1_trend_weights(G, K, ahead=1.0), None))
    return out, K, offsets


# ------------------------------------------------------------------------------------------- evaluation


def _check_memory(ckpts, names) -> None:
    """The evaluator holds every checkpoint's float tensors (float32, [N, ...]) and builds each merge in
    float64 one tensor at a time: refuse, before reading them, a study that cannot fit in memory."""
    from rivervalley._memory import require_memory

    infos = ckpts[-1].infos
    sizes = [infos[n].numel for n in names if n in infos and infos[n].dtype_str.startswith(("F", "BF"))]
    n = len(ckpts)
    need = 4 * (n + 2) * sum(sizes) + 8 * (n + 1) * max(sizes, default=0)
    require_memory(
        need, f"the study of {n} checkpoints x {sum(sizes) / 1e6:.3g}M parameters (held in float32)"
    )


class _Evaluator:
    """Holds every checkpoint's float tensors stacked [N, ...] and one model; evaluates any weight vector."""

    def __init__(self, ckpts, names, cfg: StudyConfig):
        import torch

        from extramerge.evaluate import load_model

        self.torch = torch
        if cfg.threads and not str(cfg.device).startswith("cuda"):
            torch.set_num_threads(cfg.threads)  # small models: more threads only contend
        self.model, self.tokenizer = load_model(ckpts[-1].path, device=cfg.device, dtype=torch.float32)
        self.device = cfg.device
        self.cfg = cfg
        self.stacks: dict = {}
        # tensors that share storage with a loaded one (GPT-2's lm_head = wte) are absent from checkpoints
        self._shares: dict[str, set] = {}  # name -> every name on the same storage
        by_ptr: dict[int, set] = {}
        for k, v in self.model.named_parameters(remove_duplicate=False):
            self._shares[k] = by_ptr.setdefault(v.data_ptr(), set())
            self._shares[k].add(k)
        self.fixed: dict = {}
        if not str(cfg.device).startswith("cuda"):
            _check_memory(ckpts, names)
        for name in names:  # each checkpoint's tensor read once
            tensors = [c.read(name) for c in ckpts]
            if tensors[-1].is_floating_point():
                self.stacks[name] = torch.stack([t.to(torch.float32) for t in tensors]).to(cfg.device)
            else:  # integer/bool buffers: the newest checkpoint's, as the merge engine does
                self.fixed[name] = tensors[-1].clone().to(cfg.device)
        self.texts: dict = {}
        self.blocks: dict = {}
        self.cloze: dict = {}

    def load(self, w: np.ndarray) -> None:
        torch = self.torch
        wt = torch.as_tensor(np.asarray(w, dtype=np.float64), dtype=torch.float64, device=self.device)
        state = {}
        for name, st in self.stacks.items():
            # accumulate in float64: merges with large |w| (long extrapolations) cancel a lot
            flat = st.reshape(st.shape[0], -1)
            state[name] = (wt @ flat.to(torch.float64)).to(torch.float32).reshape(st.shape[1:])
        state.update(self.fixed)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise StudyError(f"checkpoint tensors the model does not have: {unexpected[:3]}")
        untied = [k for k in missing if not (self._shares.get(k, {k}) - {k}) & state.keys()]
        if untied:  # they would keep the newest checkpoint's values in every merge
            raise StudyError(f"model tensors missing from the checkpoints: {untied[:3]}")

    def add_split(self, split: str, data_dir: Path, cloze: bool) -> None:
        from extramerge import evaluate as ev

        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise StudyError(f"{path}: missing held-out split")
        texts = ev.load_texts(path)
        self.texts[split] = texts
        self.blocks[split] = ev.token_blocks(texts, self.tokenizer, ev.max_positions(self.model))
        if cloze:
            self.cloze[split] = ev.build_cloze(
                texts, n_items=self.cfg.cloze_items, n_candidates=self.cfg.candidates, seed=self.cfg.seed
            )

    def measure(self, w: np.ndarray, split: str, cloze: bool = False) -> dict:
        from extramerge import evaluate as ev

        self.load(w)
        r = ev.evaluate_loss(
            self.model,
            self.tokenizer,
            self.texts[split],
            blocks=self.blocks[split],
            batch_size=self.cfg.batch_size,
            device=self.device,
        )
        out = {"loss": r.loss, "bits_per_byte": r.bits_per_byte}
        if cloze and split in self.cloze:
            c = ev.cloze_accuracy(
                self.model,
                self.tokenizer,
                self.cloze[split],
                batch_size=4 * self.cfg.batch_size,
                device=self.device,
            )
            out["cloze"] = c.accuracy
            out["cloze_stderr"] = c.stderr
        return out


# ----------------------------------------------------------------------------------------------- theory


def _geometric_rank1(report: dict, river: dict) -> dict:
    """THEORY §e with the geometric estimate: drift D per checkpoint, total valley variance V, ρ."""
    n = report["n_checkpoints"]
    out = {}
    D, V, rho = river["drift"], river["noise_var"], river["rho"]
    if not (V > 0 and -1 < rho < 1 and D > 0):
        return out
    lam = 1.0 - rho  # map onto η = s = 1, one valley curvature (see estimate.RiverFit.theory_params)
    sigma = math.sqrt(V * lam * (2.0 - lam))
    for K in [1, *report["windows"]]:
        m = n - K + 1
        if m < 2:
            continue
        approx, lower = theory.rank1_fraction(
            slope=D, lr=1.0, interval=1, window=K, curvatures=[lam], n=m, noise=sigma
        )
        out[str(K)] = {"approx": float(approx), "lower_bound": float(lower)}
    return out


def _theory_alpha(fit: E.RiverFit, K: int, d: int) -> dict:
    """α* of the fitted model, and of its linear-river part alone (F2 = 0: THEORY §d's closed form)."""
    import dataclasses

    return {
        "alpha_star": E.optimal_extra_alpha(fit, K, d),
        "alpha_star_linear_river": E.optimal_extra_alpha(dataclasses.replace(fit, F2=0.0), K, d),
    }


# ------------------------------------------------------------------------------------------------ study


def _progress(cfg, total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, file=sys.stderr)


def run_study(cfg: StudyConfig) -> dict:
    """Run the whole study; returns the report dict (also written to the output folder)."""
    t0 = time.perf_counter()
    run = Path(cfg.run)
    meta, ckpts, infos = _read_run(run)
    try:
        out = _check_output(Path(cfg.out) if cfg.out is not None else run / "study", run, cfg.force)
        data_dir = _data_dir(run, meta)
        tmp = staging_dir(out)
    except BaseException:
        for c in ckpts:
            c.close()
        raise
    try:
        from rivervalley._compute import flush_denormals

        # merged weights can hold denormals, on which CPU matmuls slow down several-fold
        with flush_denormals():
            report = _study(cfg, run, meta, ckpts, list(infos), data_dir, tmp)
        report["seconds"] = time.perf_counter() - t0
        outputs.mark(tmp, "study")  # what a later --force may replace
        (tmp / "study.json").write_text(json.dumps(report, indent=1, default=_json_default))
        (tmp / "study.md").write_text(markdown(report))
        publish(tmp, out, force=True)  # an earlier study, checked above, is replaced only once this is in
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for c in ckpts:
            c.close()
    report["out"] = str(out)
    return report


def _check_output(out: Path, run: Path, force: bool) -> Path:
    """Refuse an output that is the run or holds it (by path or inode), or a special file, and replace
    only an earlier study (its extramerge output marker), with --force."""
    if outputs.overlap(out, run) in ("is", "contains"):
        raise StudyError(f"{out}: the output folder would replace the run {run} itself (pick another -o)")
    outputs.refuse_special(out)
    if out.exists():
        if not force:
            raise StudyError(f"{out}: output exists (pass --force to replace it)")
        if not outputs.marked(out, "study"):
            raise StudyError(
                f"{out}: exists and is not an earlier study (no {outputs.MARKER} marker); not replacing it"
            )
    return out


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def _study(cfg, run, meta, ckpts, names, data_dir, tmp) -> dict:
    from extramerge.trajectory import analyze, load_gram

    n = len(ckpts)
    steps = [c.step for c in ckpts]
    # 1. rank-1 analysis (one streaming Gram pass; writes analysis/ with its own figures)
    windows = sorted({K for K in (1, *cfg.windows) if K < n})
    rank1 = analyze(ckpts, windows=windows, output=tmp / "analysis", progress=False)
    G = load_gram(tmp / "analysis" / "gram.npz").gram
    river = rank1["river"]  # extramerge.select.estimate_river(G), computed by analyze
    methods, K, offsets = _methods(n, cfg, G)

    ev = _Evaluator(ckpts, names, cfg)
    ev.add_split("val", data_dir, cloze=False)
    ev.add_split(cfg.split, data_dir, cloze=cfg.cloze_items > 0)

    # 2. calibration (validation split) and the two fits
    calib = E.calibration_weights(n)
    bar = _progress(cfg, len(calib) + len(methods) + 2 * len(offsets), "study")
    try:
        calib_loss = {}
        for name, w in calib.items():
            calib_loss[name] = ev.measure(w, "val")["loss"]
            bar.update()
        ws, ys = list(calib.values()), list(calib_loss.values())
        fits = {"losses": E.fit(ws, ys), "geometry": E.fit(ws, ys, rho=river["rho"], rho_source="geometry")}

        # 3. measurement (test split) of every method, with both predictions
        rows = []
        for group, name, w, a in methods:
            m = ev.measure(w, cfg.split, cloze=True)
            bar.update()
            rows.append(_row(group, name, w, m, fits, alpha=a))
        base = rows[0]
        for r in rows:
            _with_delta(r, base)
        # Extra-Merge at the predicted α*, and the theory-optimal weight vector, for each fit
        alpha = {}
        for d in offsets:
            grid = [(r["alpha"], r["loss"]) for r in rows if r["group"] == f"extra d={d}"]
            a_meas, l_meas = min(grid, key=lambda x: x[1])
            entry = {
                "measured_best_alpha": a_meas,
                "measured_best_loss": l_meas,
                "measured_best_delta": l_meas - base["loss"],
            }
            entry["measured_alpha_parabola"] = _parabola_min(grid)
            for key, f in fits.items():
                th = _theory_alpha(f, K, d)
                a = th["alpha_star"]
                entry[key] = th
                if math.isfinite(a):
                    w = W.extra(n, K, d, a)
                    m = ev.measure(w, cfg.split, cloze=True)
                    row = _row(
                        f"extra α* ({key})", f"Extra K={K} d={d} α*={a:.3g} (ρ from {key})", w, m, fits
                    )
                    rows.append(_with_delta(row, base))
                    entry[key]["measured_delta_at_alpha_star"] = row["delta_measured"]
                    entry[key]["predicted_delta_at_alpha_star"] = row["predicted"][key]["delta"]
                bar.update()
            alpha[str(d)] = entry
        for key, f in fits.items():
            w_opt = _optimal_weights(f)
            if w_opt is not None:
                m = ev.measure(w_opt, cfg.split, cloze=True)
                row = _row("theory-optimal", f"theory-optimal w (ρ from {key})", w_opt, m, fits)
                rows.append(_with_delta(row, base))
    finally:
        bar.close()  # also on a stop: its one line must not land on the bar

    # the streaming engine writes one merge to disk; its loss must equal the in-memory merge's
    engine = _engine_check(ckpts, rows, ev, cfg, tmp) if cfg.engine_check else None

    report = {
        "run": str(run),
        "log": str(run / "log.jsonl") if (run / "log.jsonl").is_file() else None,
        "config": {k: v for k, v in meta.get("config", meta).items() if not isinstance(v, dict | list)}
        if isinstance(meta, dict)
        else {},
        "checkpoints": {"n": n, "steps": steps},
        "split": cfg.split,
        "data_dir": str(data_dir),
        "rank1": {
            "raw_fve1": rank1["raw"]["fve1"],
            "merged_fve1": {K_: g["fve1"] for K_, g in rank1["merged"].items()},
            "theory_geometric": _geometric_rank1(rank1, river),
            "mean_cosine_raw": rank1["raw"]["mean_cosine"],
        },
        "river_geometry": river,
        "fits": {k: f.to_dict() for k, f in fits.items()},
        "calibration": {"split": "val", "losses": calib_loss},
        "extra": {
            "window": K,
            "offsets": offsets,
            "alphas": list(cfg.alphas),
            "by_offset": alpha,
            "curves": _alpha_curves(fits, n, K, offsets, cfg.alphas, base["loss"]),
        },
        "methods": rows,
        "engine_check": engine,
        "cloze": {"items": len(ev.cloze.get(cfg.split, [])), "candidates": cfg.candidates},
        "summary": _summary(rows, fits),
        "notes": _fit_notes(fits, river),
    }
    from experiments.lm import report_figures

    report["figures"] = report_figures.draw_all(report, G, tmp / "figures")
    return report


def _fit_notes(fits, river) -> list[str]:
    """Say where an estimate sits at the edge of its search range (the two fits may then coincide)."""
    notes = []
    if fits["losses"].rho >= 0.989:
        notes.append(
            "ρ fitted from the calibration losses sits at its grid's upper edge (0.99): the slow valley "
            "group barely decorrelates within the window, so it acts almost as a constant no merge removes."
        )
    if river["rho"] >= 0.989:
        notes.append(
            "the geometric ρ (residuals about the least-squares line) sits at its grid's edge (0.99): the "
            "trajectory bends over the window, so slow drift, not valley noise, dominates the residuals."
        )
    if fits["losses"].omega <= 0:
        notes.append("the fit found no valley loss (ω = 0): it predicts no gain from averaging.")
    return notes


def _row(group, name, w, m, fits, alpha: float | None = None) -> dict:
    row = {"group": group, "name": name, "weights": [float(x) for x in w], "lag": W.lag(w), **m}
    if alpha is not None:
        row["alpha"] = alpha
    row["predicted"] = {
        k: {"delta": E.predict_delta(w, f), "stderr": E.predict_stderr(w, f)} for k, f in fits.items()
    }
    return row


def _with_delta(row: dict, base: dict) -> dict:
    """Measured loss (and cloze accuracy) relative to the last checkpoint's row."""
    row["delta_measured"] = row["loss"] - base["loss"]
    if "cloze" in row:
        row["cloze_delta"] = row["cloze"] - base["cloze"]
    return row


def _parabola_min(grid) -> float | None:
    """α at the minimum of a parabola through the best grid point and its neighbours (None at the edge)."""
    grid = sorted(grid)
    i = int(np.argmin([g[1] for g in grid]))
    if i == 0 or i == len(grid) - 1:
        return None
    (a0, l0), (a1, l1), (a2, l2) = grid[i - 1 : i + 2]
    c = np.polyfit([a0, a1, a2], [l0, l1, l2], 2)
    return float(-c[1] / (2 * c[0])) if c[0] > 0 else None


def _optimal_weights(f: E.RiverFit) -> np.ndarray | None:
    """THEORY §d' optimal weights for the fitted linear river (rivervalley.weights.optimal)."""
    params = f.theory_params()
    if params is None:
        return None
    return W.optimal(f.n, **params)


def _engine_check(ckpts, rows, ev, cfg, tmp) -> dict:
    """Write the best measured Extra-Merge with extramerge's streaming engine (``extramerge.merge``, method
    custom) and re-evaluate it from disk: the in-memory merges of the study are the engine's merges."""
    import torch

    from extramerge import evaluate as evm
    from extramerge.api import merge

    extra = [r for r in rows if r["group"].startswith("extra d=")]
    best = min(extra, key=lambda r: r["loss"])
    folder = tmp / "engine_merge"
    merge(ckpts, method="custom", weights=best["weights"], output=folder, progress=False)
    model, _ = evm.load_model(folder, device=cfg.device, dtype=torch.float32)
    r = evm.evaluate_loss(
        model,
        ev.tokenizer,
        ev.texts[cfg.split],
        blocks=ev.blocks[cfg.split],
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
    shutil.rmtree(folder)
    return {
        "method": best["name"],
        "loss_in_memory": best["loss"],
        "loss_engine": r.loss,
        "abs_diff": abs(r.loss - best["loss"]),
    }


def _alpha_curves(fits, n, K, offsets, alphas, last_loss) -> dict:
    """Predicted loss versus α (dense grid) for each d and fit: the data behind figures/alpha.png."""
    lo, hi = min(alphas) - 0.25, max(alphas) + 0.25
    grid = np.linspace(lo, hi, 121)
    out = {"alpha": grid.tolist()}
    for d in offsets:
        out[str(d)] = {
            k: [last_loss + E.predict_delta(W.extra(n, K, d, a), f) for a in grid] for k, f in fits.items()
        }
    return out


def _summary(rows, fits) -> dict:
    """Best of each group (measured), and how well each fit predicted ΔL over all methods."""
    best = {}
    for r in rows:
        g = r["group"].split(" ")[0]
        if g not in best or r["loss"] < best[g]["loss"]:
            best[g] = {
                "name": r["name"],
                "loss": r["loss"],
                "delta": r["delta_measured"],
                "cloze": r.get("cloze"),
            }
    # each distinct weight vector once (SMA K = Extra α = 0; both fits' α* may coincide)
    seen, uniq = set(), []
    for r in rows[1:]:
        key = tuple(np.round(r["weights"], 12))
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    rows = [rows[0], *uniq]
    err = {}
    for k in fits:
        e = np.array([r["predicted"][k]["delta"] - r["delta_measured"] for r in rows[1:]])
        meas = np.array([r["delta_measured"] for r in rows[1:]])
        pred = np.array([r["predicted"][k]["delta"] for r in rows[1:]])
        err[k] = {
            "mae": float(np.mean(np.abs(e))),
            "max_abs": float(np.max(np.abs(e))),
            "spearman": _spearman(pred, meas),
            "sign_agreement": float(np.mean(np.sign(pred) == np.sign(meas))),
            "n_distinct_merges": len(rows) - 1,
        }
    return {"best": best, "prediction_error": err}


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------- report


def _f(x, spec="+.4f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(report: dict) -> str:
    """The study's tables in markdown (the same numbers as study.json)."""
    L = [f"# LM study: `{report['run']}`", ""]
    cfg = report.get("config", {})
    if cfg:
        keys = [
            k
            for k in ("arch", "size", "optimizer", "schedule", "lr", "steps", "ckpt_every", "params")
            if k in cfg
        ]
        L += ["Run: " + ", ".join(f"{k}={cfg[k]}" for k in keys), ""]
    ck = report["checkpoints"]
    L += [
        f"{ck['n']} checkpoints, steps {ck['steps'][0]}–{ck['steps'][-1]}; merges measured on the "
        f"`{report['split']}` split, the theory calibrated on `val`.",
        "",
    ]
    r1 = report["rank1"]
    L += [
        "## Rank-1 geometry (FVE₁: variance share of PC1)",
        "",
        "| trajectory | FVE₁ measured | theory §e approx | theory lower bound |",
        "|---|---|---|---|",
    ]
    th = r1["theory_geometric"]
    L.append(
        f"| raw | {r1['raw_fve1']:.3f} | {_f(th.get('1', {}).get('approx'), '.3f')} | "
        f"{_f(th.get('1', {}).get('lower_bound'), '.3f')} |"
    )
    for K, v in r1["merged_fve1"].items():
        if K == "1":
            continue
        t = th.get(K, {})
        L.append(
            f"| SMA K={K} | {v:.3f} | {_f(t.get('approx'), '.3f')} | {_f(t.get('lower_bound'), '.3f')} |"
        )
    g = report["river_geometry"]
    L += [
        "",
        f"Geometric estimate: drift {g['drift']:.4g} per checkpoint, valley variance "
        f"V = {g['noise_var']:.4g}, "
        f"ρ = {g['rho']:.3f}.",
        "",
    ]
    L += [
        "## Fitted river-valley parameters (validation losses)",
        "",
        "| ρ from | −F1 (loss drop / ckpt) | F2 | ω₀ (ρ = 0) | ω₁ (at ρ) | ρ | calib. RMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, f in report["fits"].items():
        L.append(
            f"| {k} | {-f['F1']:.4g} | {f['F2']:.3g} | {f['omega_fast']:.4g} | {f['omega_slow']:.4g} | "
            f"{f['rho']:.3f} | {f['rmse']:.2g} |"
        )
    L += [
        "",
        "## Predicted vs measured ΔL (relative to the last checkpoint; negative = better)",
        "",
        "| method | loss | bits/byte | ΔL measured | ΔL predicted (ρ losses) | ΔL predicted (ρ geometry) "
        "| cloze acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["methods"]:
        p1, p2 = r["predicted"]["losses"], r["predicted"]["geometry"]
        cl = f"{r['cloze']:.3f}" if "cloze" in r else "—"
        L.append(
            f"| {r['name']} | {r['loss']:.4f} | {r['bits_per_byte']:.4f} | {_f(r['delta_measured'])} | "
            f"{_f(p1['delta'])} ± {p1['stderr']:.4f} | {_f(p2['delta'])} ± {p2['stderr']:.4f} | {cl} |"
        )
    ex = report["extra"]
    L += [
        "",
        f"## Extra-Merge α* (K = {ex['window']})",
        "",
        "| d | measured best α (grid) | parabola α | α* (ρ losses) | α* (ρ geometry) "
        "| ΔL at α* measured (losses / geometry) |",
        "|---|---|---|---|---|---|",
    ]
    for d, e in ex["by_offset"].items():
        a1, a2 = e["losses"], e["geometry"]
        L.append(
            f"| {d} | {e['measured_best_alpha']:g} (ΔL {e['measured_best_delta']:+.4f}) | "
            f"{_f(e['measured_alpha_parabola'], '.3g')} | {_f(a1['alpha_star'], '.3g')} | "
            f"{_f(a2['alpha_star'], '.3g')} | {_f(a1.get('measured_delta_at_alpha_star'))} / "
            f"{_f(a2.get('measured_delta_at_alpha_star'))} |"
        )
    s = report["summary"]
    L += [
        "",
        "## Prediction error over all methods",
        "",
        "| ρ from | mean abs error | max abs error | Spearman (pred, meas) | sign agreement |",
        "|---|---|---|---|---|",
    ]
    for k, e in s["prediction_error"].items():
        L.append(
            f"| {k} | {e['mae']:.4f} | {e['max_abs']:.4f} | {e['spearman']:.3f} | {e['sign_agreement']:.2f} |"
        )
    eng = report.get("engine_check")
    if eng:
        L += [
            "",
            f"Streaming engine check ({eng['method']}): loss {eng['loss_engine']:.6f} from the written "
            f"folder vs {eng['loss_in_memory']:.6f} in memory (|diff| {eng['abs_diff']:.1e}).",
        ]
    for note in report.get("notes", []):
        L += ["", f"Note: {note}"]
    L += ["", "Figures: " + ", ".join(f"`figures/{Path(p).name}`" for p in report.get("figures", []))]
    return "\n".join(L) + "\n"


def print_table(report: dict, file=None) -> None:
    """One screen: each group's best, predicted next to measured, and α*."""
    file = file or sys.stdout  # looked up at call time (a default bound at import would miss redirections)
    print(
        f"\nLM study of {report['run']} ({report['checkpoints']['n']} checkpoints, "
        f"{report['split']} split) -> {report.get('out', '')}",
        file=file,
    )
    r1 = report["rank1"]
    merged = ", ".join(f"K={k}: {v:.3f}" for k, v in r1["merged_fve1"].items() if k != "1")
    print(f"  FVE1 raw {r1['raw_fve1']:.3f}; SMA-merged {merged}", file=file)
    print(f"  {'method':38s} {'loss':>8s} {'ΔL meas':>9s} {'ΔL pred':>9s} {'cloze':>6s}", file=file)
    keep = {"last", "sma", "ema", "wma", "trend", "pc1", "theory-optimal"}
    best = {}
    for r in report["methods"]:
        g = r["group"]
        key = g if g in keep or g.startswith("extra α*") else ("extra" if g.startswith("extra d=") else g)
        if key not in best or r["loss"] < best[key]["loss"]:
            best[key] = r
    for r in best.values():
        cl = f"{r['cloze']:.3f}" if "cloze" in r else "—"
        print(
            f"  {r['name']:38s} {r['loss']:8.4f} {r['delta_measured']:+9.4f} "
            f"{r['predicted']['losses']['delta']:+9.4f} {cl:>6s}",
            file=file,
        )
    for d, e in report["extra"]["by_offset"].items():
        print(
            f"  α* d={d}: measured {e['measured_best_alpha']:g} (grid), predicted "
            f"{_f(e['losses']['alpha_star'], '.3g')} (ρ losses) / "
            f"{_f(e['geometry']['alpha_star'], '.3g')} (ρ geometry)",
            file=file,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extra-Merge on a run's checkpoints: predicted vs measured gain.")
    p.add_argument("--run", required=True, type=Path, help="run folder (step_XXXXXX/ checkpoints, data/)")
    p.add_argument("-o", "--out", type=Path, default=None, help="output folder (default RUN/study)")
    p.add_argument("--windows", default="2,4,8", help="SMA/WMA windows, comma-separated (default 2,4,8)")
    p.add_argument("--ema-decays", default="0.5,0.8,0.9", help="EMA decays (default 0.5,0.8,0.9)")
    p.add_argument(
        "--extra-window", type=int, default=None, help="Extra-Merge window K (default min(4, N/2))"
    )
    p.add_argument("--offsets", default=None, help="Extra-Merge offsets d (default K/2,K)")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS), help="α grid")
    p.add_argument("--cloze-items", type=int, default=200, help="cloze items from the split (0: no cloze)")
    p.add_argument("--candidates", type=int, default=8, help="candidate words per cloze item")
    p.add_argument("--split", default="test", choices=["val", "test"], help="where merges are measured")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cloze item selection")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-engine-check", action="store_true", help="skip the streaming-engine re-evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _numbers(text: str | None, kind, flag: str):
    if text is None:
        return None
    try:
        vals = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise StudyError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise StudyError(f"{flag}: empty list")
    return vals


def _check_device(device: str, threads: int | None) -> None:
    import torch

    if threads is not None and threads < 1:
        raise StudyError(f"--threads must be >= 1, got {threads}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StudyError(f"--device: unknown device {device!r} (cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda: no CUDA device is available here")
    if dev.type not in ("cpu", "cuda"):
        raise StudyError(f"--device: {device!r} is not supported (cpu or cuda)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    try:
        _check_device(args.device, args.threads)
        cfg = StudyConfig(
            run=args.run,
            out=args.out,
            windows=_numbers(args.windows, int, "--windows"),
            ema_decays=_numbers(args.ema_decays, float, "--ema-decays"),
            extra_window=args.extra_window,
            offsets=_numbers(args.offsets, int, "--offsets"),
            alphas=_numbers(args.alphas, float, "--alphas"),
            cloze_items=args.cloze_items,
            candidates=args.candidates,
            split=args.split,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
            engine_check=not args.no_engine_check,
        )
        with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder is removed
            report = run_study(cfg)
    except KeyboardInterrupt as e:
        sig = signal.Signals(getattr(e, "signum", signal.SIGINT))
        print(
            f"experiments.lm.study: stopped by {sig.name}; nothing was written (a study is all or nothing); "
            f"start again with: python -m experiments.lm.study {shlex.join(argv)}",
            file=sys.stderr,
        )
        return 128 + sig
    except (ValueError, FileNotFoundError, OSError) as e:
        print(
            f"experiments.lm.study: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return 2
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
