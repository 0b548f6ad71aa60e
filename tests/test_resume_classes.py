"""Every key a resume may change (infra/config.py: RESUME_NUMERICS, RESUME_FREE) keeps its class's promise.

One uninterrupted run (the bundled tiny model, 3 steps, a checkpoint and an evaluation every step) is the
reference. Each case resumes a copy of that run from its step-2 checkpoint with one key changed and runs step 3,
which starts subset 1 (a cold start, then a step), and compares it with the reference's step 3:
- free: the training is the uninterrupted run's, bit for bit (every logged training metric, the posteriors, the
  final weights);
- numerics: the rollouts are the same (their metrics and the posteriors equal exactly: on a CPU every rollout
  samples with its own key whatever the batching), the update's metrics (loss, KL, entropy, gradient norm)
  within 1e-4 relative, and the weights within a few float32 ulps (1e-6). The reference runs with adam_eps 1e-3:
  with AdamW's 1e-8, a gradient that is itself rounding noise (k_proj's bias: its exact gradient is 0, softmax
  ignores a shift of every key) is divided by its own size at a fresh optimiser's first step and moves its
  weight by +-lr whatever its value (measured: up to 1.9e-4 apart, eager against sdpa), which would hide a
  real difference anywhere else; a larger eps keeps such gradients linear, so rounding stays rounding.
The refused side (a changed key is refused by name) is tested in tests/test_checkpoint.py; rollout.cache to
or from paged is refused here.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import train
from helpers import TRAIN_DATA, final_weights, tiny_default_run
from infra.checkpoint import checkpoint_dirs
from infra.config import RESUME_FREE, RESUME_NUMERICS

BASE = ["--train.adam_eps=1e-3", "--run.max_steps=3", "--run.save_every=1", "--run.keep_checkpoints=3", f"--eval.data={TRAIN_DATA}",
        "--eval.max_problems=3", "--eval.every=1"]

CHANGES = {  # key: (the value the resumed run uses, which differs from the reference's)
    "model.attn_implementation": "eager",
    "model.gradient_checkpointing": "true",
    "rollout.max_batch_tokens": "96",  # several generate calls a phase
    "rollout.max_batch_size": "3",
    "rollout.cache": "slots",
    "rollout.share_prefill": "false",
    "train.micro_batch_tokens": "150",
    "train.pack": "true",
    "train.share_prompt": "true",
    "train.cpu_offload": "true",  # inert on one CPU process (no FSDP); on GPUs AdamW steps on the CPU
    "train.logprob_chunk": "7",
    "train.max_bad_steps": "1",
    "eval.data": "",
    "eval.every": "2",
    "eval.max_problems": "2",
    "eval.samples": "2",
    "eval.temperature": "0.7",
    "eval.max_new_tokens": "4",
    "eval.group_key": "",
    "run.out_dir": None,  # the resume writes a new directory: --run.resume=PATH into it
    "run.save_every": "0",
    "run.save_every_minutes": "1e-9",
    "run.keep_checkpoints": "1",
    "run.resume": None,  # PATH instead of auto
    "run.overwrite": "true",
    "run.max_steps": "4",
    "run.reward_workers": "1",
    "run.wandb_project": "resume-classes",  # wandb is not installed here: the run says so and goes on
    "run.tensorboard": "true",  # likewise tensorboard
    "run.dist_timeout_minutes": "5",
    "run.stop_grace_s": "5",
}


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _training_row(out, step):
    (row,) = [r for r in _rows(out) if r["step"] == step and "train/reward" in r]
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/", "eval/"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and a copy of it as it stood after step 2 (its step-2 checkpoint, its rows to 2)."""
    work = tmp_path_factory.mktemp("resume_classes")
    full = work / "full"
    state, cur = train.main(tiny_default_run(full, *BASE))
    at2 = work / "at2"
    shutil.copytree(full, at2, ignore=shutil.ignore_patterns("final", "step_000003"))
    rows = [line for line in open(at2 / "metrics.jsonl") if json.loads(line)["step"] <= 2]
    (at2 / "metrics.jsonl").write_text("".join(rows))
    assert [os.path.basename(p) for p in checkpoint_dirs(str(at2))] == ["step_000001", "step_000002"]
    return {"full": full, "at2": at2, "state": state, "cur": cur, "weights": final_weights(full / "final")}


def test_the_cases_cover_every_numerics_and_free_key():
    assert sorted(CHANGES) == sorted(RESUME_NUMERICS + RESUME_FREE)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CHANGES))
def test_a_resume_with_a_key_changed_keeps_its_class_promise(reference, tmp_path, key, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference["at2"], run)
    out, extra = run, [f"--run.resume=auto", f"--{key}={CHANGES[key]}"]
    if key == "run.out_dir":
        out = tmp_path / "elsewhere"
        extra = [f"--run.resume={run}/checkpoints/step_000002", f"--run.out_dir={out}"]
    elif key == "run.resume":
        extra = [f"--run.resume={run}/checkpoints/step_000002"]
    state, cur = train.main(tiny_default_run(run, *BASE, *extra))
    said = capsys.readouterr().out
    assert f"resumed from {run}/checkpoints/step_000002" in said

    exact = key in RESUME_FREE
    if key != "run.max_steps":  # (that run goes on to step 4)
        np.testing.assert_array_equal(cur.alpha, reference["cur"].alpha)  # the rollouts' outcomes, both classes
        np.testing.assert_array_equal(cur.beta, reference["cur"].beta)
    got, want = _training_row(out, 3), _training_row(reference["full"], 3)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        same_rollouts = k.startswith(("train/reward", "train/response_len", "cures/", "rollouts/", "tokens/", "mech/"))
        if exact or same_rollouts or not isinstance(v, float):
            assert got[k] == v, (k, got[k], v)
        else:
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), (k, got[k], v)

    if key == "run.max_steps":  # the resumed run goes on to its new last step
        assert state["step"] == 4 and [r["step"] for r in _rows(out) if "train/reward" in r] == [1, 2, 3, 4]
        return
    assert state == reference["state"]
    weights = final_weights(out / "final")
    for k, w in reference["weights"].items():
        if exact:
            assert torch.equal(weights[k], w), k
        else:  # a few float32 ulps at the weights' magnitude (~1): measured at most 1.2e-7
            torch.testing.assert_close(weights[k], w, rtol=0, atol=1e-6, msg=k)

    # the copy held step 3's per-problem scores (made after its checkpoint): set aside, not overwritten; the
    # redone evaluation writes its own, the same one where the key changes nothing of the evaluation
    if out == run:
        (aside,) = list((run / "eval" / "dropped").glob("*/step_000003.jsonl"))
        assert aside.read_text() == (reference["full"] / "eval" / "step_000003.jsonl").read_text()
        if exact and not key.startswith("eval."):
            assert (run / "eval" / "step_000003.jsonl").read_text() == aside.read_text()

    # what the key itself does
    rows = _rows(out)
    if key == "run.overwrite":  # a resume never wipes: the rows before the checkpoint are still there
        assert [r["step"] for r in rows if "train/reward" in r] == [1, 2, 3]
    if key == "run.out_dir":  # the new directory holds the continuation only; the old one is untouched
        assert [r["step"] for r in rows if "train/reward" in r] == [3]
        assert [r["step"] for r in _rows(run) if "train/reward" in r] == [1, 2]
    if key == "run.keep_checkpoints":
        assert [os.path.basename(p) for p in checkpoint_dirs(str(out))] == ["step_000003"]
    if key == "eval.data":
        assert not any("eval/acc" in r for r in rows if r["step"] == 3)
    if key == "eval.every":  # step 3 is the last: evaluated anyway
        assert any("eval/acc" in r for r in rows if r["step"] == 3)
    if key in ("run.wandb_project", "run.tensorboard"):
        assert "not installed" in said


def test_a_resume_to_or_from_the_paged_cache_is_refused(tiny_model_dir, tmp_path):
    """rollout.cache among dynamic and slots changes no token (numerics); paged samples another stream
    (continuous batching), so a change to or from it is refused by name, as a refused key is."""
    from helpers import small_run

    out = tmp_path / "r"
    train.main(small_run(tiny_model_dir, out, "--run.max_steps=1"))
    with pytest.raises(ValueError, match=r"rollout.cache: 'dynamic' -> 'paged' \(paged's continuous batching"):
        train.main(small_run(tiny_model_dir, out, "--run.max_steps=2", "--run.resume=auto", "--rollout.cache=paged"))
