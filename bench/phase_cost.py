"""A whole rollout phase of one rank, predicted per generation path (issue 28, items 1 and 3: the cost model).

One rank's rollouts of a `configs/1.5b.yaml` step (1,024 responses, lengths as bench/long_tail.py draws them) are
decoded step by step under each path's batching, and each decoding step is charged its host time plus its device
time (bytes / bandwidth): every path waits for the device once a step (the stopping check), and on the H200
(2026-11-29, six shapes of the eager dynamic path) the sum was within -11..+25 % of the measured step (mean 14 %),
the larger of the two 7-49 % short (mean 26 %); `--overlap` charges the larger everywhere:

- host: eager decoding launches one kernel per non-view aten op, `kernels` a step as bench/decode_cost.py counts
  them through rollout.generate (1,205 with transformers' sdpa on 5.17, 1,149 with rollout's sdpa_gqa attention),
  at `--host-us` each: 18.4 us by default, measured on an H200 machine (2026-11-29, bench/results/gpu: the
  narrow model's eager step, 22.2 ms for 1,202 kernels; the real width at batch 128 implies at most 23 us). The
  55 us that train.py's decoding implied (86 ms a step, 2026-11-28) included, we predict, a cuDNN attention plan
  built at every step, which rollout no longer allows (rollout.attention_backends). Continuous batching adds its
  own host work every step, eager or graphed: its scheduler, the step's inputs and each request's bookkeeping, in
  Python, `--cb-host-ms` + `--cb-host-us-per-row` x the step's rows, plus, on steps that take its varlen path
  (every step without flash-attn's block table; with it, the steps that admit requests), `--cb-host-ns-per-token`
  x the tokens in the cache (the read indices it lists); measured on this CPU through rollout.generate by
  bench/cb_host.py: 1.2 ms + 19 us a request + 105 ns a cached token, transformers 5.24 and 5.17. With CUDA graphs
  transformers prepares the next batch while the device runs this one (its "async batching"), which would make a
  graphed paged step max(host, device); on the H200 (2026-11-30, torch's kernel, bench/decode_cost.py --cache
  paged) it was 30.3 ms at batch 128, context 1,024 (max 17.4, sum 31.7 ms here) and 94.0 ms at 512 (max 66.0, sum
  121.4 ms): partial overlap (about a tenth of the smaller term hidden at 128, half at 512), so every step is
  charged host + device (pessimistic) and the fully overlapped figure is printed beside it: the phase lies between
  the two. A graphed paged call also captures a CUDA graph per padded shape it meets (CAPTURE_S each, counted over
  the schedule's distinct (query tokens, KV read) buckets).
- device: the bf16 weights once, plus per token in the KV cache: the read (1x its bytes; 18x with `repeat_kv`,
  which copies the cache 6 heads wide and reads the copy), transformers' DynamicLayer's concatenation (read and
  rewritten every step: +2x; rollout's PreallocatedLayer writes the new token in place). Continuous batching with flash-attn's paged kernel
  reads the cache in place through the block table; without flash-attn (rollout.paged_varlen_attention, torch's
  flash kernel), transformers first gathers each sequence's keys and values out of the paged cache (a read and a
  write of them), and the kernel, given padded queries under CUDA graphs, reads each KV head once per query head
  (6 for 12 on 2): 8x predicted, 17.5x measured (bench/varlen_check.py on the H200, 2026-11-30).

Batching: `dynamic` decodes rollout.plan_batches' batches until their longest response ends (finished
rows keep their slot); `paged` is continuous batching (a finished row leaves, a waiting one joins).
The decode bound is the paged calls' device time under an ideal scheduler (single tokens, no margin), with a single
read of the cache and no host time.

    python bench/phase_cost.py        # configs/1.5b.yaml on one H100 (3.35 TB/s); results in bench/results/phase_cost.md
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the root: bench/rollout.py is a script
import rollout  # noqa: E402
from infra.config import load_config  # noqa: E402
from long_tail import lengths  # noqa: E402

# (batching, cache layout, KV read multiplier, host: eager kernels a step, or "graph" for a CUDA-graphed step).
# Continuous batching's layouts: "block table" (flash-attn's kernel reads the paged cache in place; its decoding
# steps skip the varlen inputs) or "gathered" (transformers' varlen path every step: each sequence's keys copied out
# of the paged cache, a read and a write, then read by torch's flash kernel once per query head, 6 for 12 query
# heads on 2 KV heads, since under CUDA graphs transformers pads the queries and the kernel cannot fold a KV head's
# query heads into one pass: 2 + 6 = 8x predicted; bench/varlen_check.py measured 16.7-18.3x on an H200,
# 2026-11-30: padded kernel 4.5-5.7x its max_q = 1 time, gather 6x the bytes' time; TORCH_KERNEL_KV_MULT).
PATHS = {
    "dynamic (DynamicLayer: concatenated), sdpa (5.17: repeat_kv), eager": ("padded", "concatenated", 18.0, 1205),
    "dynamic (DynamicLayer: concatenated), sdpa_gqa, eager": ("padded", "concatenated", 1.0, 1149),
    "dynamic (PreallocatedLayer), sdpa_gqa, eager (rollout.generate today)": ("padded", "preallocated", 1.0, 1149),
    "paged, flash-attn (block table), eager": ("paged", "block table", 1.0, 1149),
    "paged, flash-attn (block table), CUDA graphs": ("paged", "block table", 1.0, "graph"),
    "paged, torch's flash kernel (keys gathered), CUDA graphs": ("paged", "gathered", "torch kernel", "graph"),
    "slots (our decode loop), torch's flash kernel (seqused_k), CUDA graphs": ("slots", "slots", 1.0, "graph"),
}
# the decode loop (rollout.cache=slots): a captured step's kernels still run one after another on the device, with a
# gap each (an assumption until a GPU measures it: 1.5 us a kernel, 1,180 kernels a step: the eager dynamic step's
# 1,149 plus sampling's), and every SLOT_CHECK_EVERY steps the host looks (a sync, retiring and refilling slots:
# SLOT_CHECK_MS assumed); each batch shape's first step runs eagerly (its kernels at --host-us) and is captured
GRAPH_KERNEL_US, SLOT_KERNELS, SLOT_CHECK_MS = 1.5, 1180, 1.0
TORCH_KERNEL_KV_MULT = 17.5  # (padded kernel + gather) / K and V bytes, bench/varlen_check.py on an H200 (2026-11-30)
# (a time ratio against the bytes at the H200's 4.8 TB/s, charged here as bytes at --bandwidth: right if the padded
# kernel is bandwidth-bound; its padded rows are computed, so on a GPU of lower bandwidth and equal compute, as the
# H100, this overcharges it by up to 4.8 / 3.35 = 1.4x)
# transformers' continuous batching captures a CUDA graph per padded (query tokens, KV read) shape it meets in a
# generate_batch call, queries padded to 64 tokens and KV to 16,384 (5.17's intervals); each capture took 29-47 ms
# on the H200 (bench/decode_cost.py, 2026-11-30: 11-36 a call, 0.33-1.32 s)
CAPTURE_S, Q_INTERVAL, KV_INTERVAL = 0.037, 64, 16384
# transformers' continuous batching allocates its cache in pages (rollout.paged_cache_config: 256 tokens) and its
# FIFO scheduler admits no new request while less than 15 % of the pages are free
PAGE, SAFETY_MARGIN = 256, 0.15


CB_HOST_MS, CB_HOST_US_PER_ROW, CB_HOST_NS_PER_TOKEN = 1.2, 19.0, 105.0  # bench/cb_host.py, both versions (cb_host.md)


def cb_host_s(rows, cached, varlen, cb_host_ms: float = CB_HOST_MS, cb_host_us_per_row: float = CB_HOST_US_PER_ROW,
              cb_host_ns_per_token: float = CB_HOST_NS_PER_TOKEN):
    """Continuous batching's own host seconds a step (bench/cb_host.py): a fixed part, a part per request, and on
    steps that take its varlen path (`varlen`), a part per token in the cache."""
    return (cb_host_ms + cb_host_us_per_row * 1e-3 * rows + cb_host_ns_per_token * 1e-6 * cached * varlen) * 1e-3


def padded_steps(prompt, resp, batches, limit: int):
    """Per decoding step of batches decoded to their longest response: (rows, tokens in the cache)."""
    rows, cached = [], []
    for b in batches:
        T, P = int(resp[b].max()), int(prompt[b].max())  # left-padded to the batch's longest prompt
        t = np.arange(T)
        rows.append(np.full(T, len(b)))
        cached.append(len(b) * (P + t))
    return np.concatenate(rows), np.concatenate(cached)


def paged_steps(prompt, resp, max_batch_tokens: int, max_batch_size: int, page: int = 1, margin: float = 0.0,
                forward_tokens: int | None = None):
    """Per decoding step of continuous batching (rows join while their prompt and the running rows' KV fit the
    budget; a finished row leaves at once): (rows, tokens in the cache, rows that joined, query tokens of the
    forward). With the defaults, as bench/long_tail.py's simulate_paged (tokens, no margin). transformers' scheduler
    (phase_seconds passes its values): the cache in pages of `page` tokens (a row holds whole pages), no row joins
    while less than `margin` of the pages are free (its FIFO scheduler's safety margin) unless none runs, and a
    forward holds at most `forward_tokens` query tokens (a prompt that does not fit waits for the next step; the
    real scheduler splits it). Rows that outgrow the cache are not paused here (transformers offloads them); a
    request that does not fit stops the admissions of the step (transformers tries the shorter ones after it); a
    row's pages are freed at once (asynchronous batching on a GPU frees them a step later)."""
    nxt, p, g, n = 0, np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    rows, cached, joined, q = [], [], [], []
    cap = max_batch_tokens // page
    while nxt < len(resp) or len(n):
        used = int((-(-(p + g) // page)).sum())  # pages the running rows hold (page 1: tokens)
        join, tokens = [], len(n)
        if cap - used >= margin * cap or not len(n):
            while nxt < len(resp) and len(n) + len(join) < max_batch_size and \
                    used + -(-(prompt[nxt] + (page == 1)) // page) <= cap and \
                    (forward_tokens is None or not join or tokens + prompt[nxt] <= forward_tokens):
                join.append(nxt)
                used += -(-int(prompt[nxt]) // page)
                tokens += int(prompt[nxt])
                nxt += 1
        p, g, n = np.concatenate([p, prompt[join]]), np.concatenate([g, np.zeros(len(join), int)]), \
            np.concatenate([n, resp[join]])
        rows.append(len(n))
        cached.append(int((p + g).sum()))
        joined.append(len(join))
        q.append(len(n) - len(join) + int(prompt[join].sum()))  # a token a running row + the joiners' prompts
        g = g + 1
        keep = g < n
        p, g, n = p[keep], g[keep], n[keep]
    return np.array(rows), np.array(cached), np.array(joined), np.array(q)


def slots_steps(prompt, resp, limit: int, max_batch_tokens: int, max_batch_size: int, check: int = 0):
    """The decode loop's schedule (rollout._generate_slots), row for row: as many slots as the KV budget holds at
    the longest prompt + limit; every `check` steps (default SLOT_CHECK_EVERY, as graphed; eager: 1) finished rows
    retire and waiting rows (in order) take the free slots, lowest first, prefilled in forwards of up to SLOT_PREFILL_TOKENS prompt tokens (their first
    token sampled there); with none waiting and at most half the step's slots held, the rows move to the first
    slots and the step runs on the smallest power of two that holds them. Rollout i ends after resp[i] tokens (its
    EOS included). Returns (rows computed a step, tokens read a step: a live row's cache and new token, one key a
    finished row, live rows a step), the prefill forwards and the batch shapes stepped. Each rollout is its own
    prompt here (as phase_cost and phase_check draw them; the loop prefills a prompt once for all its rows)."""
    B, width = len(resp), int(prompt.max()) + limit
    S = max(1, min(B, max_batch_size, max_batch_tokens // width))
    row, length, count, live = np.full(S, -1), np.zeros(S, int), np.zeros(S, int), np.zeros(S, bool)
    waiting, n, prefills = list(range(B))[::-1], S, 0
    rows, read, alive = [], [], []
    while True:
        row[:n][(row[:n] >= 0) & ~live[:n]] = -1  # retire
        free = np.flatnonzero(row[:n] < 0)
        if waiting and len(free):
            admit = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
            total = 0
            for r in admit:  # _admit's packing of the distinct prompts into forwards
                if total and total + prompt[r] > rollout.SLOT_PREFILL_TOKENS:
                    prefills, total = prefills + 1, 0
                total += int(prompt[r])
            prefills += 1
            s = free[:len(admit)]
            row[s], length[s], count[s] = admit, prompt[admit], 1
            live[s] = (resp[admit] > 1) & (limit > 1)
            continue
        held = np.flatnonzero(row[:n] >= 0)
        if not len(held):
            break
        if not waiting and len(held) <= n // 2:  # the tail: compacted onto fewer slots
            n = 1 << (len(held) - 1).bit_length()
            src, dst = held[held >= n], np.flatnonzero(row[:n] < 0)
            dst = dst[:len(src)]
            for t in (row, length, count, live):
                t[dst] = t[src]
            row[src], live[src] = -1, False
        for _ in range(check or rollout.SLOT_CHECK_EVERY):
            lv = live[:n]
            rows.append(n)
            read.append(int(np.where(lv, length[:n] + 1, 1).sum()))
            alive.append(int(lv.sum()))
            length[:n] += lv
            count[:n] += lv
            live[:n] = lv & (count[:n] < np.where(row[:n] >= 0, resp[np.maximum(row[:n], 0)], 0)) & (count[:n] < limit)
    return np.array(rows), np.array(read), np.array(alive), prefills, sorted(set(rows))


def paged_schedule(prompt, resp, limit: int, max_batch_tokens: int, max_batch_size: int, ideal: bool = False):
    """Continuous batching as rollout.generate runs it: rollout.plan_batches' chunks of PAGED_CHUNK KV budgets (and
    at most PAGED_CHUNK x max_batch_size rows), one generate_batch call each, one after the other; inside a call
    transformers' scheduler (paged_steps with its page, safety margin and forward size; at most 1,024 rows a
    forward), or with `ideal` a scheduler of single tokens, no margin and no forward size. The cache and forward
    sizes of a call as rollout.paged_cache_config sets them. Returns paged_steps' four arrays over all the calls and
    a fifth, each step's call."""
    parts = []
    for i, c in enumerate(rollout.plan_batches(list(prompt), limit, rollout.PAGED_CHUNK * max_batch_tokens,
                                               rollout.PAGED_CHUNK * max_batch_size)):
        if ideal:
            part = paged_steps(prompt[c], resp[c], max_batch_tokens, min(len(c), 1024))
        else:  # the call's cache (pages) and forward size as rollout sets them
            cb = rollout.paged_cache_config(prompt[c].tolist(), limit, max_batch_tokens, PAGE)
            part = paged_steps(prompt[c], resp[c], cb.num_blocks * PAGE, min(len(c), 1024, cb.max_batch_tokens), PAGE,
                               SAFETY_MARGIN, cb.max_batch_tokens)
        parts.append(part + (np.full(len(part[0]), i),))
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(5))


def phase_seconds(path, prompt, resp, cfg, weight_bytes: float, kv_bytes: float, bandwidth: float,
                  host_us: float, overlap: bool = False, cb_host_ms: float = CB_HOST_MS,
                  cb_host_us_per_row: float = CB_HOST_US_PER_ROW, cb_host_ns_per_token: float = CB_HOST_NS_PER_TOKEN,
                  slot_check: int = 0) -> dict:
    """Predicted seconds of one rank's decoding (prefill not included), host-bound steps, decode steps."""
    batching, cache, kv_mult, kernels = PATHS[path]
    limit = cfg.rollout.max_new_tokens
    graphed = kernels == "graph"
    launches = 0.0 if graphed else kernels * host_us * 1e-6  # eager: a launch per kernel
    if batching == "slots":  # a graph replay a step: the kernels' gaps on the device; the host's looks between
        rows, read, alive, prefills, shapes = slots_steps(prompt, resp, limit, cfg.rollout.max_batch_tokens,
                                                          cfg.rollout.max_batch_size, slot_check)
        device = (weight_bytes + read * kv_bytes) / bandwidth + SLOT_KERNELS * GRAPH_KERNEL_US * 1e-6
        host = np.zeros(len(rows))
        host[::slot_check or rollout.SLOT_CHECK_EVERY] = SLOT_CHECK_MS * 1e-3
        step = device + host  # the host looks while the device waits (a sync)
        first = len(shapes) * (SLOT_KERNELS * host_us * 1e-6 + CAPTURE_S)  # each shape: an eager step, a capture
        return {"seconds": float(step.sum()) + first, "host_bound": 0.0, "steps": len(rows), "slots": int(rows.sum()),
                "captures": len(shapes), "overlapped": float(np.maximum(device, host).sum()) + first,
                "prefills": prefills}
    if batching == "padded":
        batches = rollout.plan_batches(list(prompt), limit, cfg.rollout.max_batch_tokens, cfg.rollout.max_batch_size)
        rows, cached = padded_steps(prompt, resp, batches, limit)
        read = cached
        host = np.full(len(rows), launches)
    else:  # continuous batching's own host work besides the launches (with graphs: instead of them)
        rows, cached, joined, q, call = paged_schedule(prompt, resp, limit, cfg.rollout.max_batch_tokens,
                                                       cfg.rollout.max_batch_size)
        read = cached
        varlen = np.ones(len(rows), bool) if cache == "gathered" else joined > 0  # steps that list every cached token
        host = cb_host_s(rows, cached, varlen, cb_host_ms, cb_host_us_per_row, cb_host_ns_per_token) + launches
    kv_mult = TORCH_KERNEL_KV_MULT if kv_mult == "torch kernel" else kv_mult
    device = (weight_bytes + read * kv_bytes * kv_mult + (2 * cached * kv_bytes if cache == "concatenated" else 0)) / bandwidth
    step = np.maximum(device, host) if overlap else device + host
    captures = 0
    if graphed and batching == "paged":  # a graph per padded shape a generate_batch call meets, anew in each call
        qb, kvb = -(-np.minimum(q, rollout.PAGED_FORWARD_TOKENS) // Q_INTERVAL), -(-cached // KV_INTERVAL)
        keys = set(zip(call[varlen], qb[varlen], kvb[varlen])) | set(zip(call[~varlen], qb[~varlen]))  # block
        captures = len(keys)  # table decoding keys on the batch alone
    return {"seconds": float(step.sum()) + captures * CAPTURE_S, "host_bound": float((host > device).mean()),
            "steps": len(rows), "slots": int(rows.sum()), "captures": captures,
            "overlapped": float(np.maximum(device, host).sum()) + captures * CAPTURE_S}


def decode_bound(prompt, resp, cfg, weight_bytes, kv_bytes, bandwidth) -> float:
    """The device time of the paged path's calls under an ideal scheduler, reading the cache once."""
    rows, cached, _, _, _ = paged_schedule(prompt, resp, cfg.rollout.max_new_tokens, cfg.rollout.max_batch_tokens,
                                           cfg.rollout.max_batch_size, ideal=True)
    return float(((weight_bytes + cached * kv_bytes) / bandwidth).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "1.5b.yaml"))
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--runaway", type=float, default=0.02, help="share of responses that hit max_new_tokens")
    ap.add_argument("--params", type=float, default=1.54e9)
    ap.add_argument("--kv-bytes", type=float, default=28 * 1024, help="KV cache bytes per token (bench/memory.py)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3)")
    ap.add_argument("--host-us", type=float, default=18.4, help="host time per eager kernel on the GPU machine")
    ap.add_argument("--cb-host-ms", type=float, default=CB_HOST_MS, help="continuous batching's host time a step, "
                    "fixed part (bench/cb_host.py)")
    ap.add_argument("--cb-host-us-per-row", type=float, default=CB_HOST_US_PER_ROW, help="continuous batching's "
                    "host time a step, per request in the step (bench/cb_host.py)")
    ap.add_argument("--cb-host-ns-per-token", type=float, default=CB_HOST_NS_PER_TOKEN, help="continuous batching's "
                    "host time a step of its varlen path, per token in the cache (bench/cb_host.py)")
    ap.add_argument("--tflops", type=float, default=221e12, help="training FLOP/s per GPU: the reference log-probs "
                    "and the update of train.py's step on the H200 (2026-11-30, one rank, one mini-batch: 10P a "
                    "token, 22 %% of 989 TFLOP/s; 40 %% was assumed before)")
    ap.add_argument("--subset-prompts", type=int, default=10_000, help="prompts per curriculum subset (cold start)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--overlap", action="store_true", help="charge a step max(host, device), not their sum")
    args = ap.parse_args()
    cfg = load_config(["--config", args.config])
    n = cfg.rollout.rollouts_per_step // args.ranks
    limit, W = cfg.rollout.max_new_tokens, 2 * args.params
    print(f"{os.path.relpath(args.config, ROOT)}: {n} rollouts per rank, max_new_tokens {limit}, KV budget "
          f"{cfg.rollout.max_batch_tokens:,} tokens; lengths lognormal(median 600, sigma 0.7) + {args.runaway:.0%} at "
          f"{limit}; {args.params / 1e9:.2f}B bf16, {args.kv_bytes / 1024:.0f} KiB KV a token, "
          f"{args.bandwidth / 1e12:.2f} TB/s; host {args.host_us:.1f} us an eager kernel, continuous batching {args.cb_host_ms} ms + {args.cb_host_us_per_row} us a row "
          f"(+ {args.cb_host_ns_per_token} ns a cached token on varlen steps); a step "
          f"{'max(host, device)' if args.overlap else 'host + device'}; a CUDA graph capture {CAPTURE_S * 1e3:.0f} ms; "
          f"{args.seeds} seeds\n")
    res = {p: [] for p in PATHS}
    bounds, tokens = [], []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        resp = lengths(n, rng, 600, 0.7, args.runaway, limit)
        prompt = np.minimum(np.exp(rng.normal(np.log(150), 0.5, n)), 1024).astype(int)
        bounds.append(decode_bound(prompt, resp, cfg, W, args.kv_bytes, args.bandwidth))
        tokens.append(int(resp.sum()))
        for p in PATHS:
            res[p].append(phase_seconds(p, prompt, resp, cfg, W, args.kv_bytes, args.bandwidth, args.host_us,
                                        args.overlap, args.cb_host_ms, args.cb_host_us_per_row,
                                        args.cb_host_ns_per_token))
    bound, tok = float(np.mean(bounds)), float(np.mean(tokens))
    print("| path | decode steps | predicted phase | tokens/s | share of the decode bound | host-bound steps | "
          "graphs captured | host and device overlapped: phase, share |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in res.items():
        s, o = np.mean([x["seconds"] for x in r]), np.mean([x["overlapped"] for x in r])
        print(f"| {p} | {np.mean([x['steps'] for x in r]):,.0f} | {s:.1f} s | {tok / s:,.0f} | {bound / s:.1%} | "
              f"{np.mean([x['host_bound'] for x in r]):.0%} | {np.mean([x['captures'] for x in r]):.0f} | "
              f"{o:.1f} s, {bound / o:.1%} |")
    print(f"| decode bound (the paged calls under an ideal scheduler, device only) | | {bound:.1f} s | "
          f"{tok / bound:,.0f} | 100% | | | |")
    # a whole configs/1.5b.yaml step on `ranks` GPUs: the phase, the cold start spread over the subset's steps,
    # and the update: per token, old log-probs (2P; none for the first mini-batch of a one-epoch update) + reference
    # (2P when kl_coef > 0) + per epoch forward and backward (6P) + gradient checkpointing's recomputed forward (2P)
    mini_batches = max(1, cfg.rollout.prompts_per_step // max(1, cfg.train.mini_batch_prompts))
    old = 2 * (1 - 1 / mini_batches) if cfg.train.epochs == 1 else 2  # train.add_logprobs: none for the first one
    per_token = (old + (2 if cfg.train.kl_coef > 0 else 0)
                 + cfg.train.epochs * (6 + (2 if cfg.model.gradient_checkpointing else 0))) * args.params
    update = n * (150 + tok / n) * per_token / args.tflops
    cold_share = cfg.cures.cold_start_rollouts * args.subset_prompts / (cfg.train.steps_per_subset * cfg.rollout.rollouts_per_step)
    steps = cfg.data.num_subsets * cfg.train.steps_per_subset
    print(f"\nA step on {args.ranks} GPUs: the rank's phase, plus the cold start ({cfg.cures.cold_start_rollouts} x "
          f"{args.subset_prompts:,} prompts a subset over its {cfg.train.steps_per_subset} steps: "
          f"+{cold_share:.0%} rollouts), plus the update ({per_token / args.params:.1f}P FLOPs a token at "
          f"{args.tflops / 1e12:.0f} TFLOP/s: {update:.0f} s); Table 1's run is {steps} steps:\n")
    print("| path | step | GPU-hours for the run |\n|---|---|---|")
    for p, r in res.items():
        step = np.mean([x["seconds"] for x in r]) * (1 + cold_share) + update
        print(f"| {p} | {step:.0f} s | {step * steps * args.ranks / 3600:.0f} |")


if __name__ == "__main__":
    main()
