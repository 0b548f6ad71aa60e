"""Is the paged path's greedy decoding right on this device? Each greedy token held to a dense fp32 reference.

Greedy tokens of two paths can differ without either being wrong: in bf16 a near-tie between the two best logits
flips with the kernel, and the row then goes its own way (2026-11-30, H200, random weights: the paged path's
greedy tokens agreed with the dynamic path's on 74 % of 8 x 16, the first token on all rows, while the dynamic path
with two attention kernels agreed on all). So each path's responses are checked on their own: the prompt and
response go through the model once more, in fp32 and plain sdpa (no cache, no paging), and at every response
position the gap between the largest logit and the chosen token's is taken. A right path picks the reference's
argmax up to bf16 noise (gaps of hundredths); a path attending to the wrong keys picks tokens the reference puts
logits below the best. Printed for the dynamic path (rollout's sdpa_gqa), the same with transformers' sdpa (the
control: same maths, other kernels), the paged path (continuous batching; on a model without flash-attn,
rollout.paged_varlen_attention, torch's flash kernel on CUDA, under transformers' CUDA graphs) and the decode loop
(cache=slots: torch's flash kernel with seqused_k over the slot cache, a CUDA graph a step): the largest gap, the
share of tokens with a gap over --tol, and rows equal to the dynamic path's. Fails (exit 1) when the paged or the
loop's largest gap exceeds --tol and twice the control's, or when the paged path's attention calls did not go
through rollout.varlen_attention where they should.

    python bench/paged_check.py                               # models/arith (pretrained), cuda if present
    python bench/paged_check.py --model models/arith --model /tmp/rand-qwen2.5-1.5b    # bench/gpu_smoke.sh
"""

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402


def prompts_for(tok, n: int, seed: int = 0) -> list[list[int]]:
    """`n` arithmetic questions in the tokenizer's chat format (models/arith answers them), prompts of mixed length."""
    rng = random.Random(seed)
    qs = [f"{rng.randint(0, 10 ** rng.randint(1, 3))}{rng.choice('+-*')}{rng.randint(0, 999)}" for _ in range(n)]
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {q}?"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for q in qs]


@torch.no_grad()
def gaps(reference, prompts, out) -> torch.Tensor:
    """For every response token: the reference's largest logit minus its logit of that token (0 = its argmax)."""
    dev = next(reference.parameters()).device
    found = []
    for i, p in enumerate(prompts):
        n = int(out.lengths[i])
        if n == 0:
            continue
        resp = out.response_ids[i, :n].tolist()
        logits = reference(torch.tensor([p + resp], device=dev)).logits[0, len(p) - 1:len(p) - 1 + n].float()
        chosen = logits.gather(-1, torch.tensor(resp, device=dev)[:, None])[:, 0]
        found.append(logits.max(-1).values - chosen)
    return torch.cat(found).cpu()


def check(path: str, device: str, n_prompts: int, new: int, tol: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # as the trainer's generation copy
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(
        device).eval()
    prompts = prompts_for(tok, n_prompts)
    kw = dict(max_new_tokens=new, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.0,
              max_batch_tokens=len(prompts) * (max(map(len, prompts)) + new))
    calls = []
    kernel = rollout.varlen_attention

    def counted(q, *a, **k):
        calls.append(q.shape[0])
        return kernel(q, *a, **k)

    runs, seconds = {}, {}
    for name in ("dynamic", "control", "paged", "slots"):
        gqa = rollout.DECODE_GQA
        rollout.DECODE_GQA = gqa if name != "control" else not gqa
        rollout.varlen_attention = counted if name == "paged" else kernel
        t0 = time.perf_counter()
        try:
            runs[name] = rollout.generate(model, prompts, 1, cache=name if name in ("paged", "slots") else "dynamic",
                                          **kw)
        finally:
            rollout.DECODE_GQA, rollout.varlen_attention = gqa, kernel
        seconds[name] = time.perf_counter() - t0
    expect_varlen = rollout.TORCH_FLASH in rollout._paged_attention(model)
    res = {"model": path, "dtype": str(dtype), "prompts": len(prompts), "new_tokens": new, "tol": tol,
           "varlen_calls": len(calls), "varlen_expected": expect_varlen}
    print(f"\n{path}: {len(prompts)} prompts, greedy, up to {new} new tokens, {dtype}; paged path's attention calls "
          f"through rollout.varlen_attention: {len(calls)} (expected {'some' if expect_varlen else 'none'})\n")
    print("| path | tokens | largest gap | tokens with gap > tol | rows equal to dynamic | seconds |\n|---|---|---|---|---|---|")
    for name, out in runs.items():
        g = gaps(reference, prompts, out)
        same = sum(a == b for a, b in zip(out.responses(), runs["dynamic"].responses())) / len(prompts)
        res[name] = {"tokens": len(g), "max_gap": float(g.max()), "over_tol": float((g > tol).float().mean()),
                     "rows_equal_dynamic": same, "seconds": seconds[name]}
        print(f"| {name} | {len(g)} | {float(g.max()):.3f} | {float((g > tol).float().mean()):.2%} | {same:.0%} | "
              f"{seconds[name]:.1f} |")
    bound = max(tol, 2 * res["control"]["max_gap"])
    res["ok"] = all(res[p]["max_gap"] <= bound for p in ("paged", "slots")) and (len(calls) > 0) == expect_varlen
    for p in ("paged", "slots"):
        print(f"\n{p} path: largest gap {res[p]['max_gap']:.3f} against {bound:.3f} (max of --tol and twice the "
              f"control's) -> {'ok' if res[p]['max_gap'] <= bound else 'FAILED'}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="model directories (default: models/arith)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--tol", type=float, default=0.25, help="logits: a greedy token this far below the "
                    "reference's best is wrong beyond bf16 noise")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    import transformers

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(f"{where}, torch {torch.__version__}, transformers {transformers.__version__}")
    results = [check(m, args.device, args.prompts, args.new, args.tol)
               for m in args.model or [os.path.join(ROOT, "models", "arith")]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "results": results}, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
