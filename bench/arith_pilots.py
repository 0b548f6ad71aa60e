"""The continuum testbed's setting chosen on GRPO alone (issue 37; the rule declared in
bench/results/instrument_plan.md, section 2), from per-seed files of bench/convergence.py runs on pilot seeds
100-103, one directory per setting, bench/results/arith_v2/pilot_<stop>_lr<lr>_<steps>:

    python bench/convergence.py --config configs/arith.yaml --variants grpo --seeds 100 101 102 103 --jobs 2 \\
        --out bench/results/arith_v2/pilot_stop0.3_lr1e-4_64 -- --eval.every=8 --model.path=<model> --train.lr=1e-4
    python bench/arith_pilots.py     # the table and the decision, into bench/results/arith_v2/pilots.md

The gain of a run is its primary metric (held-out accuracy averaged over the second half's evaluations) minus its
step-0 accuracy. A setting passes if its mean gain over the four seeds is at least GAIN (three times the declared
resolution of 1.5 points) and no seed collapses late; of passing settings, the cheapest (fewest steps), then the
highest mean gain. CurES never enters the choice.
"""

import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
from convergence import collapsed, primary_metric  # noqa: E402

GAIN = 0.045
PILOT_SEEDS = (100, 101, 102, 103)


def setting_row(d: str) -> dict:
    runs = [json.load(open(os.path.join(d, "seeds", f"grpo_seed{s}.json"))) for s in PILOT_SEEDS
            if os.path.exists(os.path.join(d, "seeds", f"grpo_seed{s}.json"))]
    gains = np.array([primary_metric(r["curve"]) - r["curve"][0][2] for r in runs])
    return {"name": os.path.basename(d), "seeds": len(runs), "steps": runs[0]["curve"][-1][0] if runs else 0,
            "start": np.mean([r["curve"][0][2] for r in runs]) if runs else np.nan,
            "gains": gains, "collapses": sum(collapsed(r["curve"]) for r in runs),
            "extra": " ".join(runs[0]["extra"]) if runs else ""}


def choose(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["seeds"] == len(PILOT_SEEDS) and r["gains"].mean() >= GAIN and not r["collapses"]]
    return min(ok, key=lambda r: (r["steps"], -r["gains"].mean())) if ok else None


def main(root=os.path.join(ROOT, "bench", "results", "arith_v2")):
    rows = [setting_row(d) for d in sorted(glob.glob(os.path.join(root, "pilot_*"))) if os.path.isdir(d)]
    lines = ["| setting (GRPO) | seeds | steps | step-0 accuracy | gain, mean ± sd (points) | per seed | late collapses |"
             " overrides |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = 100 * r["gains"]
        lines.append(f"| {r['name']} | {r['seeds']} | {r['steps']} | {100 * r['start']:.1f} | "
                     f"{g.mean():+.1f} ± {g.std(ddof=1) if len(g) > 1 else float('nan'):.1f} | "
                     f"{', '.join(f'{x:+.1f}' for x in g)} | {r['collapses']} | `{r['extra']}` |")
    pick = choose(rows)
    lines += ["", f"Rule: mean gain >= {100 * GAIN:.1f} points, no late collapse, then fewest steps, then highest "
              f"gain. Decision: **{pick['name'] if pick else 'none passes: the testbed gives no verdicts'}**."]
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(root, "pilots.md"), "w") as f:
        f.write("$ python bench/arith_pilots.py\n\n" + report)


if __name__ == "__main__":
    main()
