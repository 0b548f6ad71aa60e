"""Why does train.py decode slower than rollout.generate on its own? ms per decoding step, in one process, as the
trainer's setting is built up around the generation model stage by stage.

    python bench/gen_in_trainer.py --config configs/1.5b.yaml -- --model.path=DIR --model.attn_implementation=sdpa

On the H200 (2026-11-29, bench/results/gpu) rollout.generate decoded a random Qwen2.5-1.5B at 24-31 ms a step at
batch 128-256 in bench/decode_cost.py, but at about 95 ms a step inside train.py (batch 71 and 185 alike, so
not the device's bytes). Stages, each timed on the same prompts:
  1. the generation model loaded as build_models loads it, alone in the process;
  2. after setup_distributed (the one-rank process group train.py makes on a GPU; on CPU with --group);
  3. after build_models (the FSDP2 policy and reference beside it) and sync_generation_weights (the first
     collective, where NCCL starts its threads), for model 1 and for the trainer's own generation copy.
Prompts: the trainer's (load_subsets) and decode_cost's synthetic two; an EOS outside the vocabulary, so that every
row decodes every step.
ms a step = (a call of --new tokens - a call of 1) / (--new - 1), at key lengths not decoded before in the process
(fresh, as in a rollout) and again (seen); with cuDNN's sdpa attention off (rollout's default) and allowed
(torch's own choice: cuDNN first on Hopper, a plan built per new shape). Also printed: the CPUs the process may
run on and its thread count, at each stage.
"""

import argparse
import os
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rollout  # noqa: E402
from infra.config import load_config  # noqa: E402
from infra.data import load_subsets  # noqa: E402


def step_ms(model, prompts, counts, eos, pad, new: int) -> tuple[float, float]:
    """ms a decoding step at key lengths this process has not decoded at before (`fresh`, as every step of a
    rollout is) and at the same lengths again (`seen`): a kernel that plans per shape shows as the difference."""
    def call(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout.generate(model, prompts, counts, max_new_tokens=n, eos_ids=eos, pad_id=pad, seed=0,
                             max_batch_tokens=1 << 30, max_batch_size=1 << 20)
        return time.perf_counter() - t0

    call(2)  # warm-up: the prefill and the first two key lengths
    t1 = call(1)
    fresh, seen = call(new), call(new)
    return 1000 * (fresh - t1) / (new - 1), 1000 * (seen - t1) / (new - 1)


def where() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return f"{len(cpus)} CPUs allowed ({cpus[0]}-{cpus[-1]}), {threading.active_count()} Python threads, " \
           f"{len(os.listdir('/proc/self/task')) if os.path.isdir('/proc/self/task') else '?'} OS threads"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "1.5b.yaml"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--new", type=int, default=17)
    ap.add_argument("--group", action="store_true", help="on CPU too, a one-rank (gloo) process group, so that "
                    "build_models shards with FSDP2 and makes a separate generation copy, as on a GPU")
    args, extra = ap.parse_known_args()
    cfg = load_config(["--config", args.config, *[e for e in extra if e != "--"]])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infra.distributed import setup_distributed
    from infra.models import build_models, sync_generation_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    subsets, _ = load_subsets(cfg, tokenizer)
    train_prompts = [item["prompt_ids"] for item in subsets[0][:args.prompts]]
    lens = sorted(map(len, train_prompts))
    gen1 = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                attn_implementation=cfg.model.attn_implementation).to(device).eval()
    L = lens[len(lens) // 2]
    B = len(train_prompts) * args.n
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; {cfg.model.path}, "
          f"{cfg.model.attn_implementation}; batch {B}, prompts of {lens[0]}-{lens[-1]} tokens (median {L}), "
          f"{args.new} new tokens\n\n| stage | model | prompts | cuDNN attention | ms a step, fresh lengths | "
          "ms a step, seen lengths |\n|---|---|---|---|---|---|", flush=True)
    shift = 0

    def measure(stage, name, model, cudnn=False):
        nonlocal shift
        print(f"<!-- {stage}: {where()} -->", flush=True)
        rollout.SKIP_CUDNN_ATTENTION = not cudnn
        for case in ("trainer's prompts", "synthetic (2 prompts)"):
            shift += args.new + 2  # every measurement at key lengths of its own, so that `fresh` is fresh
            pad = [1] * shift
            if case == "trainer's prompts":
                prompts, counts = [pad + p for p in train_prompts], [args.n] * len(train_prompts)
            else:
                prompts = [pad + [1 + (i % 50) for i in range(L)], pad + [1 + (i % 50) for i in range(L - 8)]]
                counts = [B // 2, B - B // 2]  # decode_cost's kind
            stop = [gen1.config.vocab_size + 7]  # never sampled: every row decodes every step
            fresh, seen = step_ms(model, prompts, counts, stop, tokenizer.pad_token_id, args.new)
            print(f"| {stage} | {name} | {case} | {'allowed' if cudnn else 'off'} | {fresh:.1f} | {seen:.1f} |",
                  flush=True)
        rollout.SKIP_CUDNN_ATTENTION = True

    measure("1 alone", "loaded copy", gen1)
    measure("1 alone", "loaded copy", gen1, cudnn=True)
    if args.group and not cuda and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29573"))
    rank, world, device = setup_distributed()
    measure("2 process group", "loaded copy", gen1)
    policy, ref, gen = build_models(cfg, device, world)
    sync_generation_weights(policy, gen)
    measure("3 trainer's models", "loaded copy", gen1)
    name = "trainer's copy" if gen is not policy.hf else "policy (unsharded)"
    measure("3 trainer's models", name, gen)
    measure("3 trainer's models", name, gen, cudnn=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
