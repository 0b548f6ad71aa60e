"""infra/checkpoint.py: resume equals the uninterrupted run, stops, half-written and corrupt checkpoints, the
out_dir guard, config checks on resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cures
import train
from helpers import (ROOT, TRAIN_DATA, final_weights, nth_call_after, sigterm_at, small_run, tiny_default_run,
                     varlen_calls)
from infra.checkpoint import checkpoint_dirs, save_checkpoint
from infra.config import load_config
from infra.data import load_subsets
from infra.models import Policy


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
    assert checkpoint_dirs(str(tmp_path / "b"))[-1].endswith(f"step_{stop:06d}")
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
    wa, wb = final_weights(tmp_path / "a" / "final"), final_weights(tmp_path / "b" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)
    # ...and training really moved the weights (the comparison is not vacuous)
    w0 = final_weights(os.path.join(ROOT, "models", "tiny"))
    assert any(not torch.allclose(w0[k], wa[k]) for k in wa)


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
    assert [os.path.basename(p) for p in checkpoint_dirs(str(out))] == ["step_000001"]
    state, _ = train.main(tiny_default_run(out, *slow, "--run.resume=auto"))
    assert state == full_state
    wa, wb = final_weights(tmp_path / "full" / "final"), final_weights(out / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


@pytest.mark.slow
def test_checkpoint_every_few_minutes(tiny_model_dir, tmp_path):
    train.main(small_run(tiny_model_dir, tmp_path / "m", "--run.max_steps=3", "--run.save_every=0",
                         "--run.save_every_minutes=1e-6", "--run.keep_checkpoints=5"))
    assert [os.path.basename(p) for p in checkpoint_dirs(str(tmp_path / "m"))] == \
        ["step_000001", "step_000002", "step_000003"]


@pytest.mark.slow
def test_out_dir_of_another_run_is_refused_or_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3"))
    with pytest.raises(FileExistsError, match="--run.resume=auto"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1", "--run.overwrite=true"))
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1]
    assert [os.path.basename(p) for p in checkpoint_dirs(str(out))] == ["step_000001"]
    # resuming with a key that decides what comes next changed is refused, naming the key
    with pytest.raises(ValueError, match=r"train.steps_per_subset: 2 -> 3"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto",
                             "--train.steps_per_subset=3"))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_metrics_are_not_repeated(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "c"
    full, _ = train.main(small_run(tiny_model_dir, tmp_path / "full", "--run.max_steps=3"))
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.keep_checkpoints=3"))
    newest = checkpoint_dirs(str(out))[-1]
    with open(os.path.join(newest, "meta.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    state, _ = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert "step_000003" in capsys.readouterr().out and state == full  # warned, resumed from step 2, same result
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_full_disk_during_a_checkpoint_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = load_config([f"--run.out_dir={tmp_path}"])
    policy = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    optimizer, _ = train.make_optimizer(policy, cfg)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed, unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="no space left on device"):
        save_checkpoint(policy, optimizer, cures.Curriculum(3), {"step": 1}, cfg, 0)
    assert os.listdir(tmp_path / "checkpoints") == []  # no step_000001.tmp left behind


def test_paged_resume_restores_the_draws(tiny_model_dir, tmp_path, monkeypatch):
    """What resume promises with rollout.cache=paged, whose scheduler is not bitwise reproducible: the saved
    state comes back exactly, so two runs resumed from one checkpoint draw the same prompts and allocate the
    same rollouts in the step after it (their sampled tokens may differ; with dynamic and static caches they
    do not, test_resume_equals_uninterrupted_run). train.py's paged generation runs through
    rollout.paged_varlen_attention (a model on sdpa)."""
    import shutil

    draws, sample_and_allocate = [], train.sample_and_allocate

    def recording(cur, subset_id, step, cfg, world, rnd=0):
        out = sample_and_allocate(cur, subset_id, step, cfg, world, rnd)
        draws.append((step, out[0].tolist(), out[1].tolist()))
        return out
    monkeypatch.setattr(train, "sample_and_allocate", recording)
    calls = varlen_calls(monkeypatch)  # the model is on sdpa: paged decodes via paged_varlen_attention
    paged = ("--rollout.cache=paged", "--rollout.max_batch_tokens=4096")
    train.main(small_run(tiny_model_dir, str(tmp_path / "a"), "--run.max_steps=3", *paged))
    assert calls
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = []
    for run in ("a", "b"):
        draws.clear()
        train.main(small_run(tiny_model_dir, str(tmp_path / run), "--run.max_steps=4", "--run.resume=auto", *paged))
        resumed.append(list(draws))
    assert [d[0] for d in resumed[0]] == [3]  # only the step after the checkpoint ran
    assert resumed[0] == resumed[1]


def test_no_readable_checkpoint_fails_and_names_them(tiny_model_dir, tmp_path):
    """Checkpoints exist but none loads completely (metadata unreadable, or weights failing half-way over an
    unreadable older one): the run fails and names them, never restarting at step 0 over them (which emptied
    metrics.jsonl and let pruning delete its own new checkpoints) nor going on with half-loaded weights."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.keep_checkpoints=2"))
    old, new = checkpoint_dirs(str(out))
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
    with pytest.raises(RuntimeError, match="torch.distributed.checkpoint could not read .*step_000002: rank 0: ") as e:
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", f"--run.resume={new}"))
    assert "AttributeError" not in str(e.value)  # the cause itself, not an error of the handler reading it
    assert open(out / "metrics.jsonl").read() == metrics and checkpoint_dirs(str(out)) == [old, new]


@pytest.mark.parametrize("change", ["--data.user_template=Q: {problem}", "--cures.tau=0.5", "--cures.n_min=3",
                                    "--data.system_prompt=Be brief.", "--cures.cold_start_rollouts=3",
                                    "--train.advantage=rpp", "--train.kl_coef=0", "--rollout.temperature=0.7",
                                    "--cures.prior_alpha=1"])
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
    monkeypatch.setattr(train, "load_subsets", lambda cfg, tok: (lambda s, k: ([s[0][:-1], *s[1:]], k))(
        *load_subsets(cfg, tok)))
    with pytest.raises(ValueError, match="curriculum covers 30 prompts, subset 0 now has 29"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto"))
    cur = cures.Curriculum(3)
    with pytest.raises(ValueError, match="grad_stats"):
        cur.load_state_dict({"alpha": np.ones(3), "beta": np.ones(3), "grad_stats": np.ones((3, 2))})


def test_resume_checks_the_tokenizer_in_use(tiny_model_dir, tmp_path):
    """model.tokenizer is compared as used (model.path when empty): naming the same tokenizer explicitly is
    the same run, another one is refused with both values."""
    import shutil

    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto",
                         f"--model.tokenizer={tiny_model_dir}"))
    other = shutil.copytree(tiny_model_dir, tmp_path / "other_tokenizer")
    with pytest.raises(ValueError, match=f"model.tokenizer: '{tiny_model_dir}' -> '{other}'"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto", f"--model.tokenizer={other}"))


def test_resume_applies_new_optimizer_settings(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Optimiser keys changed on resume act on the loaded AdamW state and schedule (before this they were
    accepted, shown in config.yaml and ignored): the step after the resume runs with the new lr, weight decay,
    betas and eps, and the run says so."""
    out, seen = tmp_path / "r", []
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1", "--train.lr=1e-3", "--train.warmup_steps=4"))
    real = train.update_epochs

    def spy(policy, optimizer, *args, **kwargs):
        seen.append(dict(optimizer.param_groups[0]))
        return real(policy, optimizer, *args, **kwargs)
    monkeypatch.setattr(train, "update_epochs", spy)
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto", "--train.lr=2e-3",
                         "--train.warmup_steps=4", "--train.weight_decay=0.5", "--train.betas=[0.8, 0.9]",
                         "--train.adam_eps=1e-6"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"actor/lr"' in line]
    warm = rows[0]["actor/lr"] / 1e-3  # the warm-up factor after step 1 (its optimiser steps), < 1
    assert 0 < warm < 1
    group = seen[0]
    assert group["lr"] == pytest.approx(2e-3 * warm)  # the new lr at the loaded point of the (new) warm-up
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.5, (0.8, 0.9), 1e-6)
    assert "applied to the loaded optimiser: train.lr: 0.001 -> 0.002" in capsys.readouterr().out
    assert rows[-1]["step"] == 2 and rows[-1]["actor/lr"] > group["lr"]  # the schedule goes on from there


def test_checkpoint_meta_loads_without_running_code(tiny_model_dir, tmp_path):
    """meta.pt is read with torch.load(weights_only=True): a checkpoint whose meta.pt would run code is refused
    by name and the code does not run (a checkpoint directory handed over on a shared cluster); a meta.pt of
    the earlier format (numpy arrays in the curriculum) still loads."""
    from infra.checkpoint import UnsafeCheckpoint, read_meta

    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2"))
    old, new = checkpoint_dirs(str(out))
    meta = read_meta(new)
    assert all(isinstance(v, torch.Tensor) for v in (meta["curriculum"]["alpha"], meta["curriculum"]["beta"]))
    # the earlier format: the same content with numpy arrays
    meta["curriculum"] = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in meta["curriculum"].items()}
    torch.save(meta, os.path.join(old, "meta.pt"))
    assert isinstance(read_meta(old)["curriculum"]["alpha"], np.ndarray)
    # a crafted meta.pt
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    meta["curriculum"]["alpha"] = Payload()
    torch.save(meta, os.path.join(new, "meta.pt"))
    with pytest.raises(UnsafeCheckpoint, match="refusing to load .*step_000002/meta.pt: it asks for posix.system"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert not marker.exists()


def _eval_curve(out):
    return {r["step"]: r["eval/acc"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/acc" in r}


PHASES = {  # phase: (extra arguments, function to stop in, on which call)
    "cold start of subset 1 (subsets of 30 and 31 prompts)":
        (["--data.max_prompts=61"], "cold_start", lambda k, a, kw: k == 2),
    "dynamic-sampling round 1":
        (["--rollout.dynamic_sampling=true", "--rollout.max_rounds=3"], "draw_and_generate",
         lambda k, a, kw: kw.get("rnd", 0) >= 1),
    "generation of step 3": ([], "draw_and_generate", lambda k, a, kw: k == 3),
    "evaluation after step 2": ([f"--eval.data={TRAIN_DATA}", "--eval.max_problems=3", "--eval.every=1"],
                                "run_eval", lambda k, a, kw: a[6] == train.stream_seed(0, "eval", 0, 2)),
    "log-probabilities of step 3": ([], "add_logprobs", lambda k, a, kw: k == 3),
    # the update of step 3 (update_epochs' third call): its first mini-batch (update_policy's first call in it) or
    # its second (the test asserts there are at least two, and the step each way ends at)
    "update of step 3, before its first optimiser step (dropped)": ([], "update_policy", ("step 3 update", 1)),
    "update of step 3, after one optimiser step, the rest fits run.stop_grace_s (finished and saved)":
        ([], "update_policy", ("step 3 update", 2)),
    "update of step 3, after one optimiser step, the rest does not fit (abandoned, resumed from step 2)":
        (["--run.save_every=1", "--run.stop_grace_s=0"], "update_policy", ("step 3 update", 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_stop_in_any_phase_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys, phase):
    """SIGTERM inside a later subset's cold start (subsets of different sizes), inside round >= 1 of dynamic
    sampling, inside a step's generation, inside an evaluation, before the log-probabilities and inside the
    update, in each of train.UpdateStop's three ways: the run saves what its finished steps made
    (nothing of the dropped cold start, step or rounds: posteriors, optimiser, reference), exits, and the
    resumed run is the uninterrupted one: counters, Beta counts, every logged training metric, the evaluation
    curve (an interrupted evaluation is redone first) and the final weights."""
    import signal

    extra, name, when = PHASES[phase]
    args = ["--run.max_steps=4", "--run.save_every=0", *extra]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        full_state, full_cur = train.main(tiny_default_run(tmp_path / "a", *args))
        with monkeypatch.context() as patch:
            if isinstance(when, tuple):  # the n-th mini-batch of step 3's update (update_epochs' third call)
                epochs, real_epochs = [0], train.update_epochs
                patch.setattr(train, "update_epochs",
                              lambda *a, **kw: (epochs.__setitem__(0, epochs[0] + 1), real_epochs(*a, **kw))[1])
                when = nth_call_after(lambda: epochs[0] == 3, when[1])
            wrapped, fired = sigterm_at(getattr(train, name), when)
            patch.setattr(train, name, wrapped)
            capsys.readouterr()
            stopped_state, _ = train.main(tiny_default_run(tmp_path / "b", *args))
        assert fired and stopped_state["step"] < 4, (fired, stopped_state)
        said = capsys.readouterr().out
        if name == "update_policy":  # which of UpdateStop's three ways, and what it said
            way = {"dropped": (2, "checkpoint saved at step 2"), "finished": (3, "it ends and saves within"),
                   "abandoned": (2, "nothing saved; a resume starts from the last checkpoint")}
            step, text = next(v for k, v in way.items() if k in phase)
            assert stopped_state["step"] == step and text in said, (stopped_state["step"], said[-2000:])
        assert checkpoint_dirs(str(tmp_path / "b"))[-1].endswith(f"step_{stopped_state['step']:06d}")
        with monkeypatch.context() as patch:  # the resumed run starts where the stopped one saved (not at 0)
            first = []
            real_step = train.train_step
            patch.setattr(train, "train_step", lambda *a, **kw: (first.append(a[9]["step"]), real_step(*a, **kw))[1])
            capsys.readouterr()
            state, cur = train.main(tiny_default_run(tmp_path / "b", *args, "--run.resume=auto"))
        assert first[0] == stopped_state["step"], (first, stopped_state)
        assert f"resumed from {tmp_path / 'b'}/checkpoints/step_{stopped_state['step']:06d}" in capsys.readouterr().out
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert state == full_state
    np.testing.assert_array_equal(cur.alpha, full_cur.alpha)
    np.testing.assert_array_equal(cur.beta, full_cur.beta)
    rows = {run: {r["step"]: r for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "train/reward" in r}
            for run in "ab"}
    assert sorted(rows["a"]) == sorted(rows["b"]) == [1, 2, 3, 4]
    for step, ra in rows["a"].items():
        for k in ra:
            if not k.startswith(("time/", "perf/", "eval/")):  # the evaluation curve: below
                assert rows["b"][step].get(k) == pytest.approx(ra[k], rel=1e-6, abs=1e-12), (step, k)
    assert _eval_curve(tmp_path / "a") == _eval_curve(tmp_path / "b")
    wa, wb = final_weights(tmp_path / "a" / "final"), final_weights(tmp_path / "b" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


def test_checkpoint_weights_load_without_running_code(tiny_model_dir, tmp_path):
    """torch.distributed.checkpoint reads its .metadata with plain pickle and non-tensor items (the optimiser's
    param_groups) with torch.load(weights_only=False): both are read here so that a crafted file is refused by
    name, before anything of it runs."""
    import pickle
    from types import SimpleNamespace

    from infra.checkpoint import UnsafeCheckpoint, _safe_dcp_reading

    out, marker = tmp_path / "r", tmp_path / "ran"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2"))
    old, new = checkpoint_dirs(str(out))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    _, planner = _safe_dcp_reading(new)  # the real .metadata passes
    crafted = __import__("io").BytesIO()
    torch.save({"lr": Payload()}, crafted)
    crafted.seek(0)
    with pytest.raises(UnsafeCheckpoint, match="optim.param_groups.0.lr of .*: it asks for posix.system"):
        planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr")), crafted)
    with open(os.path.join(new, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(UnsafeCheckpoint, match="step_000002/.metadata: it asks for posix.system"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert not marker.exists()


class _Payload:
    """What an attacker pickles: unpickling it runs a shell command that creates `marker`."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_metadata(ckpt, edit):
    """The checkpoint's DCP .metadata loaded (by torch, trusted here: this test wrote it), edited, written back."""
    import pickle

    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _craft(route, ckpt, marker, elsewhere):
    """One way to make a checkpoint run code or read outside its directory, as an attacker would lay it out."""
    import pickle
    import shutil

    data = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))[0]
    shutil.copy(os.path.join(ckpt, data), elsewhere / data)  # a good copy: only the path can stop its reading
    if route == "rank-local metadata":  # torch falls back to __0.metadata (plain pickle) when .metadata is unusable
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:
            pickle.dump(0, f)  # plain data: passes an unpickler check, yet torch cannot use it
        with open(os.path.join(ckpt, "__0.metadata"), "wb") as f:
            pickle.dump(_Payload(marker), f)
    elif route == "metadata of another type":
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:
            pickle.dump({"state_dict_metadata": {}}, f)
    elif route in ("storage path outside", "absolute storage path"):
        target = f"../../{data}" if route == "storage path outside" else str(elsewhere / data)
        shutil.copy(os.path.join(ckpt, data), os.path.join(ckpt, "..", "..", data))

        def edit(md):
            for info in md.storage_data.values():
                info.relative_path = target
        _rewrite_metadata(ckpt, edit)
    elif route == "data file linked elsewhere":
        os.remove(os.path.join(ckpt, data))
        os.symlink(elsewhere / data, os.path.join(ckpt, data))
    elif route == "meta.pt linked elsewhere":
        shutil.copy(os.path.join(ckpt, "meta.pt"), elsewhere / "meta.pt")
        os.remove(os.path.join(ckpt, "meta.pt"))
        os.symlink(elsewhere / "meta.pt", os.path.join(ckpt, "meta.pt"))
    elif route == "class attributes set by BUILD":  # pathlib.Path's string set, for every path made after
        target = str(elsewhere).encode()
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:  # GLOBAL, {"_str": target}, BUILD, STOP
            f.write(b"cpathlib\nPosixPath\n}X\x04\x00\x00\x00_strX" + len(target).to_bytes(4, "little") + target
                    + b"sb.")
    elif route == "storage transform":
        def edit(md):
            for info in md.storage_data.values():
                info.transform_descriptors = ["zstd"]
        _rewrite_metadata(ckpt, edit)


CRAFTED = {"rank-local metadata": "__0.metadata: a rank-local metadata file",
           "metadata of another type": ".metadata: it holds a dict, not",
           "storage path outside": "at '../../__0_0.distcp', not in a file of the checkpoint directory",
           "absolute storage path": "not in a file of the checkpoint directory",
           "data file linked elsewhere": "__0_0.distcp: it is a symbolic link",
           "meta.pt linked elsewhere": "meta.pt: it is a symbolic link",
           "storage transform": "asks for the storage transforms",
           "class attributes set by BUILD": "sets attributes of the class PosixPath",
           "optimiser item through dcp.load": "optim.param_groups.*: it asks for posix.system"}


@pytest.fixture(scope="module")
def two_step_run(tiny_model_dir, tmp_path_factory):
    """One small 2-step run (checkpoints at steps 1 and 2) that tests copy before changing it."""
    out = tmp_path_factory.mktemp("two_step") / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2"))
    return out


@pytest.mark.parametrize("route", list(CRAFTED))
def test_a_crafted_checkpoint_is_refused_by_name_and_never_falls_back(tiny_model_dir, two_step_run, tmp_path,
                                                                      monkeypatch, route):
    """Each way a checkpoint handed over on a shared cluster could run code or read a file outside its directory
    through torch.distributed.checkpoint (its fallback to rank-local metadata read with plain pickle, storage
    paths, links, transforms, a pickled optimiser item reaching DCP's planner) raises UnsafeCheckpoint naming
    the file on --run.resume=auto: the code does not run, the older checkpoint is not tried, nothing is written."""
    from infra import checkpoint
    from infra.checkpoint import UnsafeCheckpoint

    out, marker, elsewhere = tmp_path / "r", tmp_path / "ran", tmp_path / "elsewhere"
    elsewhere.mkdir()
    if route != "optimiser item through dcp.load":  # the others: a copy of one 2-step run, crafted
        __import__("shutil").copytree(two_step_run, out, symlinks=True)
        _craft(route, checkpoint_dirs(str(out))[-1], marker, elsewhere)
    else:  # the step-2 checkpoint is saved with a pickled payload
        real = checkpoint._state_dicts

        def poisoned(policy, optimizer, ref, fresh):
            state = real(policy, optimizer, ref, fresh)
            if "optim" in state and os.environ.get("POISON") == "1":
                state["optim"]["param_groups"][0]["lr"] = _Payload(marker)
            return state
        monkeypatch.setattr(checkpoint, "_state_dicts", poisoned)
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
        monkeypatch.setenv("POISON", "1")
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto"))
        monkeypatch.setenv("POISON", "0")
    assert not marker.exists()
    metrics = open(out / "metrics.jsonl").read()
    with pytest.raises(UnsafeCheckpoint, match=CRAFTED[route]):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert not marker.exists() and str(__import__("pathlib").Path("/a") / "b") == "/a/b"  # pathlib untouched
    assert open(out / "metrics.jsonl").read() == metrics and len(checkpoint_dirs(str(out))) == 2


@pytest.mark.parametrize("planted", ["metrics.jsonl", "checkpoints/step_000003.tmp", "final"])
def test_links_planted_in_a_run_directory_are_refused_not_followed(tiny_model_dir, two_step_run, tmp_path, planted):
    """A symbolic link in a run directory where the run writes (metrics.jsonl, the next checkpoint's .tmp, final/)
    would make it write outside: a resume refuses it by name and writes nothing there; a fresh run with
    run.overwrite removes the link, never what it points to."""
    from infra.checkpoint import UnsafeCheckpoint

    out, elsewhere = tmp_path / "r", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    __import__("shutil").copytree(two_step_run, out, symlinks=True)
    link = out / planted
    if link.is_dir() and not link.is_symlink():
        __import__("shutil").rmtree(link)
    target = elsewhere / "keep.txt" if planted == "metrics.jsonl" else elsewhere
    if link.exists():
        link.unlink()
    os.symlink(target, link)
    with pytest.raises(UnsafeCheckpoint, match=f"{planted}: it is a symbolic link"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1", "--run.overwrite=true"))
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"
    assert not link.is_symlink()


@pytest.mark.slow
def test_a_stop_inside_a_paged_generation_call_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """rollout.cache=paged (the GPU configs' path): SIGTERM while continuous batching generates a step's rollouts
    is acted on inside that call (its manager hard-stopped, Interrupted), the run saves its last finished step
    with the posteriors as they were before the dropped step, and the resumed run starts there and finishes.
    What resume promises on this path (README): the saved state exactly; not the uninterrupted run's later
    rollouts bit for bit, since continuous batching's scheduler thread does not fix the order of its work."""
    import signal

    import rollout
    from infra.checkpoint import read_meta

    args = ["--run.max_steps=3", "--rollout.cache=paged", "--rollout.max_batch_tokens=4096"]
    real, calls, raised = rollout._generate_paged, [0], []

    def wrapped(*a, **kw):  # call 1: subset 0's cold start, 2: step 1, 3: step 2
        calls[0] += 1
        if calls[0] == 3:  # after rollout.generate's own check before the batch: seen inside the call
            os.kill(os.getpid(), signal.SIGTERM)
        try:
            return real(*a, **kw)
        except rollout.Interrupted as e:
            raised.append(str(e))
            raise

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with monkeypatch.context() as patch:
            patch.setattr(rollout, "_generate_paged", wrapped)
            stopped, cur = train.main(small_run(tiny_model_dir, tmp_path / "b", *args))
        assert raised and raised[0].startswith("stopped with"), raised  # inside the paged call
        assert stopped["step"] == 1
        last = checkpoint_dirs(str(tmp_path / "b"))[-1]
        assert last.endswith("step_000001")
        saved = read_meta(last)["curriculum"]
        np.testing.assert_array_equal(np.asarray(saved["alpha"]), cur.alpha)  # as before the dropped step
        np.testing.assert_array_equal(np.asarray(saved["beta"]), cur.beta)
        with monkeypatch.context() as patch:
            first, real_step = [], train.train_step
            patch.setattr(train, "train_step", lambda *a, **kw: (first.append(a[9]["step"]), real_step(*a, **kw))[1])
            capsys.readouterr()
            state, _ = train.main(small_run(tiny_model_dir, tmp_path / "b", *args, "--run.resume=auto"))
        assert first[0] == 1 and state["step"] == 3 and state["rollouts_train"] == 3 * 20
        assert "resumed from" in capsys.readouterr().out
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    rows = [r for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl")) if "train/reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_a_stop_inside_the_decode_loop_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM while the decode loop (rollout.cache=slots, 7 slots) generates: the run stops at the loop's next look,
    saves its last finished step, and the resumed run, on the loop with another batching (13 slots: a free key),
    ends where the uninterrupted run on HF generate's dynamic cache ends: same logged values, posteriors and
    weights. Every rollout samples with its own key, so neither the cache nor its batching changes what is sampled."""
    import rollout

    train.main(tiny_default_run(tmp_path / "a", "--run.max_steps=3"))
    started, real_draw = [], train.draw_and_generate  # step 3 (state["step"] 2) generating: stop 5 loop steps in
    monkeypatch.setattr(train, "draw_and_generate",
                        lambda *a, **kw: (a[2] == 2 and started.append(True), real_draw(*a, **kw))[1])
    wrapped, fired = sigterm_at(rollout._decode_step, nth_call_after(lambda: bool(started), 5))
    monkeypatch.setattr(rollout, "_decode_step", wrapped)
    state, _ = train.main(tiny_default_run(tmp_path / "b", "--run.max_steps=3", "--rollout.cache=slots",
                                           "--rollout.max_batch_size=7"))
    assert fired and state["step"] < 3  # (the wrapper fires once: the resumed run goes through it untouched)
    train.main(tiny_default_run(tmp_path / "b", "--run.max_steps=3", "--run.resume=auto", "--rollout.cache=slots",
                                "--rollout.max_batch_size=13"))
    skip = ("time/", "perf/")
    rows = {run: [{k: v for k, v in json.loads(l).items() if not k.startswith(skip)}
                  for l in open(tmp_path / run / "metrics.jsonl")] for run in "ab"}
    assert [r["step"] for r in rows["b"]] == [r["step"] for r in rows["a"]] == [0, 1, 2, 3]
    assert rows["a"] == rows["b"]
    wa, wb = final_weights(tmp_path / "a" / "final"), final_weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_auto_without_a_complete_checkpoint_never_starts_over_a_run(tiny_model_dir, tmp_path):
    """--run.resume=auto where no complete checkpoint is left but a run is (metrics.jsonl, final/, a half-written
    checkpoint): refused, naming what is there, nothing emptied or overwritten; in an empty directory it starts."""
    import shutil

    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    shutil.rmtree(out / "checkpoints")
    os.makedirs(out / "checkpoints" / "step_000002.tmp")
    metrics = open(out / "metrics.jsonl").read()
    with pytest.raises(FileExistsError, match=r"no complete checkpoint .* holds a run \(metrics.jsonl, final, "
                                              r"checkpoints/step_000002.tmp\)"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto"))
    assert open(out / "metrics.jsonl").read() == metrics and (out / "final").exists()
    state, _ = train.main(small_run(tiny_model_dir, tmp_path / "fresh", "--run.max_steps=1", "--run.resume=auto"))
    assert state["step"] == 1


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tiny_model_dir, tmp_path, capsys):
    """A crash or a full disk mid-write leaves half a row at the end of metrics.jsonl: the resume drops it with a
    warning and goes on (a bad row elsewhere is an error naming its line)."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/rew')
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert "dropping the torn last line" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]
    lines = open(out / "metrics.jsonl").read().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))


@pytest.mark.slow
def test_a_roll_back_sets_the_later_line_aside_and_auto_follows_it(tiny_model_dir, tmp_path):
    """--run.resume=PATH to an earlier checkpoint of the run (a roll-back): the later checkpoints move to
    checkpoints/abandoned/<time>/ and the later metrics rows to metrics.dropped.jsonl, nothing deleted; a later
    --run.resume=auto continues the rolled-back line, not the abandoned one."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.keep_checkpoints=3"))
    first = checkpoint_dirs(str(out))[0]
    old_rows = [l for l in open(out / "metrics.jsonl") if json.loads(l)["step"] > 1]
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.keep_checkpoints=3", f"--run.resume={first}",
                         "--train.lr=2e-3"))  # the new line differs from the old one
    aside = [os.path.join(r, f) for r, _, fs in os.walk(out / "checkpoints" / "abandoned") for f in fs if f == "meta.pt"]
    assert sorted(os.path.basename(os.path.dirname(p)) for p in aside) == ["step_000002", "step_000003"]
    assert [os.path.basename(p) for p in checkpoint_dirs(str(out))] == ["step_000001", "step_000002"]
    assert open(out / "metrics.dropped.jsonl").readlines()[:len(old_rows)] == old_rows
    state, _ = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.keep_checkpoints=3",
                                    "--run.resume=auto", "--train.lr=2e-3"))
    assert state["step"] == 3 and [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_step_saved_again_replaces_its_checkpoint_only_once_the_new_one_is_in_place(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """Saving a step that already has a checkpoint (a stop right after a periodic save): killed between moving the
    old one aside and putting the new one in place, the step still has a complete checkpoint that resume finds."""
    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2"))
    from transformers import AutoModelForCausalLM

    cfg = load_config(small_run(tiny_model_dir, out))
    policy = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    optimizer, _ = train.make_optimizer(policy, cfg)
    real = os.rename

    def killed(src, dst):  # the new checkpoint's move into place (not DCP's own renames inside it)
        if os.path.basename(str(src)) == "step_000002.tmp":
            raise KeyboardInterrupt("killed")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(policy, optimizer, cures.Curriculum(3), {"step": 2}, cfg, 0)
    monkeypatch.setattr(os, "rename", real)
    assert [os.path.basename(p) for p in checkpoint_dirs(str(out))][-1] == "replaced_step_000002"
    state, _ = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    assert state["step"] == 3


@pytest.mark.slow
def test_a_fallback_loads_what_a_direct_load_loads(tiny_model_dir, tmp_path):
    """A newer checkpoint that fails half-way (weights unreadable) and a fallback to the older one: the run then
    equals a run resumed from the older checkpoint directly (nothing the failed attempt created, such as optimiser
    state, carries over)."""
    import shutil

    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.keep_checkpoints=2"))
    shutil.copytree(out, tmp_path / "direct")
    old, new = checkpoint_dirs(str(out))
    weights = sorted(f for f in os.listdir(new) if f.endswith(".distcp"))
    with open(os.path.join(new, weights[0]), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(new, weights[0])) // 2)
        f.write(b"\0" * 64)
    fell_back, _ = train.main(small_run(tiny_model_dir, out, "--run.max_steps=3", "--run.resume=auto"))
    direct, _ = train.main(small_run(tiny_model_dir, tmp_path / "direct", "--run.max_steps=3",
                                     f"--run.resume={tmp_path / 'direct' / 'checkpoints' / os.path.basename(old)}"))
    assert fell_back == direct
    wa, wb = final_weights(out / "final"), final_weights(tmp_path / "direct" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
