"""The estimator on simulated trajectories with known parameters (rivervalley.estimate_validation):
bias and 90%-interval coverage of the river slope and the valley loss, per schedule, spacing and spectrum.

    python scripts/estimator_validation.py [--seeds 60] [-o results/estimator_validation]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rivervalley import estimate_validation as V  # noqa: E402
from rivervalley.common.resources import single_thread  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=60)
    p.add_argument("-o", "--out", default="results/estimator_validation")
    a = p.parse_args()
    t0 = time.time()
    rows = []
    with single_thread():
        for sc in V.SCENARIOS:
            rows.append(V.validate_scenario(sc, seeds=a.seeds))
            print(rows[-1]["name"], f"{time.time() - t0:.0f} s", file=sys.stderr)
    text = (
        V.table(rows)
        + f"\n\n{a.seeds} seeds per scenario; `python scripts/estimator_validation.py --seeds {a.seeds}`\n"
    )
    Path(a.out + ".json").write_text(json.dumps(rows, indent=1))
    Path(a.out + ".txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
