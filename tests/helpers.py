"""Shared test helpers: the small and tiny-default run arguments, a torchrun launcher, data-file writers, a
recorder of the paged path's attention calls."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TRAIN_DATA = os.path.join(ROOT, "data", "tiny", "train.jsonl")


def varlen_calls(monkeypatch) -> list[int]:
    """Record each call of rollout.varlen_attention (the paged path's attention without flash-attn) for the test:
    the returned list gets the call's query tokens, and the kernel still runs."""
    import rollout

    calls, kernel = [], rollout.varlen_attention
    monkeypatch.setattr(rollout, "varlen_attention", lambda q, *a, **k: calls.append(q.shape[0]) or kernel(q, *a, **k))
    return calls


def small_run(model_dir, out_dir, *extra):
    return [f"--model.path={model_dir}", f"--data.train={TRAIN_DATA}", "--data.max_prompts=60",
            "--data.num_subsets=2", "--train.steps_per_subset=2", "--rollout.prompts_per_step=6",
            "--rollout.rollouts_per_step=20", "--rollout.max_new_tokens=8", "--train.mini_batch_prompts=3",
            "--train.lr=1e-3", "--cures.cold_start_rollouts=2", "--run.reward_workers=2", "--run.save_every=1",
            "--train.micro_batch_tokens=400", f"--run.out_dir={out_dir}", *extra]


def tiny_default_run(out_dir, *extra):
    """small_run with the bundled pretrained tiny model and its prompt format: rewards are not all 0."""
    return small_run(os.path.join(ROOT, "models", "tiny"), out_dir, "--data.system_prompt=",
                     "--data.user_template={problem}", "--rollout.max_new_tokens=16", "--train.lr=3e-4", *extra)


def final_weights(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def sigterm_at(real, when, pid=None):
    """`real` wrapped so that the first call k (counted from 1) for which when(k, args, kwargs) holds sends this
    process (or `pid`) SIGTERM (train.main's stop handler) just before running: a stop request in that phase.
    Returns (wrapped, fired), fired listing the call that sent it."""
    import signal

    calls, fired = [0], []

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if not fired and when(calls[0], args, kwargs):
            fired.append(calls[0])
            os.kill(pid or os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return wrapped, fired


def nth_call_after(started, n):
    """A `when` for sigterm_at: true on the n-th call (counted from 1) made once started() holds."""
    first = []

    def when(k, args, kwargs):
        if not first and started():
            first.append(k)
        return bool(first) and k == first[0] + n - 1
    return when


def torchrun(args, nproc=2, script=os.path.join("tests", "dist_worker.py"), env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29561",
           os.path.join(ROOT, script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=None if env is None else {**os.environ, **env})
    assert res.returncode == 0 or not check, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def write_rows(path, rows):
    if str(path).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def numina_rows(tag, n):  # the schema of ScaleML-RLHF/numina_math_k: problem + a ready answer
    return [{"problem": f"{tag} problem {i}: what is {i}+1?", "answer": str(i + 1), "source": "stand-in"}
            for i in range(n)]
