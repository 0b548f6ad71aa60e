"""train.py, the loop: groups and ranks, the step's order, the cold start, the update, dynamic sampling, whole runs."""

import json
import os

import numpy as np
import pytest
import torch

import cures
import rollout
import train
from helpers import ROOT, TRAIN_DATA, small_run, tiny_default_run
from infra.batching import plan_micro_batches
from infra.config import Config, load_config
from infra.models import Policy


def test_first_mini_batch_needs_no_old_logprob_pass(tiny_model_dir):
    """The step skips the old-log-prob pass of a one-epoch update's first mini-batch: update_policy then
    uses logp.detach(). The update must be the one with old_logp recomputed by the same policy."""
    from transformers import AutoModelForCausalLM

    cfg = load_config([f"--model.path={tiny_model_dir}", "--train.micro_batch_tokens=40"])
    g = torch.Generator().manual_seed(1)
    seqs = []
    for k in range(6):
        p, r = 4 + k % 3, 2 + (3 * k) % 7
        seqs.append({"ids": torch.randint(3, 250, (p + r,), generator=g).tolist(), "prompt_len": p, "resp_len": r,
                     "adv": torch.randn(1, generator=g), "ref_logp": -torch.rand(r, generator=g) - 2.0})
    cpu, after = torch.device("cpu"), []
    for recompute in (True, False):
        torch.manual_seed(0)
        policy = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
        part = [dict(s) for s in seqs]
        batches = plan_micro_batches(part, cfg)
        if recompute:
            for i, lp in train.score_logprobs(policy, batches, cpu, cfg).items():
                part[i]["old_logp"] = lp
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        sums, norm, ok = train.update_policy(policy, opt, part, cpu, cfg, 1, batches=batches)
        assert ok and norm > 0 and sums["actor/clip_frac"] == 0
        after.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    assert len(batches) > 1
    torch.testing.assert_close(after[1], after[0], atol=1e-6, rtol=1e-5)


def test_assign_groups_balanced_and_whole():
    n = np.array([8, 2, 6, 4, 2, 2, 10, 6])
    idx, n, mb = train.training_groups(np.arange(8), n, 4, "draw")
    np.testing.assert_array_equal(mb, [0, 0, 0, 0, 1, 1, 1, 1])
    owner = train.assign_groups(n, mb, 2)
    for b in (0, 1):
        loads = [n[(mb == b) & (owner == r)].sum() for r in (0, 1)]
        assert abs(loads[0] - loads[1]) <= 2


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
    for line in lines[1:]:  # the scoring's share of the rollout phase, and generation's rate without it
        assert 0 < line["time/reward"] < line["time/rollout_and_reward"]
        assert line["perf/generation_tokens_per_s"] > line["perf/rollout_tokens_per_s"] > 0
    assert lines[-1]["subset"] == 1 and "cold/acc" in lines[-1]  # step 3 starts subset 1 with a cold start
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "config.yaml").exists()
    import eval as evaluation  # eval.py evaluates the final model as it was trained: prompt and stopping rule

    assert evaluation.stop_setting(str(out / "final")) is True


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
def test_tiny_default_learns(tmp_path):
    """The bundled default learns: configs/tiny.yaml as shipped (model, data, seed, evaluations every 16 steps),
    the README's main command (all 64 steps, cold starts included); held-out accuracy at temperature 1 (avg@4
    on the 480 test problems, levels 2-4) averaged over steps 32, 48 and 64 must exceed step 0's by more than 2
    points. Seeded, but a run's trajectory depends on the machine and on the threads (the summation order of
    multi-threaded kernels). Measured with the model pretrained on 2026-12-06 (AMD EPYC, 2 threads): 14.6 at step 0,
    22.4 averaged over steps 32-64 (+7.8; its level 2 alone 43.3 -> 69.7 at step 64)."""
    out = tmp_path / "tiny"
    train.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--run.out_dir={out}", "--run.save_every=0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = {r["step"]: r["eval/acc"] for r in rows if "eval/acc" in r}
    assert sorted(evals) == [0, 16, 32, 48, 64]
    assert (evals[32] + evals[48] + evals[64]) / 3 > evals[0] + 0.02, evals


def _first_steps_as_shipped(config: str, out) -> tuple[dict, list[dict]]:
    """A testbed's config as shipped, its first 4 steps (the cold start of subset 0 and evaluations at steps 0 and 4):
    ({step: held-out accuracy}, the 4 steps' metric rows), the steps' rewards checked neither all 0 nor all 1."""
    train.main(["--config", os.path.join(ROOT, "configs", config), f"--run.out_dir={out}", "--run.save_every=0",
                "--run.max_steps=4", "--eval.every=4"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = {r["step"]: r["eval/acc"] for r in rows if "eval/acc" in r}
    steps = [r for r in rows if "train/reward" in r]
    assert sorted(evals) == [0, 4] and len(steps) == 4 and all(0 < r["train/reward"] < 1 for r in steps)
    return evals, steps


@pytest.mark.slow
def test_continuum_testbed_runs_as_shipped(tmp_path):
    """configs/arith.yaml as shipped: the pre-RL held-out accuracy is the committed model's (models/arith's report:
    about 20 % at temperature 1), and CurES draws from every level."""
    evals, steps = _first_steps_as_shipped("arith.yaml", tmp_path / "arith")
    assert 0.08 < evals[0] < 0.25, evals
    assert all(sum(r.get(f"draws/level_{k}", 0) for r in steps) > 0 for k in (1, 2, 3))


@pytest.mark.slow
def test_tiny12_testbed_runs_as_shipped(tmp_path):
    """configs/tiny12.yaml as shipped (the tiny model on levels 1-2, bench/results/tiny12): the pre-RL held-out
    accuracy is models/tiny's on its 160 two-digit sums (about 44 % at temperature 1), and only levels 1 and 2 are
    drawn, CurES favouring level 2."""
    evals, steps = _first_steps_as_shipped("tiny12.yaml", tmp_path / "tiny12")
    assert 0.35 < evals[0] < 0.55, evals
    assert not any(k.startswith("draws/level_") and k not in ("draws/level_1", "draws/level_2") for r in steps for k in r)
    assert sum(r.get("draws/level_2", 0) for r in steps) > sum(r.get("draws/level_1", 0) for r in steps)


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

    def spy(policy, optimizer, seqs, device, cfg, world, scheduler=None, batches=None, before_micro_batch=None):
        got = train.score_logprobs(policy, batches, device, cfg)
        gap = max(float((got[i] - seqs[i]["ref_logp"]).abs().max()) for i in got)
        seen.append((len(optimizer.state), gap, scheduler.get_last_lr()[0]))
        return real(policy, optimizer, seqs, device, cfg, world, scheduler, batches, before_micro_batch)

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
        mixed, uniform = train.group_kinds_everywhere(rewards, out.prompt_index, len(mine), mine, len(idx))
        rounds.append({"idx": idx, "n": n, "mb": mb, "owner": owner, "mine": mine, "out": out, "rewards": rewards,
                       "mixed": mixed, "uniform": uniform})
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
    spec = [[(17, []), (10, [1, 0, 1]), (11, [1, 1]), (12, [0, 0, 0, 0]), (13, [0, 1])],
            [(14, [0, 0]), (10, [0, 0, 1]), (15, [1, 1, 1])],
            [(16, [0, 0, 0])]]  # 3 mixed groups: 10, 13, then 10 again (round 2, its own group); 17 is empty
    cfg = Config()
    cfg.rollout.prompts_per_step, cfg.train.mini_batch_prompts = m, 2
    ordered = [(p, r) for mixed in (True, False) for groups in spec for p, r in groups
               if r and (0 < sum(r) < len(r)) == mixed][:m]  # the reference: an empty group is never kept
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


def test_empty_groups_are_neither_mixed_nor_trained():
    """cures.n_min=0 lets Eq. 20 give a draw no rollouts: such a group is not formed (sample_and_allocate), and a
    group left with no scored rollout is neither mixed nor uniform (group_kinds: before, its +inf min and -inf
    max made it 'mixed', which ended dynamic sampling early and kept empty groups)."""
    from infra.metrics import group_kinds

    mixed, uniform = group_kinds(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 2, 2]), 3)
    assert mixed.tolist() == [True, False, False] and uniform.tolist() == [False, False, True]
    cfg = Config()
    cfg.rollout.prompts_per_step, cfg.rollout.rollouts_per_step, cfg.train.mini_batch_prompts = 8, 16, 4
    cfg.cures.n_min, cfg.cures.sampling = 0, "uniform"
    cur = cures.Curriculum(8, sampling="uniform", allocation="cures", n_min=0)
    cur.observe(np.arange(8), np.array([0, 0, 0, 0, 1, 2, 4, 4.0]), np.full(8, 4.0))  # p = 0 or 1: sigma = 0
    idx, n, mb, owner, n_draws, draws = train.sample_and_allocate(cur, 0, 0, cfg, world=2)
    assert (n_draws == 0).any() and n.sum() == 16 and (n > 0).all()  # empty draws formed no group
    assert sorted(np.unique(mb)) == list(range(mb.max() + 1))  # mini-batches numbered without a gap
    assert set(idx) == set(draws[n_draws > 0])


@pytest.mark.parametrize("dynamic", [False, True])
def test_n_min_zero_runs(tmp_path, dynamic):
    """cures.n_min=0 through train.main, with and without dynamic sampling: groups given no rollouts happen
    (cures/n_min = 0: 10 rollouts over 12 drawn prompts leave some with none, whatever is sampled), the steps
    train, every rollout counted once."""
    out = tmp_path / "r"
    state, cur = train.main(tiny_default_run(out, "--cures.n_min=0", "--run.max_steps=2", "--eval.data=",
                                             "--rollout.prompts_per_step=12", "--rollout.rollouts_per_step=10",
                                             f"--rollout.dynamic_sampling={str(dynamic).lower()}",
                                             "--rollout.max_rounds=2"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train/reward"' in line]
    assert len(rows) == 2 and any(r["cures/n_min"] == 0 for r in rows)
    assert all(np.isfinite(r["actor/pg_loss"]) and r["actor/grad_norm"] > 0 for r in rows)
    assert cur.alpha.sum() + cur.beta.sum() == state["rollouts_train"] + state["rollouts_cold"]  # all observed once


@pytest.mark.parametrize("sigma", ["accuracy", "gradient"])
def test_unscored_rollouts_are_counted_apart_and_left_out(tiny_model_dir, tmp_path, monkeypatch, sigma):
    """A response the checker never scored (its worker lost again and again: reward.Scores.unscored) is logged as
    reward/unscored (cold/unscored in the cold start), left out of the Beta counts (cold start and steps) and out
    of the loss; its placeholder score (1.0 here, so that counting it would show) reaches nothing. The first
    prompts' cold-start rollouts are all unscored: with sigma=gradient they get no gradient statistics (sigma 0)."""
    import reward

    real, trained = reward.score_batch, []

    def flaky(responses, golds, **kwargs):
        scores = real(responses, golds, **kwargs)
        scores.unscored = [i for i in range(len(scores)) if i % 3 == 0 or i < 4]
        for i in scores.unscored:
            scores[i] = 1.0
        return scores
    monkeypatch.setattr(reward, "score_batch", flaky)
    real_parts = train.mini_batch_sequences

    def spy(subset, prompts, mb, out, adv, num_mb):
        trained.append(len(out.prompt_index))
        return real_parts(subset, prompts, mb, out, adv, num_mb)
    monkeypatch.setattr(train, "mini_batch_sequences", spy)
    out = tmp_path / "r"
    state, cur = train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.save_every=0",
                                      f"--cures.sigma={sigma}"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train/reward"' in line]
    unscored = [r["reward/unscored"] for r in rows]
    assert unscored == [9, 9]  # 20 rollouts a step: indices 0, 1, 2, 3, 6, ..., 18
    assert rows[0]["cold/unscored"] == 22 and rows[0]["cold/rollouts"] == 60  # prompts 0 and 1 wholly
    assert trained == [20 - 9, 20 - 9]  # the update saw the scored rollouts only
    observed = cur.alpha.sum() + cur.beta.sum()
    assert observed == state["rollouts_cold"] + state["rollouts_train"] - 22 - sum(unscored)
    assert cur.alpha.sum() < 1  # the random model's real rewards are 0; the placeholders were not counted
    assert all(r["train/reward"] < 0.05 for r in rows)


@pytest.mark.parametrize("sigma", ["accuracy", "gradient"])
def test_sdpa_never_reaches_cudnn_attention(tiny_model_dir, tmp_path, monkeypatch, sigma):
    """Every sdpa call of a train.py step (rollouts, log-prob passes, the update's forward and, with gradient
    checkpointing, its recomputation inside backward; with sigma=gradient, Eq. 21's per-response gradients on the
    cold start) runs with cuDNN's attention switched off
    (rollout.attention_backends: on a GPU cuDNN would build a plan for every new shape), and the setting is given
    back after the run. On a CPU cuDNN is never used, so this checks the switch, not a kernel."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(*args, **kwargs):
        calls.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.is_grad_enabled(),
                      torch._C._current_graph_task_id() >= 0))  # cuDNN allowed, grad mode, inside backward
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    state, _ = train.main(small_run(tiny_model_dir, tmp_path / "run", "--run.max_steps=1",
                                    "--model.gradient_checkpointing=true", f"--cures.sigma={sigma}"))
    assert state["step"] == 1
    assert not any(allowed for allowed, _, _ in calls)
    assert any(not grad for _, grad, _ in calls) and any(grad for _, grad, _ in calls)  # generation and update
    assert any(in_backward for _, _, in_backward in calls)  # checkpointed recomputation
    assert torch.backends.cuda.cudnn_sdp_enabled()


def _run_rows(out):
    """metrics.jsonl without the rows' timings, speeds and memory (what differs between two equal runs)."""
    skip = ("time/", "perf/", "memory/")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(skip)} for line in open(out / "metrics.jsonl")]


def test_a_run_samples_the_same_rollouts_whatever_the_cache_and_its_batching(tmp_path):
    """rollout.sample_tokens keys every rollout by (seed, group, index): a 2-step run of the pretrained tiny model
    (cold start included) logs the same rewards, lengths, posteriors and losses, and ends with the same weights,
    on the dynamic cache, on it with a 200-token KV budget, and on the decode loop (cache=slots) with 5 slots."""
    from helpers import final_weights

    runs = {"dynamic": [], "dynamic, 200-token budget": ["--rollout.max_batch_tokens=200"],
            "slots x5": ["--rollout.cache=slots", "--rollout.max_batch_size=5"]}
    rows, weights = {}, {}
    for name, extra in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        train.main(tiny_default_run(out, "--run.max_steps=2", "--eval.data=", *extra))
        rows[name], weights[name] = _run_rows(out), final_weights(out / "final")
    ref = rows["dynamic"]
    assert [r["step"] for r in ref] == [0, 1, 2] and 0 < ref[-1]["train/reward"] < 1
    for name in runs:
        assert rows[name] == ref, name
        assert all(torch.equal(weights[name][k], weights["dynamic"][k]) for k in weights["dynamic"]), name


def test_each_evaluation_logs_accuracy_per_level_and_every_problems_scores(tmp_path):
    """eval.group_key (level, the default): each evaluation logs eval/acc/level_<k> beside eval/acc and writes
    eval/step_<step>.jsonl, a line a problem (its id, its level from the data, its samples' scores); each level's
    accuracy is the mean of its problems' scores there, and eval/acc the mean of all (real tiny-model samples)."""
    out = tmp_path / "r"
    train.main(tiny_default_run(out, "--run.max_steps=1", f"--eval.data={TRAIN_DATA}", "--eval.max_problems=12",
                                "--eval.samples=3", "--eval.temperature=1.0", "--eval.every=1"))
    data = [json.loads(line) for line in open(TRAIN_DATA)][:12]
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for r in evals:
        problems = [json.loads(line) for line in open(out / "eval" / f"step_{r['step']:06d}.jsonl")]
        assert [p["id"] for p in problems] == list(range(12))
        assert [p["level"] for p in problems] == [d["level"] for d in data]
        assert all(len(p["scores"]) == 3 and p["unscored"] == [] for p in problems)
        levels = sorted({d["level"] for d in data})
        assert len(levels) == 4 and sorted(k for k in r if k.startswith("eval/acc/")) == \
            [f"eval/acc/level_{k}" for k in levels]
        for k in levels:
            assert r[f"eval/acc/level_{k}"] == pytest.approx(np.mean([s for p in problems if p["level"] == k
                                                                      for s in p["scores"]]))
        assert r["eval/acc"] == pytest.approx(np.mean([s for p in problems for s in p["scores"]]))
    assert any(p["scores"] != [0.0] * 3 for p in problems)  # the tiny model answers some: not vacuous
