"""Logging and metrics: metrics.jsonl on rank 0 (plus wandb / tensorboard when asked for), the printed line and
progress bar, phase timers (and peak GPU memory), sums reduced over ranks by name, and the mechanism metrics
(where the draws fall by difficulty, how many rollouts sit in groups with mixed rewards).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import torch

from infra.config import Config, config_dict
from infra.distributed import all_reduce, print0


def metrics_rows(path: str) -> list[tuple[str, dict]]:
    """metrics.jsonl's (line ending in a newline, its row) pairs, every row a JSON object with a step; a torn last
    line (a crash or a full disk mid-write) is dropped with a warning, any other bad line is an error naming it."""
    lines = open(path).read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a metrics row")
        except ValueError as e:
            if i == len(lines) - 1:
                print0(f"warning: dropping the torn last line of {path} (line {i + 1}: {line[:80]!r})")
                break
            raise ValueError(f"{path}, line {i + 1}: {e}; fix or remove the line to resume") from None
        rows.append((line + "\n", row))
    return rows


def write_eval_scores(out_dir: str, step: int, rows: list[dict]):
    """One evaluation's per-problem scores, <out_dir>/eval/step_<step>.jsonl (a line a problem: its id, its group
    field, its samples' scores and which were unscored), written whole then renamed: a redone evaluation (a stop
    inside one) replaces it."""
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    path = os.path.join(out_dir, "eval", f"step_{step:06d}.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def set_aside_eval_scores(out_dir: str, step: int):
    """A resumed run at `step`: the per-problem files of evaluations after it (which it makes again, as it logs
    their rows again) move to eval/dropped/<time>/, kept, as its dropped metrics rows are."""
    evals, aside = os.path.join(out_dir, "eval"), None
    for name in sorted(os.listdir(evals)) if os.path.isdir(evals) else []:
        if name.startswith("step_") and name.endswith(".jsonl") and name[5:-6].isdigit() and int(name[5:-6]) > step:
            aside = aside or os.path.join(evals, "dropped", time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(aside, exist_ok=True)
            os.replace(os.path.join(evals, name), os.path.join(aside, name))


class Logger:
    """metrics.jsonl on rank 0, plus wandb / tensorboard when asked for and installed."""

    def __init__(self, cfg: Config, rank: int, step: int = 0):
        self.rank, self.sinks, self.closers = rank, [], []
        if rank != 0:
            return
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        path = os.path.join(cfg.run.out_dir, "metrics.jsonl")
        if os.path.exists(path):  # resumed at `step`: rows written after that checkpoint are written again (the
            keep, dropped = [], []  # dropped ones are kept in metrics.dropped.jsonl)
            for line, row in metrics_rows(path):
                (keep if step > 0 and row["step"] <= step else dropped).append(line)
            if dropped:
                with open(os.path.join(cfg.run.out_dir, "metrics.dropped.jsonl"), "a") as f:
                    f.writelines(dropped)
            with open(path, "w") as f:
                f.writelines(keep)
        set_aside_eval_scores(cfg.run.out_dir, step)
        self.file = open(path, "a")
        if cfg.run.wandb_project:
            try:
                import wandb

                wandb.init(project=cfg.run.wandb_project, config=config_dict(cfg))
                self.sinks.append(lambda m, s: wandb.log(m, step=s))
                self.closers.append(wandb.finish)
            except ImportError:
                print0("wandb is not installed: logging to metrics.jsonl only")
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(os.path.join(cfg.run.out_dir, "tb"))
                self.sinks.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items()])
                self.closers.append(tb.close)
            except ImportError:
                print0("tensorboard is not installed: logging to metrics.jsonl only")

    def log(self, metrics: dict, step: int):
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(metrics, step)

    def close(self):
        """Flush and close every sink (the run may end with `leave`, which runs no exit hooks)."""
        if self.rank == 0:
            self.file.close()
            for close in self.closers:
                close()


def log_step(logger: Logger, bar, metrics: dict, step: int):
    """metrics.jsonl (and wandb / tensorboard), the progress bar, and one printed line."""
    logger.log(metrics, step)
    bar.update(1)
    bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", eval=metrics.get("eval/acc", ""))
    print0(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                    if k.split("/")[0] in ("train", "eval", "actor", "cures", "time") and "hist" not in k))


@contextlib.contextmanager
def timed(metrics: dict, key: str):
    """Seconds of a phase in metrics[key] ("time/<phase>"); on a GPU also the phase's peak allocated memory
    in GiB ("perf/peak_gb/<phase>"), which bench/gpu_smoke.sh holds against bench/memory.py's prediction."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    yield
    if cuda:
        torch.cuda.synchronize()
        peak = "perf/peak_gb/" + key.split("/", 1)[1]
        metrics[peak] = max(metrics.get(peak, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    metrics[key] = metrics.get(key, 0.0) + time.time() - t0  # a phase run several times (rounds) adds up


P_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # posterior-accuracy bins of the difficulty metrics


def difficulty_shares(p: np.ndarray) -> dict:
    """The share of the step's draws in each bin of posterior accuracy p (Eq. 22) at draw time: where the
    curriculum spends its prompts (uniform sampling spends them as the data lies)."""
    counts, _ = np.histogram(p, bins=P_BINS)  # the last bin includes 1.0
    return {f"draws/p_{a:.1f}-{b:.1f}": float(c) / max(len(p), 1) for a, b, c in zip(P_BINS, P_BINS[1:], counts)}


def level_shares(levels: list) -> dict:
    """The share of the step's draws at each difficulty level of the data (a row's "level", when it has one:
    MATH's "Level 1-5", the tiny task's digit count), a difficulty the curriculum does not see."""
    known = [str(x) for x in levels if x is not None]
    return {f"draws/level_{v}": known.count(v) / len(known) for v in sorted(set(known))}


def group_kinds(rewards: torch.Tensor, group: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed (G,), uniform (G,)): groups whose rollouts score differently (a non-zero GRPO advantage) and
    groups whose rollouts all score the same (zero advantage); a group with no rollout is neither.
    rewards, group: (B,)."""
    lo = torch.full((G,), float("inf")).scatter_reduce(0, group, rewards, "amin")
    hi = torch.full((G,), float("-inf")).scatter_reduce(0, group, rewards, "amax")
    return lo < hi, lo == hi


def mechanism_sums(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor) -> dict:
    """What the paper argues a curriculum changes: rollouts in groups with mixed rewards (a non-zero GRPO
    advantage: where the gradient is) and response tokens in groups whose rollouts all score the same
    (zero advantage: generated, scored and trained on for no gradient). rewards, group, lengths: (B,);
    sums over this rank's groups (every group lies whole on one rank), reduced over ranks by name."""
    uniform = group_kinds(rewards, group, int(group.max()) + 1 if len(group) else 0)[1][group]  # (B,)
    return {"mixed_rollouts": float((~uniform).sum()), "zero_adv_tokens": float(lengths[uniform].sum())}


def reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Each named value summed over ranks (every rank holds the same names)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce(torch.tensor([float(sums[k]) for k in keys])).tolist()))


def rollout_sums(out, rewards: torch.Tensor, scored: torch.Tensor, timeouts: int) -> dict[str, float]:
    """This rank's sums over one round's generated rollouts (what was paid for): rewards, responses, scored
    responses, response tokens, truncated responses, checker timeouts, unscored responses, and the mechanism
    sums over the scored ones (and their response tokens, the mechanism shares' denominator). out: Rollouts;
    rewards, scored: (B,)."""
    return {"reward": float(rewards[scored].sum()), "responses": float(len(rewards)), "scored": float(scored.sum()),
            "response_tokens": float(out.lengths.sum()), "scored_tokens": float(out.lengths[scored].sum()),
            "truncated": float((~out.finished).sum()),
            "timeouts": float(timeouts), "unscored": float((~scored).sum()),
            **{k: float(v) for k, v in mechanism_sums(rewards[scored], out.prompt_index[scored],
                                                      out.lengths[scored]).items()}}


def generated_sums(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The rollout_sums of a step's rounds, added by name."""
    total = {}
    for sums in rounds:
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + v
    return total


def step_metrics(tok: dict[str, float], actor_keys: list[str], norms: list[float], num_mb: int, epochs: int,
                 lr: float) -> dict:
    """A step's reward, mechanism and actor metrics from its sums over ranks `tok` (generated_sums, the trained
    and update tokens, and the actor sums named by actor_keys): per response, per trained token, or (losses) per
    optimiser step (num_mb mini-batches x epochs). norms: the grad norm of each optimiser step."""
    B, ntok = tok["responses"], tok["trained_tokens"] * max(1, epochs)
    metrics = {"train/reward": tok["reward"] / max(tok["scored"], 1), "train/response_len": tok["response_tokens"] / B,
               "train/truncated": tok["truncated"] / B, "reward/timeouts": tok["timeouts"],
               "reward/unscored": tok["unscored"],  # never scored: out of the Beta counts and the loss
               # of the scored rollouts (an unscored one is in no group's advantage): the share in groups with mixed
               # rewards, and the response tokens spent for no gradient
               "mech/mixed_rollouts": tok["mixed_rollouts"] / max(tok["scored"], 1),
               "mech/zero_adv_tokens": tok["zero_adv_tokens"],
               "mech/zero_adv_token_share": tok["zero_adv_tokens"] / max(tok["scored_tokens"], 1),
               "actor/grad_norm": float(np.mean(norms)), "actor/lr": lr}
    for k in actor_keys:  # losses: mean over optimiser steps; the rest: per trained token
        metrics[k] = tok[k] / (num_mb * epochs) if k in ("actor/pg_loss", "actor/kl") else tok[k] / max(ntok, 1)
    return metrics
