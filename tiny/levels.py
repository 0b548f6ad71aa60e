"""Accuracy by level of trained models on the rows of tiny/pretrain.py's report (the held-out split plus 100
fresh problems of each other level): greedy, and `--samples` at temperature 1. The before/after
table of the tiny default (bench/results/testbed/README.md) comes from

    python tiny/levels.py models/tiny bench/results/convergence/runs/{cures,grpo}_seed0/final
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tiny.pretrain import level_accuracies, report_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="model directories (from_pretrained)")
    ap.add_argument("--test", default=os.path.join(HERE, "..", "data", "tiny", "test.jsonl"))
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = report_rows([json.loads(line) for line in open(args.test)])
    for path in args.models:
        model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        greedy, sampled = level_accuracies(model, tok, rows, args.samples)
        print(f"{path}: greedy {({k: round(100 * v, 1) for k, v in greedy.items()})}, "
              f"T=1 x{args.samples} {({k: round(100 * v, 1) for k, v in sampled.items()})}")


if __name__ == "__main__":
    main()
