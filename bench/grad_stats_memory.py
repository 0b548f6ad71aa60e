"""Memory of Eq. 21's gradient statistics (cures.sigma=gradient) at the 1.5B width, on CPU.

cures.gradient_stats runs, for the tied Qwen2.5-Math-1.5B, a backward through the generation model for the
input part of the shared matrix's gradient, one response at a time with the parameters frozen, then builds
the Gram matrix one vocabulary slice at a time (cures.lm_head_gram). This measures one prompt with R responses
of T tokens on a random model of the real width cut to 1 and 2 layers (full 151,936-token vocabulary, tied):
the tensors one response's backward keeps (saved-tensor hooks, parameters excluded; the difference between 1
and 2 layers is one layer's share) and the process's peak RSS, and extrapolates the activations to the 28
layers of 1.5B in bf16 at the paper's lengths.

    python bench/grad_stats_memory.py                     # R = 4 (cures.cold_start_rollouts), T = 3,072
    python bench/grad_stats_memory.py --tokens 512
"""

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def measure(model_dir: str, tokens: int, responses: int, prompt: int) -> dict:
    """One gradient_stats call in this process: seconds, bytes saved for backward per response, peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    import cures

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, 150000, (prompt,), generator=g).tolist()
    resp = [torch.randint(0, 150000, (tokens,), generator=g).tolist() for _ in range(responses)]
    seen, saved = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(ptr)
            saved[0] += t.untyped_storage().nbytes()
        return t

    t0 = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cures.gradient_stats(model, prompt_ids, resp, [a % 2 == 0 for a in range(responses)])
    return {"seconds": time.time() - t0, "saved_per_response": saved[0] / responses,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3072, help="response length T")
    ap.add_argument("--responses", type=int, default=4, help="R = cures.cold_start_rollouts")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--measure", nargs=2, metavar=("MODEL_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        with open(args.measure[1], "w") as f:
            json.dump(measure(args.measure[0], args.tokens, args.responses, args.prompt), f)
        return
    import rehearsal

    work, got = tempfile.mkdtemp(prefix="grad_stats_"), {}
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # benches leave nothing behind in /tmp
    for layers in (1, 2):  # each in its own process: a clean peak RSS
        rehearsal.build_model(f"{work}/m{layers}", 1536, layers, 12, 2, 8960)
        subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--responses", str(args.responses),
                        "--prompt", str(args.prompt), "--measure", f"{work}/m{layers}", f"{work}/{layers}.json"],
                       check=True)
        got[layers] = json.load(open(f"{work}/{layers}.json"))
    GiB, T = 2**30, args.prompt + args.tokens
    per_layer = got[2]["saved_per_response"] - got[1]["saved_per_response"]  # one decoder layer, fp32
    rest = got[1]["saved_per_response"] - per_layer  # embeddings, final norm, log-prob head chunks
    print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores; width 1,536, vocabulary 151,936 (tied), "
          f"fp32; one prompt of {args.prompt} tokens, {args.responses} responses of {args.tokens} tokens")
    print("| layers | seconds | saved for backward, one response | peak RSS |\n|---|---|---|---|")
    for layers, r in got.items():
        print(f"| {layers} | {r['seconds']:.0f} | {r['saved_per_response'] / GiB:.2f} GiB | {r['peak_rss'] / GiB:.2f} GiB |")
    print(f"one decoder layer keeps {per_layer / T / 1024:.0f} KiB a token (fp32), the rest {rest / GiB:.2f} GiB")
    for length in (T, 1024 + 3072):  # the measured length, the paper's longest prompt + max_new_tokens
        est = (28 * per_layer / T * length + rest / T * length) / 2  # bf16 on GPU: half of fp32
        print(f"1.5B (28 layers), bf16, {length:,}-token sequence: about {est / GiB:.1f} GiB of activations for "
              f"one response's backward (the generation copy and the policy's shards come on top)")


if __name__ == "__main__":
    main()
