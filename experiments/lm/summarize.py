"""One markdown table over several LM study reports (the README's table):

    python -m experiments.lm.summarize results/lm/*/study.json

Per run: FVE₁ raw and SMA-merged (K = 8), the fitted river slope, each group's best measured ΔL with the
prediction next to it, the Extra-Merge α* measured (grid, parabola) and predicted, and the prediction
error over all methods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _best(report: dict, prefix: str) -> dict | None:
    rows = [r for r in report["methods"] if r["group"].startswith(prefix)]
    return min(rows, key=lambda r: r["loss"]) if rows else None


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['delta_measured']:+.3f} / {r['predicted']['losses']['delta']:+.3f}"


def table(paths) -> str:
    head = (
        "| run | last loss | FVE₁ raw → K=8 | best SMA | best EMA | best Extra (α grid) | trend | pc1 "
        "| α* (d): grid / parabola / predicted | MAE of ΔL |"
    )
    lines = [head, "|" + "---|" * 10]
    for p in paths:
        r = json.loads(Path(p).read_text())
        name = Path(p).parent.name
        K = r["extra"]["window"]
        d = str(K) if str(K) in r["extra"]["by_offset"] else next(iter(r["extra"]["by_offset"]))
        e = r["extra"]["by_offset"][d]
        par = e["measured_alpha_parabola"]
        fve = f"{r['rank1']['raw_fve1']:.2f} → {r['rank1']['merged_fve1'].get('8', float('nan')):.2f}"
        lines.append(
            f"| {name} | {r['methods'][0]['loss']:.3f} | {fve} | {_cell(_best(r, 'sma'))} | "
            f"{_cell(_best(r, 'ema'))} | {_cell(_best(r, 'extra d='))} | {_cell(_best(r, 'trend'))} | "
            f"{_cell(_best(r, 'pc1'))} | ({d}) {e['measured_best_alpha']:g} / "
            f"{'—' if par is None else format(par, '.2f')} / {e['losses']['alpha_star']:.2f} | "
            f"{r['summary']['prediction_error']['losses']['mae']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m experiments.lm.summarize STUDY.json...", file=sys.stderr)
        return 2
    try:
        print(table(paths))
    except (OSError, ValueError, KeyError) as e:
        print(f"experiments.lm.summarize: error: {e}", file=sys.stderr)
        return 2
    print("\nCells: measured ΔL / predicted ΔL (nats per byte, relative to the last checkpoint, on each")
    print("study's measurement split; the fit uses only calibration losses on the validation split).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
