"""Mean and t-interval over training seeds of per-seed paired differences.

    python docs/results/seed_interval.py [--level 0.95] DIFF [DIFF ...]

Each DIFF is one training seed's paired held-out difference (e.g. default minus tutorial box mIoU, as
`paired_box_iou.py` prints it). Seeds are the independent units here (one seed's cells share one training
run), so the interval is Student's t over the seeds: mean +- t(level, n - 1) * SD / sqrt(n). Used for
docs/results.md's seed tables of issue 16.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats


def t_interval(diffs: np.ndarray, level: float) -> tuple[float, float, float, float]:
    """``(n,)`` differences -> (mean, SD, low, high) of the two-sided ``level`` t-interval of the mean."""
    n = len(diffs)
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    return mean, sd, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--level", type=float, action="append", help="two-sided level (repeatable; 0.95)")
    parser.add_argument("diffs", type=float, nargs="+", help="one paired difference per training seed")
    args = parser.parse_args()
    diffs = np.asarray(args.diffs)
    if len(diffs) < 2:
        raise SystemExit("seed_interval.py: need at least two seeds")
    for level in args.level or [0.95]:
        mean, sd, low, high = t_interval(diffs, level)
        interval = f"{level:.2%} t-interval {low:+.4f} .. {high:+.4f}"
        print(f"{len(diffs)} seeds: mean {mean:+.4f}, SD {sd:.4f}, {interval}")


if __name__ == "__main__":
    main()
