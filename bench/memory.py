"""Per-GPU memory of train.py for Qwen2.5-Math-1.5B and -7B, from measurements, not from a formula on paper.

    python bench/memory.py                    # both models, 8/4/2 ranks, the table and the largest batch sizes
    python bench/memory.py --models 1.5b --tokens 256

What is measured, and how:
- FSDP2 shards: the real model (bench/qwen2.5-*/config.json) built on the meta device and sharded by
  infra.models.shard_model under a fake process group of world size W; the bytes are those of rank 0's local shards
  (FSDP2 pads dim 0 to a multiple of W). fp32 master weights, fp32 gradients, AdamW's two fp32 moments, and
  the KL reference (an fp32 shard, infra.models.build_models) each take that many elements.
- The bf16 generation copy: every parameter, unsharded, on every rank (infra.models.build_models).
- FSDP2's unsharded buffers: the root (embeddings, lm_head, final norm) and two decoder layers (the one
  computing and the one prefetched) gathered in bf16, and the root's gradient before its fp32 reduce-scatter.
- KV cache per token: 2 (K, V) x layers x KV heads x head dim x 2 bytes (bf16), from the config.
- Activations per trained token, on CPU at the real width in bf16: what one decoder layer saves for its
  backward (autograd's saved-tensor hooks, parameters excluded). With gradient checkpointing (train.py on
  GPU) each of the L layers keeps only its input (d bf16 numbers a token) and the layer being recomputed
  holds its saved tensors again: L * 2d + layer bytes a token. The log-prob head (grpo.token_logprobs, real
  vocabulary, one chunk of train.logprob_chunk tokens at a time) is measured with torch's MemTracker (peak of
  activations + temporaries of its forward and backward) and added. The log-prob head (grpo.token_logprobs, real vocabulary, one chunk of
  train.logprob_chunk tokens at a time) is measured on its own and added (the two peaks do not coincide, so the
  sum is an upper bound).
- Sampling: the last position's logits in fp32 for up to rollout.max_batch_size rows, three copies (logits,
  processed scores, probabilities); the prefill's transient activations per prompt token, measured like the
  decoder layer above, without gradients.
Usable memory: the card's capacity less HEADROOM_GB (CUDA context, NCCL buffers, allocator fragmentation).
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo  # noqa: E402
from infra.config import DataConfig, RolloutConfig, TrainConfig  # noqa: E402
from infra.models import Policy, shard_model  # noqa: E402

CONFIGS = {"1.5b": os.path.join(ROOT, "bench", "qwen2.5-1.5b", "config.json"),
           "7b": os.path.join(ROOT, "bench", "qwen2.5-7b", "config.json")}
GB = 2**30
HEADROOM_GB = 6.0  # CUDA context (~0.5), NCCL buffers (~1), caching-allocator fragmentation (~10% of 40 GB)


def hf_config(path: str, layers: int | None = None, **changes):
    from transformers import AutoConfig

    with open(path) as f:
        d = json.load(f)
    if layers is not None:
        d.update(num_hidden_layers=layers, max_window_layers=layers)
    d.update(changes)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def shard_elements(cfg, world: int) -> tuple[int, int, int, int]:
    """(parameters, rank 0's sharded elements, root elements, largest decoder layer's elements) with
    infra.models.shard_model on the meta device under a fake process group of `world` ranks."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch.device("meta"):
            policy = Policy(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
        layer = sum(p.numel() for p in policy.hf.model.layers[0].parameters())
        total = sum(p.numel() for p in policy.parameters())  # tied weights counted once
        root = total - sum(p.numel() for p in policy.hf.model.layers.parameters())
        shard_model(policy, torch.device("meta"))
        local = sum(p.to_local().numel() for p in policy.parameters())
    finally:
        dist.destroy_process_group()
    return total, local, root, layer


def _peak(fn, device) -> int:
    """Peak bytes of activations + temporaries on `device` while fn runs (torch's MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    mt = MemTracker()
    with mt:
        fn()
    peak = mt.get_tracker_snapshot("peak")[device]
    return peak[_MemRefType.ACT] + peak[_MemRefType.TEMP]


def _saved_bytes(fn, exclude) -> int:
    """Bytes autograd keeps for the backward pass while fn runs (saved-tensor hooks), parameters excluded."""
    seen, total = {p.untyped_storage().data_ptr() for p in exclude}, 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def activation_bytes(path: str, tokens: int, chunk: int, device=torch.device("cpu"), dtype=torch.bfloat16,
                     **changes) -> dict:
    """Measured bytes per trained token at the real width: `layer`, what one decoder layer saves for its backward
    (with gradient checkpointing each layer keeps only its input, `layer_input`, and the layer being recomputed
    holds `layer` again); `head`, the peak of grpo.token_logprobs's forward and backward per token (up to
    `chunk` tokens); `prefill`, the transient of one layer's no-grad forward per prompt token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(path, 1, **changes), dtype=dtype,
                                             attn_implementation="sdpa").to(device)
    d, V = model.config.hidden_size, model.config.vocab_size
    ids = torch.randint(0, 1000, (1, tokens), device=device)
    model.train()
    layer = _saved_bytes(lambda: model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             use_cache=False).last_hidden_state.float().square().mean(),
                         list(model.parameters()))
    model.eval()
    with torch.no_grad():
        prefill = _peak(lambda: model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True), device)
    T = min(tokens, chunk)
    h = torch.randn(T, d, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(V, d, device=device) * 0.02).to(dtype)  # its dense (V, d) gradient is counted with the root's
    y = torch.randint(0, V, (T,), device=device)

    def head(n):
        logp, _ = grpo.token_logprobs(h[:n], w, y[:n], 1.0, chunk)
        logp.sum().backward()

    # a fixed part and a part per token (two sizes): at a few tokens the fixed part dominates (the check's small
    # micro-batches), at thousands the per-token part
    big, small = _peak(lambda: head(T), device), _peak(lambda: head(max(1, T // 4)), device)
    per_token = (big - small) / (T - max(1, T // 4)) if T > 1 else big
    return {"layer": layer / tokens, "layer_input": dtype.itemsize * d, "head": per_token,
            "head_fixed": max(0.0, big - per_token * T), "prefill": prefill / tokens}


def table(name: str, world: int, act: dict, chunk: int, max_batch_size: int, prompt_frac: float,
          micro_batch_tokens: int = 0) -> dict:
    """The per-rank numbers of one model and world size on a GPU (bf16 compute and generation copy, gradient
    checkpointing, responses longer than the log-prob chunk): the largest rollout.max_batch_tokens and
    train.micro_batch_tokens that fit 80 and 40 GB cards, and update_peak at micro_batch_tokens."""
    cfg = hf_config(CONFIGS[name])
    params, local, root, layer = shard_elements(cfg, world)
    L, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    b = {"master fp32": 4 * local, "grads fp32": 4 * local, "AdamW fp32 x2": 8 * local, "KL reference fp32": 4 * local,
         "generation copy bf16": 2 * params, "FSDP2 unsharded (bf16 gather, fp32 root grad)": 2 * (root + 2 * layer) + 4 * root}
    kv_per_token = 2 * L * kv * hd * 2
    act_per_token = L * act["layer_input"] + act["layer"]  # checkpointed inputs + the layer being recomputed
    sampling = 3 * max_batch_size * cfg.vocab_size * 4
    gen_static = b["master fp32"] + b["AdamW fp32 x2"] + b["KL reference fp32"] + b["generation copy bf16"]

    def peak(tokens):  # the update phase, several micro-batches of `tokens`, responses of at least a chunk
        return update_peak(cfg, world, act, tokens, tokens, chunk, torch.bfloat16, torch.bfloat16, True)

    fit = {}
    for cap in (80, 40):
        usable = (cap - HEADROOM_GB) * GB
        # a generate batch: KV for every token of its rows + the prefill of its prompt tokens (a fraction of them)
        per_gen_token = kv_per_token + prompt_frac * act["prefill"]
        lo, hi = 0, 1 << 24  # the largest micro-batch whose predicted peak fits (the peak grows with tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if peak(mid)["total"] <= usable else (lo, mid - 1)
        fit[cap] = (max(0, int((usable - gen_static - sampling) // per_gen_token)), lo if peak(lo)["total"] <= usable else 0)
    zero = peak(0)
    return {"model": name, "world": world, "params": params, "bytes": b, "kv_per_token": kv_per_token,
            "micro_batch_tokens": micro_batch_tokens,
            "update_peak": peak(micro_batch_tokens)["total"] if micro_batch_tokens else None,
            "act_per_token": act_per_token, "head": act.get("head_fixed", 0.0) + chunk * act["head"], "sampling": sampling,
            "gen_static": gen_static, "train_static": zero["total"] - max(zero["head phase"], zero["backward phase"]),
            "fit": fit}


def update_peak(cfg, world: int, act: dict, tokens: int, resp_tokens: int, chunk: int, dtype, gen_dtype,
                checkpointing: bool, kl: bool = True, micro_batches: int = 2,
                accumulate_unsharded: bool = False) -> dict:
    """Predicted bytes on one rank while the update runs a micro-batch of `tokens` positions (`resp_tokens` of
    them trained), as phases, not as a sum of everything (checked against FSDP2's memory tracker by --check):

    - always: fp32 master shards, AdamW's two moments, the KL reference's shards, the generation copy, and the
      root module (embeddings, lm_head) gathered in the compute dtype for the whole forward and backward;
    - the head phase (the log-prob head's forward and backward over min(chunk, resp_tokens) tokens): its
      temporaries (a fixed part and a part per token, measured at two sizes), one prefetched decoder layer, and the activations alive then (with checkpointing the L
      layer inputs, without it all L layers' saved tensors);
    - the layers' backward: two gathered layers, the L inputs plus the recomputed layer's saved tensors (or
      all L layers' without checkpointing) and the root's fp32 gradient;
    - the sharded fp32 gradients: in the backward phase of a single micro-batch, throughout from the second;
    - `accumulate_unsharded`: had train.update_policy skipped the reduce-scatter until the last of several
      micro-batches (FSDP2's set_requires_gradient_sync), every layer's gradient would stay unsharded in fp32
      in between: 4 bytes a parameter on top of both phases (measured; it no longer does)."""
    params, local, root, layer = shard_elements(cfg, world)
    L, size = cfg.num_hidden_layers, dtype.itemsize
    saved = tokens * (L * act["layer_input"] if checkpointing else L * act["layer"])  # alive in the head phase
    b = {"master fp32": 4 * local, "AdamW fp32 x2": 8 * local, "KL reference fp32": 4 * local if kl else 0,
         "generation copy": gen_dtype.itemsize * params, "root gathered": size * root,
         "grads fp32 (from micro-batch 2)": 4 * local if micro_batches > 1 else 0,
         "unsharded gradients": 4 * params if accumulate_unsharded else 0}
    head = act.get("head_fixed", 0.0) + min(chunk, resp_tokens) * act["head"] + size * layer + saved
    backward = (2 * size * layer + saved + (tokens * act["layer"] if checkpointing else 0) + 4 * root
                + (4 * local if micro_batches == 1 else 0))
    b["head phase"], b["backward phase"] = head, backward
    b["total"] = sum(v for k, v in b.items() if "phase" not in k) + max(head, backward)
    return b


def check(args) -> int:
    """Predicted against measured: the rehearsal shape (bench/rehearsal.py: Qwen2.5-Math-1.5B cut to
    --layers at --hidden width, full vocabulary, tied, 2 gloo ranks, FSDP2, fp32 on CPU) trained through
    train.main with torch's FSDP2 memory tracker around every update_policy call (tests/dist_worker.py), with
    gradient checkpointing on and off. 0 when every prediction is within --tolerance of its measurement."""
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import rehearsal

    work = tempfile.mkdtemp(prefix="memory_check_")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # benches leave nothing behind in /tmp
    args.micro_batch_tokens = args.micro_batch_tokens or 16384
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                 num_key_value_heads=2)
    rehearsal.build_model(f"{work}/model", args.hidden, args.layers, args.heads, 2, args.intermediate)
    rehearsal.write_rows(f"{work}/math.jsonl", 2 * args.prompts)
    cfg = hf_config(CONFIGS["1.5b"], args.layers, **shape)
    act = activation_bytes(CONFIGS["1.5b"], args.tokens, args.chunk, torch.device("cpu"), torch.float32, **shape)
    print(f"{platform.node()}: torch {torch.__version__}; hidden {args.hidden}, {args.layers} layers, vocabulary "
          f"{cfg.vocab_size:,} (tied), 2 ranks, fp32 (CPU); {args.prompts} prompts x {args.n} rollouts x "
          f"{args.new_tokens} new tokens; micro_batch_tokens {args.micro_batch_tokens:,}")
    print("| checkpointing | largest micro-batch (trained tokens), per rank | predicted | measured (rank 0, 1) | "
          "measured / predicted |\n|---|---|---|---|---|")
    worst = 0.0
    for ckpt in (True, False):
        out = f"{work}/run_{ckpt}"
        run = rehearsal.overrides(f"{work}/model", f"{work}/math.jsonl", out, args.new_tokens, steps=2)
        run = [a for a in run if not a.startswith(("--cures.sigma", "--run.save_every"))] + [
            "--data.num_subsets=1", f"--rollout.prompts_per_step={args.prompts}",
            f"--rollout.rollouts_per_step={args.prompts * args.n}", f"--train.mini_batch_prompts={args.prompts}",
            f"--train.micro_batch_tokens={args.micro_batch_tokens}", f"--train.logprob_chunk={args.chunk}",
            f"--model.gradient_checkpointing={str(ckpt).lower()}", "--run.save_every=0"]
        os.environ["TRACK_UPDATE_MEMORY"] = "1"
        rehearsal.torchrun(run)
        measured, predicted, sizes = [], [], ""
        for rank in (0, 1):
            with open(f"{out}/update_memory_rank{rank}.json") as f:
                last = json.load(f)[-1]  # the second step's update: AdamW's state exists
            measured.append(last["peak"]["cpu"]["Total"])
            predicted.append(update_peak(cfg, 2, act, last["tokens"], last["resp_tokens"], args.chunk, torch.float32,
                                         torch.float32, ckpt, micro_batches=last["micro_batches"])["total"])
            if args.verbose:
                print(rank, {k: round(v / GB, 3) for k, v in last["peak"]["cpu"].items()}, last["micro_batches"])
            sizes += f"{', ' if sizes else ''}{last['tokens']:,} ({last['resp_tokens']:,})"
        ratios = [m / p for m, p in zip(measured, predicted)]
        worst = max(worst, *(abs(r - 1) for r in ratios))
        print(f"| {'on' if ckpt else 'off'} | {sizes} | {predicted[0] / GB:.2f} GB | "
              f"{measured[0] / GB:.2f}, {measured[1] / GB:.2f} GB | {ratios[0]:.2f}, {ratios[1]:.2f} |")
    print(f"largest disagreement {100 * worst:.0f} % (tolerance {100 * args.tolerance:.0f} %)")
    return 0 if worst <= args.tolerance else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[8, 4, 2])
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the CPU activation measurement")
    ap.add_argument("--chunk", type=int, default=TrainConfig.logprob_chunk)
    ap.add_argument("--max-batch-size", type=int, default=RolloutConfig.max_batch_size)
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="also predict the update phase's peak at a micro-batch of this many tokens")
    ap.add_argument("--device", default="cpu", help="where to measure the activations (cuda: the real kernels)")
    ap.add_argument("--json", default="", help="also write the numbers here")
    ap.add_argument("--check", action="store_true", help="predicted against measured at the rehearsal shape")
    ap.add_argument("--hidden", type=int, default=1536, help="--check: width")
    ap.add_argument("--intermediate", type=int, default=8960, help="--check: MLP width")
    ap.add_argument("--heads", type=int, default=12, help="--check: attention heads")
    ap.add_argument("--layers", type=int, default=2, help="--check: decoder layers")
    ap.add_argument("--prompts", type=int, default=8, help="--check: prompts per step")
    ap.add_argument("--n", type=int, default=8, help="--check: rollouts per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="--check: response length")
    ap.add_argument("--verbose", action="store_true", help="--check: print the measured peak by category")
    ap.add_argument("--tolerance", type=float, default=0.2, help="--check: largest accepted |measured/predicted - 1|")
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args))
    # a generate row reserves prompt + max_new_tokens of KV; its prompt share (1,024 of 1,024 + 3,072) is prefilled
    prompt_frac = DataConfig.max_prompt_len / (DataConfig.max_prompt_len + RolloutConfig.max_new_tokens)
    print(f"{platform.node()}: torch {torch.__version__}; activations measured on {args.device} in bf16 over {args.tokens} "
          f"tokens (one decoder layer and the log-prob head, real width); usable = capacity - {HEADROOM_GB:.0f} GB")
    rows = []
    for name in args.models:
        act = activation_bytes(CONFIGS[name], args.tokens, args.chunk, torch.device(args.device))
        print(f"\n{name}: per trained token, a decoder layer saves {act['layer'] / 2**10:.0f} KiB for backward, its "
              f"checkpointed input {act['layer_input'] / 2**10:.0f} KiB; log-prob head {act['head_fixed'] / 2**20:.0f} MiB + {act['head'] / 2**20:.2f} MiB/token up to {args.chunk} tokens, "
              f"prefill {act['prefill'] / 2**10:.0f} KiB/prompt token")
        for world in args.worlds:
            r = table(name, world, act, args.chunk, args.max_batch_size, prompt_frac, args.micro_batch_tokens)
            rows.append(r)
            print(f"  {world} ranks, {r['params'] / 1e9:.2f}B parameters: "
                  + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in r["bytes"].items()))
            print(f"    KV cache {r['kv_per_token'] / 2**10:.0f} KiB/token, sampling logits {r['sampling'] / GB:.2f} GB, "
                  f"activations {r['act_per_token'] / 2**10:.0f} KiB/token + head {r['head'] / GB:.2f} GB; static: "
                  f"generation {r['gen_static'] / GB:.1f} GB, update {r['train_static'] / GB:.1f} GB")
            print("    largest rollout.max_batch_tokens / train.micro_batch_tokens: "
                  + ", ".join(f"{cap} GB: {g:,} / {m:,}" for cap, (g, m) in r["fit"].items()))
            if r["update_peak"]:
                print(f"    predicted update peak at micro_batch_tokens={args.micro_batch_tokens:,}: "
                      f"{r['update_peak'] / GB:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
