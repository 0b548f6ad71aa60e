"""Time per GRPO step: ours (train.py) against TRL's GRPOTrainer, same tiny model, batch and lengths, one run.

Both: the bundled tiny model, 64 prompts x 8 rollouts, temperature 1, one optimiser step per step on all 512
completions, KL coefficient 0.001 with a reference model, the same answer checker
(reward.score_batch). Ours runs the GRPO baseline (uniform sampling and allocation) so the sampling work
is the same, twice: with padded micro-batches (--train.share_prompt=false) and with shared prompts (each
prompt forwarded once per group in the log-prob and update passes, as configs/tiny.yaml sets). The first
step of each (our cold start, TRL's warm-up) is not timed. TRL is not a dependency of the project:
`pip install trl datasets` to run this.

Lengths: 16 new tokens is the tiny task's natural length (answers end by ~12 tokens). At 128 and 512 every
completion is forced to exactly that length in both trainers (`min_new_tokens` = `max_new_tokens`: EOS is
suppressed until then), so each generates and trains on the same number of tokens.

    python bench/trl_compare.py [--steps 5] [--new-tokens 16 128 512]
"""

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M, G = 64, 8


@contextlib.contextmanager
def forced_lengths(new: int):
    """rollout.generate's responses all exactly `new` tokens long (EOS suppressed until then: min_new_tokens), for
    benchmarks that need a fixed number of decoding steps; train.py never does this."""
    import rollout

    real = rollout.sampling_config

    def forced(*args, **kwargs):
        cfg = real(*args, **kwargs)
        cfg.min_new_tokens = new
        return cfg

    rollout.sampling_config = forced
    try:
        yield
    finally:
        rollout.sampling_config = real


def ours(steps, out, new, extra=()):
    import train

    overrides = [*extra, "--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--run.out_dir={out}",
                 "--cures.sampling=uniform", "--cures.allocation=uniform", f"--rollout.prompts_per_step={M}",
                 f"--rollout.rollouts_per_step={M * G}", f"--rollout.max_new_tokens={new}",
                 f"--train.mini_batch_prompts={M}", f"--run.max_steps={steps}", "--run.save_every=0", "--eval.data=",
                 "--data.num_subsets=1", f"--train.steps_per_subset={steps}"]
    with forced_lengths(new) if new > 16 else contextlib.nullcontext():  # 16: the tiny task's natural length
        train.main(overrides)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["time/step"] for r in rows if r["step"] > 1]  # step 1 warms up


def trl(steps, out, new):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import reward

    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "tiny", "train.jsonl"))][:M * (steps + 1)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]}
                              for r in rows])

    def math_reward(completions, answer, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return list(reward.score_batch(texts, answer, workers=2))

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=M * G, num_generations=G, max_completion_length=new,
                     learning_rate=3e-4, beta=0.001, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
                     max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     gradient_accumulation_steps=1, bf16=False, seed=0,
                     generation_kwargs={"min_new_tokens": new} if new > 16 else None)
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "models", "tiny"), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", "tiny"))
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times[1:]


VARIANTS = {"padded": ("ours, padded micro-batches", ["--train.share_prompt=false"]),
            "shared": ("ours, shared prompts", ["--train.share_prompt=true"]),
            "trl": ("TRL GRPOTrainer", None)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16, 128, 512])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    import torch
    import trl as trl_pkg

    out = tempfile.mkdtemp(prefix="trl_compare_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # benches leave nothing behind in /tmp
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}, trl {trl_pkg.__version__}")
    print(f"{M} prompts x {G} rollouts, {args.steps - 1} timed steps each; seconds per step")
    results = {}
    for new in args.new_tokens:
        for v in args.variants:
            name, extra = VARIANTS[v]
            times = trl(args.steps, os.path.join(out, f"trl{new}"), new) if v == "trl" else \
                ours(args.steps, os.path.join(out, f"{v}{new}"), new, extra)
            results[new, v] = mean(times)
            print(f"  {new} new tokens, {name}: {results[new, v]:.2f} s per step", flush=True)
    ours_v = [v for v in args.variants if v != "trl"]
    print("| new tokens | " + " | ".join(VARIANTS[v][0] for v in args.variants)
          + "".join(f" | TRL / {v}" for v in ours_v if "trl" in args.variants) + " |")
    print("|---" * (1 + len(args.variants) + len(ours_v) * ("trl" in args.variants)) + "|")
    for new in args.new_tokens:
        row = [f"{results[new, v]:.2f}" for v in args.variants]
        if "trl" in args.variants:
            row += [f"{results[new, 'trl'] / results[new, v]:.2f}x" for v in ours_v]
        print(f"| {new}{' (forced)' if new > 16 else ''} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
