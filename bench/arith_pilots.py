"""The continuum testbed's setting chosen on GRPO alone (issue 37; the rule declared in
bench/results/instrument_plan.md, section 2), from per-seed files of bench/convergence.py runs on pilot seeds
100-103, one directory per setting, bench/results/arith_v2/pilot_<stop>_lr<lr>_<steps> (the sums variant's
pilot_sums_<stop>_lr<lr>_<steps>, with --data.train, --eval.data and --model.path on data/sums and its models):

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
# The declared settings, stage by stage (instrument_plan.md section 2): a stage runs only if the ones before it pass
# nothing. The plan's "third stage" is two entries here: (a) the arith model stopped at validation 0.1, then (b) the
# sums variant (data/sums); the fourth, the sums model pretrained further; the fifth, the tiny model on its levels 1
# and 2 (configs/tiny12.yaml).
STAGES = [[f"pilot_stop{stop}_lr{lr}_{steps}" for stop in ("0.2", "0.3") for lr in ("1e-4", "3e-4", "1e-3")]
          for steps in (64, 128)]
STAGES += [[f"pilot_stop0.1_lr{lr}_64" for lr in ("1e-4", "3e-4")],
           [f"pilot_sums_stop{stop}_lr{lr}_64" for stop in ("0.2", "0.3") for lr in ("1e-4", "3e-4")],
           [f"pilot_sums_stop{stop}_lr1e-4_64" for stop in ("0.4", "0.5")],  # the fourth stage
           [f"pilot_tiny12_lr{lr}_64" for lr in ("3e-4", "1e-4")]]  # the fifth: the tiny model on levels 1-2


def sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def reward_rise(run: dict, k: int = 8) -> float:
    """A run's training reward (train/reward, the mean over its rollouts) over its last k steps minus its first k:
    whether RL learns even the prompts it trains on."""
    r = [step["train/reward"] for step in run["steps"]]
    return float(np.mean(r[-k:]) - np.mean(r[:k]))


def setting_row(d: str) -> dict:
    """One setting's pilots (its directory d holds seeds/grpo_seed<s>.json)."""
    files = [os.path.join(d, "seeds", f"grpo_seed{s}.json") for s in PILOT_SEEDS]
    runs = [json.load(open(f)) for f in files if os.path.exists(f)]
    gains = np.array([primary_metric(r["curve"]) - r["curve"][0][2] for r in runs])
    levels = sorted(runs[0]["curve_by_group"]) if runs else []
    by_level = {g: np.mean([primary_metric(r["curve_by_group"][g]) - r["curve_by_group"][g][0][2] for r in runs])
                for g in levels}
    return {"name": os.path.basename(d), "seeds": len(runs), "steps": runs[0]["curve"][-1][0] if runs else 0,
            "by_level": by_level,
            "start": np.mean([r["curve"][0][2] for r in runs]) if runs else np.nan,
            "gains": gains, "collapses": sum(collapsed(r["curve"]) for r in runs),
            "reward_rise": np.array([reward_rise(r) for r in runs]),
            "extra": " ".join(runs[0]["extra"]) if runs else ""}


def choose(rows: list[dict]) -> tuple[dict | None, int]:
    """(the chosen setting or None, the number of stages that ran to decide it): the first stage with a passing
    setting decides; within it, the cheapest (fewest steps), then the highest mean gain."""
    for k, stage in enumerate(STAGES):
        ok = [r for r in rows if r["name"] in stage and r["seeds"] == len(PILOT_SEEDS) and r["gains"].mean() >= GAIN
              and not r["collapses"]]
        if ok:
            return min(ok, key=lambda r: (r["steps"], -r["gains"].mean())), k + 1
    return None, len(STAGES)


def main(root=os.path.join(ROOT, "bench", "results", "arith_v2")):
    rows = [setting_row(os.path.dirname(d)) for d in sorted(glob.glob(os.path.join(root, "pilot_*", "seeds")))]
    rows = [r for r in rows if r["seeds"]]
    lines = ["| setting (GRPO) | seeds | steps | step-0 accuracy | gain, mean ± sd (points) | per seed | gain by level "
             "(mean) | late collapses | training reward, last 8 steps - first 8 | overrides |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = 100 * r["gains"]
        lines.append(f"| {r['name']} | {r['seeds']} | {r['steps']} | {100 * r['start']:.1f} | "
                     f"{g.mean():+.1f} ± {sd(g):.1f} | "
                     f"{', '.join(f'{x:+.1f}' for x in g)} | "
                     f"{', '.join(f'{k}: {100 * v:+.1f}' for k, v in r['by_level'].items())} | {r['collapses']} | "
                     f"{100 * r['reward_rise'].mean():+.1f} ± {sd(100 * r['reward_rise']):.1f} | "
                     f"`{r['extra']}` |")
    pick, stages = choose(rows)
    grid = [g for stage in STAGES[:stages] for g in stage]
    done = {r["name"]: r for r in rows if r["seeds"] == len(PILOT_SEEDS)}
    pruned = [g for g in grid if g.endswith("_128") and g not in done and g[:-3] + "64" in done
              and (done[g[:-3] + "64"]["gains"] <= 0).any()]  # lost in some seed at 64 steps: not run at 128
    missing = [g for g in grid if g not in done and g not in pruned]
    tiny = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "tiny_v2", "seeds", "grpo_seed*.json")))
    if tiny:  # the reference: the tiny default, where RL learns (its declared comparison's GRPO seeds)
        runs = [json.load(open(f)) for f in tiny]
        rise, steps = 100 * np.array([reward_rise(r) for r in runs]), runs[0]["curve"][-1][0]
        lines += ["", f"The tiny default's GRPO (bench/results/tiny_v2, {len(tiny)} seeds, {steps} steps): training "
                      f"reward, last 8 steps - first 8: {rise.mean():+.1f} ± {sd(rise):.1f}."]
    if pruned:
        lines += ["", f"Not run at 128 steps, since some pilot seed lost accuracy at 64 steps: {', '.join(pruned)}."]
    lines += ["", f"Rule: mean gain >= {100 * GAIN:.1f} points, no late collapse, then fewest steps, then highest "
              f"gain. Decision: **{pick['name'] if pick else 'none of these passes'}**"
              + (f" (of the declared grid, not run: {', '.join(missing)})." if missing else ".")]
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(root, "pilots.md"), "w") as f:
        f.write("$ python bench/arith_pilots.py\n\n" + report)


if __name__ == "__main__":
    main()
