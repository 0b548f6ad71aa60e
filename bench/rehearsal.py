"""The 1.5B code path at real shapes, on CPU: configs/1.5b.yaml with overrides only for size.

A random-weight Qwen2.5-Math-1.5B cut to a few layers (full 151,936-token vocabulary, tied embeddings, the
real width by default), the real Qwen2.5-Math tokenizer and chat template (tests/qwen_tokenizer.py), MATH rows
with a `solution` field (gold = its \\boxed{} answers), 2 gloo ranks under torchrun, FSDP2, gradient
checkpointing, --cures.sigma=gradient, a checkpoint each step and a resume. A random model never answers
right, so tests/dist_worker.py `rehearse` marks about a quarter of the responses correct on top of the real
checker (a hash of the text) and advantages and gradients are not zero. Prints time per phase and peak
memory per rank. tests/test_train.py runs the same at a narrow width.

    python bench/rehearsal.py                       # width 1,536, 2 layers, 2 ranks
    python bench/rehearsal.py --hidden 256 --layers 2
    python bench/rehearsal.py --stop draw_and_generate:2 --stop update_policy:2

--stop NAME:K (repeatable) instead times a stop as a scheduler sends it: a fresh run (a checkpoint every step),
SIGTERM to the torchrun agent as train.NAME is called the K-th time (rank 0 sends it, tests/dist_worker.py
STOP_IN), and the seconds from the signal to the agent's exit, against torchrun's 30 s before SIGKILL: which
step was saved (or the update abandoned), how long the save took, whether a rank had to be killed.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "..", "shared", "benchmarks", "math", "test.jsonl")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def build_model(out: str, hidden: int = 1536, layers: int = 2, heads: int = 12, kv_heads: int = 2,
                intermediate: int = 8960, tokenizer_dir: str = "") -> int:
    """Random Qwen2.5-Math-1.5B (bench/qwen2.5-1.5b/config.json) cut to `layers`, at `hidden` width, saved with
    the real tokenizer (copied from tokenizer_dir, else built). Returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qwen_tokenizer import save_tokenizer

    with open(os.path.join(ROOT, "bench", "qwen2.5-1.5b", "config.json")) as f:
        real = json.load(f)
    real.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_window_layers=layers)
    cfg = AutoConfig.for_model(real.pop("model_type"), **real)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    else:
        save_tokenizer(out)
    return sum(p.numel() for p in model.parameters())


def write_rows(path: str, n: int, source: str = MATH):
    """The first n MATH rows with the fields the trainer reads (problem, solution)."""
    with open(source) as f, open(path, "w") as g:
        for line in list(f)[:n]:
            row = json.loads(line)
            g.write(json.dumps({"problem": row["problem"], "solution": row["solution"]}) + "\n")


def overrides(model_dir: str, data: str, out_dir: str, max_new_tokens: int = 8, steps: int = 4) -> list[str]:
    """configs/1.5b.yaml, cut for size only: 2 subsets x 2 steps, 4 prompts x 16 rollouts a step; sdpa and the
    dynamic KV cache (no flash-attention on CPU; continuous batching is not bitwise reproducible, and the test
    compares a resumed run with an uninterrupted one)."""
    return ["--config", os.path.join(ROOT, "configs", "1.5b.yaml"), f"--model.path={model_dir}",
            "--model.attn_implementation=sdpa", f"--data.train=[{data}]", "--data.answer_key=solution",
            "--data.answer_format=solution", "--data.num_subsets=2", "--data.max_prompts=0",
            "--cures.cold_start_rollouts=2", "--cures.sigma=gradient", "--rollout.prompts_per_step=4",
            "--rollout.rollouts_per_step=16", f"--rollout.max_new_tokens={max_new_tokens}",
            "--rollout.max_batch_tokens=65536", "--rollout.cache=dynamic", "--train.steps_per_subset=2", "--train.mini_batch_prompts=2",
            "--train.micro_batch_tokens=2048", "--eval.data=", "--run.save_every=1", "--run.reward_workers=1",
            "--run.resume=auto", f"--run.max_steps={steps}", f"--run.out_dir={out_dir}"]


def torchrun(args: list[str], nproc: int = 2, port: int = 29563, timeout: int = 1200, env: dict | None = None,
             check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           os.path.join(ROOT, "tests", "dist_worker.py"), "rehearse", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if res.returncode != 0 and check:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-6000:])
    return res


def time_stop(model: str, data: str, out: str, where: str, max_new_tokens: int) -> dict:
    """A fresh 2-step run, SIGTERM to its torchrun agent as train.<where> (NAME:K) is called: what happened and
    the seconds from the signal to the agent's exit."""
    res = torchrun([*overrides(model, data, out, max_new_tokens, steps=2), "--run.save_every=1"],
                   env={"STOP_IN": f"agent:{where}"}, check=False)
    ended = time.time()
    log = res.stdout + res.stderr
    sent = float(open(os.path.join(out, "stop_sent_at")).read())
    said = [line for line in log.splitlines() if "stop requested" in line]
    return {"where": where, "exit_s": ended - sent, "killed": "forcefully exiting via" in log,
            "said": " / ".join(line.split("stop requested ")[-1] for line in said) or "(nothing: " + log[-300:] + ")"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--stop", action="append", default=[], metavar="NAME:K",
                    help="time a SIGTERM to the torchrun agent as train.NAME is called the K-th time (repeatable)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rehearsal_")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # benches leave nothing behind in /tmp
    params = build_model(f"{work}/model", args.hidden, args.layers, args.heads, 2, args.intermediate)
    write_rows(f"{work}/math.jsonl", args.rows)
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab 151,936, tied)")
    if args.stop:
        print("| SIGTERM to the agent at | signal to the agent's exit (s) | a rank killed | what the run said |\n"
              "|---|---|---|---|")
        for k, where in enumerate(args.stop):
            r = time_stop(f"{work}/model", f"{work}/math.jsonl", f"{work}/stop{k}", where, args.max_new_tokens)
            print(f"| {r['where']} | {r['exit_s']:.1f} | {'yes' if r['killed'] else 'no'} | {r['said']} |", flush=True)
        return
    out = f"{work}/run"
    t0 = time.time()
    torchrun(overrides(f"{work}/model", f"{work}/math.jsonl", out, args.max_new_tokens, steps=2))
    t1 = time.time()
    torchrun(overrides(f"{work}/model", f"{work}/math.jsonl", out, args.max_new_tokens, steps=4))  # resume
    print(f"2 steps + resume to 4: {t1 - t0:.0f} s + {time.time() - t1:.0f} s (each includes start-up)")
    report(out)


def report(out: str):
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    phases = ["time/cold_start", "time/grad_stats", "time/sync", "time/curriculum", "time/rollout_and_reward",
              "time/logprobs", "time/update", "time/step"]
    print("| step | " + " | ".join(p.removeprefix("time/") + " (s)" for p in phases)
          + " | mean response length | reward |\n|" + "---|" * (len(phases) + 3))
    for r in rows:
        if r["step"] > 0:
            print(f"| {r['step']} | " + " | ".join(f"{r[p]:.1f}" if p in r else "-" for p in phases)
                  + f" | {r['train/response_len']:.0f} | {r['train/reward']:.2f} |")
    for rank in (0, 1):
        with open(f"{out}/memory_rank{rank}.json") as f:
            print(f"rank {rank}: peak RSS {json.load(f)['peak_rss_gb']:.2f} GB")

if __name__ == "__main__":
    main()
