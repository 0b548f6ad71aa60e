"""The comparison benchmark's statistics (bench/convergence.py, bench/testbed.py) on constructed curves."""

import json
import subprocess
import os
import sys

import numpy as np
import pytest

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))  # after the root: bench/rollout.py must not shadow rollout.py
from helpers import ROOT  # noqa: E402
import convergence  # noqa: E402


def curve(accs, rollouts_per_eval=4096, start=0):
    """[(step, rollouts, acc)] evaluated every 8 steps."""
    return [(8 * k, start + rollouts_per_eval * k, a) for k, a in enumerate(accs)]


def test_primary_metric_is_the_second_half_mean():
    c = curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # steps 0..64
    assert convergence.primary_metric(c) == pytest.approx(np.mean([0.6, 0.7, 0.8, 0.9]))  # steps 40-64


def test_paired_differences_and_verdicts():
    rng = np.random.default_rng(0)
    base = [curve(0.4 + 0.05 * rng.standard_normal(9)) for _ in range(8)]
    shift = 0.03 + 0.005 * rng.standard_normal(8)  # a seed-dependent, always positive gain
    better = [[(s, r, a + d) for s, r, a in c] for c, d in zip(base, shift)]
    same = [list(c) for c in base]
    worse = [[(s, r, a - 0.1) for s, r, a in c] for c in base]
    # twice the rollouts per evaluation: at GRPO's last rollouts (32,768) it is at step 32, interpolated exactly
    costly = [curve([a for _, _, a in c], 8192) for c in base]
    rows = {r["variant"]: r for r in convergence.paired_differences(
        {"grpo": base, "better": better, "same": same, "worse": worse, "costly": costly})}
    assert rows["better"]["primary"][0] == pytest.approx(shift.mean())
    assert rows["better"]["primary"][1] > 0 and rows["better"]["verdict"] == "better"
    assert rows["better"]["equal steps"][0] == pytest.approx(shift.mean())
    assert rows["same"]["primary"][:3] == (0.0, 0.0, 0.0) and rows["same"]["verdict"] == "no difference detected"
    assert rows["worse"]["verdict"] == "worse" and rows["worse"]["verdict at equal rollouts"] == "worse"
    expected = np.mean([c[4][2] - c[-1][2] for c in base])  # costly at step 32 against base at step 64
    assert rows["costly"]["equal rollouts"][0] == pytest.approx(expected)
    assert rows["costly"]["equal steps"][0] == pytest.approx(0.0)
    # the other way round (the base generated more): both compared at the variant's final count, 32,768
    rows = {r["variant"]: r for r in convergence.paired_differences({"costly": costly, "grpo": base}, base="costly")}
    assert rows["grpo"]["equal rollouts"][0] == pytest.approx(-expected)
    assert convergence.verdict(None) == "not enough seeds"


def test_late_collapse():
    assert convergence.collapsed(curve([0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.41, 0.45, 0.45]))  # 9 points below its best
    assert not convergence.collapsed(curve([0.4, 0.5, 0.3, 0.4, 0.45, 0.45, 0.44, 0.45, 0.45]))  # first half only
    assert not convergence.collapsed(curve([0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.43, 0.45, 0.45]))  # 7 points


def test_pilot_rule_takes_the_first_stage_with_a_passing_setting():
    """bench/arith_pilots.choose, the declared rule: a later stage decides only if every earlier one passes nothing;
    within a stage the fewest steps, then the highest mean gain; a late collapse or a missing seed disqualifies."""
    import arith_pilots

    def row(name, gains, steps=64, collapses=0, seeds=4):
        return {"name": name, "gains": np.array(gains), "steps": steps, "collapses": collapses, "seeds": seeds}

    fail = [row("pilot_stop0.2_lr1e-4_64", [0.02] * 4), row("pilot_stop0.2_lr1e-4_128", [0.03] * 4, 128)]
    assert arith_pilots.choose(fail) == (None, len(arith_pilots.STAGES))
    late = [row("pilot_stop0.1_lr1e-4_64", [0.05] * 4), row("pilot_stop0.1_lr3e-4_64", [0.08] * 4, collapses=1),
            row("pilot_sums_stop0.2_lr1e-4_64", [0.20] * 4)]
    pick, stages = arith_pilots.choose(fail + late)
    assert (pick["name"], stages) == ("pilot_stop0.1_lr1e-4_64", 3)  # not the collapsing one, not stage 4's larger gain
    first = [row("pilot_stop0.3_lr1e-4_128", [0.09] * 4, 128), row("pilot_stop0.2_lr3e-4_128", [0.05] * 4, 128)]
    assert arith_pilots.choose(first + late)[0]["name"] == "pilot_stop0.3_lr1e-4_128"  # stage 2 decides, top gain
    assert arith_pilots.choose([row("pilot_stop0.1_lr1e-4_64", [0.09] * 3, seeds=3)])[0] is None
    run = {"steps": [{"train/reward": r} for r in [0.1] * 8 + [0.9] * 4 + [0.3] * 8]}
    assert arith_pilots.reward_rise(run) == pytest.approx(0.2)  # the last 8 steps against the first 8


def test_mechanism_gives_every_variant_every_draw_key(tmp_path):
    """bench/convergence.mechanism: per step, mean over seeds; a level a variant never drew, in one step or in the
    whole run (GRPO-like variants draw every level, a curriculum may skip one), is 0 % of its draws, not missing."""
    (tmp_path / "seeds").mkdir()
    steps = {"cures": [[{"step": 1, "draws/level_1": 1.0, "mech/mixed_rollouts": 0.5},
                        {"step": 2, "draws/level_1": 0.5, "draws/level_2": 0.5, "mech/mixed_rollouts": 0.7}]] * 2,
             "grpo": [[{"step": 1, "draws/level_1": 0.5, "draws/level_3": 0.5, "mech/mixed_rollouts": 0.2},
                       {"step": 2, "draws/level_1": 0.2, "draws/level_3": 0.8}],
                      [{"step": 1, "draws/level_1": 0.7, "draws/level_3": 0.3, "mech/mixed_rollouts": 0.4},
                       {"step": 2, "draws/level_1": 0.4, "draws/level_3": 0.6}]]}
    for name, runs in steps.items():
        for seed, run in enumerate(runs):
            (tmp_path / "seeds" / f"{name}_seed{seed}.json").write_text(json.dumps({"steps": run}))
    m = convergence.mechanism(str(tmp_path), ["cures", "grpo"], [0, 1])
    for name in m:
        assert sorted(k for k in m[name] if k != "step") == ["draws/level_1", "draws/level_2", "draws/level_3",
                                                              "mech/mixed_rollouts"]
    np.testing.assert_allclose(m["cures"]["draws/level_2"], [0.0, 0.5])
    np.testing.assert_allclose(m["cures"]["draws/level_3"], [0.0, 0.0])
    np.testing.assert_allclose(m["grpo"]["draws/level_1"], [0.6, 0.3])
    np.testing.assert_allclose(m["grpo"]["draws/level_2"], [0.0, 0.0])
    assert m["grpo"]["mech/mixed_rollouts"][0] == pytest.approx(0.3) and np.isnan(m["grpo"]["mech/mixed_rollouts"][1])
    np.testing.assert_array_equal(m["grpo"]["step"], [1, 2])


def test_schedule_starts_the_longest_runs_first_and_keeps_each_variants_seeds():
    jobs = [(name, convergence.VARIANTS[name]) for name in ("grpo", "cures", "dapo", "cures_dapo")]
    order = convergence.schedule(jobs, [0, 1, 2])
    assert [(n, s) for n, _, s in order] == [("dapo", 0), ("dapo", 1), ("dapo", 2), ("cures_dapo", 0),
                                             ("cures_dapo", 1), ("cures_dapo", 2), ("grpo", 0), ("grpo", 1),
                                             ("grpo", 2), ("cures", 0), ("cures", 1), ("cures", 2)]
    assert sorted(order, key=lambda j: (j[0], j[2])) == sorted((n, e, s) for n, e in jobs for s in [0, 1, 2])


def test_run_times_sum_the_timed_seed_files(tmp_path):
    os.makedirs(tmp_path / "seeds")
    for name, walls in {"grpo": [100.0, 140.0], "cures": [None, 150.0]}.items():
        for seed, wall in enumerate(walls):
            with open(tmp_path / "seeds" / f"{name}_seed{seed}.json", "w") as f:
                json.dump({"threads": 1, "wall_s": wall}, f)
    lines = convergence.run_times(str(tmp_path), ["grpo", "cures"], [0, 1])
    assert "| grpo | 2 of 2 | 1 | 120 s | 4.0 min |" in lines
    assert "| cures | 1 of 2 | 1 | 150 s | 2.5 min |" in lines
    assert lines[-1] == "| all | | | | 6.5 min |"


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


def test_rollout_axis_statistics_on_constructed_curves():
    """The per-rollout metrics against hand values: a cold start holds the curve flat wherever the evaluations
    fall, the rollout-axis mean is the area per rollout, and the comparison splits the total into the cold start's
    cost (the base's per-step curve on the variant's rollout clock) and the rest."""
    steps = [{"step": s, "rollouts/total": 4000 + 100 * s} for s in range(1, 5)]  # cold start 4000, then 100 a step
    f = {"curve": [(0, 0, 0.2), (2, 4200, 0.4), (4, 4400, 0.6)], "steps": steps}
    pts = convergence.rollout_points(f)
    np.testing.assert_allclose(pts, [[0, 0.2], [4000, 0.2], [4200, 0.4], [4400, 0.6]])  # flat through the cold start
    # area: 4000 x 0.2 + 200 x 0.3 + 200 x 0.5, then held at 0.6 to 5000: 600 x 0.6
    assert convergence.rollout_mean(pts, 5000) == pytest.approx((800 + 60 + 100 + 360) / 5000)
    assert convergence.rollout_mean(pts, 2000) == pytest.approx(0.2)
    # a cold start of 1000 before step 3, between evaluations at steps 0 and 4: flat there too, at the accuracy
    # interpolated along the training rollouts (step 2 of 4: 0.4), not interpolated across it
    mid = {"curve": [(0, 0, 0.2), (4, 1400, 0.6)],
           "steps": [{"step": s, "rollouts/total": t} for s, t in zip(range(1, 5), (100, 200, 1300, 1400))]}
    np.testing.assert_allclose(convergence.rollout_points(mid), [[0, 0.2], [200, 0.4], [1200, 0.4], [1400, 0.6]])
    grpo = {"curve": [(0, 0, 0.2), (2, 200, 0.3), (4, 400, 0.4)],
            "steps": [{"step": s, "rollouts/total": 100 * s} for s in range(1, 5)]}
    np.testing.assert_allclose(convergence.rollout_points(grpo), [[0, 0.2], [200, 0.3], [400, 0.4]])  # no cold start
    lines = convergence.rollout_comparison({"grpo": [grpo] * 3, "cures": [f] * 3}, "grpo", budget=400)
    row = next(line for line in lines if line.startswith("| cures")).split(" | ")
    # total: 0.2 flat against 0.2 -> 0.4 (mean 0.3): -0.1; GRPO's own curve on CurES's clock is 0.2 flat to 400
    # rollouts as well, so the cold start is all of it and the rest 0
    assert row[1] == "3" and row[2].startswith("-10.00 [-10.00, -10.00]") and row[3] == "worse"
    assert row[4].startswith("-10.00 [-10.00, -10.00]") and row[5].startswith("+0.00 [+0.00, +0.00]")
    assert row[6].startswith("no difference detected")
    # a cold start (200) shorter than the budget (600), the variant learning faster per step than GRPO, which
    # holds 0.4 from 400: GRPO 0.333 (200 x 0.25 + 200 x 0.35 + 200 x 0.4); the variant 0.367 (200 x 0.2 flat +
    # 200 x 0.35 + 200 x 0.55); GRPO's curve on its clock 0.267 (200 x 0.2 + 200 x 0.25 + 200 x 0.35). Total +3.33
    # = cold start -6.67 + rest +10.00, and the logged rollouts/cold_start places the cold start
    fast = {"curve": [(0, 0, 0.2), (2, 400, 0.5), (4, 600, 0.6)],
            "steps": [{"step": s, "rollouts/total": 200 + 100 * s, "rollouts/cold_start": 200} for s in range(1, 5)]}
    np.testing.assert_allclose(convergence.rollout_points(fast), [[0, 0.2], [200, 0.2], [400, 0.5], [600, 0.6]])
    lines = convergence.rollout_comparison({"grpo": [grpo] * 3, "cures": [fast] * 3}, "grpo", budget=600)
    row = next(line for line in lines if line.startswith("| cures")).split(" | ")
    assert row[2].startswith("+3.33 [") and row[3] == "better"
    assert row[4].startswith("-6.67 [") and row[5].startswith("+10.00 [") and row[6].startswith("better")


def test_the_t_interval_is_the_verdicts_and_wider_than_the_bootstrap_on_few_seeds():
    """convergence.t_quantile against Student's table; intervals() puts the t-interval beside the percentile
    bootstrap, which over 5 seeds runs narrower (the reason the verdict takes the t-interval)."""
    for df, q in ((1, 12.706), (4, 2.776), (9, 2.262), (15, 2.131), (30, 2.042)):
        assert convergence.t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)
    d = [0.01, 0.03, -0.005, 0.02, 0.04]
    iv = convergence.intervals(d)
    half = 2.776 * np.std(d, ddof=1) / np.sqrt(5)
    assert iv["t"] == pytest.approx((np.mean(d) - half, np.mean(d) + half), abs=1e-5)
    assert iv["boot"][1] - iv["boot"][0] < iv["t"][1] - iv["t"][0]
    assert iv["t"][0] < 0 < iv["boot"][0]  # the bootstrap would call it better; the t-interval does not
    assert convergence.verdict(iv) == "no difference detected"


def test_across_testbeds_welch_interval_by_hand():
    """bench/across_testbeds.welch: equal sizes and spreads give the pooled t-interval (df 2n - 2); unequal ones the
    Welch-Satterthwaite df, rounded down (4.41 -> 4, 1.94 -> 1)."""
    import across_testbeds

    a, b = [0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]  # equal spreads: df 6
    half = convergence.t_quantile(0.975, 6) * np.sqrt(2 * np.var(a, ddof=1) / 4)
    assert across_testbeds.welch(a, b) == pytest.approx((-0.2, -0.2 - half, -0.2 + half))
    a, b = [1, 2, 3, 4], [2, 4, 6, 8]  # va = 5/12, vb = 5/3: df = (25/12)^2 / ((5/12)^2 / 3 + (5/3)^2 / 3) = 4.41
    half = convergence.t_quantile(0.975, 4) * np.sqrt(5 / 12 + 5 / 3)
    assert across_testbeds.welch(a, b) == pytest.approx((-2.5, -2.5 - half, -2.5 + half))
    a, b = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 3]  # va = 11/12, vb = 9/4: df = 1.94 -> 1 (rounded down, not to 2)
    half = convergence.t_quantile(0.975, 1) * np.sqrt(11 / 12 + 9 / 4)
    assert across_testbeds.welch(a, b) == pytest.approx((3.0, 3.0 - half, 3.0 + half))


def test_across_testbeds_reads_each_testbeds_group_and_draws(tmp_path, monkeypatch, capsys):
    """bench/across_testbeds.py end to end on constructed per-seed files: the group's primary metric (second-half
    mean) of each testbed, their difference a - b, and each testbed's share of draws on the group's level."""
    import across_testbeds

    for name, level2, share in (("a", [[0.1, 0.2, 0.5, 0.7], [0.2, 0.2, 0.3, 0.5]], 0.8),
                                ("b", [[0.1, 0.2, 0.2, 0.4], [0.1, 0.1, 0.2, 0.2]], 0.25)):
        (tmp_path / name / "seeds").mkdir(parents=True)
        for s, accs in enumerate(level2):
            f = {"curve_by_group": {"level_2": [[8 * i, 0, x] for i, x in enumerate(accs)],
                                    "level_3": [[8 * i, 0, 0.0] for i in range(4)]},
                 "steps": [{"step": 1, "draws/level_2": share, "draws/level_1": 1 - share}]}
            (tmp_path / name / "seeds" / f"grpo_seed{s}.json").write_text(json.dumps(f))
    np.testing.assert_allclose(across_testbeds.group_metric(str(tmp_path / "a"), "grpo", [0, 1], "level_2"), [0.6, 0.4])
    monkeypatch.setattr(sys, "argv", ["across_testbeds.py", str(tmp_path / "a"), str(tmp_path / "b"), "--variants",
                                      "grpo", "--seeds", "0", "1"])
    across_testbeds.main()
    row = capsys.readouterr().out.splitlines()[-1]
    d, lo, hi = across_testbeds.welch([0.6, 0.4], [0.3, 0.2])
    assert row == f"| grpo | 50.0 % | 25.0 % | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | 80.0 % / 25.0 % |"


@pytest.mark.parametrize("preallocated", [True, False])
@pytest.mark.parametrize("gqa", [True, False])
def test_decode_cost_byte_model_matches_counted_bytes(gqa, preallocated, monkeypatch):
    """bench/decode_cost.py: one decoding step of rollout.generate (GQA heads, left padding), its aten ops counted;
    the byte model of each kind it models (matmuls, attention, the cache's concatenation with transformers'
    DynamicLayer or only generate's ids and mask with rollout's PreallocatedLayer, whose in-place writes are
    counted as copies, repeat_kv copies where the installed transformers makes them) within 10 % of the bytes
    counted, and a sync or two, not one a layer.
    rollout.generate's own decoding attention (gqa) reads the KV cache once: attention moves at most 1.5x the
    cache's bytes (issue 28's goal), with no copy of it, whatever transformers version."""
    import decode_cost
    import rollout

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(rollout, "DECODE_GQA", gqa)
    monkeypatch.setattr(rollout, "PREALLOCATE", preallocated)
    torch.manual_seed(0)
    model = decode_cost.narrow_model(layers=3, heads=6, kv_heads=2, head_dim=8, vocab=128, intermediate=96)
    m = decode_cost.per_step(model, batch=4, prompt=20, new=6, eos=128 + 7)
    cfg = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "num_key_value_heads", "intermediate_size", "vocab_size")}
    copies = m["bytes"].get("other copies", 0) > 0.5 * m["bytes"]["attention"]  # repeat_kv on this version
    pred = decode_cost.model_bytes(cfg, 4, 20 - 1 + 6 / 2 + 0.5, 4, copies, preallocated)
    assert pred["weights"] + pred["activations"] == pytest.approx(m["bytes"]["matmul"], rel=0.1)
    assert pred["kv read"] == pytest.approx(m["bytes"]["attention"], rel=0.1)
    assert pred["cache concatenation"] + pred["small concatenations"] == pytest.approx(m["bytes"]["concatenation"],
                                                                                       rel=0.1)
    if copies:
        assert pred["repeat_kv copy"] + pred["cache writes"] == pytest.approx(m["bytes"]["other copies"], rel=0.1)
    assert m["bytes"].get("other copies", 0) >= 0.99 * pred["cache writes"]
    assert 20 < m["kernels"] / 3 < 80 and 1 <= m["syncs"] <= 3
    if gqa:
        moved = m["bytes"]["attention"] + m["bytes"].get("other copies", 0)
        assert not copies and moved <= 1.5 * decode_cost.kv_cache_bytes(cfg, 4, 20 - 1 + 6 / 2 + 0.5, 4)


def test_phase_cost_schedules_against_the_long_tail_simulator(monkeypatch):
    """bench/phase_cost.py: continuous batching's steps hold every generated token once and stay within the KV
    budget, and their device-only time is bench/long_tail.py's independent simulation; transformers' scheduler
    (pages, safety margin, forward size) takes at least the ideal schedule's steps, and the graphs it captures are
    counted per padded shape; padded batches decode to their longest response; with no host time the paged path is
    the decode bound, and repeat_kv's reads and the dynamic cache's rewrites only add."""
    import long_tail
    import phase_cost
    import rollout

    from infra.config import load_config

    cfg = load_config(["--config", os.path.join(ROOT, "configs", "1.5b.yaml"), "--rollout.max_batch_tokens=60000",
                       "--rollout.max_new_tokens=512", "--rollout.max_batch_size=64"])
    rng = np.random.default_rng(0)
    resp = long_tail.lengths(200, rng, 120, 0.7, 0.05, 512)
    prompt = np.minimum(np.exp(rng.normal(np.log(150), 0.5, 200)), 1024).astype(int)
    rows, cached, joined, q = phase_cost.paged_steps(prompt, resp, 60000, 64)
    assert rows.sum() == resp.sum() and rows.max() <= 64 and cached.max() <= 60000
    assert q.sum() == rows.sum() - len(resp) + prompt.sum()  # a token a running row; a joiner's whole prompt
    sim = long_tail.simulate_paged(prompt, resp, 60000, 64, 3e9, 28 * 1024, 3.35e12)
    assert sim["decode_steps"] == len(rows) and sim["slots"] == rows.sum()
    assert float(((3e9 + cached * 28 * 1024) / 3.35e12).sum()) == pytest.approx(sim["seconds"], rel=1e-9)
    real = phase_cost.paged_schedule(prompt, resp, 512, 60000, 64)  # transformers' scheduler, rollout's chunks
    ideal = phase_cost.paged_schedule(prompt, resp, 512, 60000, 64, ideal=True)
    assert real[0].sum() == ideal[0].sum() == resp.sum() and len(real[0]) >= len(ideal[0])
    batches = rollout.plan_batches(list(prompt), 512, 60000, 64)
    prow, pcached = phase_cost.padded_steps(prompt, resp, batches, 512)
    assert len(prow) == sum(int(resp[b].max()) for b in batches) and prow.sum() >= resp.sum()
    free = dict(cb_host_ms=0.0, cb_host_us_per_row=0.0, cb_host_ns_per_token=0.0)  # no host time at all
    block, eager_block = "paged, flash-attn (block table), CUDA graphs", "paged, flash-attn (block table), eager"
    gathered = "paged, torch's flash kernel (keys gathered), CUDA graphs"
    graphs = phase_cost.phase_seconds(block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **free)
    gathered_graphs = phase_cost.phase_seconds(gathered, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **free)
    keys = {(c, -(-min(a, 8192) // 64), -(-b // 16384)) for a, b, c in zip(real[3], real[1], real[4])}  # a graph
    # per padded shape and generate_batch call
    assert gathered_graphs["captures"] == len(keys) and 1 < len(keys) < len(real[0])
    assert 1 < graphs["captures"] < len(keys)  # block-table decoding keys on the batch alone
    monkeypatch.setattr(phase_cost, "CAPTURE_S", 0.0)  # below: the steps alone
    steps_alone = phase_cost.phase_seconds(block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **free)
    assert graphs["seconds"] == pytest.approx(steps_alone["seconds"] + graphs["captures"] * 0.037)
    # below: transformers' scheduler made ideal, so that the paged paths run the decode bound's schedule
    monkeypatch.setattr(phase_cost, "PAGE", 1)
    monkeypatch.setattr(phase_cost, "SAFETY_MARGIN", 0.0)
    monkeypatch.setattr(rollout, "PAGED_FORWARD_TOKENS", 10 ** 9)
    t = {p: phase_cost.phase_seconds(p, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **free)["seconds"]
         for p in phase_cost.PATHS}
    bound = phase_cost.decode_bound(prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12)
    assert t[block] == pytest.approx(bound) == pytest.approx(t[eager_block])
    weights = phase_cost.phase_seconds(eager_block, prompt, resp, cfg, 3e9, 0.0, 3.35e12, 0.0, **free)["seconds"]
    assert t[gathered] - weights == pytest.approx(17.5 * (bound - weights))  # gather + a read per query head: measured
    rows, cached, joined, _, _ = ideal
    assert joined.sum() == len(resp) and 0 < (joined > 0).sum() < len(rows)  # some steps admit new requests
    assert t["dynamic (DynamicLayer: concatenated), sdpa (5.17: repeat_kv), eager"] > \
        t["dynamic (DynamicLayer: concatenated), sdpa_gqa, eager"] > \
        t["dynamic (PreallocatedLayer), sdpa_gqa, eager (rollout.generate today)"] > bound
    slow = phase_cost.phase_seconds(eager_block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 1000.0, **free)
    assert slow["host_bound"] == 1.0 and slow["seconds"] == pytest.approx(len(rows) * 1149 * 1e-3 + bound)  # host + device
    overlapped = phase_cost.phase_seconds(eager_block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 1000.0, True,
                                          **free)
    assert overlapped["seconds"] == pytest.approx(len(rows) * 1149 * 1e-3)  # max(host, device): the host alone
    # continuous batching's own host work: 1 ms + 1 ms a row a step, + 1 ms a cached token on the steps that take
    # the varlen path (every step without a block table; with it, those that admit requests), on top of the eager
    # kernels; with graphs too, added to the device's time (the overlapped figure beside it: the larger)
    cb = dict(cb_host_ms=1.0, cb_host_us_per_row=1000.0, cb_host_ns_per_token=1e6)
    varlen = (cached * (joined > 0)).sum()
    eager = phase_cost.phase_seconds(eager_block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **cb)
    assert eager["seconds"] == pytest.approx(1e-3 * (len(rows) + rows.sum() + varlen) + bound)
    graphed = phase_cost.phase_seconds(block, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **cb)
    assert graphed["host_bound"] == 1.0 and graphed["seconds"] == pytest.approx(1e-3 * (len(rows) + rows.sum() + varlen)
                                                                                + bound)
    assert graphed["overlapped"] == pytest.approx(1e-3 * (len(rows) + rows.sum() + varlen))
    every = phase_cost.phase_seconds(gathered, prompt, resp, cfg, 3e9, 28 * 1024, 3.35e12, 0.0, **cb)
    assert every["overlapped"] == pytest.approx(1e-3 * (len(rows) + rows.sum() + cached.sum()))


def test_paged_steps_pages_margin_and_forward_size_by_hand():
    """phase_cost.paged_steps against schedules traced by hand: 4 requests of 10 prompt tokens and 5 new ones in a
    cache of 4 pages of 256 tokens: all at once (5 steps); at most 20 tokens a forward, two join, then one a step
    (7); with half the pages kept free as well, the fourth waits until two have left (10). Pages alone: 3 requests
    in 2 pages run two, then one (6 steps; 3 with single-token pages)."""
    import phase_cost

    p, r = np.array([10] * 4), np.array([5] * 4)
    assert len(phase_cost.paged_steps(p, r, 1024, 100, page=256)[0]) == 5
    rows = phase_cost.paged_steps(p, r, 1024, 100, page=256, forward_tokens=20)[0]
    assert rows.tolist() == [2, 3, 4, 4, 4, 2, 1]
    rows = phase_cost.paged_steps(p, r, 1024, 100, page=256, margin=0.5, forward_tokens=20)[0]
    assert rows.tolist() == [2, 3, 3, 3, 3, 2, 1, 1, 1, 1]
    p3, r3 = np.array([10] * 3), np.array([3] * 3)
    assert len(phase_cost.paged_steps(p3, r3, 512, 100, page=256)[0]) == 6
    assert len(phase_cost.paged_steps(p3, r3, 512, 100)[0]) == 3


def test_gen_in_trainer_measures_every_stage():
    """bench/gen_in_trainer.py (the GPU script's first part) runs on CPU through the trainer's own pieces: a one-rank
    gloo group, build_models' FSDP2 policy and separate generation copy, sync_generation_weights; a row per stage,
    model, prompt kind and cuDNN setting, each with two finite times (differences of two runs, so noisy beside
    other jobs), positive at the median."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gen_in_trainer.py"), "--config",
           os.path.join(ROOT, "configs", "tiny.yaml"), "--group", "--prompts", "4", "--n", "2", "--new", "9"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "MASTER_PORT": "29583"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in res.stdout.splitlines()
            if line.startswith("| ") and line[2:3].isdigit()]
    assert {(r[0], r[1], r[3]) for r in rows} == {
        ("1 alone", "loaded copy", "off"), ("1 alone", "loaded copy", "allowed"),
        ("2 process group", "loaded copy", "off"), ("3 trainer's models", "loaded copy", "off"),
        ("3 trainer's models", "trainer's copy", "off"), ("3 trainer's models", "trainer's copy", "allowed")}
    times = np.array([[float(r[4]), float(r[5])] for r in rows])  # ms a step, fresh and seen: differences of two
    assert len(rows) == 12 and np.isfinite(times).all() and np.median(times) > 0  # runs, noisy beside other jobs


def test_decode_step_model_against_the_h200_measurement():
    """The per-step model bench/phase_cost.py charges (host + device) against the H200's measured eager dynamic
    steps (bench/results/gpu, 2026-11-29): the committed device figures are decode_cost.model_bytes' own for the
    1.5B config at 4.8 TB/s (within 1 %), and host + device is within 30 % of every measured step and closer on average than
    max(host, device), the rule it replaced."""
    import decode_cost

    d = json.load(open(os.path.join(ROOT, "bench", "results", "gpu", "2026-11-29_h200_decode_dynamic.json")))
    real = json.load(open(os.path.join(ROOT, "bench", "qwen2.5-1.5b", "config.json")))
    assert d["attention"] == "sdpa_gqa" and len(d["measured"]) == 6
    err_sum, err_max = [], []
    for m in d["measured"]:
        device = 1000 * decode_cost.model_bytes(real, m["batch"], m["context"], 2, False,  # that run: DynamicLayer
                                                preallocated=False)["total"] / 4.8e12
        assert device == pytest.approx(m["device_ms_model"], rel=0.01)  # + the small concatenations modelled since
        err_sum.append(abs((m["host_ms_narrow"] + device) / m["ms_per_step"] - 1))
        err_max.append(abs(max(m["host_ms_narrow"], device) / m["ms_per_step"] - 1))
    assert max(err_sum) < 0.3 and np.mean(err_sum) < np.mean(err_max)


def test_paged_step_model_against_the_h200_measurement():
    """bench/phase_cost.py's step of the paged path on torch's kernel against the H200's (bench/results/gpu,
    2026-11-30, decode_cost.py --cache paged, 64 steps, graph captures taken out): continuous batching's host time
    (phase_cost.cb_host_s, measured on the CI CPU) and the device's (weights + K and V x TORCH_KERNEL_KV_MULT, which
    varlen_check.py measured that day, at 4.8 TB/s) bracket every measured step: above the larger of the two,
    within 10 % of their sum or below it (the charge: host + device); the larger alone (full overlap) is 20 % short
    or more."""
    import phase_cost

    d = json.load(open(os.path.join(ROOT, "bench", "results", "gpu", "2026-11-30_h200_decode_paged_run3.json")))
    v = json.load(open(os.path.join(ROOT, "bench", "results", "gpu", "2026-11-30_h200_varlen_check.json")))
    mult = [(s["kernel_padded_ms_layer"] + s["gather_ms_layer"]) / s["kv_bound_ms_layer"] for s in v["shapes"]]
    assert min(mult) < phase_cost.TORCH_KERNEL_KV_MULT < max(mult)
    captures = {(c["batch"], c["context"]): c for c in d["captures"]}
    for m in d["measured"]:
        c = captures[(m["batch"], m["context"])]
        steps = m["new"][1] - m["new"][0] if "new" in m else 81 - 17  # that run's pair, before "new" was recorded
        ms = m["ms_per_step"] - 1000 * (c["long"][1] - c["short"][1]) / steps
        cached = m["batch"] * m["context"]
        host = 1000 * phase_cost.cb_host_s(m["batch"], cached, True)
        device = 1000 * (3.087e9 + cached * 28 * 1024 * phase_cost.TORCH_KERNEL_KV_MULT) / 4.8e12
        assert max(host, device) < 0.8 * ms and ms < 1.1 * (host + device), (m["batch"], ms, host, device)


def test_gpu_smoke_fits_its_budget_and_runs_what_exists(tmp_path):
    """bench/gpu_smoke.sh: the default parts' time limits add up to at most 5 minutes (a session has 15 of GPU time,
    machine start and one rerun included), and every bench script it runs exists; bench/varlen_check.py (its first
    part) runs here on the CPU (the reference against itself) and writes its JSON."""
    import re

    text = open(os.path.join(ROOT, "bench", "gpu_smoke.sh")).read()
    parts = re.search(r"PARTS=\$\{SMOKE_PARTS:-([a-z,]+)\}", text).group(1).split(",")
    limits = []
    for line in text.splitlines():
        m = re.match(r"\[\[ \$PARTS == \*(\w+)\* \]\] && step \$?\{?(?:SMOKE_STEP_LIMIT:-)?(\d+)\}? ", line)
        if m and m.group(1) in parts:
            limits.append(int(m.group(2)))
    assert len(limits) == 5 and sum(limits) <= 300, limits
    for script in set(re.findall(r"bench/(\w+\.py)", text)):
        assert os.path.exists(os.path.join(ROOT, "bench", script)), script
    out = tmp_path / "v.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "varlen_check.py"), "--device", "cpu",
                          "--reps", "1", "--measure", "128:1024", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "-> ok" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.load(open(out))["shapes"][0]["kernel_padded_ms_layer"] > 0


@pytest.mark.parametrize("broken", [False, True])
def test_paged_check_holds_greedy_tokens_to_the_dense_reference(monkeypatch, broken):
    """bench/paged_check.py (gpu_smoke's check that the paged path decodes right on the GPU): on models/arith the
    paged path's greedy tokens are the fp32 dense reference's argmax (gap 0 here, fp32 and the reference kernel),
    and its calls went through rollout.varlen_attention; with that attention reading each sequence's values one
    token off, the check fails on the gaps, while the dynamic path and its control stay at 0."""
    import paged_check
    import rollout

    if broken:
        kernel = rollout.varlen_attention
        monkeypatch.setattr(rollout, "varlen_attention", lambda q, k, v, *a, **kw: kernel(q, k, v.roll(1, 0), *a, **kw))
    res = paged_check.check(os.path.join(ROOT, "models", "arith"), "cpu", n_prompts=12, new=24, tol=0.25)
    assert res["varlen_calls"] > 0 and res["varlen_expected"]
    assert res["dynamic"]["max_gap"] < 1e-4 and res["control"]["max_gap"] < 1e-4 and res["dynamic"]["tokens"] > 50
    if broken:
        assert not res["ok"] and res["paged"]["max_gap"] > 1.0 and res["paged"]["rows_equal_dynamic"] < 1
    else:
        assert res["ok"] and res["paged"]["max_gap"] < 1e-4 and res["paged"]["rows_equal_dynamic"] == 1
    assert res["slots"]["max_gap"] < 1e-4 and res["slots"]["rows_equal_dynamic"] == 1  # the decode loop (its own
    #                                                                                    attention: not broken here)


def test_paged_check_fails_a_decode_loop_that_reads_the_wrong_keys(monkeypatch):
    """The same check on the decode loop (cache=slots): with its decoding attention reading every row's keys one
    slot off, bench/paged_check.py fails on the loop's gaps."""
    import paged_check
    import rollout

    real = rollout.slot_attention

    def off(module, query, key, value, *a, **kw):
        if "slot_width" in kw:  # decoding: each row reads its neighbour's slot
            key, value = key.roll(kw["slot_width"], 0), value.roll(kw["slot_width"], 0)
        return real(module, query, key, value, *a, **kw)
    from transformers import AttentionInterface

    rollout._register(rollout.SLOT_ATTENTION, rollout.slot_attention)
    monkeypatch.setitem(AttentionInterface._global_mapping, rollout.SLOT_ATTENTION, off)
    res = paged_check.check(os.path.join(ROOT, "models", "arith"), "cpu", n_prompts=12, new=24, tol=0.25)
    assert not res["ok"] and res["slots"]["max_gap"] > 1.0 and res["paged"]["max_gap"] < 1e-4


def test_phase_check_ends_every_rollout_at_its_drawn_length(tmp_path):
    """bench/phase_check.py (gpu_smoke's whole-phase check): on a small random model (vocab large enough for the
    countdown), every rollout of the dynamic and the paged cache answers exactly its drawn length (the script
    asserts it), the lengths follow bench/long_tail.py's draw, and the JSON holds both caches' tokens. And
    bench/phase_cost.py's schedules against the real ones, counted in forwards (no CUDA graphs here): the dynamic
    cache's exactly (plan_batches' batches, each to its longest response), transformers' continuous batching
    within 15 % (its pages, safety margin and forward size modelled; a token-granular schedule said 31, not ~160),
    the decode loop's (cache=slots: decoding steps and prefill forwards, refills and a compacted tail) exactly."""
    import phase_check
    from step import random_model

    cfg = json.load(open(os.path.join(ROOT, "bench", "qwen2.5-1.5b", "config.json")))
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=2048)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    random_model(str(tmp_path / "config.json"), str(tmp_path / "m"))
    out = tmp_path / "phase.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "phase_check.py"), "--model", str(tmp_path / "m"),
                          "--rollouts", "24", "--max-batch-size", "8", "--median", "12", "--limit", "40",
                          "--prompt-median", "10", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    prompt, resp = phase_check.draw(24, 0, 12, 0.7, 0.02, 40, 10)
    got = json.load(open(out))
    assert set(got["caches"]) == {"dynamic", "paged", "slots"}
    assert all(c["tokens"] == int(resp.sum()) and c["seconds"] > 0 for c in got["caches"].values())
    dynamic, paged, slots = got["caches"]["dynamic"], got["caches"]["paged"], got["caches"]["slots"]
    assert dynamic["forwards"] == dynamic["schedule_steps"]
    assert slots["forwards"] == slots["schedule_steps"]  # the decode loop's schedule, step for step
    assert abs(paged["forwards"] / paged["schedule_steps"] - 1) < 0.15, paged
    assert resp.max() > 3 * np.median(resp)  # a long tail to idle the dynamic cache's batches
    ids = phase_check.prompts_for(prompt, resp, 40, 0)
    assert [len(p) for p in ids] == prompt.tolist() and [p[-1] - phase_check.BASE for p in ids] == resp.tolist()


def test_verdicts_are_read_per_level_where_every_run_logged_levels():
    """bench/convergence.py reads the per-level curves (eval/acc/level_k, stored per seed as curve_by_group) into a
    paired table per level: here CurES gains on level 2 and loses on level 3 by constructed amounts, seed by seed;
    a level some run lacks (an older seed file) gets no table."""
    rng = np.random.default_rng(1)
    files = {"grpo": [], "cures": []}
    for seed in range(6):
        base2, base3 = 0.4 + 0.05 * rng.standard_normal(9), 0.2 + 0.05 * rng.standard_normal(9)
        gain = 0.05 + 0.01 * rng.standard_normal()
        for name, d in (("grpo", 0.0), ("cures", gain)):
            files[name].append({"curve": curve(base2), "curve_by_group": {
                "level_2": curve(base2 + d), "level_3": curve(base3 - d), **({"level_4": curve(base3)} if seed else {})}})
    lines = convergence.per_group_tables(files, "grpo")
    tables = [line for line in lines if line.startswith("Held-out accuracy on")]
    assert [t.split(",")[0] for t in tables] == ["Held-out accuracy on level_2", "Held-out accuracy on level_3"]
    rows = [line for line in lines if line.startswith("| cures")]
    assert "| better |" in rows[0] and "| worse |" in rows[1]
