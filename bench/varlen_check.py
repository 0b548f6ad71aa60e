"""rollout.varlen_attention on a GPU: torch's flash kernel against the reference, and what a decoding step of it costs.

The paged path of a model without the flash-attn package decodes through rollout.paged_varlen_attention, whose
kernel is aten::_flash_attention_forward on CUDA; on a CPU the same function runs varlen_attention_reference (one
sdpa call per sequence), which tests/test_rollout.py holds to attention written out. Here, on the GPU:

1. agreement: a packed batch at Qwen2.5-Math-1.5B's head shape (12 query heads on 2 KV heads of 128) mixing whole
   prompts, prompt chunks after a cached part and decoding tokens, bf16: the kernel against the reference computed
   in fp32 from the same bf16 inputs; it fails above --tol (max abs difference);
2. cost, per layer of a decoding step (one query token per sequence), each call captured in a CUDA graph and
   replayed (as transformers runs it; a capture failure fails the check): the kernel as transformers calls it
   under graphs (queries padded to a multiple of 64, max_q the padded count, max_k a power of two: the kernel
   then reads each KV head once per query head), the kernel with max_q = 1 (it folds a KV head's query heads into
   one pass: its best), and the gather transformers does before it (each sequence's keys and values copied out
   of the paged cache by index); against the bytes of K and V at --bandwidth. bench/phase_cost.py charges the
   padded kernel + gather TORCH_KERNEL_KV_MULT (17.5x) the cache's bytes, which this script measured on an H200
   (2026-11-30: 16.7-18.3x, against 8x predicted from 6 query heads a KV head + 2).

3. the decode loop's attention (rollout.cache=slots, rollout.slot_attention): which arguments this torch's
   aten::_flash_attention_forward takes (seqused_k: the loop needs it; block_table: a paged layout could use it),
   then one query token a row over a slot cache (each row's keys at row * width, the first seqused_k of them
   read) against the reference in fp32, and its ms a layer at --measure's shapes (rows x context used, slots of
   twice the context) under a CUDA graph against the used keys' bytes.

    python bench/varlen_check.py                    # on cuda (bench/gpu_smoke.sh runs it); --device cpu: the
                                                    # reference against itself, to check the script runs
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402


def packed(shapes, h, h_kv, d, device, dtype, gen):
    """q (Tq, h, d), k, v (Tk, h_kv, d) and cumulative lengths for sequences of (queries, keys)."""
    cu_q = torch.tensor([0] + [sum(s[0] for s in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s[1] for s in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, generator=gen).to(device, dtype)
    k = torch.randn(int(cu_k[-1]), h_kv, d, generator=gen).to(device, dtype)
    v = torch.randn(int(cu_k[-1]), h_kv, d, generator=gen).to(device, dtype)
    return q, k, v, cu_q.to(device), cu_k.to(device)


def off_reference(out, q, k, v, cu_q, cu_k, scale) -> float:
    """Max abs difference of `out`'s rows up to cu_q[-1] from the reference computed in fp32 from the same inputs."""
    want = rollout.varlen_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, scale)
    n = int(cu_q[-1])
    return float((out[:n].float() - want[:n]).abs().max())


def timed(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of fn(): on CUDA a replay of fn captured in a CUDA graph (after a warm-up on a side
    stream), elsewhere a plain call, over reps runs."""
    if cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    times = []
    for i in range(reps + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def slot_decode(h, h_kv, d, rows: int, width: int, used: torch.Tensor, device, dtype, gen):
    """rollout.slot_attention's decoding call on a random slot cache: (its output, the fp32 reference's, a closure
    that runs the call)."""
    q = torch.randn(rows, h, 1, d, generator=gen).to(device, dtype)
    k = torch.randn(rows * width, h_kv, d, generator=gen).to(device, dtype)
    v = torch.randn(rows * width, h_kv, d, generator=gen).to(device, dtype)
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device=device)
    kw = dict(slot_cu_q=cu_q, slot_cu_k=cu_q * width, slot_width=width, slot_used_k=used.to(device, torch.int32))
    run = lambda: rollout.slot_attention(None, q, k, v, None, d ** -0.5, **kw)[0]  # noqa: E731
    want = rollout.varlen_attention_reference(q[:, :, 0].float(), k.float(), v.float(), cu_q, cu_q * width,
                                              d ** -0.5, seqused_k=kw["slot_used_k"])
    return run()[:, 0], want, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=28, help="layers a decoding step runs (per-step figures)")
    ap.add_argument("--tol", type=float, default=2e-2, help="max abs difference allowed in bf16")
    ap.add_argument("--measure", default="128:1024,512:1024,128:3072,512:3072", help="batch:context,... to time")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s (H200)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, h_kv, d = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"{where}, torch {torch.__version__}; {h} query heads on {h_kv} KV heads of {d}, {dtype}")

    shapes = [(300, 300), (37, 37), (64, 700), (128, 1100)] + [(1, 200 + 23 * i) for i in range(60)]
    q, k, v, cu_q, cu_k = packed(shapes, h, h_kv, d, device, dtype, gen)
    scale = d ** -0.5
    got = rollout.varlen_attention(q, k, v, cu_q, cu_k, max(s[0] for s in shapes), max(s[1] for s in shapes), scale)
    err = off_reference(got, q, k, v, cu_q, cu_k, scale)
    print(f"agreement, {len(shapes)} packed sequences (prefill, chunks after a cached part, decoding): max abs "
          f"difference {err:.2e} (tolerance {args.tol:.0e}) -> {'ok' if err <= args.tol else 'FAILED'}")
    results = {"device": where, "torch": torch.__version__, "max_abs_diff": err, "tolerance": args.tol, "shapes": []}

    print("\n| batch, context | kernel as under graphs (padded) | kernel, max_q = 1 | gather | K and V at the "
          "bandwidth | (padded + gather) / K and V | a step of it (x%d layers) |" % args.layers)
    print("|---|---|---|---|---|---|---|")
    for spec in filter(None, args.measure.split(",")):
        batch, ctx = map(int, spec.split(":"))
        if not cuda:
            batch, ctx = min(batch, 8), min(ctx, 64)
        qd, kd, vd, cq, ck = packed([(1, ctx)] * batch, h, h_kv, d, device, dtype, gen)
        pad = -(-batch // 64) * 64  # transformers pads the forward's query tokens under CUDA graphs
        qp = torch.cat([qd, qd.new_zeros(pad - batch, h, d)])
        max_k = 1 << (ctx - 1).bit_length()
        err = max(err, off_reference(rollout.varlen_attention(qp, kd, vd, cq, ck, pad, max_k, scale), qp, kd, vd, cq,
                                     ck, scale))
        pool_k, pool_v = torch.cat([kd, kd]), torch.cat([vd, vd])  # a paged cache twice the batch's tokens
        index = torch.randperm(pool_k.shape[0], generator=gen).to(device)[:kd.shape[0]]
        padded = timed(lambda: rollout.varlen_attention(qp, kd, vd, cq, ck, pad, max_k, scale), args.reps, cuda)
        folded = timed(lambda: rollout.varlen_attention(qd, kd, vd, cq, ck, 1, ctx, scale), args.reps, cuda)
        gather = timed(lambda: (pool_k.index_select(0, index), pool_v.index_select(0, index)), args.reps, cuda)
        kv = 2 * batch * ctx * h_kv * d * qd.element_size()  # one layer's K and V
        bound = 1000 * kv / args.bandwidth
        print(f"| {batch}, {ctx:,} | {padded:.3f} ms | {folded:.3f} ms | {gather:.3f} ms | {bound:.3f} ms | "
              f"{(padded + gather) / bound:.1f}x | {args.layers * (padded + gather):.1f} ms |")
        results["shapes"].append({"batch": batch, "context": ctx, "kernel_padded_ms_layer": padded,
                                  "kernel_folded_ms_layer": folded, "gather_ms_layer": gather,
                                  "kv_bound_ms_layer": bound})
    print(f"\nagreement with the padded queries too: max abs difference {err:.2e} -> "
          f"{'ok' if err <= args.tol else 'FAILED'}")
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    has = {a: a in schema for a in ("seqused_k", "block_table")}
    print(f"\ndecode loop (rollout.slot_attention): this torch's flash kernel takes seqused_k: {has['seqused_k']}, "
          f"block_table: {has['block_table']}")
    used = torch.randint(1, 1024, (64,), generator=gen)
    got, want, _ = slot_decode(h, h_kv, d, 64, 1024, used, device, dtype, gen)
    slot_err = float((got.float() - want).abs().max())
    print(f"agreement, 64 rows of up to 1,024 keys in slots of 1,024: max abs difference {slot_err:.2e} -> "
          f"{'ok' if slot_err <= args.tol else 'FAILED'}")
    print("\n| rows, context used (slots of twice it) | kernel (seqused_k) | used K and V at the bandwidth | ratio |\n|---|---|---|---|")
    results["slots"] = {"kernel_args": has, "max_abs_diff": slot_err, "shapes": []}
    for spec in filter(None, args.measure.split(",")):
        rows, ctx = map(int, spec.split(":"))
        if not cuda:
            rows, ctx = min(rows, 8), min(ctx, 64)
        _, _, run = slot_decode(h, h_kv, d, rows, 2 * ctx, torch.full((rows,), ctx), device, dtype, gen)
        ms = timed(run, args.reps, cuda)
        bound = 1000 * 2 * rows * ctx * h_kv * d * (2 if cuda else 4) / args.bandwidth
        print(f"| {rows}, {ctx:,} | {ms:.3f} ms | {bound:.3f} ms | {ms / bound:.1f}x |")
        results["slots"]["shapes"].append({"rows": rows, "context": ctx, "kernel_ms_layer": ms, "kv_bound_ms_layer": bound})
    err = max(err, slot_err)
    results["max_abs_diff"] = err
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if err <= args.tol else 1)


if __name__ == "__main__":
    main()
