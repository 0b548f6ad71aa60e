"""A whole rollout phase at the paper's length distribution, measured per cache and held to bench/phase_cost.py.

bench/phase_cost.py chose the rollout cache from a model of a whole phase: one rank's rollouts with lognormal
response lengths (bench/long_tail.py) under each path's batching. Random weights (all a GPU here can load) never
end a response early, so this script makes each rollout end where the distribution says: a forward hook on the
model replaces its logits, token by token, with a countdown (the next token is the input token minus one, down to
EOS), and each rollout's prompt ends in the token that starts its countdown, so rollout i answers exactly
resp[i] tokens, EOS included (checked). Everything else runs as train.py runs it: rollout.generate, the model's
full forward at every step, the cache's own batching: the dynamic cache decodes rollout.plan_batches' batches
until their longest response ends, continuous batching lets a finished rollout leave and a waiting one join. The
hook's cost (filling a logits row) is small beside a forward.

Printed per cache: the wall time of the phase (prefill included), the tokens, tokens/s, on a GPU phase_cost's
prediction for the same prompts and lengths (decoding only, its constants: --bandwidth, --host-us, continuous
batching's host terms) with measured/predicted, and the model's forwards (counted by the hook, where no CUDA graph
replays them: on the CPU, and for the eager dynamic cache on a GPU) against the steps of phase_cost's schedule.
Lengths are scaled down from the paper's (median 600, limit 3,072) to fit a smoke test, with the same sigma and
runaway share, and both caches get one KV budget, --max-batch-size rows at the longest prompt + --limit: the
dynamic cache decodes several batches of at most that many rows, each until its longest response ends (the
defaults: 4 batches of 48, three of them to the 512-token limit), while continuous batching admits rows as long as
their pages fit (here up to about 144 at once: transformers allocates 256-token pages) and its steps shrink as rows
end; phase_cost's paged schedule models that scheduler.

    python bench/phase_check.py --model /tmp/rand-qwen2.5-1.5b      # bench/gpu_smoke.sh's phase part
    python bench/phase_check.py --model-config CONFIG.json --rollouts 24 --max-batch-size 8 --median 12 --limit 40
        # a random model of that architecture (vocab of at least BASE + limit + 520 tokens), e.g. on the CPU
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the root: bench/rollout.py is a script
import rollout  # noqa: E402
from long_tail import lengths  # noqa: E402

BASE = 1000  # countdown tokens are BASE + 1 .. BASE + limit - 1; prompts' other tokens sit above them


@contextlib.contextmanager
def countdown(model, eos: int, forwards: list | None = None):
    """While active, the model's logits at every position put all the mass on one token: the input token minus
    one, or EOS when that would reach BASE. A prompt ending in BASE + L then gets L - 1 countdown tokens and EOS.
    `forwards` gets a 1 for every forward that runs in Python (not a CUDA graph's replays)."""

    def hook(module, args, kwargs, out):
        if forwards is not None:
            forwards.append(1)
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = out.logits
        keep = kwargs.get("logits_to_keep")
        if torch.is_tensor(keep) and keep.dim() == 1:  # continuous batching: logits of these positions only
            ids = ids[:, keep]
        else:  # generate: the last positions
            ids = ids[:, ids.shape[1] - logits.shape[1]:]
        nxt = torch.where(ids - 1 > BASE, ids - 1, torch.full_like(ids, eos))
        logits.fill_(-1e4).scatter_(-1, nxt.unsqueeze(-1), 0.0)
        return out

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def draw(n: int, seed: int, median: float, sigma: float, runaway: float, limit: int, prompt_median: float):
    """Response lengths as bench/long_tail.py draws them and prompt lengths as bench/phase_cost.py does."""
    rng = np.random.default_rng(seed)
    resp = lengths(n, rng, median, sigma, runaway, limit)
    prompt = np.maximum(np.minimum(np.exp(rng.normal(np.log(prompt_median), 0.5, n)), 4 * prompt_median), 2).astype(int)
    return prompt, resp


def prompts_for(prompt, resp, limit: int, seed: int) -> list[list[int]]:
    """Token ids: random filler above the countdown range, then BASE + resp[i] (the countdown's start)."""
    rng = np.random.default_rng(seed + 1)
    lo = BASE + limit + 10
    return [rng.integers(lo, lo + 500, int(p) - 1).tolist() + [BASE + int(r)] for p, r in zip(prompt, resp)]


def predicted(path: str, prompt, resp, limit: int, max_batch_tokens: int, max_batch_size: int, model_cfg,
              bandwidth: float, host_us: float, cuda: bool = True) -> dict:
    """phase_cost's phase for these rollouts on `path` (its defaults for the host terms): "seconds" of decoding and
    "steps", the forwards its schedule implies (the dynamic cache's batches, rollout.plan_batches, each one forward
    a token of their longest response, the first from the prefill; continuous batching one a step of
    phase_cost.paged_schedule, joiners' prefills inside them)."""
    import phase_cost

    cfg = SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=limit, max_batch_tokens=max_batch_tokens,
                                                  max_batch_size=max_batch_size))
    params = model_cfg["params"]
    return phase_cost.phase_seconds(path, prompt, resp, cfg, 2 * params, model_cfg["kv_bytes"], bandwidth, host_us,
                                    slot_check=0 if cuda else 1)  # the loop looks every step when eager


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="a model directory (its vocabulary must hold the countdown)")
    ap.add_argument("--model-config", default="", help="or a random-weight model of this config.json's architecture")
    ap.add_argument("--caches", default="dynamic,paged,slots")
    ap.add_argument("--rollouts", type=int, default=192)
    ap.add_argument("--max-batch-size", type=int, default=48, help="the dynamic cache's rows a batch; with the "
                    "longest prompt and --limit, the KV budget of both caches")
    ap.add_argument("--max-batch-tokens", type=int, default=0, help="KV budget (both caches; 0: as above)")
    ap.add_argument("--median", type=float, default=100, help="response length median (the paper's: about 600)")
    ap.add_argument("--sigma", type=float, default=0.7)
    ap.add_argument("--runaway", type=float, default=0.02, help="share of responses at --limit")
    ap.add_argument("--limit", type=int, default=512, help="max_new_tokens (the paper's: 3,072)")
    ap.add_argument("--prompt-median", type=float, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s for the prediction and the decode bound "
                    "(default: 3.35 TB/s on an H100, 4.8 on an H200 or elsewhere)")
    ap.add_argument("--host-us", type=float, default=18.4, help="host time per eager kernel for the prediction")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_flash_attn_2_available

    if bool(args.model) == bool(args.model_config):
        ap.error("give --model or --model-config")
    if args.model_config:
        import tempfile

        from step import random_model  # bench/, beside this script

        args.model = tempfile.mkdtemp(prefix="phase_check_")
        random_model(args.model_config, args.model)
    cuda = torch.cuda.is_available()
    args.bandwidth = args.bandwidth or (3.35e12 if cuda and "H100" in torch.cuda.get_device_name() else 4.8e12)
    if not cuda:
        torch.set_num_threads(1)
    dev = torch.device("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32).to(
        dev).eval()
    c = model.config
    assert c.vocab_size > BASE + args.limit + 520, "the countdown needs token ids up to BASE + limit + 520"
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    model_cfg = {"params": sum(p.numel() for p in model.parameters()),
                 "kv_bytes": 2 * c.num_hidden_layers * c.num_key_value_heads * head * 2}
    prompt, resp = draw(args.rollouts, args.seed, args.median, args.sigma, args.runaway, args.limit,
                        args.prompt_median)
    prompts = prompts_for(prompt, resp, args.limit, args.seed)
    args.max_batch_tokens = args.max_batch_tokens or args.max_batch_size * (int(prompt.max()) + args.limit)
    where = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    flash = is_flash_attn_2_available()
    print(f"{where}, torch {torch.__version__}; {args.model} ({model_cfg['params'] / 1e9:.2f}B); {args.rollouts} "
          f"rollouts, responses lognormal(median {args.median:g}, sigma {args.sigma}) + {args.runaway:.0%} at "
          f"{args.limit} (mean {resp.mean():.0f}), prompts median {args.prompt_median:g} (mean {prompt.mean():.0f}); "
          f"at most {args.max_batch_size} rows at once, KV budget {args.max_batch_tokens:,} tokens\n")
    paths = {"dynamic": "dynamic (PreallocatedLayer), sdpa_gqa, eager (rollout.generate today)",
             "paged": "paged, flash-attn (block table), CUDA graphs" if flash else
             "paged, torch's flash kernel (keys gathered), CUDA graphs",
             "slots": "slots (our decode loop), torch's flash kernel (seqused_k), CUDA graphs"}
    import phase_cost

    bound = phase_cost.decode_bound(prompt, resp, SimpleNamespace(rollout=SimpleNamespace(
        max_new_tokens=args.limit, max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size)),
        2 * model_cfg["params"], model_cfg["kv_bytes"], args.bandwidth)
    print("| cache | seconds (prefill included) | tokens | tokens/s | predicted decoding (phase_cost) | "
          "measured / predicted | forwards / the schedule's steps |\n|---|---|---|---|---|---|---|")
    results = {"device": where, "rollouts": args.rollouts, "mean_response": float(resp.mean()), "caches": {},
               "decode_bound_s": bound, "bandwidth": args.bandwidth}
    for cache in args.caches.split(","):
        kw = dict(max_new_tokens=args.limit, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=1.0,
                  max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size, cache=cache, seed=1)
        forwards, capture = [], rollout._capture
        captures = []  # the decode loop's CUDA-graph captures: seconds each

        def timed_capture(fn, pool):
            torch.cuda.synchronize()
            t = time.perf_counter()
            graph = capture(fn, pool)
            torch.cuda.synchronize()
            captures.append(time.perf_counter() - t)
            return graph
        rollout._capture = timed_capture
        with countdown(model, tok.eos_token_id, forwards):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                out = rollout.generate(model, prompts, 1, **kw)
            finally:
                rollout._capture = capture
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        got = out.lengths.numpy()
        assert (got == resp).all(), f"{cache}: {int((got != resp).sum())} responses not of their drawn length"
        cost = predicted(paths[cache], prompt, resp, args.limit, args.max_batch_tokens, args.max_batch_size,
                         model_cfg, args.bandwidth, args.host_us, cuda)
        pred = cost["seconds"] if cuda else float("nan")  # GPU constants
        tokens, steps = int(resp.sum()), cost["steps"] + cost.get("prefills", 0)  # the loop's prefills: forwards
        graphed = cuda and cache != "dynamic"  # replays of CUDA graphs run no Python: forwards not countable
        fwd = None if graphed else len(forwards)
        print(f"| {cache} | {seconds:.1f} | {tokens:,} | {tokens / seconds:,.0f} | " +
              (f"{pred:.1f} s | {seconds / pred:.2f} |" if cuda else "(GPU constants) | |") +
              (f" n/a (CUDA graphs) / {steps:,} |" if graphed else f" {fwd:,} / {steps:,} |"))
        results["caches"][cache] = {"seconds": seconds, "tokens": tokens, "predicted_s": pred, "path": paths[cache],
                                    "forwards": fwd, "schedule_steps": steps, "captures": len(captures),
                                    "capture_s": sum(captures), "decode_bound_share": bound / seconds,
                                    "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        if captures or cuda:
            print(f"  {cache}: {len(captures)} CUDA graphs captured in {sum(captures):.2f} s; peak memory "
                  f"{results['caches'][cache]['peak_gb'] or 0:.1f} GB; the phase at {bound / seconds:.1%} of its decode "
                  f"bound ({bound:.1f} s: bench/phase_cost.py's, weights + cache at --bandwidth, device only)")
        if args.json:  # after every cache: a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    for fast in ("paged", "slots"):
        if {"dynamic", fast} <= set(results["caches"]):
            d, p = results["caches"]["dynamic"], results["caches"][fast]
            print(f"\nphase time, dynamic / {fast}: {d['seconds'] / p['seconds']:.2f} measured" +
                  (f", {d['predicted_s'] / p['predicted_s']:.2f} predicted" if cuda else ""))


if __name__ == "__main__":
    main()
