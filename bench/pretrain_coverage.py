"""Which problems did each committed tiny model see in pretraining? A replay of tiny/pretrain.py's problem stream.

tiny/pretrain.py draws fresh problems every batch (random.Random(100) for the problems, torch's generator seeded 0
for the levels and the answer noise), skipping the held-out split. Replaying that stream without the model, for
the steps the committed model ran (models/<name>/pretrain_report.json), gives every problem it was trained on:
a held-out split can only hold problems outside that set, which bounds how large it can be per level without
pretraining the model again (issue 37, item 2).

    python bench/pretrain_coverage.py          # both testbeds, about 10 s
"""

import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tiny.pretrain import corrupt, stream_draw  # noqa: E402


def level_space(task: str) -> dict:
    """How many distinct problems each level has: add, a+b of `level` digits each (level 1: 0-9); arith, a+b and
    a-b with max(digits) = level."""
    if task == "add":
        return {1: 100, 2: 90 * 90, 3: 900 * 900, 4: 9000 * 9000}
    n = {1: 10, 2: 90, 3: 900}
    return {lv: 2 * sum(n[a] * n[b] for a in n for b in n if max(a, b) == lv) for lv in n}


def seen_problems(name: str) -> set:
    """The problems the committed models/<name> was pretrained on (tiny: the add task; arith)."""
    task = "add" if name == "tiny" else "arith"
    args = json.load(open(os.path.join(ROOT, "models", name, "pretrain_report.json")))["args"]
    test = [json.loads(line) for line in open(os.path.join(ROOT, "data", name, "test.jsonl"))]
    held_out = {r["problem"] for r in test}
    draw = stream_draw(task)
    weights = torch.tensor([float(w) for w in args["level_weights"].split(",")])
    noise = [float(x) for x in args["noise"].split(",")]
    rng, gen, seen = random.Random(100), torch.Generator().manual_seed(0), set()
    for _ in range(args["steps_done"]):
        for lv in torch.multinomial(weights, args["batch"], replacement=True, generator=gen).tolist():
            row = draw(rng, lv + 1)
            while row["problem"] in held_out:
                row = draw(rng, lv + 1)
            corrupt(row, noise[lv], gen)  # draws from the generator as the stream did
            seen.add((row["problem"], row["level"]))
    return seen


def main():
    print("| model | level | problems | seen in pretraining | share | unseen: the most a held-out split can hold | "
          "in the committed held-out split |\n|---|---|---|---|---|---|---|")
    for name in ("tiny", "arith"):
        seen = seen_problems(name)
        test = [json.loads(line) for line in open(os.path.join(ROOT, "data", name, "test.jsonl"))]
        for lv, size in level_space("add" if name == "tiny" else "arith").items():
            n = sum(1 for _, level in seen if level == lv)
            print(f"| {name} | {lv} | {size:,} | {n:,} | {n / size:.2%} | {size - n:,} | "
                  f"{sum(r['level'] == lv for r in test)} |")


if __name__ == "__main__":
    main()
