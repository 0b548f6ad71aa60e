"""train.py end to end on a tiny local model: a short run, resume, half-written checkpoints, 2 ranks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cures
import rollout
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_DATA = os.path.join(ROOT, "data", "tiny", "train.jsonl")


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


# --- packing ------------------------------------------------------------------------------------

def _per_sequence(policy, batches, cfg):
    """logp and entropy of each sequence (by index into seqs), whatever the layout and row order."""
    out = {}
    for b in batches:
        logp, ent = train.forward_batch(policy, b, torch.device("cpu"), cfg)
        if not b["rows"]:  # a dummy micro-batch (fewer units than micro-batches)
            continue
        for i, lp, e in zip(b["rows"], torch.split(logp, b["sizes"]), torch.split(ent, b["sizes"])):
            out[i] = (lp, e)
    return out


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("num", [1, 3])
def test_micro_batch_layouts_equal_padded(tiny_model_dir, layout, num):
    """No compute on padding (packed) or on repeated prompts (shared): the same log-probs, entropies and
    gradients as one right-padded row per sequence (sdpa here: transformers builds the block-diagonal mask
    of a packed row; flash-attention would use varlen kernels)."""
    from transformers import AutoModelForCausalLM

    cfg = train.load_config([f"--model.path={tiny_model_dir}", "--train.kl_coef=0"])
    policy = train.Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    seqs = []
    for k, n in enumerate([2, 3, 10, 1]):  # 4 prompts of mixed lengths, responses of mixed lengths (10: two rows)
        prompt = torch.randint(3, 250, (3 + 2 * k,), generator=g).tolist()
        for j in range(n):
            r = 1 + (5 * k + 3 * j) % 9
            seqs.append({"ids": prompt + torch.randint(3, 250, (r,), generator=g).tolist(), "prompt_len": len(prompt),
                         "resp_len": r, "adv": torch.randn(1, generator=g)})
    padded = train.make_micro_batches(seqs, num, 0, "padded")
    other = train.make_micro_batches(seqs, num, 0, layout)
    tokens = sum(b["ids"].numel() for b in other)
    if layout == "packed":
        assert all(b["ids"].shape[0] == 1 and b["attn"] is None for b in other)
        assert tokens == sum(len(s["ids"]) for s in seqs)  # not one pad token
    else:
        assert tokens < sum(len(s["ids"]) for s in seqs)  # each prompt once per row
        assert sum(b["ids"].shape[0] for b in other) == 5  # the group of 10 in two rows of 5
    assert sum(b["ids"].numel() for b in padded) > sum(len(s["ids"]) for s in seqs)
    ref, got = _per_sequence(policy, padded, cfg), _per_sequence(policy, other, cfg)
    assert sorted(got) == list(range(len(seqs)))
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i][0], ref[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[i][1], ref[i][1], atol=1e-5, rtol=1e-5)
    grads = []
    for batches in (padded, other):
        policy.zero_grad()
        for b in batches:
            logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
            if not b["rows"]:
                continue
            adv = torch.cat([seqs[i]["adv"].expand(seqs[i]["resp_len"]) for i in b["rows"]])
            (-(logp * adv).sum()).backward()
        grads.append(torch.cat([p.grad.flatten().clone() for p in policy.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_first_mini_batch_needs_no_old_logprob_pass(tiny_model_dir):
    """The step skips the old-log-prob pass of a one-epoch update's first mini-batch: update_policy then
    uses logp.detach(). The update must be the one with old_logp recomputed by the same policy."""
    from transformers import AutoModelForCausalLM

    cfg = train.load_config([f"--model.path={tiny_model_dir}", "--train.micro_batch_tokens=40"])
    g = torch.Generator().manual_seed(1)
    seqs = []
    for k in range(6):
        p, r = 4 + k % 3, 2 + (3 * k) % 7
        seqs.append({"ids": torch.randint(3, 250, (p + r,), generator=g).tolist(), "prompt_len": p, "resp_len": r,
                     "adv": torch.randn(1, generator=g), "ref_logp": -torch.rand(r, generator=g) - 2.0})
    cpu, after = torch.device("cpu"), []
    for recompute in (True, False):
        torch.manual_seed(0)
        policy = train.Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
        part = [dict(s) for s in seqs]
        batches = train.plan_micro_batches(part, cfg)
        if recompute:
            for i, lp in train.score_logprobs(policy, batches, cpu, cfg).items():
                part[i]["old_logp"] = lp
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        sums, norm, ok = train.update_policy(policy, opt, part, cpu, cfg, 1, batches=batches)
        assert ok and norm > 0 and sums["actor/clip_frac"] == 0
        after.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    assert len(batches) > 1
    torch.testing.assert_close(after[1], after[0], atol=1e-6, rtol=1e-5)


def test_micro_batch_layout_switches():
    layout = lambda *a: train.micro_batch_layout(train.load_config(list(a)))  # noqa: E731
    assert layout() == "padded"  # sdpa default
    assert layout("--model.attn_implementation=flash_attention_2") == "packed"
    assert layout("--train.pack=true") == "packed"
    assert layout("--train.share_prompt=true") == "shared"
    with pytest.raises(ValueError, match="train.pack"):
        layout("--train.pack=maybe")
    for bad in (["--train.pack=true"], ["--model.attn_implementation=flash_attention_2"]):
        with pytest.raises(ValueError, match="share_prompt"):
            layout("--train.share_prompt=true", *bad)


# --- config -------------------------------------------------------------------------------------

def test_config_yaml_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-5\ncures:\n  tau: 0.3\n")
    cfg = train.load_config(["--config", str(f), "--cures.tau=0.5", "--rollout.prompts_per_step=7",
                             "--model.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-5 and cfg.cures.tau == 0.5 and cfg.rollout.prompts_per_step == 7
    assert cfg.model.gradient_checkpointing is True
    with pytest.raises(KeyError, match="cures.tau"):
        train.load_config(["--cures.tua=0.1"])
    with pytest.raises(KeyError, match="train"):
        train.load_config(["--trian.lr=0.1"])
    with pytest.raises(TypeError):
        train.load_config(["--rollout.prompts_per_step=1.5"])
    with pytest.raises(TypeError):
        train.load_config(["--train.lr=fast"])


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        train.load_config(["--config", os.path.join(ROOT, "configs", name)])


def test_malformed_data_row_names_file_and_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    cfg = train.load_config([f"--data.train={f}", "--data.num_subsets=1"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*answer"):
        train.load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train.load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))


def test_assign_groups_balanced_and_whole():
    n = np.array([8, 2, 6, 4, 2, 2, 10, 6])
    idx, n, mb = train.training_groups(np.arange(8), n, 4, "draw")
    np.testing.assert_array_equal(mb, [0, 0, 0, 0, 1, 1, 1, 1])
    owner = train.assign_groups(n, mb, 2)
    for b in (0, 1):
        loads = [n[(mb == b) & (owner == r)].sum() for r in (0, 1)]
        assert abs(loads[0] - loads[1]) <= 2


# --- single process --------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_step_run_logs_and_saves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    state, cur = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--rollout.stop_at_im_end=true"))
    assert state["step"] == 3 and state["rollouts_train"] == 60 and state["rollouts_cold"] == 2 * 30 * 2
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    assert lines[0].pop("time/startup") > 0
    assert lines[0] == {"step": 0, "data/prompts": 60, "data/skipped_too_long": 0, "data/skipped_no_answer": 0}
    for key in ("train/reward", "actor/grad_norm", "cures/eff_prompts", "time/rollout_and_reward", "rollouts/total",
                "mech/mixed_rollouts", "mech/zero_adv_token_share", "draws/p_0.4-0.6"):
        assert key in lines[-1]
    assert sum(v for k, v in lines[-1].items() if k.startswith("draws/p_")) == pytest.approx(1.0)
    assert lines[-1]["subset"] == 1 and "cold/acc" in lines[-1]  # step 3 starts subset 1 with a cold start
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "config.yaml").exists()
    import eval as evaluation  # eval.py evaluates the final model as it was trained: prompt and stopping rule

    assert evaluation.stop_setting(str(out / "final")) is True


def _weights(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 3])
def test_resume_equals_uninterrupted_run(tmp_path, stop):
    """Stopped at a subset boundary (2: the resumed run starts subset 1 with a fresh trainer and a cold
    start) or inside a subset (3: the re-anchored KL reference and AdamW state come from the checkpoint)."""
    full_state, full_cur = train.main(tiny_default_run(tmp_path / "a", "--run.max_steps=4"))
    train.main(tiny_default_run(tmp_path / "b", f"--run.max_steps={stop}"))
    # a crashed later save leaves a half-written directory behind: it must be ignored
    os.makedirs(tmp_path / "b" / "checkpoints" / f"step_{stop + 1:06d}.tmp")
    os.makedirs(tmp_path / "b" / "checkpoints" / "step_000009")  # no meta.pt: incomplete
    assert train.checkpoint_dirs(str(tmp_path / "b"))[-1].endswith(f"step_{stop:06d}")
    state, cur = train.main(tiny_default_run(tmp_path / "b", "--run.max_steps=4", "--run.resume=auto"))
    assert state == full_state
    # step by step, including what only the KL reference and the optimizer state decide
    keys = ("actor/kl", "actor/pg_loss", "actor/grad_norm", "train/reward", "cures/acc_mean")
    rows = {run: [json.loads(l) for l in open(tmp_path / run / "metrics.jsonl") if '"actor/kl"' in l] for run in "ab"}
    assert [r["step"] for r in rows["b"]] == [1, 2, 3, 4]
    assert any(r["actor/kl"] > 0 for r in rows["a"])  # the reference moved away from the policy: not vacuous
    for ra, rb in zip(rows["a"], rows["b"]):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-12), (ra["step"], k)
    np.testing.assert_array_equal(cur.alpha, full_cur.alpha)
    np.testing.assert_array_equal(cur.beta, full_cur.beta)
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)
    # ...and training really moved the weights (the comparison is not vacuous)
    w0 = _weights(os.path.join(ROOT, "models", "tiny"))
    assert any(not torch.allclose(w0[k], wa[k]) for k in wa)


# --- two processes (gloo) ------------------------------------------------------------------------------

def _torchrun(args, nproc=2, script=os.path.join("tests", "dist_worker.py")):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29561",
           os.path.join(ROOT, script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.slow
def test_two_ranks_keep_identical_curriculum(tiny_model_dir, tmp_path):
    out = tmp_path / "dist"
    _torchrun(["train", str(out), *small_run(tiny_model_dir, out, "--run.max_steps=3")])
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
    train.leave (no interpreter teardown for torch's gloo threads to abort), after everything is written."""
    out = tmp_path / "entry"
    _torchrun(small_run(tiny_model_dir, out, "--run.max_steps=3"), script="train.py")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "time/step" in r] == [1, 2, 3]
    assert (out / "config.yaml").exists() and (out / "final" / "config.json").exists()
    assert sorted(os.listdir(out / "checkpoints"))  # the last checkpoint, for a resume


@pytest.mark.slow
def test_two_ranks_dynamic_sampling(tmp_path):
    """DAPO's dynamic sampling on two FSDP2 ranks: rounds, the kept groups' move to their new ranks, and the
    posteriors of every generated rollout, identical on both ranks."""
    out = tmp_path / "dyn"
    _torchrun(["train", str(out), *tiny_default_run(out, "--run.max_steps=3", "--rollout.dynamic_sampling=true",
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
    _torchrun(["grad", tiny_model_dir, str(two), *two_rank_options])
    r1, r2 = torch.load(one), torch.load(two)
    assert r1["gen_diff"] == 0.0 and r2["gen_diff"] == 0.0  # generation weights follow the policy
    g1, g2 = r1["grads"], r2["grads"]
    assert g1.keys() == {"hf." + k.removeprefix("hf.") for k in g2} or g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-7, msg=k)
    assert max(float(g.abs().max()) for g in g1.values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--cures.sigma=gradient"], ["--cures.sigma=gradient", "--cures.grad_param=embed_tokens"],
                                     ["--train.advantage=rpp"], ["--train.loss_agg=seq_mean_token_mean"],
                                     ["--train.pack=true", "--train.mini_batch_prompts=2"],
                                     ["--train.share_prompt=true", "--train.epochs=2"],
                                     ["--cures.sampling=uniform", "--cures.allocation=uniform", "--train.kl_coef=0"]])
def test_variants_run(tiny_model_dir, tmp_path, variant):
    state, cur = train.main(small_run(tiny_model_dir, tmp_path / "v", "--run.max_steps=1", *variant))
    assert state["step"] == 1
    line = [json.loads(l) for l in open(tmp_path / "v" / "metrics.jsonl")][-1]
    assert np.isfinite(line["actor/pg_loss"]) and np.isfinite(line["actor/grad_norm"])
    if "--cures.sigma=gradient" in variant:
        assert cur.grad_stats is not None and np.all(cur.grad_stats >= 0) and cur.grad_stats.sum() > 0


@pytest.mark.slow
def test_non_finite_loss_skips_then_aborts(tiny_model_dir, tmp_path, monkeypatch):
    import grpo

    real = grpo.policy_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    calls = {"n": 0}

    def first_nan(*args, **kwargs):  # only the very first micro-batch of the run is poisoned
        calls["n"] += 1
        return (nan_loss if calls["n"] == 1 else real)(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    with pytest.raises(RuntimeError, match="2 non-finite updates in a row"):
        train.main(small_run(tiny_model_dir, tmp_path / "nan", "--run.max_steps=3", "--train.max_bad_steps=2"))
    assert not (tmp_path / "nan" / "final").exists()
    # a single bad mini-batch is skipped with a warning and the run goes on
    monkeypatch.setattr(grpo, "policy_loss", first_nan)
    state, _ = train.main(small_run(tiny_model_dir, tmp_path / "nan1", "--run.max_steps=2", "--train.max_bad_steps=2"))
    assert state["step"] == 2 and calls["n"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stop_signal_inside_a_long_step(tmp_path, sig):
    """A step made long on purpose (one rollout per generate batch): the signal arrives while it generates,
    the process drops the unfinished step, saves the last finished one within seconds and exits 0, and the
    resumed run ends exactly where the uninterrupted one does."""
    import signal
    import time

    slow = ["--rollout.max_batch_size=1", "--rollout.rollouts_per_step=120", "--rollout.prompts_per_step=6",
            "--run.save_every=0", "--run.max_steps=3"]
    full_state, _ = train.main(tiny_default_run(tmp_path / "full", *slow))
    out = tmp_path / "stop"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *tiny_default_run(out, *slow)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    step_seconds = json.loads(metrics.read_text().splitlines()[1])["time/step"]
    time.sleep(0.3 * step_seconds)  # well inside step 2's generation
    sent = time.time()
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=120) == 0
    waited = time.time() - sent
    assert waited < max(0.5 * step_seconds, 3.0), (waited, step_seconds)  # not the rest of the step
    assert [json.loads(l)["step"] for l in open(metrics)] == [0, 1]  # step 2 was dropped, not half-done
    assert [os.path.basename(p) for p in train.checkpoint_dirs(str(out))] == ["step_000001"]
    state, _ = train.main(tiny_default_run(out, *slow, "--run.resume=auto"))
    assert state == full_state
    wa, wb = _weights(tmp_path / "full" / "final"), _weights(out / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


@pytest.mark.slow
def test_checkpoint_every_few_minutes(tiny_model_dir, tmp_path):
    train.main(small_run(tiny_model_dir, tmp_path / "m", "--run.max_steps=3", "--run.save_every=0",
                         "--run.save_every_minutes=1e-6", "--run.keep_checkpoints=5"))
    assert [os.path.basename(p) for p in train.checkpoint_dirs(str(tmp_path / "m"))] == \
        ["step_000001", "step_000002", "step_000003"]


@pytest.mark.slow
def test_tiny_default_learns(tmp_path):
    """The bundled default learns: configs/tiny.yaml as shipped (model, data, seed), the README's main command
    (all 64 steps, cold starts included); held-out accuracy at temperature 1 (avg@16 on the 46 test problems)
    must rise by more than 8 points (seed 0 gives 37.4 -> 49.9 on the 2-core CI machine). Seeded, so the run is
    the same on every run of this machine type up to the summation order of multi-threaded kernels."""
    out = tmp_path / "tiny"
    train.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--run.out_dir={out}",
                "--eval.every=64", "--run.save_every=0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = {r["step"]: r["eval/acc"] for r in rows if "eval/acc" in r}
    assert sorted(evals) == [0, 64]
    assert evals[64] > evals[0] + 0.08, evals


# --- the released pipeline where the paper is silent (PAPER.md section 8) --------------------------------

def _write_rows(path, rows):
    if str(path).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(tag, n):  # the schema of ScaleML-RLHF/numina_math_k: problem + a ready answer
    return [{"problem": f"{tag} problem {i}: what is {i}+1?", "answer": str(i + 1), "source": "stand-in"}
            for i in range(n)]


def test_data_sources_give_one_subset_each(tmp_path, tiny_model_dir):
    """data.train as a list of sources (files of either format, a directory of files): one subset per file,
    in order, as the released pipeline trains on numina_math_1 ... _15; a single source is cut in parts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _write_rows(tmp_path / "s1.parquet", _rows("a", 3))
    _write_rows(tmp_path / "s2.jsonl", _rows("b", 2))
    (tmp_path / "dir").mkdir()
    _write_rows(tmp_path / "dir" / "x.jsonl", _rows("c", 1))
    _write_rows(tmp_path / "dir" / "y.parquet", _rows("d", 2))
    sources = f"--data.train=[{tmp_path / 's1.parquet'}, {tmp_path / 's2.jsonl'}, {tmp_path / 'dir'}]"
    for T in (0, 4):
        subsets, skipped = train.load_subsets(train.load_config([sources, f"--data.num_subsets={T}"]), tok)
        assert [len(s) for s in subsets] == [3, 2, 1, 2] and skipped == {"too_long": 0, "no_answer": 0}
        assert [s[0]["answer"] for s in subsets] == ["1", "1", "1", "1"]
        assert "a problem 0" in tok.decode(subsets[0][0]["prompt_ids"]) and "d problem 1" in tok.decode(subsets[3][1]["prompt_ids"])
    with pytest.raises(ValueError, match="4 sources"):
        train.load_subsets(train.load_config([sources, "--data.num_subsets=15"]), tok)
    one = train.load_config([f"--data.train={tmp_path / 's1.parquet'}", "--data.num_subsets=3"])
    assert [len(s) for s in train.load_subsets(one, tok)[0]] == [1, 1, 1]
    # the paper configs and the defaults train on the authors' 15 sets, gold in `answer`
    want = [f"ScaleML-RLHF/numina_math_{i}" for i in range(1, 16)]
    for args in ([], ["--config", os.path.join(ROOT, "configs", "1.5b.yaml")],
                 ["--config", os.path.join(ROOT, "configs", "7b.yaml")]):
        cfg = train.load_config(args)
        assert cfg.data.train == want and cfg.data.answer_key == "answer" and cfg.data.answer_format == "answer"
        assert cfg.data.num_subsets in (0, 15)


def test_gold_answers_from_solutions(tmp_path, tiny_model_dir):
    """A solution's \\boxed{} answers are its gold: several make one set, none skips the row (counted), and
    the solution text is never the gold."""
    import reward
    from transformers import AutoTokenizer

    rows = [{"problem": "Solve x^2 + x - 2 = 0.", "solution": "Factor: so \\boxed{x = 1} and \\boxed{x = -2}."},
            {"problem": "What is 2+2?", "solution": "It is \\boxed{4}. Indeed, \\boxed{4}."},
            {"problem": "Prove it.", "solution": "Obvious, since 3 > 2."}]
    _write_rows(tmp_path / "math.jsonl", rows)
    cfg = train.load_config([f"--data.train={tmp_path / 'math.jsonl'}", "--data.num_subsets=1",
                             "--data.answer_key=solution", "--data.answer_format=solution"])
    subsets, skipped = train.load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    golds = [item["answer"] for item in subsets[0]]
    assert golds == ["x = 1, x = -2", "4"] and skipped == {"too_long": 0, "no_answer": 1}
    assert reward.score("so \\boxed{-2, 1}", golds[0]) == 1.0
    assert reward.score("both: \\boxed{x=1} and \\boxed{x=-2}", golds[0]) == 1.0
    assert reward.score("\\boxed{1}", golds[0]) == 0.0  # half the set is wrong
    assert train.gold_answer("the answer is \\boxed{7}", "answer") == "7"
    assert train.gold_answer("7", "answer") == "7"


def test_training_groups_by_prompt_or_draw():
    """A prompt drawn k times is one GRPO group (as released: grouped by dataset index) holding all its
    rollouts, in the mini-batch of its first draw; mini-batches stay numbered without gaps."""
    draws, n = np.array([5, 3, 5, 7, 3, 3]), np.array([2, 3, 4, 2, 2, 1])
    idx, cnt, mb = train.training_groups(draws, n, 2, "prompt")
    np.testing.assert_array_equal(idx, [5, 3, 7])
    np.testing.assert_array_equal(cnt, [6, 6, 2])
    np.testing.assert_array_equal(mb, [0, 0, 1])
    idx, cnt, mb = train.training_groups(draws, n, 2, "draw")
    np.testing.assert_array_equal(idx, draws)
    np.testing.assert_array_equal(mb, [0, 0, 1, 1, 2, 2])
    _, _, mb = train.training_groups(np.array([1, 2, 1, 2, 4, 4]), np.full(6, 2), 2, "prompt")
    np.testing.assert_array_equal(mb, [0, 0, 1])  # the second mini-batch had only repeats
    with pytest.raises(ValueError, match="group_by"):
        train.training_groups(draws, n, 2, "batch")


@pytest.mark.slow
@pytest.mark.parametrize("group_by", ["prompt", "draw"])
def test_repeated_draws_form_one_group(tiny_model_dir, tmp_path, monkeypatch, group_by):
    """In a run: with group_by=prompt every prompt reaches generation (and GRPO's baseline) once per step,
    with all its rollouts; with group_by=draw a prompt drawn twice makes two groups."""
    import grpo
    import rollout

    calls, real_generate, real_adv = [], rollout.generate, grpo.group_advantages

    def spy_generate(model, prompts, n, **kw):
        calls.append([tuple(p) for p in prompts])
        return real_generate(model, prompts, n, **kw)

    groups = []

    def spy_adv(rewards, group):
        groups.append(len(torch.unique(group)))
        return real_adv(rewards, group)

    monkeypatch.setattr(rollout, "generate", spy_generate)
    monkeypatch.setattr(grpo, "group_advantages", spy_adv)
    train.main(small_run(tiny_model_dir, tmp_path / "g", "--data.max_prompts=8", "--data.num_subsets=1",
                         "--rollout.prompts_per_step=12", "--rollout.rollouts_per_step=24", "--run.max_steps=2",
                         f"--train.group_by={group_by}", "--run.save_every=0"))
    steps = calls[-2:]  # the two training steps (the cold start comes first)
    distinct = [len(set(c)) for c in steps]
    if group_by == "prompt":
        assert [len(c) for c in steps] == distinct == groups
    else:
        assert all(len(c) == 12 for c in steps) and any(d < 12 for d in distinct) and groups == [12, 12]


@pytest.mark.slow
@pytest.mark.parametrize("restart", [True, False])
def test_restart_each_subset(tiny_model_dir, tmp_path, monkeypatch, restart):
    """As released, each subset is a fresh trainer from the previous subset's final weights: at a subset's
    first update the AdamW state is empty and the KL reference is the policy (ref_logp = the policy's
    log-probs). Without the switch, the optimizer state carries over and the reference stays the base model."""
    seen, real = [], train.update_policy

    def spy(policy, optimizer, seqs, device, cfg, world, scheduler=None, batches=None):
        got = train.score_logprobs(policy, batches, device, cfg)
        gap = max(float((got[i] - seqs[i]["ref_logp"]).abs().max()) for i in got)
        seen.append((len(optimizer.state), gap, scheduler.get_last_lr()[0]))
        return real(policy, optimizer, seqs, device, cfg, world, scheduler, batches)

    monkeypatch.setattr(train, "update_policy", spy)
    train.main(tiny_default_run(tmp_path / "r", "--run.max_steps=4", "--train.mini_batch_prompts=6",
                         "--train.warmup_steps=2", f"--train.restart_each_subset={restart}", "--run.save_every=0"))
    assert len(seen) == 4  # one mini-batch per step, M = 2 steps per subset
    assert seen[0][0] == 0 and seen[0][1] < 1e-5  # subset 0: the base model is the policy
    assert seen[1][0] > 0 and seen[1][1] > 1e-4  # within a subset: state kept, the policy moved away
    if restart:
        assert seen[2][0] == 0 and seen[2][1] < 1e-5 and seen[2][2] == seen[0][2]  # warm-up starts again
    else:
        assert seen[2][0] > 0 and seen[2][1] > 1e-4 and seen[2][2] > seen[0][2]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--cures.sampling=uniform", "--cures.allocation=uniform"],
                                     ["--cures.cold_start_rollouts=0"]])
def test_no_cold_start_when_estimates_are_unused_or_lazy(tiny_model_dir, tmp_path, variant):
    """GRPO (uniform sampling and allocation) never reads the Beta estimates, so it generates no cold-start
    rollouts and is charged only for what it generated; a lazy start (N' = 0) begins from p = 0.5."""
    state, cur = train.main(small_run(tiny_model_dir, tmp_path / "c", "--run.max_steps=3", "--run.save_every=0",
                                      *variant))
    rows = [json.loads(l) for l in open(tmp_path / "c" / "metrics.jsonl")][1:]
    assert state["rollouts_cold"] == 0 and not any("cold/acc" in r for r in rows)
    assert [r["rollouts/cold_start"] for r in rows] == [0, 0, 0]
    assert [r["rollouts/total"] for r in rows] == [r["rollouts/train"] for r in rows] == [20, 40, 60]
    assert cur.alpha.sum() + cur.beta.sum() == 20  # subset 1: only its first step's rollouts are known
    assert cur.accuracy()[cur.alpha + cur.beta == 0].tolist() == [0.5] * int(np.sum(cur.alpha + cur.beta == 0))


def test_stream_seeds_are_distinct():
    keys = [(p, s, t, r) for p in train.SEED_PURPOSES for s in range(3) for t in range(30) for r in range(8)]
    seeds = {train.stream_seed(0, *k) for k in keys}
    assert len(seeds) == len(keys)
    assert train.stream_seed(0, "rollout", 1, 2, 3) == train.stream_seed(0, "rollout", 1, 2, 3)
    assert train.stream_seed(1, "rollout", 1, 2, 3) != train.stream_seed(0, "rollout", 1, 2, 3)


@pytest.mark.slow
def test_no_two_generation_calls_share_a_seed(tiny_model_dir, tmp_path, monkeypatch):
    """Cold starts, training rollouts and evaluations of a 2 x 10-step run: every generate call has its own
    random stream (the cold start's stream was once the training stream of 17 steps later)."""
    import rollout

    seeds, real = [], rollout.generate

    def spy(model, prompts, n, **kw):
        seeds.append(kw["seed"])
        return real(model, prompts, n, **kw)

    monkeypatch.setattr(rollout, "generate", spy)
    train.main(small_run(tiny_model_dir, tmp_path / "s", "--train.steps_per_subset=10", "--rollout.prompts_per_step=2",
                         "--rollout.rollouts_per_step=4", "--rollout.max_new_tokens=2", "--run.save_every=0",
                         f"--eval.data={TRAIN_DATA}", "--eval.max_problems=2", "--eval.every=5"))
    assert len(seeds) == 2 + 20 + 5 and len(set(seeds)) == len(seeds)


# --- a run you can trust on a shared cluster -----------------------------------------------------------

def test_help_and_config_flag_forms(capsys, tmp_path):
    assert train.main(["--help"]) is None
    out = capsys.readouterr().out
    assert "usage:" in out and "--train.restart_each_subset=True" in out and "--run.overwrite=False" in out
    f = tmp_path / "c.yaml"
    f.write_text("cures:\n  tau: 0.3\n")
    assert train.load_config([f"--config={f}"]).cures.tau == 0.3
    with pytest.raises(ValueError, match="--config needs a YAML file"):
        train.load_config(["--config"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        train.load_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("args, match", [
    (["--train.advantage=grpoo"], "train.advantage must be one of grpo, rpp"),
    (["--train.kl_kind=k3"], "train.kl_kind"), (["--train.loss_agg=mean"], "train.loss_agg"),
    (["--train.pack=yes"], "train.pack"), (["--rollout.cache=paged2"], "rollout.cache"),
    (["--rollout.rollouts_per_step=0"], "rollouts_per_step >= 2048"),
    (["--data.num_subsets=0", f"--data.train={TRAIN_DATA}"], "data.num_subsets=0"),
    (["--model.path=./no/such/model"], "model.path='./no/such/model': no such directory"),
    (["--rollout.cache=paged", "--model.attn_implementation=sdpa"], "dense .* mask: 8,192 x 2,097,152"),
])
def test_bad_config_fails_before_anything_loads(tmp_path, args, match):
    """Checked before the tokenizer, the data or the model are touched (no model exists at the default path)."""
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.main([f"--run.out_dir={tmp_path / 'x'}", *args])
    assert not (tmp_path / "x").exists()


def test_bad_data_is_named(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    (tmp_path / "d" / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"b.jsonl.*no usable prompt"):
        train.load_subsets(train.load_config([f"--data.train={tmp_path / 'd'}", "--data.num_subsets=0"]), tok)
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="has no .jsonl"):
        train.load_subsets(train.load_config([f"--data.train={tmp_path / 'e'}", "--data.num_subsets=0"]), tok)
    with pytest.raises(ValueError, match="longer than data.max_prompt_len"):
        train.load_subsets(train.load_config([f"--data.train={TRAIN_DATA}", "--data.max_prompt_len=3"]), tok)


@pytest.mark.slow
def test_out_dir_of_another_run_is_refused_or_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3"))
    with pytest.raises(FileExistsError, match="--run.resume=auto"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1", "--run.overwrite=true"))
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1]
    assert [os.path.basename(p) for p in train.checkpoint_dirs(str(out))] == ["step_000001"]
    # resuming with a key that decides what comes next changed is refused, naming the key
    with pytest.raises(ValueError, match=r"train.steps_per_subset: 2 -> 3"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto",
                             "--train.steps_per_subset=3"))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_metrics_are_not_repeated(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "c"
    full, _ = train.main(small_run(tiny_model_dir, tmp_path / "full", "--run.max_steps=3"))
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.keep_checkpoints=3"))
    newest = train.checkpoint_dirs(str(out))[-1]
    with open(os.path.join(newest, "meta.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    state, _ = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert "step_000003" in capsys.readouterr().out and state == full  # warned, resumed from step 2, same result
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_full_disk_during_a_checkpoint_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = train.load_config([f"--run.out_dir={tmp_path}"])
    policy = train.Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    optimizer, _ = train.make_optimizer(policy, cfg)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed, unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="no space left on device"):
        train.save_checkpoint(policy, optimizer, cures.Curriculum(3), {"step": 1}, cfg, 0)
    assert os.listdir(tmp_path / "checkpoints") == []  # no step_000001.tmp left behind


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


# --- train / eval modes -------------------------------------------------------------------------

def _record_modes(monkeypatch):
    """Wrap train.forward_batch and the generation model: per update pass (grad on), the tensor elements
    saved for backward per forwarded position and the policy's mode; per generation forward, its input length
    and mode."""
    seen = {"update": [], "score": [], "gen": []}
    forward_batch, build_models = train.forward_batch, train.build_models

    def recording_forward_batch(model, b, device, cfg):
        saved = [0]

        def pack(t):
            saved[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward_batch(model, b, device, cfg)
        key = "update" if torch.is_grad_enabled() else "score"
        training = model.hf.model.layers[0].training  # what transformers' checkpointing reads
        seen[key].append((saved[0] / b["ids"].numel(), training))  # per forwarded position
        return out

    def recording_build_models(cfg, device, world):
        policy, ref, gen = build_models(cfg, device, world)
        gen.register_forward_pre_hook(lambda m, args, kw: seen["gen"].append(
            ((kw.get("input_ids") if "input_ids" in kw else args[0]).shape[1], m.training)), with_kwargs=True)
        return policy, ref, gen

    monkeypatch.setattr(train, "forward_batch", recording_forward_batch)
    monkeypatch.setattr(train, "build_models", recording_build_models)
    return seen


@pytest.mark.parametrize("checkpointing", [True, False])
def test_update_runs_in_train_mode_with_checkpointing(tiny_model_dir, tmp_path, monkeypatch, checkpointing):
    """Through train.main: the update passes run in train mode, so transformers' gradient checkpointing is
    active when configured. Saved for backward per position, as a saved-tensor hook sees it: outside the
    checkpointed layers the embedding output, final norm and head input (about 6 hidden vectors, whatever
    the depth; the checkpoints themselves keep one hidden vector per layer, out of the hook's sight), against
    all of every layer's activations (about 28 hidden vectors per layer here) without checkpointing. Log-prob passes and generation run in eval mode, generation with its KV cache
    (decoding steps of one token), also after an update (the unsharded trainer generates with its policy)."""
    seen = _record_modes(monkeypatch)
    train.main(small_run(tiny_model_dir, str(tmp_path / "run"), "--data.num_subsets=1", "--train.epochs=2",
                         f"--model.gradient_checkpointing={str(checkpointing).lower()}"))
    hidden, layers = 32, 2  # tiny_model_dir
    assert seen["update"] and all(training for _, training in seen["update"])
    assert seen["score"] and not any(training for _, training in seen["score"])
    per_position = max(x for x, _ in seen["update"])
    if checkpointing:
        assert per_position <= 8 * hidden, per_position  # measured: 5.9 hidden vectors
    else:
        assert per_position > 10 * layers * hidden, per_position  # measured: 57 hidden vectors
    assert not any(training for _, training in seen["gen"])
    lengths = [n for n, _ in seen["gen"]]
    assert lengths.count(1) >= 0.8 * len(lengths)  # cached decoding: one new token per forward


def test_train_mode_adds_no_dropout(tmp_path):
    """build_models zeroes every dropout rate: a model configured with dropout gives the same log-probs in the
    update's train mode as in the eval mode of the old-policy and reference passes."""
    from tiny.build import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = train.load_config([f"--model.path={tmp_path / 'm'}", "--train.kl_coef=0"])
    policy, _, _ = train.build_models(cfg, torch.device("cpu"), 1)
    seqs = [{"ids": list(range(3, 40)), "prompt_len": 5, "resp_len": 32, "adv": torch.ones(1)}]
    (b,) = train.make_micro_batches(seqs, 1, 0, "padded")
    with torch.no_grad():
        eval_logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
        with train.train_mode(policy):
            assert policy.training
            train_logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
    assert not policy.training
    torch.testing.assert_close(train_logp, eval_logp, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5  # the test model does have dropout


def test_paged_resume_restores_the_draws(tiny_model_dir, tmp_path, monkeypatch):
    """What resume promises with rollout.cache=paged, whose scheduler is not bitwise reproducible: the saved
    state comes back exactly, so two runs resumed from one checkpoint draw the same prompts and allocate the
    same rollouts in the step after it (their sampled tokens may differ; with dynamic and static caches they
    do not, test_resume_equals_uninterrupted_run)."""
    import shutil

    draws, sample_and_allocate = [], train.sample_and_allocate

    def recording(cur, subset_id, step, cfg, world, rnd=0):
        out = sample_and_allocate(cur, subset_id, step, cfg, world, rnd)
        draws.append((step, out[0].tolist(), out[1].tolist()))
        return out
    monkeypatch.setattr(train, "sample_and_allocate", recording)
    paged = ("--rollout.cache=paged", "--rollout.max_batch_tokens=4096")
    train.main(small_run(tiny_model_dir, str(tmp_path / "a"), "--run.max_steps=3", *paged))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = []
    for run in ("a", "b"):
        draws.clear()
        train.main(small_run(tiny_model_dir, str(tmp_path / run), "--run.max_steps=4", "--run.resume=auto", *paged))
        resumed.append(list(draws))
    assert [d[0] for d in resumed[0]] == [3]  # only the step after the checkpoint ran
    assert resumed[0] == resumed[1]


@pytest.mark.slow
def test_memory_model_matches_the_real_update():
    """bench/memory.py's update model (what the GPU configs' micro_batch_tokens are sized from) against the
    real update_policy under FSDP2's memory tracker, 2 gloo ranks, with and without gradient checkpointing,
    one micro-batch and several: within 20 % (the full-width figures: bench/results/memory_check.md)."""
    for micro_batch_tokens in ("16384", "1024"):
        cmd = [sys.executable, os.path.join(ROOT, "bench", "memory.py"), "--check", "--hidden", "128",
               "--intermediate", "256", "--heads", "4", "--tokens", "256", "--new-tokens", "8",
               "--micro-batch-tokens", micro_batch_tokens]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "largest disagreement" in res.stdout


def test_no_readable_checkpoint_fails_and_names_them(tiny_model_dir, tmp_path):
    """Checkpoints exist but none loads completely (metadata unreadable, or weights failing half-way over an
    unreadable older one): the run fails and names them, never restarting at step 0 over them (which emptied
    metrics.jsonl and let pruning delete its own new checkpoints) nor going on with half-loaded weights."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.keep_checkpoints=2"))
    old, new = train.checkpoint_dirs(str(out))
    metrics = open(out / "metrics.jsonl").read()
    with open(os.path.join(old, "meta.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    weights = [f for f in os.listdir(new) if f.endswith(".distcp")]
    assert weights
    with open(os.path.join(new, weights[0]), "wb") as f:  # metadata fine, weights broken
        f.write(b"\0" * 16)
    with pytest.raises(RuntimeError, match="none could be loaded") as e:
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert "step_000001" in str(e.value) and "step_000002" in str(e.value)
    assert open(out / "metrics.jsonl").read() == metrics and train.checkpoint_dirs(str(out)) == [old, new]


@pytest.mark.parametrize("change", ["--data.user_template=Q: {problem}", "--cures.tau=0.5", "--cures.n_min=3",
                                    "--data.system_prompt=Be brief.", "--cures.cold_start_rollouts=3"])
def test_resume_refuses_a_config_that_changes_the_subsets_or_the_method(tiny_model_dir, tmp_path, change):
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    with pytest.raises(ValueError, match=change.split("=")[0].removeprefix("--")):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto", change))


def test_resume_checks_the_curriculum_against_the_subset(tiny_model_dir, tmp_path, monkeypatch):
    """A subset that changed size under the same config (the data file was edited) is refused by name, not
    sampled over stale posteriors; Curriculum.load_state_dict checks its own arrays."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    load_subsets = train.load_subsets
    monkeypatch.setattr(train, "load_subsets", lambda cfg, tok: (lambda s, k: ([s[0][:-1], *s[1:]], k))(
        *load_subsets(cfg, tok)))
    with pytest.raises(ValueError, match="curriculum covers 30 prompts, subset 0 now has 29"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto"))
    cur = cures.Curriculum(3)
    with pytest.raises(ValueError, match="grad_stats"):
        cur.load_state_dict({"alpha": np.ones(3), "beta": np.ones(3), "grad_stats": np.ones((3, 2))})


def test_zero_subsets_fail_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """A directory with one data file and data.num_subsets=0 once gave zero subsets, trained zero steps and saved
    the untrained model as final/."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "part.jsonl").write_text(open(TRAIN_DATA).read())
    monkeypatch.setattr(train, "build_models", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="num_subsets=0"):
        train.main(small_run(tiny_model_dir, tmp_path / "r", f"--data.train={data}", "--data.num_subsets=0"))
    assert not (tmp_path / "r" / "final").exists()


def test_empty_or_null_answers_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys):
    rows = [json.loads(l) for l in open(TRAIN_DATA)][:40]
    rows[3]["answer"], rows[7]["answer"] = "", None
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train.load_config(small_run(tiny_model_dir, tmp_path / "r", f"--data.train={path}", "--data.num_subsets=1"))
    from transformers import AutoTokenizer

    subsets, skipped = train.load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert skipped["no_answer"] == 2 and sum(map(len, subsets)) == 38
    out = capsys.readouterr().out
    assert f"{path}:4" in out and f"{path}:8" in out
    del rows[5]["answer"]  # the key itself missing: a wrong data.answer_key or a malformed row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{path}:6: row has no 'answer'"):
        train.load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))


def test_mechanism_metrics_on_a_constructed_batch():
    """The rollouts in groups with mixed rewards (non-zero GRPO advantage) and the response tokens spent on
    groups that all score the same, against the advantages themselves; draw shares by difficulty."""
    import grpo

    rewards = torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 1, 0, 0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    lengths = torch.tensor([5, 6, 7, 8, 3, 4, 1, 2, 3, 9])
    got = train.mechanism_sums(rewards, group, lengths)
    zero = grpo.group_advantages(rewards, group) == 0
    assert got == {"mixed_rollouts": 7.0, "zero_adv_tokens": 16.0}
    assert got["mixed_rollouts"] == float((~zero).sum()) and got["zero_adv_tokens"] == float(lengths[zero].sum())
    shares = train.difficulty_shares(np.array([0.1, 0.5, 0.5, 1.0, 0.0, 0.8, 0.79, 0.2]))
    assert shares == {"draws/p_0.0-0.2": 0.25, "draws/p_0.2-0.4": 0.125, "draws/p_0.4-0.6": 0.25,
                      "draws/p_0.6-0.8": 0.125, "draws/p_0.8-1.0": 0.25}
    assert train.level_shares([1, 2, 2, None, "Level 5"]) == {"draws/level_1": 0.25, "draws/level_2": 0.5,
                                                              "draws/level_Level 5": 0.25}
    assert train.level_shares([None, None]) == {}


def _rounds_for_rank(spec, rank, world, mini_batch_prompts):
    """Rounds as draw_and_generate leaves them on `rank`, from spec: per round, per group (prompt, rewards);
    each rollout's response is the single token 100 * prompt + its position, so it can be traced."""
    rounds = []
    for groups in spec:
        idx = np.array([p for p, _ in groups])
        n = np.array([len(r) for _, r in groups])
        mb = np.arange(len(groups)) // mini_batch_prompts
        owner = train.assign_groups(n, mb, world)
        mine = np.flatnonzero(owner == rank)
        responses = [[100 * int(idx[j]) + b] for j in mine for b in range(n[j])]
        prompt_index = [k for k, j in enumerate(mine) for _ in range(n[j])]
        rewards = torch.tensor([float(x) for j in mine for x in groups[j][1]])
        out = rollout.Rollouts.from_responses(responses, prompt_index, [True] * len(responses), pad_id=0)
        rounds.append({"idx": idx, "n": n, "mb": mb, "owner": owner, "mine": mine, "out": out, "rewards": rewards,
                       "mixed": train.group_mixed(rewards, out.prompt_index, len(mine), mine, len(idx))})
    return rounds


def _on_ranks(world, fn, monkeypatch):
    """fn(rank) on `world` threads whose all_gather_list meets like torch.distributed's (rank order)."""
    import threading

    barrier, slots, results = threading.Barrier(world), [None] * world, [None] * world
    local = threading.local()

    def gather(items):
        slots[local.rank] = list(items)
        barrier.wait()
        got = [x for part in slots for x in part]
        barrier.wait()
        return got

    monkeypatch.setattr(train, "all_gather_list", gather)

    def run(rank):
        local.rank = rank
        results[rank] = fn(rank)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("m", [3, 5])
def test_dynamic_sampling_keeps_the_first_mixed_groups(monkeypatch, world, m):
    """DAPO's filter (rollout.dynamic_sampling) against the obvious reading: of every round's groups in the order
    generated, the first m whose rewards are mixed, then (rounds exhausted) uniform ones in order; each kept
    group with its own rollouts and rewards, whole, on some rank, in mini-batches of train.mini_batch_prompts;
    the same groups whatever the number of ranks."""
    spec = [[(10, [1, 0, 1]), (11, [1, 1]), (12, [0, 0, 0, 0]), (13, [0, 1])],
            [(14, [0, 0]), (10, [0, 0, 1]), (15, [1, 1, 1])],
            [(16, [0, 0, 0])]]  # 3 mixed groups: 10, 13, then 10 again (round 2, its own group)
    cfg = train.Config()
    cfg.rollout.prompts_per_step, cfg.train.mini_batch_prompts = m, 2
    ordered = [(p, r) for mixed in (True, False) for groups in spec for p, r in groups
               if (0 < sum(r) < len(r)) == mixed][:m]  # the reference
    results = _on_ranks(world, lambda rank: train.keep_mixed_groups(
        _rounds_for_rank(spec, rank, world, 2), cfg, rank, world, pad_id=0), monkeypatch)
    kept = {}
    for idx, mb, mine, out, rewards in results:
        np.testing.assert_array_equal(idx, [p for p, _ in ordered])  # every rank knows the whole plan
        np.testing.assert_array_equal(mb, np.arange(len(ordered)) // 2)
        for local, k in enumerate(mine.tolist()):
            rows = torch.nonzero(out.prompt_index == local).flatten()
            kept[k] = ([r[0] for r in out.responses()[rows[0]:rows[-1] + 1]], rewards[rows].tolist())
    assert sorted(kept) == list(range(len(ordered)))  # each kept group on exactly one rank
    for k, (p, r) in enumerate(ordered):
        responses, rewards = kept[k]
        assert responses == [100 * p + b for b in range(len(r))] and rewards == [float(x) for x in r]
    first_mixed_round2 = kept[2] if m >= 3 else None  # prompt 10 drawn again: a group of its own (round 2's)
    assert first_mixed_round2 is None or first_mixed_round2[1] == [0.0, 0.0, 1.0]


def test_dynamic_sampling_run_charges_every_round(tiny_model_dir, tmp_path):
    """Through train.main: rounds until m groups have mixed rewards; every generated rollout charged and
    observed by the posteriors; the update sees only the kept groups."""
    out = tmp_path / "dyn"
    trained = []
    real = train.mini_batch_sequences

    def spy(subset, prompts, mb, rollouts, adv, num_mb):
        trained.append(adv)
        return real(subset, prompts, mb, rollouts, adv, num_mb)

    import unittest.mock

    with unittest.mock.patch.object(train, "mini_batch_sequences", spy):
        state, cur = train.main(tiny_default_run(out, "--rollout.dynamic_sampling=true", "--rollout.max_rounds=6",
                                                 "--cures.sampling=uniform", "--cures.allocation=uniform",
                                                 "--run.max_steps=2", "--eval.data=", "--train.kl_coef=0"))
    rows = [json.loads(l) for l in open(out / "metrics.jsonl") if "dynamic/rounds" in l]
    assert len(rows) == 2
    total = 0
    for row, adv in zip(rows, trained):
        total += 20 * row["dynamic/rounds"]  # N = 20 per round
        assert row["rollouts/total"] == total
        assert 1 <= row["dynamic/rounds"] <= 6
        if row["dynamic/mixed_groups"] >= 6:  # m = 6 groups reached: every trained rollout has an advantage
            assert bool((adv != 0).all())
        else:
            assert row["dynamic/rounds"] == 6
    assert cur.alpha.sum() + cur.beta.sum() == total  # every generated rollout observed (prior 0, no cold start)


def test_logger_close_finishes_every_sink(tmp_path, monkeypatch):
    """A torchrun rank ends with os._exit (train.leave), which runs no exit hooks: Logger.close must finish the
    sinks that rely on them (wandb here, a stand-in module) and leave metrics.jsonl complete."""
    import types

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append("init"), log=lambda m, step: calls.append(step),
                                 finish=lambda: calls.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = train.load_config([f"--run.out_dir={tmp_path}", "--run.wandb_project=p"])
    logger = train.Logger(cfg, rank=0)
    logger.log({"train/reward": 0.5}, 1)
    logger.close()
    assert calls == ["init", 1, "finish"]
    assert logger.file.closed
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "train/reward": 0.5}]
    train.Logger(cfg, rank=1).close()  # other ranks hold no sinks
