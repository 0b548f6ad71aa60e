"""infra/distributed.py and FSDP2 under torchrun: two gloo ranks keep one curriculum, the same gradient as one
rank, dynamic sampling, a stop on one rank resumed exactly, a clean exit, the real shapes' rehearsal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, final_weights, small_run, tiny_default_run, torchrun
from infra.checkpoint import checkpoint_dirs


@pytest.mark.slow
def test_two_ranks_keep_identical_curriculum(tiny_model_dir, tmp_path):
    out = tmp_path / "dist"
    torchrun(["train", str(out), *small_run(tiny_model_dir, out, "--run.max_steps=3")])
    r0, r1 = np.load(out / "curriculum_rank0.npz"), np.load(out / "curriculum_rank1.npz")
    assert r0["step"] == r1["step"] == 3
    np.testing.assert_array_equal(r0["alpha"], r1["alpha"])
    np.testing.assert_array_equal(r0["beta"], r1["beta"])
    assert r0["alpha"].sum() + r0["beta"].sum() == 30 * 2 + 20  # cold start of subset 1, then one step
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.slow
def test_torchrun_train_py_ends_cleanly(tiny_model_dir, tmp_path):
    """The users' command itself, `torchrun --nproc_per_node=2 train.py ...`: every rank leaves with 0 through
    infra.distributed.leave (no interpreter teardown for torch's gloo threads to abort), after everything is written."""
    out = tmp_path / "entry"
    torchrun(small_run(tiny_model_dir, out, "--run.max_steps=3"), script="train.py")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "time/step" in r] == [1, 2, 3]
    assert (out / "config.yaml").exists() and (out / "final" / "config.json").exists()
    assert sorted(os.listdir(out / "checkpoints"))  # the last checkpoint, for a resume


@pytest.mark.slow
def test_two_ranks_dynamic_sampling(tmp_path):
    """DAPO's dynamic sampling on two FSDP2 ranks: rounds, the kept groups' move to their new ranks, and the
    posteriors of every generated rollout, identical on both ranks."""
    out = tmp_path / "dyn"
    torchrun(["train", str(out), *tiny_default_run(out, "--run.max_steps=3", "--rollout.dynamic_sampling=true",
                                                    "--rollout.max_rounds=4")])
    r0, r1 = np.load(out / "curriculum_rank0.npz"), np.load(out / "curriculum_rank1.npz")
    np.testing.assert_array_equal(r0["alpha"], r1["alpha"])
    np.testing.assert_array_equal(r0["beta"], r1["beta"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl") if "dynamic/rounds" in l]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["dynamic/rounds"] for r in rows) > 1  # (4, 3, 3 here) groups did move between rounds and ranks
    in_subset_1 = sum(20 * r["dynamic/rounds"] for r in rows if r["step"] > 2)  # subset 1 began after step 2
    assert r0["alpha"].sum() + r0["beta"].sum() == 30 * 2 + in_subset_1  # its cold start, then every round
    assert rows[-1]["rollouts/total"] == 2 * 30 * 2 + sum(20 * r["dynamic/rounds"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("two_rank_options", [[], ["--train.cpu_offload=true"]])
def test_gradient_same_with_one_and_two_ranks(tiny_model_dir, tmp_path, two_rank_options):
    """One process against two FSDP2 ranks (optionally with CPU offload of the shards): same gradient."""
    one, two = tmp_path / "g1.pt", tmp_path / "g2.pt"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist_worker.py"), "grad", tiny_model_dir,
                          str(one)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    torchrun(["grad", tiny_model_dir, str(two), *two_rank_options])
    r1, r2 = torch.load(one), torch.load(two)
    assert r1["gen_diff"] == 0.0 and r2["gen_diff"] == 0.0  # generation weights follow the policy
    g1, g2 = r1["grads"], r2["grads"]
    assert g1.keys() == {"hf." + k.removeprefix("hf.") for k in g2} or g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-7, msg=k)
    assert max(float(g.abs().max()) for g in g1.values()) > 0


@pytest.mark.slow
def test_real_shapes_rehearsal_two_ranks(qwen_tokenizer_dir, tmp_path):
    """configs/1.5b.yaml with overrides for size only (bench/rehearsal.py): Qwen2.5-Math-1.5B cut to 2 layers at a
    narrow width (full 151,936 vocabulary, tied embeddings), the real tokenizer and chat template, MATH rows whose
    gold comes from their solutions, 2 gloo ranks, FSDP2, gradient checkpointing, sigma=gradient, a checkpoint
    every step. A run stopped after 3 steps (inside subset 2) and resumed to 4 equals the uninterrupted 4 steps."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import rehearsal

    model, data = str(tmp_path / "model"), str(tmp_path / "math.jsonl")
    rehearsal.build_model(model, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                          tokenizer_dir=qwen_tokenizer_dir)
    rehearsal.write_rows(data, 16)
    small = ["--train.logprob_chunk=256"]  # (256, 151,936) float32 logits per chunk: the suite's memory budget

    def run(out, steps):
        rehearsal.torchrun([*rehearsal.overrides(model, data, str(out), steps=steps), *small])
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    run(tmp_path / "a", 3)  # stopped inside subset 2 (its cold start done, one step of it left)
    resumed = run(tmp_path / "a", 4)
    straight = run(tmp_path / "b", 4)
    assert [r["step"] for r in straight] == [0, 1, 2, 3, 4] and [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert straight[0]["data/prompts"] == 16  # every MATH row has a boxed answer in its solution
    for a, b in zip(resumed[1:], straight[1:]):
        for key in ("train/reward", "actor/pg_loss", "actor/grad_norm", "rollouts/total", "tokens/train"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # the work was real: mixed rewards, non-zero gradients, Eq. 21 statistics from the tied embedding matrix
    assert all(0 < r["train/reward"] < 1 and r["actor/grad_norm"] > 0 for r in straight[1:])
    assert straight[3]["subset"] == 1 and straight[3]["rollouts/cold_start"] > straight[2]["rollouts/cold_start"]
    for rank in (0, 1):
        a, b = np.load(tmp_path / "a" / f"curriculum_rank{rank}.npz"), np.load(tmp_path / "b" / f"curriculum_rank{rank}.npz")
        assert a["step"] == b["step"] == 4
        for k in ("alpha", "beta", "grad_stats"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
        assert np.all(b["grad_stats"] >= 0) and b["grad_stats"][0].sum() > 0
        # measured 1.1-1.3 GB (torch, the 151,936-token tokenizer, (256, V) logit chunks); the suite budget is ~4 GB
        assert json.load(open(tmp_path / "b" / f"memory_rank{rank}.json"))["peak_rss_gb"] < 2.0
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    w0 = AutoModelForCausalLM.from_pretrained(model).state_dict()
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(w0[k], wb[k]) for k in wb)


@pytest.mark.slow
@pytest.mark.parametrize("stop_in", ["cold_start:2", "draw_and_generate:3", "agent:add_logprobs:3"])
def test_two_ranks_stop_and_resume_to_the_uninterrupted_run(tmp_path, stop_in):
    """Under FSDP2 on two gloo ranks, SIGTERM to rank 0 only, inside the cold start of subset 1 (subsets of 30
    and 31 prompts; a fresh, never-stepped AdamW state is saved as such) or inside the generation of step 3,
    or SIGTERM to the torchrun agent (as a scheduler sends it; the agent forwards it to every rank and kills
    them after --shutdown-timeout) before step 3's log-probabilities: every rank stops and saves before any
    SIGKILL, the resumed run's curriculum (on both ranks) and final weights equal the uninterrupted run's."""
    args = ["--run.max_steps=4", "--run.save_every=0", "--data.max_prompts=61"]
    full, stop = tmp_path / "full", tmp_path / "stop"
    torchrun(["train", str(full), *tiny_default_run(full, *args)])
    res = torchrun(["train", str(stop), *tiny_default_run(stop, *args)], env={"STOP_IN": stop_in},
                   check=not stop_in.startswith("agent:"))
    if stop_in.startswith("agent:"):  # the agent itself ends with its SignalException, its workers with 0
        log = res.stdout + res.stderr
        assert res.returncode != 0 and "got signal: 15" in log, log[-3000:]
        assert "forcefully exiting via" not in log and "checkpoint saved at step 2" in log, log[-3000:]
    stopped = np.load(stop / "curriculum_rank0.npz")["step"]
    assert stopped == 2 and [os.path.basename(p) for p in checkpoint_dirs(str(stop))] == ["step_000002"]
    torchrun(["train", str(stop), *tiny_default_run(stop, *args, "--run.resume=auto")])
    for rank in (0, 1):
        a, b = np.load(full / f"curriculum_rank{rank}.npz"), np.load(stop / f"curriculum_rank{rank}.npz")
        assert a["step"] == b["step"] == 4
        np.testing.assert_array_equal(a["alpha"], b["alpha"])
        np.testing.assert_array_equal(a["beta"], b["beta"])
    wa, wb, w0 = (final_weights(p) for p in (full / "final", stop / "final", os.path.join(ROOT, "models", "tiny")))
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # training moved the weights: not vacuous
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


@pytest.mark.slow
def test_one_and_two_ranks_sample_the_same_rollouts(tmp_path):
    """Rollouts are keyed by (seed, group, index), not by rank (rollout.sample_tokens): the cold start's and the
    first step's rollouts of the pretrained tiny model score the same on one rank and on two FSDP2 ranks, so the
    posteriors after step 1 and the step's rewards and lengths are equal. (The step's update then differs at
    rounding level between the two reductions; later steps are not compared.)"""
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}"
        torchrun(["train", str(out), *tiny_default_run(out, "--run.max_steps=1", "--eval.data=")], nproc=nproc)
    one, two = np.load(tmp_path / "w1" / "curriculum_rank0.npz"), np.load(tmp_path / "w2" / "curriculum_rank0.npz")
    np.testing.assert_array_equal(one["alpha"], two["alpha"])
    np.testing.assert_array_equal(one["beta"], two["beta"])
    assert 0 < one["alpha"].sum() and 0 < one["beta"].sum()  # rollouts right and wrong: the counts say something
    rows = [[json.loads(l) for l in open(tmp_path / w / "metrics.jsonl") if '"train/reward"' in l] for w in ("w1", "w2")]
    assert [(r["train/reward"], r["train/response_len"]) for r in rows[0]] == \
        [(r["train/reward"], r["train/response_len"]) for r in rows[1]]
