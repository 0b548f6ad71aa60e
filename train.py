"""CurES training: Algorithm 1 of arXiv 2510.01037 with GRPO. This file is the method; the machinery (config,
data, distributed set-up and models, micro-batch layouts, checkpoints, logging) sits beside it in infra/.

    torchrun --nproc_per_node=8 train.py --config configs/1.5b.yaml     # the paper's setting, one 8-GPU node
    python train.py --config configs/1.5b.yaml --rollout.prompts_per_step=64   # one GPU
    python train.py --config configs/tiny.yaml                          # CPU, bundled tiny model, minutes
    python train.py --config configs/tiny.yaml --cures.sampling=uniform --cures.allocation=uniform   # GRPO

What the method does, and where (main() holds Algorithm 1's two loops, train_step one inner step):
 1. Split the training set into T subsets (one per source, as released); M steps on each     infra.data.load_subsets
 2. New subset: a fresh trainer (AdamW state, KL reference = policy; as released), then      main
    the cold start: N' rollouts of every prompt initialise Beta(alpha, beta) (Eq. 22-23;     cold_start
    with sigma=gradient also the gradient statistics of Eq. 21)                           cures.gradient_stats
 3. Draw m prompts with replacement from rho* = softmax(sqrt(p(1-p)) / tau)  (Eq. 14)       Curriculum.sample
 4. Give prompt i n_i = N sigma_i / sum sigma rollouts (Eq. 20-21)                          Curriculum.allocate
 5. Generate, score with math-verify, update the Beta counts (Eq. 23)                       draw_and_generate
 6. GRPO advantages per group, PPO-clip loss with dual clip and k3 KL (verl's settings)      grpo.py
 7. AdamW over mini-batches of 256 prompts, one epoch, token-mean loss                      update_policy

Config: `infra.config.Config` is the single source of truth; a YAML file holds what differs; override anything
with --section.key=value. Distributed: FSDP2 under torchrun (NCCL on GPU, gloo on CPU); plain
`python train.py` runs in one process (one GPU through a one-rank FSDP group, or the CPU without FSDP).
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml

import cures
import grpo
import reward
import eval as evaluation
import rollout
from infra.batching import plan_micro_batches
from infra.checkpoint import check_out_dir, resume_state, save_checkpoint, save_hf
from infra.config import Config, config_dict, load_config, usage, validate_config
from infra.data import load_subsets
from infra.distributed import (StopAbandoned, StopRequested, all_gather_list, all_reduce, check_stop,
                               interruptible, leave, print0, setup_distributed)
from infra.metrics import (Logger, difficulty_shares, generated_sums, group_kinds, level_shares, log_step,
                           reduce_sums, rollout_sums, step_metrics, timed, write_eval_scores)
from infra.models import Policy, build_models, sync_generation_weights, train_mode

# ----------------------------------------------------------------------------------------------
# Rollouts: the step's groups spread over ranks, random streams, generation and scoring, the cold start


def training_groups(idx: np.ndarray, n: np.ndarray, mini_batch_prompts: int, group_by: str = "prompt"):
    """The step's GRPO groups from the draw (Algorithm 1, line 12: m prompts with replacement, n_i rollouts
    each by Eq. 20). The draw is cut into mini-batches of `mini_batch_prompts` draws, in order.
    group_by "draw": each draw is a group. "prompt" (as released: responses are grouped by dataset index): a
    prompt drawn k times is one group of sum n rollouts, with one baseline, placed in the mini-batch of its
    first draw. Returns (prompt (g,), rollouts (g,), mini-batch (g,) numbered 0..), g = groups."""
    mb = np.arange(len(idx)) // max(1, mini_batch_prompts)  # (m,)
    if group_by == "draw":
        return idx, n, mb
    if group_by != "prompt":
        raise ValueError(f"train.group_by must be prompt or draw, not {group_by!r}")
    prompts, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first draw
    counts = np.bincount(inverse, weights=n, minlength=len(prompts)).astype(np.int64)  # (g,)
    mb_first = mb[first[order]]
    return prompts[order], counts[order], np.unique(mb_first, return_inverse=True)[1]  # no empty mini-batch


def assign_groups(n: np.ndarray, mb: np.ndarray, world: int) -> np.ndarray:
    """Spread each mini-batch's whole groups over ranks balanced by rollout count (largest first, to the
    least loaded rank). Deterministic, so every rank computes the same plan. n, mb: (g,) rollouts and
    mini-batch of each group. Returns the rank of each group (g,)."""
    owner = np.zeros(len(n), dtype=np.int64)
    for b in np.unique(mb):
        load = np.zeros(world)
        idx = np.flatnonzero(mb == b)
        for i in idx[np.argsort(-n[idx], kind="stable")]:
            r = int(np.argmin(load))
            owner[i] = r
            load[r] += n[i]
    return owner


SEED_PURPOSES = ("cold_start", "sample", "rollout", "eval")


def stream_seed(seed: int, purpose: str, subset: int, step: int, rank: int = 0, rnd: int = 0) -> int:
    """The seed of one random stream, derived from the run's seed by np.random.SeedSequence keyed by
    (purpose, subset, step, rank, and the dynamic-sampling round rnd when > 0): no two purposes, subsets,
    steps, ranks or rounds share a stream, and a resumed run draws what the uninterrupted run drew."""
    key = [seed, SEED_PURPOSES.index(purpose), subset, step, rank] + ([rnd] if rnd else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def generate_and_score(gen, tokenizer, prompts, answers, counts, cfg: Config, seed: int, stop: dict | None = None,
                       progress: str = "", metrics: dict | None = None, prompt_keys: list[int] | None = None):
    """Rollouts for this rank's prompts and their binary rewards. Returns (Rollouts, rewards (B,), scored (B,)
    bool: False for the rare response the checker could not score at all (reward.Scores.unscored; it is left out
    of the Beta counts and of the loss), number of checker timeouts). `stop`: {"requested": bool}, checked
    between generation batches and while scoring (then StopRequested on every rank). `metrics`: the scoring's seconds are added to
    its "time/reward" (a part of the phase that calls this)."""
    with interruptible(stop) as should_stop:
        out = rollout.generate(gen, prompts, counts, max_new_tokens=cfg.rollout.max_new_tokens,
                               eos_ids=rollout.stop_token_ids(tokenizer, gen, cfg.rollout.stop_at_im_end),
                               pad_id=tokenizer.pad_token_id, temperature=cfg.rollout.temperature,
                               top_p=cfg.rollout.top_p, seed=seed, max_batch_tokens=cfg.rollout.max_batch_tokens,
                               max_batch_size=cfg.rollout.max_batch_size, cache=cfg.rollout.cache,
                               share_prefill=cfg.rollout.share_prefill, should_stop=should_stop, progress=progress,
                               prompt_keys=prompt_keys)
        t0 = time.time()  # the scoring (not infra.metrics.timed: that resets the peak memory the phase measures)
        texts = out.texts(tokenizer)
        golds = [answers[i] for i in out.prompt_index.tolist()]
        workers = cfg.run.reward_workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        scores = reward.score_batch(texts, golds, workers=min(workers, 32), timeout=cfg.run.reward_timeout,
                                    should_stop=should_stop)
    if metrics is not None:
        metrics["time/reward"] = metrics.get("time/reward", 0.0) + time.time() - t0
    scored = torch.ones(len(scores), dtype=torch.bool)
    scored[scores.unscored] = False
    return out, torch.tensor(list(scores), dtype=torch.float32), scored, scores.timeouts


def only_scored(out, rewards: torch.Tensor, scored: torch.Tensor, pad_id: int):
    """The rollouts the checker scored (all of them, nearly always: then the same objects). out: Rollouts,
    rewards, scored: (B,) -> (Rollouts, rewards) of the scored rows, prompt_index unchanged (a group whose
    rollouts were all unscored is empty)."""
    if scored.all():
        return out, rewards
    keep = torch.nonzero(scored).flatten().tolist()
    responses = out.responses()
    return (rollout.Rollouts.from_responses([responses[b] for b in keep], out.prompt_index[keep].tolist(),
                                            out.finished[keep].tolist(), pad_id), rewards[keep])


def cold_start(cur: cures.Curriculum, subset, gen, tokenizer, cfg: Config, rank: int, world: int, seed: int,
               stop: dict | None = None):
    """Algorithm 1, line 3: N' rollouts of every prompt of the subset -> Beta counts (Eq. 23) and,
    for sigma=gradient, the gradient statistics of Eq. 21. Prompts are spread over ranks (i = rank mod W)."""
    t0 = time.time()
    mine = list(range(rank, len(subset), world))
    k = cfg.cures.cold_start_rollouts
    out, rewards, scored, timeouts = generate_and_score(gen, tokenizer, [subset[i]["prompt_ids"] for i in mine],
                                                        [subset[i]["answer"] for i in mine], k, cfg, seed, stop,
                                                        "cold start" if rank == 0 else "", prompt_keys=mine)
    correct, scored = (rewards * scored).view(len(mine), k), scored.view(len(mine), k)  # (P_rank, k)
    counts = [(mine[j], float(correct[j].sum()), int(scored[j].sum())) for j in range(len(mine))]  # unscored: no trial
    stats, t_grad = [], time.time()
    if cfg.cures.sigma == "gradient":
        responses = out.responses()
        for j, i in enumerate(mine):
            rs = [r for b, r in enumerate(responses[j * k:(j + 1) * k]) if scored[j, b]]
            stats.append((i, *cures.gradient_stats(gen, subset[i]["prompt_ids"], rs,
                                                   (correct[j][scored[j]] > 0).tolist(), cfg.cures.grad_param,
                                                   cfg.rollout.temperature)) if rs
                         else (i, 0.0, 0.0, 0.0))  # no scored response: no gradient measured, sigma_i = 0
    t_grad = time.time() - t_grad
    counts = all_gather_list(counts)
    idx, c, n = (np.array(x) for x in zip(*counts))
    cur.observe(idx.astype(np.int64), c, n)
    if cfg.cures.sigma == "gradient":  # every rank gathers, also one that had no prompts
        s = np.array(all_gather_list(stats))
        cur.set_grad_stats(s[:, 0].astype(np.int64), s[:, 1], s[:, 2], s[:, 3])
    lost = all_reduce(torch.tensor([float(timeouts), float((~scored).sum())]))
    return {"cold/rollouts": len(subset) * k, "cold/acc": float(c.sum() / max(n.sum(), 1)),
            "cold/timeouts": lost[0].item(), "cold/unscored": lost[1].item(),
            "time/cold_start": time.time() - t0, "time/grad_stats": t_grad}


# ----------------------------------------------------------------------------------------------
# The update


def forward_batch(model: Policy, b: dict, device, cfg: Config):
    """logp, entropy (N,) of one micro-batch's response tokens, in any layout."""
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return model(to(b["ids"]), to(b["attn"]), to(b["src"]), to(b["tgt"]), cfg.rollout.temperature,
                 cfg.train.logprob_chunk, position_ids=to(b["pos"]))


@torch.no_grad()
def score_logprobs(model: Policy, batches, device, cfg: Config):
    """Per-sequence response log-probs (no grad) for old_logp / ref_logp: {index into seqs: logp (n,)}."""
    out = {}
    for b in batches:
        logp, _ = forward_batch(model, b, device, cfg)
        for i, part in zip(b["rows"], torch.split(logp, b["sizes"]) if b["rows"] else []):
            out[i] = part
    if hasattr(model, "reshard"):  # FSDP2 keeps the root (embeddings, lm_head) gathered after a forward
        model.reshard()  # without backward: 0.9 GB (1.5B) to 4.4 GB (7B) fp32 per rank for the KL reference
    return out


def update_policy(policy: Policy, optimizer, seqs: list[dict], device, cfg: Config, world: int, scheduler=None,
                  batches=None, before_micro_batch=None):
    """One optimiser step on one mini-batch (this rank's share `seqs`). The token_mean normaliser is the
    token count of the whole mini-batch over all ranks, divided by W because FSDP averages gradients over
    ranks: the result does not depend on how the mini-batch is cut into ranks and micro-batches
    (tests/test_train.py). `batches`: the micro-batch plan of `seqs` if already made (make_micro_batches).
    `before_micro_batch()`: called before each micro-batch (UpdateStop). Returns (metrics sums, grad norm, ok)."""
    tokens = torch.tensor([float(sum(s["resp_len"] for s in seqs)), float(len(seqs))])
    tokens = all_reduce(tokens)
    num_tokens, num_seqs = tokens[0].item() / world, tokens[1].item() / world
    sums = {k: 0.0 for k in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/clip_frac",
                             "actor/clip_frac_lower", "actor/approx_kl_old", "actor/ratio_mean")}
    if num_tokens == 0:  # every response of the mini-batch on every rank left out (unscored): no update
        return sums, 0.0, True
    if batches is None:
        batches = plan_micro_batches(seqs, cfg)
    finite = True
    with train_mode(policy):  # gradient checkpointing, when configured, runs in train mode only
        # FSDP2 reduce-scatters every micro-batch's gradients into the fp32 shards, which accumulate them.
        # Skipping that until the last micro-batch (set_requires_gradient_sync) would keep every layer's
        # gradient unsharded in fp32 in between: 4 bytes a parameter per rank (6 GB for 1.5B, 30 GB for
        # 7B; bench/memory.py --check measured it) to save one reduce-scatter per micro-batch.
        for b in batches:
            if before_micro_batch is not None:
                before_micro_batch()
            logp, entropy = forward_batch(policy, b, device, cfg)  # (N,)
            rows = b["rows"]
            if rows:
                adv = torch.cat([seqs[i]["adv"].expand(seqs[i]["resp_len"]) for i in rows]).to(device)  # (N,)
                old = (torch.cat([seqs[i]["old_logp"] for i in rows]).to(device) if "old_logp" in seqs[rows[0]]
                       else logp.detach())  # (N,) on-policy (first mini-batch, one epoch): ratio = 1
            else:  # dummy micro-batch: zero-weight loss keeps FSDP's collectives in step
                adv, old = torch.zeros_like(logp), logp.detach()
            seq_id = torch.cat([torch.full((seqs[i]["resp_len"],), k) for k, i in enumerate(rows)]) if rows else \
                torch.zeros(logp.shape[0], dtype=torch.long)
            mask = torch.ones(1, logp.shape[0], device=device) if rows else torch.zeros(1, logp.shape[0], device=device)
            if cfg.train.loss_agg == "seq_mean_token_mean":  # as (B, T): one row per sequence
                B = max(1, len(rows))
                T = max([seqs[i]["resp_len"] for i in rows] or [logp.shape[0]])
                pos = torch.cat([torch.arange(seqs[i]["resp_len"]) for i in rows]) if rows else torch.arange(logp.shape[0])
                shape = lambda x, fill=0.0: torch.full((B, T), fill, device=device, dtype=x.dtype).index_put_(  # noqa: E731
                    (seq_id.to(device), pos.to(device)), x)
                logp2, old2, adv2, mask2 = shape(logp), shape(old), shape(adv), shape(mask[0])
            else:
                logp2, old2, adv2, mask2 = logp[None], old[None], adv[None], mask
            loss, m = grpo.policy_loss(logp2, old2, adv2, mask2, cfg.train.clip_low, cfg.train.clip_high,
                                       cfg.train.clip_c, cfg.train.loss_agg, num_tokens, num_seqs)
            sums["actor/pg_loss"] += loss.item() * world
            if cfg.train.kl_coef > 0:
                ref = torch.cat([seqs[i]["ref_logp"] for i in rows]).to(device) if rows else logp.detach()
                ref2 = shape(ref) if cfg.train.loss_agg == "seq_mean_token_mean" else ref[None]
                kl = grpo.aggregate(grpo.kl_penalty(logp2, ref2, cfg.train.kl_kind), mask2, cfg.train.loss_agg,
                                    num_tokens, num_seqs)
                loss = loss + cfg.train.kl_coef * kl
                sums["actor/kl"] += kl.item() * world
            finite = finite and bool(torch.isfinite(loss).item())
            loss.backward()
            sums["actor/entropy"] += float((entropy * mask[0]).sum())
            for k, v in m.items():
                sums[k] += float(v)
    flag = all_reduce(torch.tensor([0.0 if finite else 1.0]))
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = flag.item() == 0 and math.isfinite(grad_norm)
    if ok:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, ok


def make_optimizer(policy: Policy, cfg: Config):
    """AdamW with an empty state and its lr schedule (linear warm-up, then constant as in the paper)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=cfg.train.betas, eps=cfg.train.adam_eps)
    warmup = max(1, cfg.train.warmup_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))


@torch.no_grad()
def reanchor_reference(policy: Policy, ref: Policy | None):
    """KL reference <- the current policy (a subset's fresh trainer, as released). Both are sharded the
    same way, so each rank copies its own shards."""
    if ref is not None:
        for p_ref, p in zip(ref.parameters(), policy.parameters()):
            p_ref.copy_(p)


# ----------------------------------------------------------------------------------------------
# One training step: the inner loop of Algorithm 1 (draw, allocate, generate, observe, update)


def sample_and_allocate(cur: cures.Curriculum, subset_id: int, step: int, cfg: Config, world: int, rnd: int = 0):
    """Draw m prompts with replacement from rho* (Eq. 14), allocate N rollouts over the draws (Eq. 20), form
    the GRPO groups and give each a mini-batch and a rank. Identical on every rank (one random stream per
    step and round). Returns (prompt (g,), rollouts (g,), mini-batch (g,), rank (g,), rollouts per draw (m,),
    draws (m,))."""
    rng = np.random.default_rng(stream_seed(cfg.run.seed, "sample", subset_id, step, rnd=rnd))
    draws = cur.sample(cfg.rollout.prompts_per_step, rng)  # (m,)
    n_draws = cur.allocate(draws, cfg.rollout.rollouts_per_step)  # (m,) sums to N
    idx, n, mb = training_groups(draws, n_draws, cfg.train.mini_batch_prompts, cfg.train.group_by)  # (g,)
    if (n == 0).any():  # cures.n_min=0: a group given no rollouts is not a group (nothing to generate or train)
        idx, n, mb = idx[n > 0], n[n > 0], np.unique(mb[n > 0], return_inverse=True)[1]
    return idx, n, mb, assign_groups(n, mb, world), n_draws, draws


def observe_rollouts(cur: cures.Curriculum, prompts: np.ndarray, group: torch.Tensor, rewards: torch.Tensor):
    """Eq. 23 with every rank's scored rollouts: alpha += #correct, beta += #wrong for this rank's groups
    (prompts: (g_rank,); group, rewards: (B,)), gathered so every rank holds the same posteriors."""
    correct = torch.zeros(len(prompts)).index_add_(0, group, rewards)  # (g_rank,)
    trials = torch.zeros(len(prompts)).index_add_(0, group, torch.ones_like(rewards))  # (g_rank,)
    counts = all_gather_list([(int(prompts[j]), float(correct[j]), int(trials[j])) for j in range(len(prompts))])
    i_all, c_all, n_all = (np.array(x) for x in zip(*counts))
    cur.observe(i_all.astype(np.int64), c_all, n_all)


def compute_advantages(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor, cfg: Config,
                       rank: int) -> torch.Tensor:
    """GRPO: per group, whole on this rank. REINFORCE++: rewards whitened over every rank's response
    tokens. rewards, group, lengths: (B,) -> (B,)."""
    if cfg.train.advantage == "grpo":
        return grpo.group_advantages(rewards, group)  # (B,)
    if cfg.train.advantage == "rpp":
        everything = all_gather_list([(rank, r, l) for r, l in zip(rewards.tolist(), lengths.tolist())])
        r_all = torch.tensor([r for _, r, _ in everything])
        l_all = torch.tensor([l for _, _, l in everything])
        mask_all = (torch.arange(int(l_all.max()))[None] < l_all[:, None]).float()  # (B_all, T)
        return grpo.rpp_advantages(r_all, mask_all)[torch.tensor([k == rank for k, _, _ in everything])]
    raise ValueError(f"unknown advantage {cfg.train.advantage!r}")


def mini_batch_sequences(subset: list[dict], prompts: np.ndarray, mb: np.ndarray, out, adv: torch.Tensor,
                         num_mb: int) -> list[list[dict]]:
    """This rank's sequences (prompt + response, advantage) for the update, one list per mini-batch.
    prompts, mb: (g_rank,) for this rank's groups; out: their Rollouts; adv (B,)."""
    responses = out.responses()
    parts = [[] for _ in range(num_mb)]
    for b, j in enumerate(out.prompt_index.tolist()):
        p = subset[prompts[j]]["prompt_ids"]
        parts[mb[j]].append({"ids": p + responses[b], "prompt_len": len(p), "resp_len": len(responses[b]),
                             "adv": adv[b:b + 1]})
    return parts


def add_logprobs(parts, plans, policy: Policy, ref, device, cfg: Config, stop: dict | None = None):
    """old_logp under the sampling policy and ref_logp under the KL reference, for every mini-batch.
    The first mini-batch of a one-epoch update is trained before any optimiser step, by the policy that
    sampled it: its old_logp would equal logp.detach(), which update_policy uses when it is absent. A stop
    request before a mini-batch raises StopRequested on every rank (nothing has touched the weights yet)."""
    for b_id, (part, batches) in enumerate(zip(parts, plans)):
        check_stop(stop)
        on_policy = b_id == 0 and cfg.train.epochs == 1
        models = ([] if on_policy else [("old_logp", policy)]) + ([("ref_logp", ref)] if ref is not None else [])
        for key, model in models:
            for i, lp in score_logprobs(model, batches, device, cfg).items():
                part[i][key] = lp.cpu()


class UpdateStop:
    """What a stop request does inside an update: asked before each of its micro-batches, on every rank (a
    collective: every rank runs the same micro-batches, dummies included).
    - Before the update's first optimiser step nothing of the step has reached the weights: StopRequested
      drops the step as a stop in generation does, and the resumed run redoes it (exact).
    - After it the weights are part-way: the update goes on if what is left of it (timed from the
      micro-batches done) and a save (as long as the last one took, or the resume's load; 0 before either)
      fit in what is left of run.stop_grace_s since the signal, else StopAbandoned: nothing is saved and a
      resume starts from the last checkpoint (a save still running when the launcher's SIGKILL comes would be
      lost anyway). The signal's time is when Python ran its handler, which a long kernel call delays: the
      default grace leaves 5 s of torchrun's 30 for that and for the exit."""

    def __init__(self, stop: dict | None, grace_s: float, total: int):
        self.stop, self.grace_s, self.total = stop, grace_s, total  # total: micro-batches of the whole update
        self.done, self.stepped, self.going_on, self.t0 = 0, False, False, time.monotonic()

    def __call__(self):
        if self.stop is not None and not self.going_on:
            now = time.monotonic()
            since = now - self.stop["at"] if self.stop["requested"] else -1.0
            left = (now - self.t0) / max(self.done, 1) * (self.total - self.done)
            since, left, save_s = all_reduce(torch.tensor([since, left, self.stop.get("save_s", 0.0)],
                                                          dtype=torch.float64), dist.ReduceOp.MAX).tolist()
            if since >= 0:  # some rank was asked to stop, `since` seconds ago (the same numbers on every rank)
                if not self.stepped:
                    raise StopRequested()
                need = since + left + save_s
                if need > self.grace_s:
                    raise StopAbandoned(f"the update was {self.done}/{self.total} micro-batches in; finishing and "
                                        f"saving would end {need:.0f} s after the signal, past run.stop_grace_s="
                                        f"{self.grace_s:g}: nothing saved")
                self.going_on = True
                print0(f"stop requested inside the update: it ends and saves within {need:.0f} s of the signal "
                       f"(run.stop_grace_s={self.grace_s:g})")
        self.done += 1


def update_epochs(policy: Policy, optimizer, scheduler, parts, plans, state: dict, device, cfg: Config,
                  world: int, stop: dict | None = None):
    """PPO: `epochs` passes over the mini-batches, one optimiser step each. A non-finite update is skipped
    with a warning; `train.max_bad_steps` in a row abort. Returns (summed actor metrics, grad norms). A stop
    request: see UpdateStop."""
    sums, norms = {}, []
    stop_check = UpdateStop(stop, cfg.run.stop_grace_s, cfg.train.epochs * sum(map(len, plans)))
    for _ in range(cfg.train.epochs):
        for part, batches in zip(parts, plans):
            s_mb, norm, ok = update_policy(policy, optimizer, part, device, cfg, world, scheduler, batches,
                                           stop_check)
            stop_check.stepped = True
            norms.append(norm)
            for k, v in s_mb.items():
                sums[k] = sums.get(k, 0.0) + v
            state["bad_updates"] = 0 if ok else state["bad_updates"] + 1
            if not ok:
                print0(f"warning: non-finite loss or gradient at step {state['step']}: update skipped")
                if state["bad_updates"] >= cfg.train.max_bad_steps:
                    raise RuntimeError(f"{state['bad_updates']} non-finite updates in a row: aborting")
    return sums, norms


def draw_and_generate(subset, subset_id: int, step: int, cur: cures.Curriculum, gen, tokenizer, cfg: Config,
                      rank: int, world: int, metrics: dict, stop=None, rnd: int = 0) -> dict:
    """One round of a step: draw m prompts and allocate N rollouts (Eq. 14, Eq. 20), generate and score this
    rank's groups, update the posteriors with every rank's rollouts (Eq. 23). A step has one round, or
    several with rollout.dynamic_sampling. Returns the round: the draw (idx, n, mb, owner: (g,), draws,
    n_draws, p_draws: (m,)), this rank's groups `mine`, their scored Rollouts and rewards (B,), the sums over
    everything generated (`generated`, for the metrics), and with dynamic sampling which groups are mixed /
    uniform (g,) on every rank."""
    with timed(metrics, "time/curriculum"):  # draw m prompts (Eq. 14, Alg. 1 l. 12), allocate N rollouts (Eq. 20)
        idx, n, mb, owner, n_draws, draws = sample_and_allocate(cur, subset_id, step, cfg, world, rnd)
        mine = np.flatnonzero(owner == rank)  # this rank's groups
        p_draws = cur.accuracy()[draws]  # what was drawn, by its difficulty then
    with timed(metrics, "time/rollout_and_reward"):  # generate n_i rollouts per prompt, score them
        out, rewards, scored, timeouts = generate_and_score(
            gen, tokenizer, [subset[i]["prompt_ids"] for i in idx[mine]], [subset[i]["answer"] for i in idx[mine]],
            n[mine].tolist(), cfg, stream_seed(cfg.run.seed, "rollout", subset_id, step, rnd=rnd), stop,
            "rollouts" if rank == 0 else "", metrics, prompt_keys=mine.tolist())  # keyed by group: no rank
    generated = rollout_sums(out, rewards, scored, timeouts)  # every rollout is paid for, scored or not
    out, rewards = only_scored(out, rewards, scored, tokenizer.pad_token_id)
    observe_rollouts(cur, idx[mine], out.prompt_index, rewards)  # Beta counts, Eq. 23
    kinds = group_kinds_everywhere(rewards, out.prompt_index, len(mine), mine, len(idx)) \
        if cfg.rollout.dynamic_sampling else (None, None)  # a collective: only where the filter needs it
    return {"idx": idx, "n": n, "mb": mb, "owner": owner, "draws": draws, "n_draws": n_draws, "p_draws": p_draws,
            "mine": mine, "out": out, "rewards": rewards, "generated": generated, "mixed": kinds[0],
            "uniform": kinds[1]}


def group_kinds_everywhere(rewards: torch.Tensor, group: torch.Tensor, g_rank: int, mine: np.ndarray, g: int):
    """Which of the round's g groups have mixed rewards (a non-zero GRPO advantage) and which uniform ones, known
    on every rank: (mixed (g,), uniform (g,)); a group with no scored rollout is neither. rewards, group: (B,)
    this rank's rollouts and their group among its g_rank groups `mine`."""
    mixed, uniform = np.zeros(g, dtype=bool), np.zeros(g, dtype=bool)
    mine_mixed, mine_uniform = group_kinds(rewards, group, g_rank)
    for j, is_mixed, is_uniform in all_gather_list(list(zip(mine.tolist(), mine_mixed.tolist(),
                                                            mine_uniform.tolist()))):
        mixed[j], uniform[j] = is_mixed, is_uniform
    return mixed, uniform


def count_mixed(rounds: list[dict]) -> int:
    return int(sum(r["mixed"].sum() for r in rounds))


def keep_mixed_groups(rounds: list[dict], cfg: Config, rank: int, world: int, pad_id: int):
    """DAPO's dynamic sampling filter: of every round's groups in the order generated, the first m with mixed
    rewards (then, after rollout.max_rounds rounds short of m, the uniform ones in order; never an empty group),
    cut into mini-batches
    of train.mini_batch_prompts groups and spread over ranks afresh; each kept group's rollouts move to its new
    rank. Returns (prompt (k,), mini-batch (k,), this rank's kept groups, their Rollouts, rewards) like one round."""
    groups = [(r, j) for kind in ("mixed", "uniform") for r, R in enumerate(rounds)
              for j in np.flatnonzero(R[kind])][:cfg.rollout.prompts_per_step]
    idx = np.array([rounds[r]["idx"][j] for r, j in groups], dtype=np.int64)
    n = np.array([rounds[r]["n"][j] for r, j in groups], dtype=np.int64)
    mb = np.arange(len(groups)) // max(1, cfg.train.mini_batch_prompts)
    owner = assign_groups(n, mb, world)
    new_slot = {key: k for k, key in enumerate(groups)}
    payload = []  # (kept position, responses, rewards, finished) of the kept groups this rank generated
    for r, R in enumerate(rounds):
        responses, group = R["out"].responses(), R["out"].prompt_index
        for local, j in enumerate(R["mine"].tolist()):
            if (r, j) in new_slot:
                rows = torch.nonzero(group == local).flatten().tolist()
                payload.append((new_slot[(r, j)], [responses[b] for b in rows], R["rewards"][rows].tolist(),
                                R["out"].finished[rows].tolist()))
    mine = np.flatnonzero(owner == rank)
    got = {k: rest for k, *rest in all_gather_list(payload) if owner[k] == rank}
    responses, rewards, finished, prompt_index = [], [], [], []
    for local, k in enumerate(mine.tolist()):
        rs, rw, fin = got[k]
        responses += rs
        rewards += rw
        finished += fin
        prompt_index += [local] * len(rs)
    out = rollout.Rollouts.from_responses(responses, prompt_index, finished, pad_id)
    return idx, mb, mine, out, torch.tensor(rewards, dtype=torch.float32)


def train_step(subset: list[dict], subset_id: int, cur: cures.Curriculum, policy: Policy, ref, gen, tokenizer,
               optimizer, scheduler, state: dict, cfg: Config, rank: int, world: int, device, stop=None) -> dict:
    """One step of Algorithm 1 on this rank, in the paper's order. Advances the counters in `state`
    (not the step) and returns the step's metrics, reduced over ranks. A stop request during generation,
    scoring, the log-probabilities or the update's first mini-batch raises StopRequested before anything
    has changed (weights, counters; the curriculum is the caller's to restore); later in the update, see
    UpdateStop."""
    step, metrics, t_step = state["step"], {}, time.time()
    with timed(metrics, "time/sync"):  # the policy that samples: one all-gather per phase, not per token
        sync_generation_weights(policy, gen)
    rounds = [draw_and_generate(subset, subset_id, step, cur, gen, tokenizer, cfg, rank, world, metrics, stop)]
    if cfg.rollout.dynamic_sampling:  # DAPO (beyond the paper): more rounds until m groups have mixed rewards
        while count_mixed(rounds) < cfg.rollout.prompts_per_step and len(rounds) < cfg.rollout.max_rounds:
            rounds.append(draw_and_generate(subset, subset_id, step, cur, gen, tokenizer, cfg, rank, world, metrics,
                                            stop, rnd=len(rounds)))
        idx, mb, mine, out, rewards = keep_mixed_groups(rounds, cfg, rank, world, tokenizer.pad_token_id)
        metrics.update({"dynamic/rounds": len(rounds), "dynamic/mixed_groups": count_mixed(rounds)})
    else:
        idx, mb, mine, out, rewards = (rounds[0][k] for k in ("idx", "mb", "mine", "out", "rewards"))
    draws = np.concatenate([r["draws"] for r in rounds])
    metrics.update(difficulty_shares(np.concatenate([r["p_draws"] for r in rounds])))  # by difficulty at draw time
    metrics.update(level_shares([subset[i]["level"] for i in draws]))
    adv = compute_advantages(rewards, out.prompt_index, out.lengths, cfg, rank)  # (B,) GRPO or REINFORCE++
    num_mb = int(mb.max()) + 1
    parts = mini_batch_sequences(subset, idx[mine], mb[mine], out, adv, num_mb)
    with timed(metrics, "time/logprobs"):
        plans = [plan_micro_batches(p, cfg) for p in parts]
        add_logprobs(parts, plans, policy, ref, device, cfg, stop)
    with timed(metrics, "time/update"):  # policy update: PPO-clip, dual clip, k3 KL, token-mean (grpo.py)
        sums, norms = update_epochs(policy, optimizer, scheduler, parts, plans, state, device, cfg, world, stop)

    # --- log: one metrics dict, reduced over ranks by name ------------------------------------------
    tok = reduce_sums({**generated_sums([r["generated"] for r in rounds]),
                       "trained_tokens": sum(s["resp_len"] for p in parts for s in p),
                       "update_tokens": sum(len(s["ids"]) for p in parts for s in p), **sums})
    metrics.update(step_metrics(tok, sorted(sums), norms, num_mb, cfg.train.epochs, scheduler.get_last_lr()[0]))
    state["rollouts_train"] += int(sum(r["n"].sum() for r in rounds))
    state["tokens_train"] += int(tok["response_tokens"])
    metrics.update(cur.stats())
    n_draws = np.concatenate([r["n_draws"] for r in rounds])
    metrics.update({"cures/n_min": int(n_draws.min()), "cures/n_max": int(n_draws.max()),
                    "cures/unique_prompts": len(np.unique(draws)), "rollouts/train": state["rollouts_train"],
                    "rollouts/cold_start": state["rollouts_cold"],
                    "rollouts/total": state["rollouts_train"] + state["rollouts_cold"],
                    "tokens/train": state["tokens_train"], "subset": subset_id, "time/step": time.time() - t_step,
                    "perf/rollout_tokens_per_s": tok["response_tokens"] / max(metrics["time/rollout_and_reward"], 1e-9),
                    "perf/generation_tokens_per_s": tok["response_tokens"] / max(  # the phase without the scoring
                        metrics["time/rollout_and_reward"] - metrics.get("time/reward", 0.0), 1e-9),
                    "perf/update_tokens_per_s": tok["update_tokens"] / max(metrics["time/update"], 1e-9)})
    if device.type == "cuda":  # the step's peak: the largest of its phases'
        metrics["perf/peak_mem_gb"] = max(v for k, v in metrics.items() if k.startswith("perf/peak_gb/"))
    return metrics


# ----------------------------------------------------------------------------------------------
# Held-out evaluation (the loop's eval point)


def run_eval(gen, tokenizer, problems, cfg: Config, rank: int, world: int, seed: int, stop: dict | None = None):
    """Held-out accuracy (mean score over every sample of every problem, all ranks), the same per value of the
    problems' eval.group_key field (eval/acc/level_2 ...), and the number of samples the checker could not score
    (left out of the means); generated with the rollouts' cache (rollout.cache). Returns (metrics, per-problem
    rows {"id", group key, "scores", "unscored"} of every rank, sorted by id: the problem's row in its file)."""
    with interruptible(stop) as should_stop:
        records = evaluation.evaluate_problems(
            gen, tokenizer, problems, n_samples=cfg.eval.samples,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, temperature=cfg.eval.temperature,
            top_p=cfg.rollout.top_p, seed=seed, rank=rank, world_size=world, workers=cfg.run.reward_workers,
            timeout=cfg.run.reward_timeout, max_batch_tokens=cfg.rollout.max_batch_tokens,
            system_prompt=cfg.data.system_prompt, user_template=cfg.data.user_template,
            stop_at_im_end=cfg.rollout.stop_at_im_end, should_stop=should_stop,
            progress="eval" if rank == 0 else "", cache=cfg.rollout.cache)
    key = cfg.eval.group_key
    group = {p["id"]: p.get(key) for p in problems}
    rows = sorted(all_gather_list([{"id": r["id"], **({key: group[r["id"]]} if group[r["id"]] is not None else {}),
                                    "scores": r["scores"], "unscored": r["unscored"]} for r in records]),
                  key=lambda r: r["id"])
    metrics = {"eval/acc": scored_mean(rows),
               "eval/unscored": sum(len(r["unscored"]) for r in rows)}
    for value in sorted({r[key] for r in rows if key in r}, key=str):
        name = re.sub(r"\W+", "_", f"{key}_{value}")  # "Level 5" -> level_Level_5
        metrics[f"eval/acc/{name}"] = scored_mean([r for r in rows if r.get(key) == value])
    return metrics, rows


def scored_mean(rows: list[dict]) -> float:
    """The mean score over the scored samples of per-problem rows (0 when none)."""
    scores = [s for r in rows for b, s in enumerate(r["scores"]) if b not in r["unscored"]]
    return float(np.mean(scores)) if scores else 0.0


# ----------------------------------------------------------------------------------------------
# Main: Algorithm 1


def main(argv=None):
    """A run (run_training), with sdpa kept off cuDNN's attention throughout (rollout.attention_backends):
    generation, the log-prob passes, the update with its backward and checkpointed recomputation, and Eq. 21's
    gradients all vary in shape from call to call, where cuDNN would build a plan for each new shape."""
    with rollout.attention_backends():
        return run_training(argv)


def run_training(argv=None):
    argv, t_start = sys.argv[1:] if argv is None else argv, time.time()
    if "--help" in argv or "-h" in argv:
        print(usage(__doc__))
        return None
    cfg = load_config(argv)
    validate_config(cfg)
    check_out_dir(cfg)
    rank, world, device = setup_distributed(cfg.run.dist_timeout_minutes)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.run.seed)
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    print0(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    if rank == 0:
        with open(os.path.join(cfg.run.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict(cfg), f, sort_keys=False)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    subsets, skipped = load_subsets(cfg, tokenizer)  # the T subsets of Algorithm 1
    print0(f"data: {sum(map(len, subsets))} prompts in {len(subsets)} subsets; skipped: {skipped['too_long']} "
           f"longer than data.max_prompt_len, {skipped['no_answer']} solutions without a \\boxed{{}} answer")
    eval_problems = []
    if cfg.eval.data:
        eval_problems = evaluation.load_benchmark(cfg.eval.data, keep=[cfg.eval.group_key] if cfg.eval.group_key
                                                  else [])[0][:cfg.eval.max_problems or None]
    policy, ref, gen = build_models(cfg, device, world)
    optimizer, scheduler = make_optimizer(policy, cfg)
    saved_ref = ref if cfg.train.restart_each_subset else None  # the reference moves: checkpoint it
    cur = cures.Curriculum(1, cfg.cures.prior_alpha, cfg.cures.prior_beta, cfg.cures.tau, cfg.cures.sampling,
                           cfg.cures.allocation, cfg.cures.sigma, cfg.cures.n_min, cfg.cures.n_max or None)
    M, T = cfg.train.steps_per_subset, len(subsets)
    total_steps = min(T * M, cfg.run.max_steps or T * M)
    t_load = time.monotonic()
    state = resume_state(cfg, policy, optimizer, scheduler, cur, saved_ref)
    t_load = time.monotonic() - t_load if state["step"] > 0 or state["subset"] >= 0 else None
    if 0 <= state["subset"] < T and len(cur.alpha) != len(subsets[state["subset"]]):
        raise ValueError(f"cannot resume: the checkpoint's curriculum covers {len(cur.alpha)} prompts, subset "
                         f"{state['subset']} now has {len(subsets[state['subset']])}: the data or its filtering changed")
    logger = Logger(cfg, rank, state["step"])
    stop = {"requested": False}  # and once asked: "at", when (monotonic); "save_s": how long the last save took
    if t_load is not None:  # resumed: until this process saves, a save is taken to cost what the load did
        stop["save_s"] = t_load

    def request_stop(*_):  # save a checkpoint at the next safe point, then exit
        stop.update(requested=True, at=stop.get("at", time.monotonic()))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)

    def evaluate(metrics: dict, step: int, stop=None):  # held-out accuracy of the policy after `step` steps
        check_stop(stop)  # a stop already asked for: no weight sync first (the resumed run evaluates)
        with timed(metrics, "time/eval"):
            sync_generation_weights(policy, gen)
            got, rows = run_eval(gen, tokenizer, eval_problems, cfg, rank, world,
                                 stream_seed(cfg.run.seed, "eval", 0, step), stop)
            metrics.update(got)
            if rank == 0:  # every problem's scores: eval/step_<step>.jsonl
                write_eval_scores(cfg.run.out_dir, step, rows)

    if state["step"] == 0:
        first = {"data/prompts": sum(map(len, subsets)), "data/skipped_too_long": skipped["too_long"],
                 "data/skipped_no_answer": skipped["no_answer"], "time/startup": time.time() - t_start}  # load, shard
        if eval_problems:
            evaluate(first, 0)  # not interrupted: no step yet
        logger.log(first, 0)
    elif state["pending_eval"] == state["step"] and eval_problems:  # a stop ended the evaluation of this step:
        redone = {}  # done now, logged as a second row of the step (its training row was logged before the stop)
        evaluate(redone, state["step"])
        logger.log(redone, state["step"])
    state["pending_eval"] = -1
    # the Beta estimates steer sampling (Eq. 14) or allocation (Eq. 20-21); GRPO (uniform/uniform) never reads them
    estimates_used = cfg.cures.sampling == "cures" or cfg.cures.allocation == "cures"
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0, desc="steps")
    stopped, abandoned, last_save = False, False, time.time()

    def save():
        t = time.monotonic()
        save_checkpoint(policy, optimizer, cur, {**state, "scheduler": scheduler.state_dict()}, cfg, rank, saved_ref)
        stop["save_s"] = time.monotonic() - t

    for subset_id in range(state["step"] // M, T):  # Algorithm 1: one data subset at a time
        if state["step"] >= total_steps or stopped:
            break
        subset = subsets[subset_id]
        before = cur.state_dict()  # what a stop restores: nothing of an unfinished cold start or step is kept
        try:
            if state["subset"] != subset_id:  # a new subset (a run resumed inside one goes straight to its steps)
                if cfg.train.restart_each_subset:  # as released: a fresh trainer from the previous subset's weights
                    optimizer, scheduler = make_optimizer(policy, cfg)  # (a stop before its first step saves it
                    reanchor_reference(policy, ref)                      # fresh; a resume makes the same again)
                cur.reset(len(subset))  # forget the previous subset's estimates (no decay, a reset)
                if estimates_used and cfg.cures.cold_start_rollouts > 0:  # cold start: N' rollouts of every prompt
                    sync_generation_weights(policy, gen)
                    state["cold"] = cold_start(cur, subset, gen, tokenizer, cfg, rank, world,
                                               stream_seed(cfg.run.seed, "cold_start", subset_id, state["step"]),
                                               stop)
                    state["rollouts_cold"] += state["cold"]["cold/rollouts"]
                state["subset"] = subset_id

            while state["step"] < min((subset_id + 1) * M, total_steps):  # M steps on the subset
                before = cur.state_dict()
                metrics = state["cold"] | train_step(subset, subset_id, cur, policy, ref, gen, tokenizer, optimizer,
                                                     scheduler, state, cfg, rank, world, device, stop)
                state["step"], state["cold"] = state["step"] + 1, {}  # the cold start's metrics: in this row
                before = None  # the step is finished: a stop from here on keeps it

                # --- log, eval, checkpoint -----------------------------------------------------------
                last = state["step"] == total_steps
                try:
                    if eval_problems and ((cfg.eval.every and state["step"] % cfg.eval.every == 0) or last):
                        state["pending_eval"] = state["step"]  # a stop inside it: the resumed run evaluates first
                        evaluate(metrics, state["step"], stop)
                        state["pending_eval"] = -1
                finally:  # an interrupted evaluation still logs its finished step
                    log_step(logger, bar, metrics, state["step"])
                due = rank == 0 and 0 < 60 * cfg.run.save_every_minutes < time.time() - last_save  # rank 0's clock
                flags = all_reduce(torch.tensor([float(stop["requested"]), float(due)]))  # the same on every rank
                stopped, due = flags[0].item() > 0, flags[1].item() > 0
                if last or stopped or due or (cfg.run.save_every and state["step"] % cfg.run.save_every == 0):
                    save()
                    last_save = time.time()
                if stopped:
                    break
        except StopRequested:  # in a cold start, a step before its first optimiser step, or an evaluation: the
            stopped = True     # last finished step saved
            if before is not None:  # an unfinished cold start or step: its posterior updates are undone
                cur.load_state_dict(before)
            optimizer.zero_grad(set_to_none=True)  # a dropped update's first micro-batches
            save()
        except StopAbandoned as e:  # inside an update that would not end and save in time (UpdateStop)
            stopped, abandoned = True, True
            print0(f"stop requested (SIGTERM or Ctrl-C) inside the update of step {state['step'] + 1}: {e}; a "
                   f"resume starts from the last checkpoint")
        if stopped and not abandoned:
            print0(f"stop requested (SIGTERM or Ctrl-C): checkpoint saved at step {state['step']} (the save took "
                   f"{stop['save_s']:.1f} s), exiting")
    bar.close()
    logger.close()
    if state["step"] > 0 and (state["step"] == T * M or (cfg.run.max_steps and state["step"] >= cfg.run.max_steps)):
        save_hf(policy, tokenizer, os.path.join(cfg.run.out_dir, "final"), rank, cfg)
        print0(f"done: {cfg.run.out_dir}/final (Hugging Face model), metrics.jsonl, config.yaml, checkpoints/")
    if dist.is_initialized():
        dist.destroy_process_group()
    return state, cur


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:  # a process group was set up (torchrun, or plain python on a GPU)
        leave()
