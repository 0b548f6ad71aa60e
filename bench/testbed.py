"""The tiny testbed's settings compared on GRPO alone (issue 19, item 3), from per-seed files of
bench/convergence.py runs on seeds outside the reported table (100-103):

    python bench/convergence.py --variants grpo --seeds 100 101 102 103 --out bench/results/testbed/<name> \\
        -- --eval.every=8 <the setting's overrides>
    python bench/testbed.py            # the table and the decision, into bench/results/testbed/results.md

The current config's runs are the pilot's (bench/results/pilot). The rule, written before the results were
read (bench/results/testbed/README.md): a setting replaces the current one only if GRPO's mean primary metric is more than 1
point higher and it has no more late collapses; of several, the highest. CurES never enters the choice.
"""

import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
from convergence import collapsed, primary_metric  # noqa: E402


def main():
    settings = {"current (configs/tiny.yaml)": os.path.join(ROOT, "bench", "results", "pilot")}
    for d in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "testbed", "*", "seeds"))):
        settings[os.path.basename(os.path.dirname(d))] = os.path.dirname(d)
    lines = ["| setting (GRPO) | seeds | primary metric, mean ± sd | per seed | late collapses | overrides |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for name, d in settings.items():
        runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(d, "seeds", "grpo_seed*.json")))]
        runs = [r for r in runs if r["seed"] >= 100]
        prim = np.array([primary_metric(r["curve"]) for r in runs])
        falls = sum(collapsed(r["curve"]) for r in runs)
        summary[name] = (prim.mean(), falls, len(runs))
        extra = " ".join(a for a in runs[0]["extra"] if not a.startswith("--cures.")) if runs else ""
        lines.append(f"| {name} | {len(runs)} | {100 * prim.mean():.1f} ± {100 * prim.std(ddof=1):.1f} | "
                     f"{', '.join(f'{100 * p:.1f}' for p in prim)} | {falls} | `{extra}` |")
    base_mean, base_falls, _ = summary.pop("current (configs/tiny.yaml)")
    better = {k: v for k, v in summary.items() if v[0] > base_mean + 0.01 and v[1] <= base_falls and v[2] == 4}
    choice = max(better, key=lambda k: better[k][0]) if better else "current (configs/tiny.yaml)"
    lines += ["", f"Decision by the rule: **{choice}**."]
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(ROOT, "bench", "results", "testbed", "results.md"), "w") as f:
        f.write("$ python bench/testbed.py\n\n" + report)


if __name__ == "__main__":
    main()
