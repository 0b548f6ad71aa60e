"""One variant on two testbeds that share the model and a held-out group: the tiny default (bench/results/tiny_v2)
and tiny12 (bench/results/tiny12), both `models/tiny` with the same 160 two-digit sums held out, tiny12 without the
out-of-reach levels 3 and 4 in training. Per variant, the difference in the primary metric on that group (tiny12
minus the tiny default), unpaired (the data differ, so a seed does not pair): mean and 95 % Welch t-interval; beside
it, each testbed's share of the draws on that level. A reading across two declared comparisons, made after their
runs, not declared before them: descriptive.

    python bench/across_testbeds.py bench/results/tiny12 bench/results/tiny_v2 --group level_2
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convergence import mechanism, primary_metric, t_quantile  # noqa: E402


def welch(a, b) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 95 % Welch t-interval low, high) of two independent samples; the Welch-Satterthwaite
    degrees of freedom rounded down (a slightly wider interval: t_quantile takes an integer)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    d, half = a.mean() - b.mean(), t_quantile(0.975, max(1, int(df + 1e-9))) * np.sqrt(va + vb)
    return float(d), float(d - half), float(d + half)


def group_metric(out: str, variant: str, seeds, group: str) -> np.ndarray:
    files = [json.load(open(os.path.join(out, "seeds", f"{variant}_seed{s}.json"))) for s in seeds]
    return np.array([primary_metric(f["curve_by_group"][group]) for f in files])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a", help="a bench/convergence.py output folder (the difference is a minus b)")
    ap.add_argument("b")
    ap.add_argument("--group", default="level_2")
    ap.add_argument("--variants", nargs="+", default=["grpo", "cures", "sampling_only"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(16)))
    args = ap.parse_args()
    na, nb = os.path.basename(os.path.normpath(args.a)), os.path.basename(os.path.normpath(args.b))
    draws = {d: mechanism(d, args.variants, args.seeds) for d in (args.a, args.b)}
    print(f"| variant | {args.group}, {na} | {nb} | {na} - {nb} [95 % Welch t-interval] | draws of {args.group}, "
          f"{na} / {nb} |\n|---|---|---|---|---|")
    for v in args.variants:
        a, b = (group_metric(d, v, args.seeds, args.group) for d in (args.a, args.b))
        d, lo, hi = welch(a, b)
        share = " / ".join(f"{100 * np.nanmean(draws[x][v][f'draws/{args.group}']):.1f} %" for x in (args.a, args.b))
        print(f"| {v} | {100 * a.mean():.1f} % | {100 * b.mean():.1f} % | {100 * d:+.1f} [{100 * lo:+.1f}, "
              f"{100 * hi:+.1f}] | {share} |")


if __name__ == "__main__":
    main()
