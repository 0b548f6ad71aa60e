"""Time per phase of full CurES steps (train.py as users run it), from the run's metrics.jsonl.

    python bench/step.py                                  # CPU: the tiny default, 4 steps
    python bench/step.py --model-config bench/qwen2.5-1.5b/config.json -- --rollout.max_new_tokens=1024 ...

Extra arguments after `--` are train.py overrides. With --model-config a random-weight model of that
architecture is built first (no network), with the bundled byte-level tokenizer.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def random_model(config_path, out):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny.build import build_tokenizer

    cfg = AutoConfig.from_pretrained(config_path)
    tok = build_tokenizer()
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--model-config", default="", help="build a random-weight model of this architecture")
    ap.add_argument("--model-dir", default="", help="an existing model directory (parameters counted for MFU)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--memory-json", default="", help="bench/memory.py --json output with one update_peak: hold the "
                    "measured peak of the update phase against it (exit 3 beyond +-20 %%)")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = tempfile.mkdtemp(prefix="bench_step_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # benches leave nothing behind in /tmp
    overrides = [f"--run.out_dir={out}/run", f"--run.max_steps={args.steps}", "--run.save_every=0", "--eval.data="]
    params = None
    if args.model_config:
        params = random_model(args.model_config, f"{out}/model")
        overrides.append(f"--model.path={out}/model")
    elif args.model_dir:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(args.model_dir)).parameters())
        overrides.append(f"--model.path={args.model_dir}")
    launcher = [sys.executable] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          f"--nproc_per_node={args.nproc}"]
    cmd = launcher + [os.path.join(ROOT, "train.py"), "--config", args.config, *overrides, *extra]
    log_path, metrics_path = f"{out}/train.log", f"{out}/run/metrics.jsonl"

    def steps_done():
        if not os.path.exists(metrics_path):
            return []
        return [json.loads(line) for line in open(metrics_path) if '"time/step"' in line]

    def stop(*_):  # a timeout stops train.py too, shows how far it got and reports the steps it finished
        proc.kill()
        print(open(log_path).read()[-6000:])
        rows = steps_done()
        if rows:
            print(f"timed out after {len(rows)} of {args.steps} steps; those steps:")
            report(rows, args, extra, params)
        sys.exit(124)

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        signal.signal(signal.SIGTERM, stop)
        while proc.poll() is None and len(steps_done()) < args.steps:
            time.sleep(1.0)
        if proc.poll() is None:  # every step is logged: the final save is not part of a step, nor a stop's save
            proc.kill()
            proc.wait()
        elif proc.returncode != 0:
            print(open(log_path).read()[-8000:])
            sys.exit(proc.returncode)
    sys.exit(report(steps_done(), args, extra, params))


def report(rows: list[dict], args, extra: list[str], params) -> int:
    """Print the phase table and figures of the logged steps; 3 if the update's peak memory disagrees with
    bench/memory.py's prediction by more than 20 %, else 0."""
    steady = rows[1:] or rows  # the first step carries the cold start

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"machine: {name}; {len(rows)} steps ({len(steady)} timed); config {args.config} {' '.join(extra)}")
    keys = ["time/sync", "time/curriculum", "time/rollout_and_reward", "time/reward", "time/logprobs", "time/update",
            "time/step"]  # time/reward: the scoring part of time/rollout_and_reward
    print("| phase | seconds per step | share |\n|---|---|---|")
    total = sum(r["time/step"] for r in steady) / len(steady)
    for k in keys:
        v = sum(r.get(k, 0.0) for r in steady) / len(steady)
        print(f"| {k}{' (part of time/rollout_and_reward)' if k == 'time/reward' else ''} | {v:.3f} | "
              f"{100 * v / total:.0f}% |")
    cold = rows[0].get("time/cold_start")
    if cold:
        print(f"cold start (first step only): {cold:.2f} s")
    for k in ("perf/rollout_tokens_per_s", "perf/generation_tokens_per_s", "perf/update_tokens_per_s", "perf/peak_mem_gb", "train/response_len"):
        if k in steady[-1]:
            print(f"{k}: {sum(r[k] for r in steady) / len(steady):.1f}")
    status = 0
    for k in sorted(k for k in steady[-1] if k.startswith("perf/peak_gb/")):
        print(f"{k}: {max(r[k] for r in rows):.2f} GiB (max over steps)")
    if args.memory_json and "perf/peak_gb/update" not in rows[0]:
        print("update peak: not measured (no GPU)")
    elif args.memory_json:
        predicted = [r["update_peak"] for r in json.load(open(args.memory_json)) if r.get("update_peak")][0] / 2**30
        measured = max(r["perf/peak_gb/update"] for r in rows)
        verdict = "agree" if abs(measured / predicted - 1) <= 0.2 else "DISAGREE"
        status = 0 if verdict == "agree" else 3
        print(f"update peak: predicted {predicted:.2f} GiB (bench/memory.py), measured {measured:.2f} GiB "
              f"(torch.cuda.max_memory_allocated), measured/predicted {measured / predicted:.2f}: {verdict}")
    if params:
        upd = sum(r["perf/update_tokens_per_s"] for r in steady) / len(steady)
        # update phase: forward + backward of the policy = 6 N FLOPs per token (no recompute counted)
        if torch.cuda.is_available():
            print(f"update MFU (6N flops/token vs 989 TFLOP/s bf16 dense H100/H200; checkpointing's recompute "
                  f"not counted): {100 * 6 * params * upd / 989e12:.1f}%")
        print(f"parameters: {params / 1e9:.2f}B")
    return status


if __name__ == "__main__":
    main()
