"""The synthetic task of the tiny default: integer addition with graded difficulty.

Level k (1..4) adds two k-digit numbers. Problems read "What is 12+345?" and the gold answer is the sum;
responses are scored by reward.py (math-verify on \\boxed{}) like the real task.

    python tiny/make_data.py            # writes data/tiny/{train,test}.jsonl (committed)
"""

import argparse
import json
import os
import random

# The held-out split is the level the tiny model is half-way on (2-digit sums). Levels 3 and 4 stay in train
# (prompts too hard for the model: what a curriculum must learn to skip) but not in the held-out split,
# where the model scores 0-3 % before and after RL: they would only dilute the curve. (The split once held
# level 3 too; tiny/pretrain.py still never draws those problems, so the committed model stays reproducible.)
TEST_LEVELS = (2,)


def problem(rng: random.Random, level: int) -> dict:
    lo, hi = (0 if level == 1 else 10 ** (level - 1)), 10**level - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return {"problem": f"What is {a}+{b}?", "answer": str(a + b), "level": level}


def make(n_per_level: int, levels, seed: int):
    rng = random.Random(seed)
    rows = [problem(rng, level) for level in levels for _ in range(n_per_level)]
    rng.shuffle(rows)
    return rows


def splits(train_per_level: int = 1000, test_per_level: int = 50, test_levels=TEST_LEVELS):
    """(train, test): train has every level; test is drawn from every level with another seed, then keeps
    the problems not in train (which removes level 1: its 100 problems are all in train) of test_levels."""
    train = make(train_per_level, [1, 2, 3, 4], seed=0)
    test = make(test_per_level, [1, 2, 3, 4], seed=1)
    seen = {r["problem"] for r in train}
    return train, [r for r in test if r["problem"] not in seen and r["level"] in test_levels]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "tiny"))
    ap.add_argument("--train-per-level", type=int, default=1000)
    ap.add_argument("--test-per-level", type=int, default=50)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, test = splits(args.train_per_level, args.test_per_level)
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(rows)} problems")


if __name__ == "__main__":
    main()
