"""Per-prompt accuracy of a model before RL, measured by sampling: the difficulty profile a curriculum sees.

For each prompt, `--samples` responses at temperature 1 (the training temperature) and the share that is correct;
printed as a histogram (exactly 0, ten bins over (0, 1), exactly 1) for the training prompts (a fixed random
subset) and the held-out split, and drawn as a PNG when matplotlib is installed. The arith continuum testbed was
declared on this figure (bench/results/arith/README.md): its prompts should spread over (0, 1) where the
tiny default's cluster at 0, ~0.4 and 1.

    python tiny/spread.py models/tiny data/tiny --png bench/results/arith/spread.png \\
        --also models/arith data/arith
"""

import argparse
import json
import os
import random
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tiny.pretrain import row_accuracy  # noqa: E402

EDGES = np.linspace(0, 1, 11)


def histogram(acc: np.ndarray) -> dict:
    """Counts: exactly 0, each tenth of (0, 1) (right-closed but for the last bin's right edge), exactly 1."""
    inner = acc[(acc > 0) & (acc < 1)]
    counts = np.histogram(inner, EDGES)[0]
    return {"0": int((acc == 0).sum()), **{f"({EDGES[k]:.1f},{EDGES[k + 1]:.1f})": int(c) for k, c in enumerate(counts)},
            "1": int((acc == 1).sum())}


def profile(model_dir: str, data_dir: str, samples: int, train_prompts: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(os.path.join(data_dir, f"{split}.jsonl"))]
        if split == "train":
            rows = random.Random(0).sample(rows, min(train_prompts, len(rows)))
        # 64 prompts a call (each call seeded alike by rollout.generate: the committed spread.json's draws)
        acc = np.array([a for i in range(0, len(rows), 64)
                        for a in row_accuracy(model, tok, rows[i:i + 64], temperature=1.0, n=samples)])
        out[split] = {"accuracy": acc.round(4).tolist(), "levels": [r["level"] for r in rows],
                      "histogram": histogram(acc), "mean": float(acc.mean()),
                      "strictly_between": float(((acc > 0) & (acc < 1)).mean())}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", help="a folder with train.jsonl and test.jsonl")
    ap.add_argument("--also", nargs=2, action="append", default=[], metavar=("MODEL", "DATA"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    results = {}
    for model_dir, data_dir in [(args.model, args.data), *args.also]:
        results[model_dir] = prof = profile(model_dir, data_dir, args.samples, args.train_prompts)
        for split, p in prof.items():
            print(f"{model_dir} on {data_dir} {split} ({len(p['accuracy'])} prompts x {args.samples} samples, T=1): "
                  f"mean {100 * p['mean']:.1f} %, strictly between 0 and 1: {100 * p['strictly_between']:.0f} %")
            print("   ", p["histogram"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": args.samples, "train_prompts": args.train_prompts, "results": results}, f)
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False, sharey=True)
        bins = np.concatenate([[-0.05, 0.0001], EDGES[1:-1], [0.9999, 1.05]])
        for ax, (model_dir, prof) in zip(axes[0], results.items()):
            for split, p in prof.items():
                acc = np.array(p["accuracy"])
                ax.hist(acc, bins=bins, weights=np.full(len(acc), 100 / len(acc)), alpha=0.6,
                        label=f"{split} ({len(acc)})")
            ax.set_title(f"{model_dir}: pre-RL per-prompt accuracy")
            ax.set_xlabel(f"share of {args.samples} samples correct (T = 1)")
            ax.legend()
        axes[0][0].set_ylabel("% of prompts")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
