"""Rollout long tails: how much of the decoding does useful work with rollout.cache=dynamic vs paged.

    python bench/long_tail.py                 # configs/1.5b.yaml's shapes, on an H100's memory bandwidth

A `generate` batch with HF's dynamic cache runs until its longest response ends: a finished row keeps its
slot (and its KV cache is still read) until then. With cache=paged (continuous batching) a finished row leaves
at once and a waiting one takes its place. This simulates one rank's rollouts of one step, decode step by
decode step, under both policies and prints the fraction of decode slots that produce a real token and the
tokens/s that implies at the decode bound (each step reads the bf16 weights once plus the KV cache of every
row in the batch, at the card's memory bandwidth; compute is not the limit at these batch sizes).

Response lengths (Qwen2.5-Math-1.5B sampling at temperature 1 on NuminaMath; no length histogram is published
for the paper's runs): lognormal with median 600 tokens and sigma 0.7, plus a share of runaway responses that
hit the 3,072-token limit (a base model at temperature 1 sometimes loops). The share is swept, 0-10%.
Prompt lengths: lognormal, median 150 tokens (NuminaMath problems in the chat template), at most 1,024.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402
from infra.config import load_config  # noqa: E402


def lengths(n: int, rng, median: float, sigma: float, runaway: float, limit: int) -> np.ndarray:
    x = np.minimum(np.exp(rng.normal(np.log(median), sigma, n)), limit).astype(int)
    x[rng.random(n) < runaway] = limit
    return np.maximum(x, 1)


def simulate_dynamic(prompt, resp, batches, weight_bytes: float, kv_bytes: float, bw: float):
    """Each batch decodes max(resp) steps with all its rows; the KV read grows with the step for every row."""
    steps = slots = 0
    seconds = 0.0
    for b in batches:
        T, P = int(resp[b].max()), int(prompt[b].max())  # rows are left-padded to the batch's longest prompt
        kv_read = len(b) * (P * T + T * (T - 1) // 2)  # tokens of KV read over the batch's decode steps
        seconds += (T * weight_bytes + kv_read * kv_bytes) / bw
        steps += T
        slots += T * len(b)
    return {"decode_steps": steps, "slots": slots, "seconds": seconds}


def simulate_paged(prompt, resp, max_batch_tokens: int, max_batch_size: int, weight_bytes: float, kv_bytes: float,
                   bw: float):
    """Continuous batching: rows join while their prompt plus the running rows' current KV fit the budget
    (pages are taken as tokens are written, as in transformers' paged cache); a finished row leaves at once."""
    order, nxt = list(range(len(resp))), 0
    active_p, active_done, active_len = [], [], []  # prompt, generated, target length of each running row
    steps = slots = 0
    seconds = 0.0
    while nxt < len(order) or active_len:
        used = sum(p + g for p, g in zip(active_p, active_done))
        while nxt < len(order) and len(active_len) < max_batch_size and used + prompt[order[nxt]] + 1 <= max_batch_tokens:
            i = order[nxt]
            active_p.append(int(prompt[i])), active_done.append(0), active_len.append(int(resp[i]))
            used += prompt[i]
            nxt += 1
        p, g, n = np.array(active_p), np.array(active_done), np.array(active_len)
        seconds += (weight_bytes + (p + g).sum() * kv_bytes) / bw
        steps += 1
        slots += len(n)
        g += 1
        keep = g < n
        active_p, active_done, active_len = p[keep].tolist(), g[keep].tolist(), n[keep].tolist()
    return {"decode_steps": steps, "slots": slots, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "1.5b.yaml"))
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--median", type=float, default=600)
    ap.add_argument("--sigma", type=float, default=0.7)
    ap.add_argument("--runaway", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.10])
    ap.add_argument("--params", type=float, default=1.54e9)
    ap.add_argument("--kv-bytes", type=float, default=28 * 1024, help="KV cache bytes per token (bench/memory.py)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cfg = load_config(["--config", args.config])
    N, limit = cfg.rollout.rollouts_per_step // args.ranks, cfg.rollout.max_new_tokens
    print(f"{args.config}: {N} rollouts per rank per step, max_new_tokens {limit}, max_batch_tokens "
          f"{cfg.rollout.max_batch_tokens:,}, max_batch_size {cfg.rollout.max_batch_size}; lengths lognormal(median "
          f"{args.median:.0f}, sigma {args.sigma}) + runaway share at {limit}; decode bound at "
          f"{args.bandwidth / 1e12:.2f} TB/s, {args.params / 1e9:.2f}B bf16 parameters, {args.kv_bytes / 1024:.0f} KiB KV/token")
    print("runaway | mean length | dynamic: useful slots, tokens/s, s/step | paged: useful slots, tokens/s, s/step | paged/dynamic")
    out = []
    for runaway in args.runaway:
        res = {"dynamic": [], "paged": []}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            resp = lengths(N, rng, args.median, args.sigma, runaway, limit)
            prompt = np.minimum(np.exp(rng.normal(np.log(150), 0.5, N)), 1024).astype(int)
            useful = int(resp.sum())
            # rows reserve prompt + max_new_tokens of the KV budget each (what rollout.generate plans)
            batches = rollout.plan_batches(list(prompt), limit, cfg.rollout.max_batch_tokens, cfg.rollout.max_batch_size)
            for name, r in (("dynamic", simulate_dynamic(prompt, resp, batches, 2 * args.params, args.kv_bytes, args.bandwidth)),
                            ("paged", simulate_paged(prompt, resp, cfg.rollout.max_batch_tokens, cfg.rollout.max_batch_size,
                                                     2 * args.params, args.kv_bytes, args.bandwidth))):
                res[name].append((useful / r["slots"], useful / r["seconds"], r["seconds"], resp.mean()))
        d, p = (np.mean(res[k], 0) for k in ("dynamic", "paged"))
        print(f"{runaway:.0%} | {d[3]:.0f} | {d[0]:.1%}, {d[1]:,.0f}, {d[2]:.1f} | {p[0]:.1%}, {p[1]:,.0f}, {p[2]:.1f} "
              f"| {p[1] / d[1]:.2f}x")
        out.append({"runaway": runaway, "mean_len": d[3], "dynamic": {"useful": d[0], "tokens_per_s": d[1], "s": d[2]},
                    "paged": {"useful": p[0], "tokens_per_s": p[1], "s": p[2]}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
