"""The synthetic tasks of the tiny testbeds, each with graded difficulty; responses are scored by reward.py
(math-verify on \\boxed{}) like the real task.

- `add` (the tiny default, data/tiny): level k (1..4) adds two k-digit numbers, "What is 12+345?". Its prompts
  fall into clusters of difficulty (solved, half-learned, out of reach).
- `arith` (the arith continuum testbed, data/arith): sums and differences of operands of 1 to 3 digits drawn
  independently, "What is 407-58?", answers negative where the second operand is larger. Difficulty varies
  with the operands' lengths, the carries and borrows, and the sign, so that a partly trained model's
  per-prompt accuracy spreads over (0, 1) (bench/results/arith/README.md shows the histogram). Its level is
  the longer operand's number of digits.
- `sums` (data/sums): the arith task with sums only, a candidate continuum testbed (the third stage of
  bench/results/instrument_plan.md section 2); its pilots did not pass (bench/results/arith_v2).

    python tiny/make_data.py                # writes data/tiny/{train,test}.jsonl (committed)
    python tiny/make_data.py --task arith   # writes data/arith/{train,test}.jsonl (committed)
    python tiny/make_data.py --task sums    # writes data/sums/{train,test}.jsonl
    python tiny/make_data.py --levels 1 2 --out data/tiny12   # the tiny default's rows of levels 1 and 2 only

`--levels` keeps the add task's rows of those levels, in file order, from both splits (the same problems as
data/tiny's): data/tiny12 is the continuum candidate of bench/results/instrument_plan.md's fifth stage, the tiny
model's learnable range without its out-of-reach levels 3 and 4.
"""

import argparse
import json
import os
import random

# The held-out split: every level that can be held out, in the training mix's proportions (equal shares of levels
# 2, 3 and 4; level 1's 100 problems are all in train), 160 problems each, so that one problem is 0.21 points of the
# overall accuracy and 0.63 of its level's (issue 37; bench/results/instrument_plan.md). tiny/pretrain.py never
# draws them.
TEST_LEVELS = (2, 3, 4)
DATA_DIR = {"add": "tiny", "arith": "arith", "sums": "sums"}  # each task's folder under data/ (and models/)
OPS = {"arith": "+-", "sums": "+"}  # the operators of the tasks arith_problem draws


def problem(rng: random.Random, level: int) -> dict:
    lo, hi = (0 if level == 1 else 10 ** (level - 1)), 10**level - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return {"problem": f"What is {a}+{b}?", "answer": str(a + b), "level": level}


def arith_problem(rng: random.Random, ops: str = "+-") -> dict:
    """a+b or a-b (the sums task: a+b only, ops "+") with a and b of 1 to 3 digits (lengths drawn independently
    and uniformly). The level is max(len(a), len(b))."""
    la, lb = rng.randint(1, 3), rng.randint(1, 3)
    a, b = (rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1) for n in (la, lb))
    op = rng.choice(ops)
    return arith_row(a, op, b)


def arith_splits(train_size: int = 4000, test_size: int = 480, seed: int = 0, ops: str = "+-"):
    """(train, test) of the arith task (the sums task: ops "+"). Train: distinct problems, shuffled, the first
    `train_size` (so that every curriculum subset, cut in file order, follows one distribution; a stream cut in
    order would not: the one-digit problems run out as it goes). Test (issue 37; bench/results/instrument_plan.md):
    `test_size` distinct problems none of which is in train: every one-digit problem train lacks (arith: 13 of 200;
    sums: none, train holds all 100), the rest levels 2 and 3 in train's proportions (arith: 1,347 : 2,466), each
    drawn from the task's own distribution given its level (seed 1), shuffled so that any prefix mixes the levels.
    One problem is 0.21 points of the overall accuracy."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < train_size + 64:  # (the earlier 64-problem split's draw: train is unchanged by the new split)
        r = arith_problem(rng, ops)
        if r["problem"] not in seen:
            seen.add(r["problem"])
            rows.append(r)
    rng.shuffle(rows)
    train = rows[:train_size]
    in_train = {r["problem"] for r in train}
    test = [r for r in (arith_row(a, op, b) for a in range(10) for b in range(10) for op in ops)
            if r["problem"] not in in_train]
    counts = {lv: sum(r["level"] == lv for r in train) for lv in (2, 3)}
    n2 = round((test_size - len(test)) * counts[2] / (counts[2] + counts[3]))
    rng = random.Random(1)
    test += arith_quota(rng, {2: n2, 3: test_size - len(test) - n2}, in_train | {r["problem"] for r in test}, ops)
    rng.shuffle(test)
    return train, test


def arith_quota(rng: random.Random, want: dict, exclude: set, ops: str = "+-") -> list[dict]:
    """Distinct arith problems, none in `exclude`, want[level] of each level, drawn from the task's distribution
    (a draw of a level whose quota is full, or not in `want`, is skipped), in draw order."""
    want, seen, rows = dict(want), set(exclude), []
    while any(want.values()):
        r = arith_problem(rng, ops)
        if want.get(r["level"]) and r["problem"] not in seen:
            seen.add(r["problem"])
            rows.append(r)
            want[r["level"]] -= 1
    return rows


def arith_row(a: int, op: str, b: int) -> dict:
    return {"problem": f"What is {a}{op}{b}?", "answer": str(a + b if op == "+" else a - b),
            "level": max(len(str(a)), len(str(b)))}


def arith_validation(held_out: set, train: list[dict], n: int = 100, seed: int = 7, ops: str = "+-") -> list[dict]:
    """`n` distinct problems of the arith task, none held out, in train's level proportions (the stopping rule's
    validation set for tiny/pretrain.py; an undeduplicated draw has about twice train's share of one-digit
    problems, of which there are only 200)."""
    share = {lv: sum(r["level"] == lv for r in train) / len(train) for lv in (1, 2, 3)}
    want = {lv: round(n * share[lv]) for lv in (1, 2)}
    want[3] = n - want[1] - want[2]
    return arith_quota(random.Random(seed), want, held_out, ops)


def make(n_per_level: int, levels, seed: int):
    rng = random.Random(seed)
    rows = [problem(rng, level) for level in levels for _ in range(n_per_level)]
    rng.shuffle(rows)
    return rows


def splits(train_per_level: int = 1000, test_per_level: int = 160, test_levels=TEST_LEVELS):
    """(train, test): train has every level (seed 0); test has test_per_level distinct problems of each of
    test_levels that are not in train (seed 1), shuffled so that any prefix (eval.max_problems) mixes the levels."""
    train = make(train_per_level, [1, 2, 3, 4], seed=0)
    seen, rng, test = {r["problem"] for r in train}, random.Random(1), []
    for level in test_levels:
        rows = {}
        while len(rows) < test_per_level:
            r = problem(rng, level)
            if r["problem"] not in seen:
                rows.setdefault(r["problem"], r)
        test += rows.values()
    rng.shuffle(test)
    return train, test


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["add", "arith", "sums"], default="add")
    ap.add_argument("--out", default=None, help="default: data/tiny (add), data/arith (arith) or data/sums (sums)")
    ap.add_argument("--train-per-level", type=int, default=1000, help="add only")
    ap.add_argument("--test-per-level", type=int, default=160, help="add only")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="add only: keep these levels' rows")
    args = ap.parse_args()
    if args.levels and (args.task != "add" or not set(args.levels) <= {1, 2, 3, 4}):
        ap.error("--levels is for the add task, levels 1 to 4")
    args.out = args.out or os.path.join(os.path.dirname(__file__), "..", "data", DATA_DIR[args.task])
    os.makedirs(args.out, exist_ok=True)
    train, test = (splits(args.train_per_level, args.test_per_level) if args.task == "add"
                   else arith_splits(ops=OPS[args.task]))
    if args.levels:
        train, test = ([r for r in rows if r["level"] in args.levels] for rows in (train, test))
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(rows)} problems")


if __name__ == "__main__":
    main()
