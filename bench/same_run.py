"""Are two training runs the same? For refactors that must not change behaviour.

    python bench/same_run.py RUN_A RUN_B      # two --run.out_dir directories of the same config and seed

Compares every metrics.jsonl row (all keys but the wall-clock ones: time/*, perf/*) and every tensor of
the final Hugging Face weights, exactly. Prints the differences, exits 1 if there are any.
"""

import json
import os
import sys

import torch


def rows(run):
    skip = ("time/", "perf/")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(skip)}
            for line in open(os.path.join(run, "metrics.jsonl"))]


def weights(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, "final", "model.safetensors"))


def main(a, b):
    problems = []
    ra, rb = rows(a), rows(b)
    if len(ra) != len(rb):
        problems.append(f"metrics.jsonl: {len(ra)} rows vs {len(rb)}")
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                problems.append(f"step {x.get('step')}: {k} = {x.get(k)} vs {y.get(k)}")
    wa, wb = weights(a), weights(b)
    for k in sorted(set(wa) | set(wb)):
        if k not in wa or k not in wb or not torch.equal(wa[k], wb[k]):
            problems.append(f"final weights differ: {k}")
    print(f"{len(ra)} metrics rows, {len(wa)} weight tensors compared")
    print("\n".join(problems[:50]) if problems else "identical (metrics without time/ and perf/, final weights bit for bit)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
