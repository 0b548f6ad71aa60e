"""Cost of one CurES curriculum step against a plain np.random.choice over the same prompts.

One step = rho* over all prompts (Eq. 14), draw m = 1024 with replacement, allocate N = 8192 (Eq. 20),
observe the rewards (Eq. 23). Usage: python bench/cures_overhead.py [--sizes 1e4 1e5 1e6 1e7]
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cures import Curriculum  # noqa: E402


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    print("| prompts | curriculum step (ms) | np.random.choice (ms) | ratio | ms per 1e6 prompts |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        P = int(size)
        rng = np.random.default_rng(0)
        cur = Curriculum(P, tau=0.1)
        cur.observe(np.arange(P), rng.integers(0, 5, P), np.full(P, 4))
        uniform = np.full(P, 1.0 / P)

        def step():
            idx = cur.sample(1024, rng)
            n = cur.allocate(idx, 8192)
            cur.observe(idx, rng.binomial(n, 0.5), n)

        t_cur = best_of(step, args.repeat)
        t_ref = best_of(lambda: rng.choice(P, size=1024, replace=True, p=uniform), args.repeat)
        print(f"| {P:.0e} | {t_cur * 1e3:.1f} | {t_ref * 1e3:.1f} | {t_cur / t_ref:.2f} | {t_cur * 1e9 / P:.1f} |")


if __name__ == "__main__":
    main()
