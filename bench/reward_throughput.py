"""Answer-checking throughput on realistic long responses (about 3,000 tokens each).

Responses are built from real worked solutions (Minerva Math, committed in data/benchmarks) concatenated
to about 12,000 characters and ending with a boxed answer, half right and half wrong. A training step of
the paper scores 8,192 of them; the table says how long that takes per core and with all cores.

    python bench/reward_throughput.py [--n 256] [--workers 1 2]
"""

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def responses(n, chars=12_000, seed=0):
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data", "benchmarks", "minerva_math", "test.jsonl"))]
    rng = random.Random(seed)
    out, golds = [], []
    for i in range(n):
        text = ""
        while len(text) < chars:
            text += rng.choice(rows)["solution"].replace("\\boxed", "") + "\n\n"
        gold = reward.extract_boxed(rows[i % len(rows)]["solution"])
        answer = gold if i % 2 == 0 else rng.choice(rows)["solution"][-20:].replace("}", "")
        out.append(text[:chars] + f"\nTherefore the final answer is \\boxed{{{answer}}}.")
        golds.append(gold)
    return out, golds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count()])
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    texts, golds = responses(args.n)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {args.n} responses of "
          f"{sum(map(len, texts)) // len(texts)} chars")
    print("| workers | responses/s | responses/s per worker | 8,192 responses (s) | timeouts |")
    print("|---|---|---|---|---|")
    for w in args.workers:
        reward.score_batch(texts[:w], golds[:w], workers=w)  # start the pool outside the timing
        t0 = time.perf_counter()
        scores = reward.score_batch(texts, golds, workers=w, timeout=args.timeout)
        dt = time.perf_counter() - t0
        rate = args.n / dt
        print(f"| {w} | {rate:.1f} | {rate / w:.1f} | {8192 / rate:.0f} | {scores.timeouts} |")


if __name__ == "__main__":
    main()
