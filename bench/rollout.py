"""Rollout throughput: rollout.generate against a plain `model.generate` on the same mixed-length prompts.

The plain baseline is what one writes first: all prompts left-padded into one batch, n samples each via
num_return_sequences. Both use the KV cache and pure sampling. Prints generated tokens/s and the ratio.

    python bench/rollout.py                                  # CPU, bundled tiny model
    python bench/rollout.py --model PATH --prompts 64 --n 8 --max-new-tokens 1024   # GPU
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402
from eval import build_prompt, read_rows  # noqa: E402


def plain_generate(model, tok, prompts, n, max_new_tokens):
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = out[:, L:].cpu()
    done = (gen == tok.eos_token_id).cumsum(-1)
    return int(((done == 0) | ((done == 1) & (gen == tok.eos_token_id))).sum())  # tokens up to EOS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "benchmarks", "math500", "test.jsonl"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 16)
    ap.add_argument("--cache", default="dynamic", help="rollout.generate's KV cache: dynamic | slots | paged")
    ap.add_argument("--no-share-prefill", action="store_true", help="prefill every rollout (rollout.share_prefill=false)")
    ap.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the plain-generate baseline")
    ap.add_argument("--repeats", type=int, default=2, help="timings of each; the last (warm) one is kept")
    ap.add_argument("--forced", action="store_true", help="every rollout.generate response exactly "
                    "--max-new-tokens long (EOS suppressed until then), so the phase's decoding steps are fixed; "
                    "the plain baseline is not forced: use with --no-plain")
    ap.add_argument("--transformers-cache", action="store_true", help="the dynamic path on transformers' "
                    "DynamicLayer (concatenation every step) instead of rollout.PreallocatedLayer")
    args = ap.parse_args()
    rollout.PREALLOCATE = not args.transformers_cache

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).to(dev).eval()
    rows = read_rows(args.data)[:args.prompts]
    prompts = [build_prompt(tok, r["problem"]) for r in rows]  # mixed lengths: real problems
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"machine: {name}; model {args.model}; {len(prompts)} prompts x {args.n}, prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))}, {args.max_new_tokens} new tokens, rollout cache {args.cache}, "
          f"share_prefill {not args.no_share_prefill}"
          + (f", KV layer {'DynamicLayer (transformers)' if args.transformers_cache else 'PreallocatedLayer'}"
             if args.cache == "dynamic" else "")
          + (", forced lengths" if args.forced else ""))
    from trl_compare import forced_lengths  # bench/, beside this script

    results = {}
    with forced_lengths(args.max_new_tokens) if args.forced else contextlib.nullcontext():
        for label in (("plain", "rollout") if args.plain else ("rollout",)) * args.repeats:  # alternate, keep the last
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if label == "plain":
                with torch.no_grad():
                    tokens = plain_generate(model, tok, prompts, args.n, args.max_new_tokens)
            else:
                out = rollout.generate(model, prompts, args.n, max_new_tokens=args.max_new_tokens,
                                       eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                                       max_batch_tokens=args.max_batch_tokens, cache=args.cache,
                                       share_prefill=not args.no_share_prefill)
                tokens = int(out.lengths.sum())
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results[label] = (tokens, time.perf_counter() - t0)
    print("| generator | tokens | seconds | tokens/s |\n|---|---|---|---|")
    for label, (tokens, dt) in results.items():
        print(f"| {label} | {tokens} | {dt:.2f} | {tokens / dt:.0f} |")
    if "plain" in results:
        ratio = (results["rollout"][0] / results["rollout"][1]) / (results["plain"][0] / results["plain"][1])
        print(f"rollout.generate / plain generate tokens/s: {ratio:.2f}x")
    print(json.dumps({k: {"tokens": v[0], "seconds": round(v[1], 3)} for k, v in results.items()}))


if __name__ == "__main__":
    main()
