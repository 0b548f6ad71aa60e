"""Time per GRPO step: ours (train.py) against TRL's GRPOTrainer, same tiny model, batch and lengths, one run.

Both: the bundled tiny model, 64 prompts x 8 rollouts, 16 new tokens, temperature 1, one optimiser step per
step on all 512 completions, KL coefficient 0.001 with a reference model, the same answer checker
(reward.score_batch). Ours runs the GRPO baseline (uniform sampling and allocation) so the sampling work
is the same, twice: with padded micro-batches (--train.share_prompt=false) and with shared prompts (each
prompt forwarded once per group in the log-prob and update passes, as configs/tiny.yaml sets). The first
step of each (our cold start, TRL's warm-up) is not timed. TRL is not a dependency of the project:
`pip install trl` to run this.

    python bench/trl_compare.py [--steps 5]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M, G, NEW = 64, 8, 16


def ours(steps, out, extra=()):
    import train

    overrides = [*extra, "--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--run.out_dir={out}",
                 "--cures.sampling=uniform", "--cures.allocation=uniform", f"--rollout.prompts_per_step={M}",
                 f"--rollout.rollouts_per_step={M * G}", f"--rollout.max_new_tokens={NEW}",
                 f"--train.mini_batch_prompts={M}", f"--run.max_steps={steps}", "--run.save_every=0", "--eval.data=",
                 "--data.num_subsets=1", f"--train.steps_per_subset={steps}"]
    train.main(overrides)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["time/step"] for r in rows if r["step"] > 1]  # step 1 warms up


def trl(steps, out):
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

    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=M * G, num_generations=G, max_completion_length=NEW,
                     learning_rate=3e-4, beta=0.001, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
                     max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     gradient_accumulation_steps=1, bf16=False, seed=0)
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "models", "tiny"), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", "tiny"))
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times[1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    import torch

    out = tempfile.mkdtemp(prefix="trl_compare_")
    t_ours = ours(args.steps, os.path.join(out, "ours"), ["--train.share_prompt=false"])
    t_shared = ours(args.steps, os.path.join(out, "ours_shared"), ["--train.share_prompt=true"])
    t_trl = trl(args.steps, os.path.join(out, "trl"))
    import trl as trl_pkg

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}, trl {trl_pkg.__version__}")
    print(f"{M} prompts x {G} rollouts, {NEW} new tokens, {args.steps - 1} timed steps each")
    print("| trainer | seconds per step | steps timed |\n|---|---|---|")
    print(f"| ours (train.py, GRPO baseline), padded micro-batches | {mean(t_ours):.2f} | {len(t_ours)} |")
    print(f"| ours, shared prompts (--train.share_prompt=true) | {mean(t_shared):.2f} | {len(t_shared)} |")
    print(f"| TRL GRPOTrainer | {mean(t_trl):.2f} | {len(t_trl)} |")
    print(f"speed-up, TRL time / ours: {mean(t_trl) / mean(t_ours):.2f}x (padded micro-batches), "
          f"{mean(t_trl) / mean(t_shared):.2f}x (shared prompts)")


if __name__ == "__main__":
    main()
