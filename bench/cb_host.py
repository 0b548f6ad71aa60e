"""Host time of a continuous-batching decoding step outside the model's forward (issue 28: the paged path's unknown).

    python bench/cb_host.py            # results in bench/results/cb_host.md

With CUDA graphs a decoding step's forward is one graph replay; what is left on the host is transformers'
continuous batching itself: its scheduler, the step's inputs (cumulative lengths, read and write indices into the
paged cache), sampling and the bookkeeping of each request's tokens, in Python, every step. bench/phase_cost.py
charges it as `--graph-host-ms` (1 ms assumed until now); this measures it through rollout.generate(cache="paged")
on the CPU: a narrow Qwen2 at 1 and 2 layers (attention a one-op stand-in, so that a layer costs little), B requests
of P prompt tokens decoding T tokens each (EOS never sampled), all in the cache at once; per step = (time at T2 -
time at T1) / (T2 - T1); the forward's share is removed by extrapolating to zero layers (2 x the 1-layer step - the
2-layer step). Without flash-attn's block-table kernel (torch's kernel, or sdpa) every step takes transformers'
varlen path, whose inputs list every cached token's place in the paged cache (read indices, built in Python and
turned into a tensor each step): hence a term per token in the cache. A least-squares fit over (batch, tokens in
the cache), a + b x batch + c x tokens, is what phase_cost.py charges (--cb-host-ms, --cb-host-us-per-row,
--cb-host-ns-per-token; the block-table decoding steps of flash-attn pay no c). The embedding, final norm, lm_head
and sampling stay in the figure (on a GPU they run inside or beside the graph): a slight overestimate.
"""

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import rollout  # noqa: E402
from decode_cost import narrow_model  # noqa: E402


def seconds(model, batch: int, prompt: int, new: int, vocab: int) -> float:
    """Wall seconds of one paged rollout.generate call of `batch` requests x `new` tokens (best of three)."""
    prompts = [[1 + (i * 7 + j) % 50 for j in range(prompt)] for i in range(batch)]
    budget = batch * (-(-(prompt + new) // 256) + 1) * 256
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = rollout.generate(model, prompts, 1, max_new_tokens=new, eos_ids=[vocab + 7], pad_id=0, seed=0,
                               cache="paged", max_batch_tokens=budget, max_batch_size=batch)
        best = min(best, time.perf_counter() - t0)
        assert int(out.lengths.min()) == new
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", default="64:8,128:8,256:8,512:8,1024:8,64:1024,128:1024,256:1024,64:3072",
                    help="batch:prompt tokens,... (all requests in the cache at once)")
    ap.add_argument("--steps", default="8,136", help="T1,T2: tokens per request of the two timed calls")
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    t1, t2 = map(int, args.steps.split(","))
    real = rollout.varlen_attention
    rollout.varlen_attention = lambda q, *a, **k: q.clone()  # a layer's attention: one op (the forward is replayed)
    try:
        models = {n: narrow_model(n, 12, 2, 4, args.vocab, 96) for n in (1, 2)}
        print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores (one thread), torch {torch.__version__}, "
              f"transformers {transformers.__version__}; narrow Qwen2 (12/2 heads of 4, vocab {args.vocab}), "
              f"{t1} and {t2} tokens a request, all requests in the cache at once\n")
        print("| batch | prompt | tokens in the cache (mean) | a step, 1 layer | a step, 2 layers | "
              "outside the forward (0 layers) |")
        print("|---|---|---|---|---|---|")
        rows = []
        for spec in args.measure.split(","):
            batch, prompt = map(int, spec.split(":"))
            step = {n: (seconds(m, batch, prompt, t2, args.vocab) - seconds(m, batch, prompt, t1, args.vocab))
                    / (t2 - t1) * 1000 for n, m in models.items()}
            host = 2 * step[1] - step[2]
            cached = batch * (prompt + (t1 + t2) / 2)
            rows.append((batch, cached, host))
            print(f"| {batch} | {prompt:,} | {cached:,.0f} | {step[1]:.2f} ms | {step[2]:.2f} ms | {host:.2f} ms |")
        X = np.array([[1.0, r[0], r[1]] for r in rows])
        a, b, c = np.linalg.lstsq(X, np.array([r[2] for r in rows]), rcond=None)[0]
        print(f"\nleast squares, outside the forward, a step: {a:.2f} ms + {1000 * b:.1f} us a request + "
              f"{1e6 * c:.1f} ns a token in the cache")
    finally:
        rollout.varlen_attention = real


if __name__ == "__main__":
    main()
