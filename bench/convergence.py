"""CurES vs GRPO at the same rollout budget on the tiny default, with the ablation the paper lacks.

Variants (same config, same budget N per step):
    cures          sampling=cures   allocation=cures     (CurES-GRPO; cold start of N' = 4 per prompt)
    grpo           sampling=uniform allocation=uniform   (GRPO; no cold start: it never reads the estimates)
    sampling_only  sampling=cures   allocation=uniform
    alloc_only     sampling=uniform allocation=cures
    cures_lazy     CurES with cold_start_rollouts=0: unseen prompts read p = 0.5 (Eq. 14 favours them)
    dapo           GRPO with DAPO's dynamic sampling (beyond the paper): rounds of m prompts until m groups have
                   mixed rewards, every generated rollout charged; compare it on the rollout axis
    cures_dapo     CurES with the same dynamic sampling (the two together: does the filter still pay on top of
                   a curriculum that already draws mostly mixed groups?)
For each, several seeds: held-out accuracy against training steps and against the rollouts each run really
generated (its cold starts included, none for GRPO), a PNG plot (when matplotlib is installed), a markdown table
with mean and spread, and the speed-up in the paper's sense for every variant against GRPO: the steps, and
the rollouts, it needs to reach the best mean accuracy GRPO reaches.

    python bench/convergence.py --seeds 0 1 2 --out bench/results/convergence
    python bench/convergence.py --seeds 0 1 2 3 --jobs 2 ...      # two runs at once, one thread each
    python bench/convergence.py --variants grpo cures --taus 0.03 0.1 0.3 1 --out bench/results/tau_v2   # tau sweep
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "cures": ["--cures.sampling=cures", "--cures.allocation=cures"],
    "grpo": ["--cures.sampling=uniform", "--cures.allocation=uniform"],
    "sampling_only": ["--cures.sampling=cures", "--cures.allocation=uniform"],
    "alloc_only": ["--cures.sampling=uniform", "--cures.allocation=cures"],
    "cures_lazy": ["--cures.sampling=cures", "--cures.allocation=cures", "--cures.cold_start_rollouts=0"],
    "dapo": ["--cures.sampling=uniform", "--cures.allocation=uniform", "--rollout.dynamic_sampling=true"],
    "cures_dapo": ["--cures.sampling=cures", "--cures.allocation=cures", "--rollout.dynamic_sampling=true"],
}


MECHANISM = ("train/reward", "mech/mixed_rollouts", "mech/zero_adv_token_share", "rollouts/total", "rollouts/cold_start",
             "dynamic/rounds")


def run(name, seed, extra, out, config, threads: int = 0):
    """One train.py run (skipped when its per-seed file exists): its evaluation curve [(step, rollouts, acc)].
    Writes <out>/seeds/<name>_seed<seed>.json, small enough to commit: the curve and, per step, the reward,
    the mechanism metrics and the draw shares by difficulty, so tables and plots regenerate without runs."""
    summary = os.path.join(out, "seeds", f"{name}_seed{seed}.json")
    if os.path.exists(summary):
        with open(summary) as f:
            return [tuple(p) for p in json.load(f)["curve"]]
    run_dir = os.path.join(out, "runs", f"{name}_seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    wall = os.path.join(run_dir, "wall_s")  # the process's wall time, start-up included (absent: run elsewhere)
    if not os.path.exists(os.path.join(run_dir, "final", "config.json")):  # resume the benchmark itself
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, f"--run.out_dir={run_dir}",
               f"--run.seed={seed}", "--run.save_every=0", "--run.overwrite=true", *extra]
        if os.path.exists(metrics):
            os.remove(metrics)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{res.stderr[-3000:]}")
        with open(wall, "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    rows = [json.loads(line) for line in open(metrics)]
    curve, by_group, rollouts = [], {}, 0
    for r in rows:
        rollouts = r.get("rollouts/total", rollouts)
        if "eval/acc" in r:
            curve.append((r["step"], rollouts, r["eval/acc"]))
            for k, v in r.items():  # eval/acc/level_2 ...: the same curve per level (train.run_eval)
                if k.startswith("eval/acc/"):
                    by_group.setdefault(k[len("eval/acc/"):], []).append((r["step"], rollouts, v))
    per_step = [{"step": r["step"], **{k: v for k, v in r.items() if k in MECHANISM or k.startswith("draws/")}}
                for r in rows if "time/step" in r]
    wall_s = float(open(wall).read()) if os.path.exists(wall) else None
    os.makedirs(os.path.dirname(summary), exist_ok=True)
    with open(summary, "w") as f:
        # a run's trajectory (not its statistics) depends on its intra-op threads: float reduction order
        json.dump({"variant": name, "seed": seed, "extra": extra, "threads": threads or "default", "wall_s": wall_s,
                   "curve": curve, "curve_by_group": by_group, "steps": per_step}, f)
    return curve


def primary_metric(curve) -> float:
    """Declared before the runs (bench/results/convergence/README.md): held-out accuracy averaged over the evaluations of the second
    half of training (steps > half the last), one number per run that no single noisy evaluation decides."""
    last = curve[-1][0]
    return float(np.mean([acc for step, _, acc in curve if step > last / 2]))


COLLAPSE = 0.08  # a fall of this much below the run's own best, in the second half of training


def collapsed(curve) -> bool:
    """A late collapse: an evaluation in the second half COLLAPSE or more below the run's best so far."""
    last, best = curve[-1][0], 0.0
    for step, _, acc in curve:
        best = max(best, acc)
        if step > last / 2 and acc <= best - COLLAPSE:
            return True
    return False


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (numpy only): the CDF by Simpson's rule on the density, inverted by bisection."""
    import math

    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x):  # x >= 0
        grid = np.linspace(0.0, x, 2001)
        f = c * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
        return 0.5 + (grid[1] - grid[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def intervals(d, draws: int = 10_000, seed: int = 0) -> dict:
    """Paired differences over seeds -> {"mean", "t": 95 % t-interval (the verdict's), "boot": 95 % percentile
    bootstrap interval (beside it: over few seeds it runs narrower than the t-interval), "sd"}."""
    d = np.asarray(d, dtype=float)
    half = t_quantile(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    boot = d[np.random.default_rng(seed).integers(0, len(d), (draws, len(d)))].mean(1)
    return {"mean": float(d.mean()), "t": (float(d.mean() - half), float(d.mean() + half)),
            "boot": tuple(np.percentile(boot, [2.5, 97.5]).tolist()), "sd": float(d.std(ddof=1))}


def paired_differences(curves: dict, base: str = "grpo", draws: int = 10_000, seed: int = 0) -> list[dict]:
    """Each variant against `base`, paired by seed: the difference in the primary metric, at equal steps (the
    last evaluation) and at equal rollouts (both curves interpolated at the smaller of the two runs' final rollout
    counts: the base's, when the variant generated more), each as (mean, t-interval low, high, sd) with the 95 %
    bootstrap interval beside ("<key> boot"), and a verdict from the primary metric's t-interval."""
    out = []
    for name, runs in curves.items():
        if name == base:
            continue
        diffs = {"primary": [], "equal steps": [], "equal rollouts": []}
        for c, b in zip(runs, curves[base]):
            diffs["primary"].append(primary_metric(c) - primary_metric(b))
            diffs["equal steps"].append(c[-1][2] - b[-1][2])
            (roll, acc), (b_roll, b_acc) = (np.array([(p[1], p[2]) for p in x]).T for x in (c, b))
            at = min(roll[-1], b_roll[-1])  # the rollouts both runs generated
            diffs["equal rollouts"].append(float(np.interp(at, roll, acc) - np.interp(at, b_roll, b_acc)))
        row = {"variant": name, "seeds": len(diffs["primary"])}
        for k, d in diffs.items():
            if len(d) < 2:
                row[k] = row[f"{k} boot"] = None
                continue
            iv = intervals(d, draws, seed)
            row[k], row[f"{k} boot"] = (iv["mean"], *iv["t"], iv["sd"]), (iv["mean"], *iv["boot"])
        p = row["primary"]
        row["verdict"] = verdict(p)
        row["verdict at equal rollouts"] = verdict(row["equal rollouts"])
        out.append(row)
    return out


def paired_table(curves: dict, base: str, what: str = "held-out accuracy") -> list[str]:
    """The markdown lines of paired_differences against `base`, with the seeds a +-2.5-point interval needs."""
    lines = ["", f"{what[0].upper() + what[1:]}, against {base}, paired by seed (difference in points, mean [95 % "
             "t-interval] (95 % bootstrap interval); verdicts from the t-interval; the primary metric is the accuracy "
             "averaged over the second half of training):", "",
             "| variant | seeds | primary metric | at equal steps (last) | at equal rollouts | verdict (primary) | "
             "verdict at equal rollouts |", "|---|---|---|---|---|---|---|"]
    fmt = lambda d, b: "n/a" if d is None else (f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] "  # noqa: E731
                                                f"({100 * b[1]:+.1f}, {100 * b[2]:+.1f})")
    for r in paired_differences(curves, base):
        cells = [fmt(r[k], r[f"{k} boot"]) for k in ("primary", "equal steps", "equal rollouts")]
        lines.append(f"| {r['variant']} | {r['seeds']} | {' | '.join(cells)} | {r['verdict']} | "
                     f"{r['verdict at equal rollouts']} |")
        if r["primary"] is not None:  # seeds for a +-2.5-point interval at this spread (normal approximation)
            need = int(np.ceil((1.96 * r["primary"][3] / 0.025) ** 2))
            lines.append(f"| | | seed-to-seed sd of the difference {100 * r['primary'][3]:.1f} points: "
                         f"about {need} seeds for a +-2.5-point interval | | | | |")
    return lines


def per_group_tables(files: dict, base: str = "grpo") -> list[str]:
    """The paired table of each evaluation group (eval/acc/level_k: train.run_eval) that every run logged, so that
    a verdict can be read per level as well as overall. files: {variant: [per-seed file dict, in seed order]}."""
    groups = set.intersection(*[set(f.get("curve_by_group", {})) for runs in files.values() for f in runs])
    lines = ["", "Per level (one verdict a level, no correction for multiple comparisons: descriptive, read beside the "
             "overall verdict):"] if groups else []
    for g in sorted(groups):
        curves = {name: [[tuple(p) for p in f["curve_by_group"][g]] for f in runs] for name, runs in files.items()}
        lines += paired_table(curves, base, what=f"held-out accuracy on {g}")
    return lines


def rollout_points(seed_file: dict, curve=None) -> np.ndarray:
    """(rollouts, accuracy) points of one run's evaluations, cold starts charged and held flat wherever the
    evaluations fall: the policy changes only with a step's own rollouts, so accuracy is interpolated along the
    training rollouts (a step's own) and stays constant across each cold start (logged with the step it precedes,
    rollouts/cold_start; in older files, the excess of a step's increase over the smallest one). `curve`:
    [(step, _, accuracy)] to put on this run's rollout clock instead of its own (the null model of
    rollout_comparison). (k, 2), rollouts increasing."""
    rows = {r["step"]: r for r in seed_file["steps"] if "rollouts/total" in r}
    steps = sorted(rows)
    increase = np.diff([0] + [rows[s]["rollouts/total"] for s in steps])
    if all("rollouts/cold_start" in rows[s] for s in steps):
        cold_steps = np.diff([0] + [rows[s]["rollouts/cold_start"] for s in steps])
        per_step = float(np.median(increase - cold_steps))
    else:  # the smallest step-to-step increase: a step with no cold start (a subset holds more than one step)
        per_step = float(increase.min())
        cold_steps = increase - per_step
    cold = {s: float(c) for s, c in zip(steps, cold_steps) if c > 0}  # before step s's own rollouts
    curve = seed_file["curve"] if curve is None else curve
    evals_t = np.array([step * per_step for step, _, _ in curve])  # the training-rollout clock
    evals_acc = np.array([acc for _, _, acc in curve])
    t_points = sorted(set(evals_t.tolist()) | {(s - 1) * per_step for s in cold})
    points, spent = [], 0.0  # spent: cold-start rollouts before the current point
    for t in t_points:
        acc = float(np.interp(t, evals_t, evals_acc))
        points.append((t + spent, acc))
        c = cold.get(int(round(t / per_step)) + 1, 0.0)
        if c:  # the cold start before the next step: flat
            spent += c
            points.append((t + spent, acc))
    return np.array(points, dtype=float)


def rollout_mean(points: np.ndarray, budget: float) -> float:
    """Mean accuracy over the rollout axis [0, budget] of the piecewise-linear curve through `points` (held at
    its last value beyond its last point): the area under the curve per rollout."""
    x, y = points[:, 0], points[:, 1]
    grid = np.unique(np.concatenate([[0.0, budget], x[(x > 0) & (x < budget)]]))
    values = np.interp(grid, x, y)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / budget)


def rollout_comparison(files: dict, base: str, budget: float, draws: int = 10_000, seed: int = 0) -> list[str]:
    """The declared per-rollout comparison, markdown lines: each variant against `base`, paired by seed, in the
    rollout-axis mean accuracy up to `budget` (95 % t-interval, the verdict's; the bootstrap beside it), split as
    total = cold start + rest. "cold start": the null model, the base's own per-step curve put on the variant's
    rollout clock (what the variant's cold starts cost by themselves, had it learned per step exactly as the base);
    "rest": total minus that, what the variant's curriculum did per rollout beyond its cold start's price.
    files: {variant: [per-seed file dict, in seed order]}."""
    lines = ["", f"Per rollout: mean held-out accuracy over the rollout axis up to {budget:,.0f} rollouts (cold starts "
             "charged, held flat), paired by seed, in points: mean [95 % t-interval] (95 % bootstrap interval); "
             "total = cold start (the base's per-step curve on the variant's rollout clock) + rest:", "",
             "| variant | seeds | total | verdict | cold start | rest | verdict on the rest |", "|---|---|---|---|---|---|---|"]
    cell = lambda iv: (f"{100 * iv['mean']:+.2f} [{100 * iv['t'][0]:+.2f}, {100 * iv['t'][1]:+.2f}] "  # noqa: E731
                       f"({100 * iv['boot'][0]:+.2f}, {100 * iv['boot'][1]:+.2f})")
    base_means = [rollout_mean(rollout_points(f), budget) for f in files[base]]
    for name, runs in files.items():
        if name == base:
            continue
        total = [rollout_mean(rollout_points(f), budget) - b for f, b in zip(runs, base_means)]
        null = [rollout_mean(rollout_points(f, curve=g["curve"]), budget) - b
                for f, g, b in zip(runs, files[base], base_means)]
        parts = [intervals(x, draws, seed) for x in (total, null, np.subtract(total, null))]
        lines.append(f"| {name} | {len(total)} | {cell(parts[0])} | {verdict(parts[0])} | {cell(parts[1])} | "
                     f"{cell(parts[2])} | {verdict(parts[2])} |")
    return lines


def verdict(d) -> str:
    """better / worse when the 95 % t-interval of the paired difference excludes 0. d: (mean, low, high, ...) or
    an intervals() dict."""
    if isinstance(d, dict):
        d = (d["mean"], *d["t"])
    return ("not enough seeds" if d is None else "better" if d[1] > 0 else "worse" if d[2] < 0
            else "no difference detected")


def mechanism(out: str, names, seeds) -> dict:
    """Per variant, per step, mean over seeds, from the per-seed files: the share of training rollouts in groups
    with mixed rewards, of response tokens in groups with none, and of the draws in each posterior-accuracy bin and
    data level. Every variant gets every key any of them logged; a bin or level a variant never drew (in a step,
    or at all) counts 0 % of its draws."""
    rows = {n: [json.load(open(os.path.join(out, "seeds", f"{n}_seed{s}.json")))["steps"] for s in seeds]
            for n in names}
    keys = sorted({k for r in rows.values() for run in r for step in run for k in step if k != "step"})
    missing = lambda k: 0.0 if k.startswith("draws/") else np.nan  # noqa: E731
    return {n: {"step": np.array([step["step"] for step in r[0]]),
                **{k: np.array([[step.get(k, missing(k)) for step in run] for run in r]).mean(0) for k in keys}}
            for n, r in rows.items()}


def schedule(jobs, seeds) -> list[tuple]:
    """(name, extra, seed) in the order to start them: the longest runs first (dynamic sampling generates several
    rounds a step), so that a table made with --jobs > 1 does not end on one long run alone on the machine;
    otherwise the order asked for. The results keep the order asked for whatever the order of the runs."""
    runs = [(name, extra, s) for name, extra in jobs for s in seeds]
    return sorted(runs, key=lambda job: "--rollout.dynamic_sampling=true" not in job[1])


def run_times(out: str, names, seeds) -> list[str]:
    """Markdown lines: each variant's run time, summed over its seeds' processes (start-up included), from the
    per-seed files that recorded one; with --jobs J the table's wall time is about the total over J."""
    lines = ["", "Run time per variant, from the per-seed files (each process's wall time, start-up included; "
             "threads a run):", "", "| variant | runs timed | threads | mean per run | sum over runs |",
             "|---|---|---|---|---|"]
    total = 0.0
    for name in names:
        files = [json.load(open(os.path.join(out, "seeds", f"{name}_seed{s}.json"))) for s in seeds]
        timed = [f for f in files if f.get("wall_s") is not None]
        walls = [f["wall_s"] for f in timed]
        if walls:
            total += sum(walls)
            threads = sorted({str(f.get("threads")) for f in timed})
            lines.append(f"| {name} | {len(walls)} of {len(files)} | {', '.join(threads)} | "
                         f"{np.mean(walls):.0f} s | {sum(walls) / 60:.1f} min |")
        else:
            lines.append(f"| {name} | 0 of {len(files)} | | | |")
    lines.append(f"| all | | | | {total / 60:.1f} min |")
    return lines


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def first_reaching(steps, values, target):
    hit = np.flatnonzero(np.asarray(values) >= target - 1e-12)
    return steps[hit[0]] if hit.size else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--taus", type=float, nargs="+", default=[])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "convergence"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs threads (a run's "
                    "figures then differ from a one-job run's by float summation order only)")
    ap.add_argument("extra", nargs="*", help="train.py overrides, after --")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jobs = [(v, VARIANTS[v] + args.extra) for v in args.variants]
    if args.taus:  # GRPO never reads tau (uniform sampling): it runs once, as the baseline of every tau
        jobs = [j for j in jobs if j[0] == "grpo"] + [(f"{v}_tau{t}", VARIANTS[v] + [f"--cures.tau={t}"] + args.extra)
                                                      for v in args.variants if v != "grpo" for t in args.taus]
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    order = schedule(jobs, args.seeds)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a train.py process
        futures = {(name, s): pool.submit(run, name, s, extra, args.out, args.config, threads)
                   for name, extra, s in order}
        curves = {name: [futures[name, s].result() for s in args.seeds] for name, _ in jobs}
    elapsed = f"{time.time() - t0:.0f} s" if time.time() - t0 > 60 else "tables from runs made earlier"
    steps = np.array([p[0] for p in next(iter(curves.values()))[0]])
    table = {}
    for name, runs in curves.items():
        acc = np.array([[p[2] for p in c] for c in runs])  # (seeds, evals)
        roll = np.array([[p[1] for p in c] for c in runs]).mean(0)
        table[name] = {"mean": acc.mean(0), "std": acc.std(0), "rollouts": roll, "final": acc[:, -1], "best": acc.max(1)}
    lines = [f"machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; {elapsed}; seeds {args.seeds}; "
             f"config {os.path.relpath(args.config, ROOT)} {' '.join(args.extra)}", "",
             "Held-out accuracy (mean ± std over seeds) at each evaluation:", "",
             "| variant | " + " | ".join(f"step {s}" for s in steps) + " | final | best | late collapses |",
             "|---|" + "---|" * (len(steps) + 3)]
    for name, t in table.items():
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(t["mean"], t["std"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * t['final'].mean():.1f} ± {100 * t['final'].std():.1f}"
                     f" | {100 * t['best'].mean():.1f} | {sum(map(collapsed, curves[name]))} of {len(curves[name])} |")
    lines += ["", "Rollouts generated (cold starts included) at each evaluation, mean over seeds:", ""]
    lines += [f"- {name}: {t['rollouts'].astype(int).tolist()}" for name, t in table.items()]
    if "grpo" in table:
        g = table["grpo"]
        target = g["mean"].max()
        g_step, g_roll = first_reaching(steps, g["mean"], target), first_reaching(g["rollouts"], g["mean"], target)
        lines += ["", f"Speed-up (paper's sense) against GRPO, each run charged the rollouts it generated: GRPO's best "
                  f"mean accuracy {100 * target:.1f} is first reached by GRPO at step {g_step} ({int(g_roll)} rollouts).", "",
                  "| variant | step | rollouts | speed-up in steps | speed-up in rollouts |", "|---|---|---|---|---|"]
        for name, t in table.items():
            if name == "grpo":
                continue
            c_step, c_roll = first_reaching(steps, t["mean"], target), first_reaching(t["rollouts"], t["mean"], target)
            if c_step is None:
                lines.append(f"| {name} | not reached | | | |")
            else:
                lines.append(f"| {name} | {c_step} | {int(c_roll)} | {g_step / max(c_step, 1):.2f}x | "
                             f"{g_roll / max(c_roll, 1):.2f}x |")
    files = {n: [json.load(open(os.path.join(args.out, "seeds", f"{n}_seed{s}.json"))) for s in args.seeds]
             for n in curves}
    if "grpo" in curves and len(curves) > 1:
        lines += paired_table(curves, "grpo") + per_group_tables(files, "grpo")
    on_cures = {k: v for k, v in curves.items() if k != "grpo"}
    if "cures" in on_cures and len(on_cures) > 1:  # ablations and additions against the whole of CurES
        lines += paired_table(on_cures, "cures")
    plain = [n for n, extra in jobs if "--rollout.dynamic_sampling=true" not in extra]  # one round a step
    if "grpo" in plain and len(plain) > 1:  # the per-rollout comparison, to GRPO's budget
        lines += rollout_comparison({n: files[n] for n in plain}, "grpo", budget=table["grpo"]["rollouts"][-1])
    mech = mechanism(args.out, list(curves), args.seeds)
    bins = [k for k in next(iter(mech.values())) if k.startswith("draws/p_")]
    levels = [k for k in next(iter(mech.values())) if k.startswith("draws/level_")]
    lines += ["", "The mechanism, mean over steps and seeds: the share of training rollouts in groups with mixed rewards "
              "(where GRPO's gradient is), of response tokens in groups with none, and of the draws by the drawn "
              "prompt's posterior accuracy p at draw time (rollouts per step: dynamic sampling generates several "
              "rounds):", "",
              "| variant | mixed-reward rollouts | zero-advantage tokens | rollouts per step (cold starts included) | "
              + " | ".join(f"draws {k[len('draws/'):]}" for k in bins + levels) + " |",
              "|---|---|---|---|" + "---|" * len(bins + levels)]
    for name, m in mech.items():
        per_step = np.diff(np.concatenate([[0], m["rollouts/total"]])).mean()
        lines.append(f"| {name} | {100 * np.nanmean(m['mech/mixed_rollouts']):.1f} % | "
                     f"{100 * np.nanmean(m['mech/zero_adv_token_share']):.1f} % | {per_step:.0f} | "
                     + " | ".join(f"{100 * np.nanmean(m[k]):.1f} %" for k in bins + levels) + " |")
    lines += run_times(args.out, list(curves), args.seeds)
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"$ python bench/convergence.py {' '.join(sys.argv[1:])}\n\n" + report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, t in table.items():
            for ax, x in zip(axes, (steps, t["rollouts"])):
                ax.plot(x, 100 * t["mean"], marker="o", label=name)
                ax.fill_between(x, 100 * (t["mean"] - t["std"]), 100 * (t["mean"] + t["std"]), alpha=0.15)
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("rollouts generated (cold starts included; GRPO has none)")
        for ax in axes:
            ax.set_ylabel("held-out accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "convergence.png"), dpi=120)
        # the curriculum over time: where each variant spends its draws (stacked shares by difficulty), and the
        # share of its rollouts that carry a gradient
        by = [("posterior p at draw time", bins)] + ([("data level", levels)] if levels else [])
        groups = sorted(set.intersection(*[set(f.get("curve_by_group", {})) for r in files.values() for f in r]))
        n_rows = len(by) + bool(groups)
        fig, axes = plt.subplots(n_rows, len(mech), figsize=(3.6 * len(mech), 3.4 * n_rows), sharey=True, squeeze=False)
        for row, (what, keys) in zip(axes, by):
            for ax, (name, m) in zip(row, mech.items()):
                ax.stackplot(m["step"], *[100 * np.nan_to_num(m[k]) for k in keys],
                             labels=[k[len("draws/"):] for k in keys], alpha=0.8)
                ax.plot(m["step"], 100 * m["mech/mixed_rollouts"], color="black", lw=1.5, label="mixed-reward rollouts")
                ax.set_title(name)
                ax.set_xlabel("training step")
            row[0].set_ylabel(f"draws by {what} (%)")
            row[-1].legend(fontsize=7, loc="lower right")
        for ax, name in zip(axes[-1] if groups else [], mech):  # beside the draws: held-out accuracy per level
            for g in groups:
                acc = np.array([[p[2] for p in f["curve_by_group"][g]] for f in files[name]])
                ax.plot([p[0] for p in files[name][0]["curve_by_group"][g]], 100 * acc.mean(0), marker="o", label=g)
            ax.set_title(name)
            ax.set_xlabel("training step")
        if groups:
            axes[-1][0].set_ylabel("held-out accuracy by level (%)")
            axes[-1][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "curriculum.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
