"""What one decoding step of rollout.generate costs, measured on CPU through rollout.generate itself (issue 28, item 1:
the measuring half; the GPU check is the next GPU session's).

A decoding step is one token for every row of a batch. Its cost on a GPU is the larger of what the host does
(Python, transformers, the dispatcher: one kernel launch per non-view aten op) and what the device does (bytes
moved at the memory bandwidth), plus whatever a host-device sync serialises. This script measures, per decoding
step, with the real depth of Qwen2.5-Math-1.5B / 7B (28 layers) and its head layout (12 query / 2 KV heads), on a
narrow width so that the CPU's arithmetic does not hide the host's work:

- every aten op rollout.generate dispatches (a TorchDispatchMode), split into kernels (non-view ops) and views,
  the host-device syncs (`item`, `nonzero`, `is_nonzero`, `equal`), and the bytes each kind of op reads and
  writes (matmuls, attention, cache concatenation, other copies, elementwise and sampling);
- the host time per step (wall time, one thread; the ops are tiny, so this is the host's own time);

and then evaluates a byte model of each kind at the real width, batch and context, checked against the
measured bytes at the narrow width first (the same formulas; they must agree before they are scaled).

    python bench/decode_cost.py                      # prints the tables; bench/results/decode_cost.md has a run
    python bench/decode_cost.py --batch 8 --new-tokens 33
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402

VIEWS = {"view", "_unsafe_view", "expand", "slice", "select", "as_strided", "transpose", "permute", "unsqueeze",
         "squeeze", "t", "alias", "detach", "_reshape_alias", "unbind", "split", "split_with_sizes", "chunk",
         "lift_fresh", "empty", "empty_like", "new_empty", "empty_strided", "_to_copy_view"}
SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select"}


def kind(op: str) -> str:
    if op in ("mm", "addmm", "bmm", "matmul", "baddbmm"):
        return "matmul"
    if "scaled_dot_product" in op:
        return "attention"
    if op == "cat":
        return "concatenation"
    if op in ("clone", "copy_", "index_select", "index", "gather", "_to_copy", "contiguous", "index_copy_"):
        return "other copies"
    return "elementwise and sampling"


class Count(TorchDispatchMode):
    """Every aten op dispatched while active: name, kernel or view, sync, and bytes read + written."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.kernels, self.syncs = Counter(), Counter(), 0, 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        self.ops[name] += 1
        if name in VIEWS:
            self.views += 1
            return out
        self.kernels += 1
        self.syncs += name in SYNCS
        if name == "gather":  # reads only the elements it gathers (the sampler's look at p of its token), not its input
            flat = [args[2], out, out]
        else:
            flat = [x for x in torch.utils._pytree.tree_leaves((args, kwargs or {}, out)) if isinstance(x, torch.Tensor)]
        self.bytes[kind(name)] += sum(t.numel() * t.element_size() for t in flat)
        return out


def narrow_model(layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int, intermediate: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def run(model, batch: int, prompt: int, new: int, eos: int, counter=None, cache: str = "dynamic",
        temperature: float = 1.0, out=None):
    """rollout.generate of `batch` rows: half of them answer a `prompt`-token prompt, half a prompt 8 tokens
    shorter (left padding, so an attention mask, as with real prompts of mixed lengths); `eos` is an id outside
    the vocabulary, so every row decodes `new` tokens. Returns wall seconds."""
    prompts = [[1 + (i % 50) for i in range(prompt)], [1 + (i % 50) for i in range(prompt - 8)]]
    t0 = time.perf_counter()
    with counter or torch.no_grad():
        budget = batch * (-(-(prompt + new) // 256) + 1) * 256  # one call of every path, whole pages for paged
        got = rollout.generate(model, prompts, [batch // 2, batch - batch // 2], max_new_tokens=new, eos_ids=[eos],
                               pad_id=0, seed=0, cache=cache, max_batch_tokens=budget, max_batch_size=batch,
                               temperature=temperature)
    if out is not None:
        out.append(got)
    assert int(got.lengths.min()) == new, "a row ended early: the counts would not be per full step"
    return time.perf_counter() - t0


class Captures:
    """CUDA graphs captured while active (transformers' continuous batching captures one per new padded shape, in
    each generate_batch call): how many, and the seconds between their capture_begin and capture_end."""

    def __init__(self):
        self.n, self.seconds = 0, 0.0

    def __enter__(self):
        graph = torch.cuda.CUDAGraph
        self.saved = graph.capture_begin, graph.capture_end

        def begin(g, *a, **k):
            self.t0 = time.perf_counter()
            return self.saved[0](g, *a, **k)

        def end(g, *a, **k):
            out = self.saved[1](g, *a, **k)
            self.n, self.seconds = self.n + 1, self.seconds + time.perf_counter() - self.t0
            return out

        graph.capture_begin, graph.capture_end = begin, end
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end = self.saved


def per_step(model, batch, prompt, new, eos):
    """Counts and host time of one decoding step: a run of `new` tokens minus a run of 1 (prefill + first
    token), divided by new - 1."""
    runs = {}
    for n in (1, new):
        c = Count()
        run(model, batch, prompt, n, eos, c)
        best = min(run(model, batch, prompt, n, eos) for _ in range(3))
        runs[n] = (c, best)
    (c1, t1), (cn, tn) = runs[1], runs[new]
    k = new - 1
    return {"kernels": (cn.kernels - c1.kernels) / k, "views": (cn.views - c1.views) / k,
            "syncs": (cn.syncs - c1.syncs) / k, "host_ms": 1000 * (tn - t1) / k,
            "bytes": {key: (cn.bytes[key] - c1.bytes[key]) / k for key in set(cn.bytes) | set(c1.bytes)},
            "ops": {op: (cn.ops[op] - c1.ops[op]) / k for op in cn.ops if cn.ops[op] != c1.ops[op]}}


def kv_cache_bytes(cfg: dict, batch: int, ctx: float, dtype_bytes: int) -> float:
    """The K and V of every layer at context `ctx`: what one decoding step's attention must read."""
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * batch * ctx * cfg["num_key_value_heads"] * d * dtype_bytes


def model_bytes(cfg: dict, batch: int, ctx: float, dtype_bytes: int, gqa_copy: bool, preallocated: bool = True) -> dict:
    """Bytes read + written per decoding step, by kind, at context `ctx` (the tokens already in the cache, padding
    included). Matmuls read their weights and activations. The cache: rollout's PreallocatedLayer (preallocated)
    writes the new token's K and V in place ("cache writes"); transformers' DynamicLayer concatenates every layer's
    K and V with the new token's (reads the cache, writes it one longer). generate concatenates its token ids and
    attention mask either way. Attention reads K and V: `kv` heads wide, or,
    when transformers repeats the KV heads for every query head (gqa_copy: `repeat_kv`, transformers 5.17 with a
    padding mask), heads wide, after a copy that reads the expanded cache and writes it heads wide."""
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, inter, V = h // heads, cfg["intermediate_size"], cfg["vocab_size"]
    b = dtype_bytes
    kv_layer = 2 * batch * ctx * kv * d * b  # K and V of one layer
    wide = kv_layer * heads / kv if gqa_copy else kv_layer  # what attention reads
    weights = L * (h * (heads * d) + 2 * h * (kv * d) + (heads * d) * h + 3 * h * inter) * b + V * h * b
    acts = L * batch * b * (2 * h + 2 * (heads + 2 * kv) * d + 2 * (heads * d) + 2 * h + 3 * (h + inter) + inter) \
        + batch * b * (h + V)
    attention = L * (wide + 2 * batch * heads * d * b)  # K, V read; q in, output out
    copies = L * 2 * wide if gqa_copy else 0  # repeat_kv: the expanded cache read, the heads-wide copy written
    new_token = L * 2 * 2 * batch * kv * d * b  # the new token's K and V, read and written
    writes = new_token if preallocated else 0
    cat = 0 if preallocated else L * 2 * kv_layer + new_token  # DynamicLayer: read the cache and the token, write both
    # small ones: rotary's rotate_half on q and k in every layer, its cos/sin table (fp32), and three int64 (b, t)
    # tensors generate extends by a token (ids, attention mask and one more: counted on 5.17 and 5.24)
    small = L * 2 * batch * (heads + kv) * d * b + 2 * batch * d * 4 + 3 * 2 * batch * (ctx + 1) * 8
    return {"weights": weights, "activations": acts, "kv read": attention, "repeat_kv copy": copies,
            "cache writes": writes, "cache concatenation": cat, "small concatenations": small,
            "total": weights + acts + attention + copies + writes + cat + small}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "qwen2.5-1.5b", "config.json"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--head-dim", type=int, default=8, help="narrow width: hidden = heads x head_dim")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200 HBM3e: 4.8 TB/s)")
    ap.add_argument("--device", default="cpu", help="where the models run (cuda: the GPU check)")
    ap.add_argument("--measure", default="", help="batch:context,... also measure ms per decoding step of the "
                    "real-width model (random weights, bf16 on cuda) on --device, beside the model's prediction")
    ap.add_argument("--json", default="", help="write the measurements and predictions here")
    ap.add_argument("--cache", choices=["dynamic", "paged"], default="dynamic", help="the path --measure "
                    "times (the counting above is always the dynamic path's, in this thread)")
    ap.add_argument("--new", default="", help="short:long: new tokens of the two runs whose difference --measure "
                    "times (default 1:9 for the dynamic path, which warms up at other lengths; 17:81 for paged, "
                    "which warms up with the long run)")
    ap.add_argument("--attention", choices=["sdpa_gqa", "sdpa"], default="sdpa_gqa", help="how rollout.generate "
                    "decodes: sdpa_gqa (its default: each KV head read once) or transformers' sdpa")
    args = ap.parse_args()
    rollout.DECODE_GQA = args.attention == "sdpa_gqa"
    if args.device == "cpu":
        torch.set_num_threads(1)
    import transformers

    real = json.load(open(args.config))
    narrow = narrow_model(real["num_hidden_layers"], real["num_attention_heads"], real["num_key_value_heads"],
                          args.head_dim, args.vocab, 4 * args.head_dim * real["num_attention_heads"])
    narrow.to(args.device)
    m = per_step(narrow, args.batch, args.prompt, args.new_tokens, eos=args.vocab + 7)  # an id never sampled
    ncfg = {k: getattr(narrow.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size")}
    ctx = args.prompt - 1 + args.new_tokens / 2 + 0.5  # mean cache length over the measured steps (padded)
    gqa_copy = m["ops"].get("clone", 0) >= 2 * real["num_hidden_layers"] or "repeat_interleave" in m["ops"]
    pred = model_bytes(ncfg, args.batch, ctx, 4, gqa_copy, rollout.PREALLOCATE)
    kv_cache = kv_cache_bytes(ncfg, args.batch, ctx, 4)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(f"{platform.node()}: {where}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"attention {args.attention}; "
          f"one thread; narrow Qwen2 with {real['num_hidden_layers']} layers, {real['num_attention_heads']}/"
          f"{real['num_key_value_heads']} heads of {args.head_dim}, vocab {args.vocab}, fp32; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens (EOS suppressed)\n")
    print("| per decoding step | measured |\n|---|---|")
    print(f"| kernels (non-view aten ops) | {m['kernels']:.0f} ({m['kernels'] / real['num_hidden_layers']:.1f} a layer) |")
    print(f"| view ops | {m['views']:.0f} |\n| host-device syncs | {m['syncs']:.1f} |")
    print(f"| host time (1 thread) | {m['host_ms']:.2f} ms |")
    attn_moved = m["bytes"].get("attention", 0) + m["bytes"].get("other copies", 0)
    print(f"| attention bytes (attention + copies) / KV cache read | {attn_moved / kv_cache:.2f} |\n")
    print("| bytes per step, narrow model | measured | byte model | model / measured |\n|---|---|---|---|")
    measured_total = sum(m["bytes"].values())
    pairs = {"matmul": pred["weights"] + pred["activations"], "attention": pred["kv read"],
             "concatenation": pred["cache concatenation"] + pred["small concatenations"],
             "other copies": pred["repeat_kv copy"] + pred["cache writes"]}
    for k, v in sorted(m["bytes"].items()):
        model_v = pairs.get(k)
        print(f"| {k} | {v / 1e6:.3f} MB | " + (f"{model_v / 1e6:.3f} MB | {model_v / v:.2f} |" if model_v else
                                               "not modelled | |"))
    print(f"| total | {measured_total / 1e6:.3f} MB | {pred['total'] / 1e6:.3f} MB | {pred['total'] / measured_total:.2f} |\n")
    print("most frequent ops per step:", ", ".join(f"{op} {n:.0f}" for op, n in
                                                 sorted(m["ops"].items(), key=lambda x: -x[1])[:14]), "\n")
    name = os.path.basename(os.path.dirname(args.config))
    per_op_us = 1000 * m["host_ms"] / m["kernels"]
    print(f"| {name}, bf16, this path ({'repeat_kv' if gqa_copy else 'no KV copy'}) | weights | KV read | repeat_kv "
          f"copy | cache cat | total | device at {args.bandwidth / 1e12:.1f} TB/s |\n|---|---|---|---|---|---|---|")
    for batch, ctx in ((64, 1024), (128, 1024), (128, 3072), (256, 1024), (256, 3072), (512, 1024), (512, 3072)):
        p = model_bytes(real, batch, ctx, 2, gqa_copy, rollout.PREALLOCATE)
        print(f"| batch {batch}, context {ctx} | " + " | ".join(f"{p[k] / 1e9:.2f} GB" for k in (
            "weights", "kv read", "repeat_kv copy", "cache concatenation", "total")) +
              f" | {1000 * p['total'] / args.bandwidth:.1f} ms |")
    print(f"\nhost, measured here: {m['host_ms']:.1f} ms a step for {m['kernels']:.0f} kernels ({per_op_us:.1f} us an op)")
    # the one GPU measurement: H200, transformers 5.17 (repeat_kv), 32 MATH500 prompts with the byte-level
    # tokenizer padded to the longest, 900 tokens, then 512 new: the cache holds 900 + 256 tokens on average
    print("\nThe H200 measurement (bench/results/gpu, transformers 5.17: repeat_kv; context 900 + 256 on average):\n")
    print("| batch | measured ms a step | device (bytes / 4.8 TB/s) | host at this CPU's cost per op | "
          "model: max(host, device) .. host + device | host cost per op that the measurement implies |")
    print("|---|---|---|---|---|---|")
    for batch, measured in ((64, 74.0), (128, 86.0)):
        dev = 1000 * model_bytes(real, batch, 1156, 2, True, preallocated=False)["total"] / args.bandwidth
        host = m["host_ms"]
        print(f"| {batch} | {measured:.0f} | {dev:.1f} ms | {host:.1f} ms | {max(host, dev):.1f} .. {host + dev:.1f} ms | "
              f"{1000 * (measured - dev) / m['kernels']:.0f} us |")
    results = {"device": where, "transformers": transformers.__version__, "attention": args.attention,
               "attention_bytes_over_kv_cache": attn_moved / kv_cache, "kernels": m["kernels"], "syncs": m["syncs"],
               "host_ms_narrow": m["host_ms"], "repeat_kv": bool(gqa_copy), "measured": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    if args.measure:
        import phase_cost  # bench/, beside this script

        print(f"\nMeasured on {where}: ms per decoding step of the real-width model (random weights), beside the "
              f"model (device bytes at {args.bandwidth / 1e12:.1f} TB/s; host: the narrow model's eager step on this "
              f"device, or for paged continuous batching's host model (bench/cb_host.py) and torch's kernel at "
              f"{phase_cost.TORCH_KERNEL_KV_MULT}x the K and V bytes)"
              f":\n\n| batch, context | measured | device (model) | host (model) | model: max .. sum |\n"
              "|---|---|---|---|---|")
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from transformers.utils import is_flash_attn_2_available

        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        big = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in real.items() if k != "architectures"})).to(
            device=args.device, dtype=dtype).eval()
        cuda = args.device.startswith("cuda")
        eos = real["vocab_size"] + 7
        results["cache"] = args.cache
        # two runs at the same prompt, --new short:long new tokens; their difference is long - short decoding
        # steps with the same prefill. The dynamic path warms up at other lengths (fresh key lengths, as a rollout
        # meets them); paged warms up with the longer run itself: each generate_batch call captures its CUDA graphs
        # anew (one per padded shape met; a 1-token run against a 9-token one came out negative on 2026-11-30),
        # captures counted apart
        short0, new0 = map(int, (args.new or {"dynamic": "1:9", "paged": "17:81"}[args.cache]).split(":"))

        for spec in args.measure.split(","):
            batch, ctx = map(int, spec.split(":"))
            short, new = short0, new0
            if args.cache == "paged":  # the short run past the prefill's forwards (rollout.PAGED_FORWARD_TOKENS each):
                # else the two runs differ in mixed prefill + decoding forwards, not in whole decoding steps
                fill = -(-batch * ctx // rollout.PAGED_FORWARD_TOKENS) + 1
                short, new = max(short, fill), max(short, fill) + new - short
            prompt = max(25, ctx - (new + short) // 2)  # the cache holds about `ctx` tokens over the measured steps
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            reps = 1 if cuda else 2  # GPU time is scarce and its timings steady; the prefill dominates a run
            try:
                # warm-up: dynamic, at a longer prompt, so that the measured calls decode at key lengths this
                # process has not seen, as every step of a real rollout does (a kernel that plans per shape, cuDNN's
                # attention, pays there and is hidden by a repeat); paged, the long run itself
                first = run(big, batch, prompt + (new + 16 if args.cache == "dynamic" else 0), new, eos,
                            cache=args.cache)
                with Captures() if cuda else contextlib.nullcontext() as c1:
                    t1 = min(run(big, batch, prompt, short, eos, cache=args.cache) for _ in range(reps))
                with Captures() if cuda else contextlib.nullcontext() as cn:
                    tn = min(run(big, batch, prompt, new, eos, cache=args.cache) for _ in range(reps))
            except torch.OutOfMemoryError as e:  # one shape too large must not lose the others' figures
                print(f"| {batch}, {ctx} | out of memory | | | | {str(e).splitlines()[0][:120]} |")
                results["measured"].append({"batch": batch, "context": ctx, "error": "out of memory"})
                continue
            ms = 1000 * (tn - t1) / (new - short)
            graphs = ""
            if cuda and reps == 1 and cn.n:  # the steps' own time, the extra graphs' capture taken out
                graphs = (f", graphs captured {c1.n} / {cn.n} ({c1.seconds:.2f} / {cn.seconds:.2f} s): "
                          f"{1000 * (tn - t1 - cn.seconds + c1.seconds) / (new - short):.1f} ms a step without them")
                results["captures"] = results.get("captures", []) + [{"batch": batch, "context": ctx, "short": [
                    c1.n, c1.seconds], "long": [cn.n, cn.seconds]}]
            p = model_bytes(real, batch, ctx, 2 if dtype == torch.bfloat16 else 4, gqa_copy and args.cache != "paged",
                            rollout.PREALLOCATE or args.cache != "dynamic")  # paged: written in place
            dev = 1000 * p["total"] / args.bandwidth
            host = m["host_ms"]  # eager: the narrow model's step here
            if args.cache == "paged":  # phase_cost's charge: continuous batching's host work (varlen path) and,
                # without flash-attn, torch's kernel at its measured multiple of the K and V bytes
                host = 1000 * phase_cost.cb_host_s(batch, batch * ctx, True)
                if not is_flash_attn_2_available():
                    dev += 1000 * batch * ctx * (phase_cost.TORCH_KERNEL_KV_MULT - 1) * kv_cache_bytes(
                        real, 1, 1, 2) / args.bandwidth
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            print(f"| {batch}, {ctx} | {ms:.1f} ms | {dev:.1f} ms | {host:.1f} ms | {max(dev, host):.1f} .. "
                  f"{dev + host:.1f} ms | first call {first:.1f} s (warm {tn:.1f} s), peak {peak:.1f} GiB{graphs} |")
            results["measured"].append({"batch": batch, "context": ctx, "new": [short, new], "ms_per_step": ms,
                                        "device_ms_model": dev,
                                        "host_ms_narrow": host, "first_call_s": first, "warm_call_s": tn,
                                        "peak_gib": peak})
            save()  # after every shape: a run stopped at its time limit keeps what it measured
    save()


if __name__ == "__main__":
    main()
