"""reward.py: equivalent and non-equivalent forms, adversarial outputs, and the gold answers of the
eight benchmarks in ../shared/benchmarks."""

import json
import os
import subprocess
import sys
import time

import pytest

import reward
from eval import BENCHMARKS, load_benchmark
from infra.config import load_config
from infra.data import load_subsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EQUIVALENT = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac12"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
    ("\\boxed{(1,2)}", "(1, 2)"),
    ("\\boxed{[0,1)}", "[0,1)"),
    ("\\boxed{x=3}", "3"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{10 \\text{ cm}}", "10"),
    ("\\boxed{\\text{east}}", "\\text{east}"),
    ("\\boxed{2}", "\\sqrt{4}"),
    ("The final answer is 7.", "7"),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{1{,}000}", "1000"),
]
NOT_EQUIVALENT = [
    ("\\boxed{4}", "5"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),
    ("\\boxed{(1,2)}", "(2,1)"),
    ("\\boxed{[0,1]}", "[0,1)"),
    ("\\boxed{x^2}", "2x"),
    ("\\boxed{\\text{west}}", "\\text{east}"),
    ("no answer at all", "3"),
    # math-verify reads several boxed answers together as a set: a hedged answer does not score
    ("first \\boxed{5}, then corrected: \\boxed{6}", "6"),
]


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_equivalent_forms_score_one(response, gold):
    assert reward.score(response, gold) == 1.0


@pytest.mark.parametrize("response,gold", NOT_EQUIVALENT)
def test_non_equivalent_forms_score_zero(response, gold):
    assert reward.score(response, gold) == 0.0


def test_extract_boxed():
    assert reward.extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert reward.extract_boxed("\\fbox{3}") == "3"
    assert reward.extract_boxed("\\boxed{") is None and reward.extract_boxed("none") is None


def test_adversarial_outputs_score_zero_within_timeout():
    bad = ["", "x" * 1_000_000, "{" * 10_000 + "}" * 10_000, "\\boxed{9^{9^{9^{9}}}}", "\\boxed{",
           "\\boxed{}" * 5_000, bytes(range(256)).decode("latin-1") * 100, "\\boxed{\\frac{" * 2_000]
    timeout = 3.0
    t0 = time.monotonic()
    scores = reward.score_batch(bad + ["\\boxed{7}"], ["1"] * len(bad) + ["7"], workers=2, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert list(scores) == [0.0] * len(bad) + [1.0]
    assert elapsed < timeout * len(bad) / 2 + 10
    # the pool survives its killed workers and keeps working
    assert list(reward.score_batch(["\\boxed{2}"] * 4, ["2"] * 4, workers=2, timeout=timeout)) == [1.0] * 4


def test_score_batch_reports_timeouts():
    # 10^10^10^10 makes sympy hang; a 1 s deadline must cut it off and count it
    scores = reward.score_batch(["\\boxed{10^{10^{10^{10}}}!}"], ["1"], workers=1, timeout=2.0)
    assert scores == [0.0] and scores.timeouts == 1  # by math-verify's own timeout or by our deadline
    with pytest.raises(ValueError):
        reward.score_batch(["a"], [], workers=1)


def test_math_verify_timeouts_are_counted_and_logged_short(caplog):
    """math-verify answers 'no match' on its own timeout and logs the whole input: we count it as a
    timeout and log only the start."""
    import logging

    reward._configs()
    before = reward._TimeoutLog.count
    with caplog.at_level(logging.WARNING):
        logging.getLogger("math_verify.parser").warning("Timeout during parsing: " + "x" * 200_000)
    assert reward._TimeoutLog.count == before + 1
    assert len(caplog.records[-1].getMessage()) < 200 and "200024 characters" in caplog.records[-1].getMessage()


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_gold_answers_of_real_benchmarks(name, monkeypatch):
    """A response ending in \\boxed{gold} scores 1; the gold of another problem scores 0 unless the two
    answers are mathematically equal (checked both ways)."""
    if os.path.isdir(SHARED):
        monkeypatch.setattr("eval.BENCH_DIR", SHARED)
    problems, no_gold = load_benchmark(name)
    assert no_gold == (2 if name == "gaokao2023en" else 0)
    golds = [p["answer"] for p in problems if p["answer"]]
    responses = [f"Let me think. The answer is \\boxed{{{g}}}." for g in golds]
    scores = reward.score_batch(responses, golds, workers=2, timeout=20)
    failed = [(g) for g, s in zip(golds, scores) if s != 1.0]
    assert not failed, f"{len(failed)} gold answers of {name} not recognised: {failed[:5]}"
    shifted = golds[1:] + golds[:1]
    cross = reward.score_batch([f"\\boxed{{{g}}}" for g in shifted], golds, workers=2, timeout=20)
    back = reward.score_batch([f"\\boxed{{{g}}}" for g in golds], shifted, workers=2, timeout=20)
    # Known, kept behaviour of math-verify (the paper's checker): a boxed equation is compared by its right
    # side, so "x^2/2 - y^2/2 = 1" matches the gold "1". Those are listed and allowed; nothing else is.
    rhs_rule = lambda a, b: "=" in a and reward.score(f"\\boxed{{{a.split('=')[-1]}}}", b) == 1.0  # noqa: E731
    wrong = [(a, b) for a, b, s, t in zip(shifted, golds, cross, back) if s == 1.0 and t != 1.0 and not rhs_rule(a, b)]
    assert not wrong, f"{name}: different answers judged equal one way only: {wrong[:5]}"
    same = [s for a, b, s in zip(shifted, golds, cross) if a.replace(" ", "") == b.replace(" ", "")]
    assert all(s == 1.0 for s in same)  # identical answers of neighbouring problems do match
    assert sum(cross) - len(same) <= 0.1 * len(golds), f"{name}: {sum(cross)} cross matches"


def test_workers_survive_stop_signals_and_lost_items_are_scored_again():
    """The scoring workers live in their own session and ignore SIGINT and SIGTERM (Ctrl-C in a terminal, or
    Slurm signalling every process of a job step, once killed them and their items scored 0 in a step that
    was then kept); an item whose worker is killed outright is scored again, not zero-filled."""
    import signal
    import threading
    import time

    pool = reward.ScorePool(2)
    try:
        responses = [f"The answer is \\boxed{{{k}}}" for k in range(200)]
        golds = [str(k) for k in range(200)]
        assert all(os.getsid(w.proc.pid) != os.getsid(0) for w in pool.workers)  # not our process group
        for _ in range(100):  # until both have started (a signal before that is the interpreter's to handle)
            if all(w.ready for w in pool.workers):
                break
            pool.map(["1"] * 8, ["1"] * 8, timeout=30)
        pids = [w.proc.pid for w in pool.workers]

        def disturb():
            time.sleep(0.05)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGINT)
            time.sleep(0.05)
            os.kill(pool.workers[0].proc.pid, signal.SIGKILL)  # lost mid-batch for a reason of its own
        t = threading.Thread(target=disturb)
        t.start()
        got = pool.map(responses, golds, timeout=30)
        t.join()
        assert list(got) == [1.0] * 200 and got.timeouts == 0
        assert pool.workers[1].proc.pid == pids[1]  # SIGTERM and SIGINT did not kill it
    finally:
        pool.close()


def test_workers_end_with_their_trainer(tmp_path):
    """A trainer killed outright (SIGKILL: no cleanup) leaves no scoring worker behind."""
    import time

    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import reward; p = reward.ScorePool(2); "
            "p.map(['1'], ['1'], 30); print(' '.join(str(w.proc.pid) for w in p.workers), flush=True); "
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in res.stdout.split()]
    assert len(pids) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------
# The fast path (reward.fast_score) gives math-verify's score wherever it answers


def _agree(responses, golds, expect_fast: float = 0.0):
    """fast_score equals math-verify's score on every pair it answers; it answers at least `expect_fast` of them.
    Returns how many it answered."""
    fast = [reward.fast_score(r, g) for r, g in zip(responses, golds)]
    differ = [(r, g, f) for r, g, f in zip(responses, golds, fast)
              if f is not None and f != reward.math_verify_score(r, g)[0]]
    assert not differ, f"fast path disagrees with math-verify: {differ[:5]}"
    answered = sum(f is not None for f in fast)
    assert answered >= expect_fast * len(fast), f"fast path answered {answered} of {len(fast)}"
    return answered


def test_fast_path_agrees_with_math_verify_on_near_misses():
    """Integers of every size it takes, their neighbours and negations, and the forms it must leave to
    math-verify (leading zeros, a sign, decimals, text around the box, non-ASCII digits, 10 digits)."""
    ints = ["0", "1", "-1", "7", "10", "99", "100", "123", "-45", "2024", "99999", "123456789", "999999999",
            "-999999999"]
    forms = ["\\boxed{%s}", " \\boxed{%s}\n", "\\boxed{0%s}", "\\boxed{+%s}", "\\boxed{%s.0}", "\\boxed{%s}.",
             "x \\boxed{%s}", "\\boxed{ %s }", "\\boxed{%s}\\boxed{%s}", "The final answer is %s. \\boxed{%s}"]
    responses, golds = [], []
    for g in ints + ["05", "7.0", "+3", "1000000000", "١٢"]:
        for n in ints + [str(int(g) + 1) if g.lstrip("-").isdigit() else "8", "1000000000", "١٢"]:
            for form in forms:
                responses.append(form.replace("%s", n))
                golds.append(g)
    answered = _agree(responses, golds)
    assert answered == sum(1 for r, g in zip(responses, golds) if reward._PLAIN_INT.fullmatch(g)
                           and reward._ONLY_BOXED_INT.fullmatch(r))
    assert reward.fast_score("\\boxed{0123}", "123") is None and reward.fast_score("\\boxed{1000000000}", "1") is None
    assert reward.fast_score("\\boxed{١٢}", "12") is None and reward.fast_score("\\boxed{12}", "12.0") is None
    assert reward.fast_score(" \\boxed{-7}\n", "-7") == 1.0 and reward.fast_score("\\boxed{8}", "7") == 0.0


def test_fast_path_agrees_on_real_tiny_model_outputs():
    """Rollouts of the bundled tiny model on its training prompts (what the tiny default scores thousands of
    times a step): the fast path answers almost all of them, each with math-verify's score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rollout

    cfg = load_config(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"--model.path={ROOT}/models/tiny",
                             f"--data.train={ROOT}/data/tiny/train.jsonl"])
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path).eval()
    subsets, _ = load_subsets(cfg, tok)
    items = [it for s in subsets for it in s[::40]]  # 100 prompts of every level
    out = rollout.generate(model, [it["prompt_ids"] for it in items], 4, max_new_tokens=16,
                           eos_ids=rollout.stop_token_ids(tok, model, True), pad_id=tok.pad_token_id,
                           temperature=1.0, top_p=1.0, seed=0)
    texts = out.texts(tok)
    golds = [items[i]["answer"] for i in out.prompt_index.tolist()]
    _agree(texts, golds, expect_fast=0.95)
    assert 0 < sum(reward.score_batch(texts, golds, workers=1)) < len(texts)  # right and wrong ones both


@pytest.mark.slow
def test_fast_path_agrees_on_every_gold_answer(monkeypatch):
    """Every gold answer of the tiny data and of the shared benchmarks, boxed alone, against itself and
    against its neighbour's gold (a different answer), both ways."""
    golds = [json.loads(line)["answer"] for f in ("train", "test") for line in open(os.path.join(ROOT, "data", "tiny", f"{f}.jsonl"))]
    if os.path.isdir(SHARED):
        monkeypatch.setattr("eval.BENCH_DIR", SHARED)
    for name in BENCHMARKS:
        golds += [p["answer"] for p in load_benchmark(name)[0] if p["answer"]]
    golds = list(dict.fromkeys(golds))  # each distinct answer once
    shifted = golds[1:] + golds[:1]
    responses = [f"\\boxed{{{g}}}" for g in golds]
    answered = _agree(responses + responses, golds + shifted)
    assert answered > len(golds)  # the integers of all of them


def test_a_pool_that_cannot_start_fails_with_the_reason(tmp_path, monkeypatch):
    """Workers that die before they are ready (here math-verify cannot be imported) fail the call with the
    worker's own error after reward.START_FAILURES tries, instead of being respawned forever."""
    (tmp_path / "math_verify.py").write_text("raise ImportError('math_verify is broken on this node')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pool = reward.ScorePool(1)
    try:
        with pytest.raises(RuntimeError, match="cannot start .*math_verify is broken on this node"):
            pool.map(["x = 2"], ["2"], timeout=30)
    finally:
        pool.close()


def test_workers_that_never_get_ready_fail_the_call_by_a_deadline(tmp_path, monkeypatch):
    """A worker stuck before it is ready (here its math-verify import sleeps: a stalled file system) is killed
    START_TIMEOUT_S after its start and counts as a failed start: the call fails with the reason after
    START_FAILURES of them (2 here), instead of waiting forever for the first item's deadline to start."""
    (tmp_path / "math_verify.py").write_text("import time\ntime.sleep(3600)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(reward, "START_TIMEOUT_S", 1.0)
    monkeypatch.setattr(reward, "START_FAILURES", 2)
    pool = reward.ScorePool(1)
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="cannot start .*importing math-verify took over 1 s"):
            pool.map(["x = 2"], ["2"], timeout=30)
    finally:
        pool.close()
    assert time.monotonic() - t0 < 30  # 2 starts of 1 s, then the 1 s foreground import that names the cause


def test_a_stop_request_ends_scoring_while_workers_start(tmp_path, monkeypatch):
    """should_stop is asked while the pool waits for its workers (and while they score): a stop request ends
    the call within about a second with reward.Interrupted, whatever the workers are doing."""
    (tmp_path / "math_verify.py").write_text("import time\ntime.sleep(3600)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pool = reward.ScorePool(2)
    t0 = time.monotonic()
    try:
        with pytest.raises(reward.Interrupted):
            pool.map(["x = 2"] * 4, ["2"] * 4, timeout=30, should_stop=lambda: time.monotonic() - t0 > 0.5)
    finally:
        pool.close()
    assert time.monotonic() - t0 < 3


def test_an_item_lost_past_its_retries_is_unscored_not_zero(monkeypatch):
    """An item whose worker is lost more than reward.RETRIES times is listed in .unscored (the trainer leaves
    it out), not counted as a checker timeout and not silently scored 0 (here RETRIES = 0: lost once)."""
    import signal
    import threading

    monkeypatch.setattr(reward, "RETRIES", 0)
    pool = reward.ScorePool(2)
    try:
        for _ in range(100):  # until both have started
            if all(w.ready for w in pool.workers):
                break
            pool.map(["1"] * 8, ["1"] * 8, timeout=30)
        responses = [f"The answer is \\boxed{{{k}}}" for k in range(300)]
        golds = [str(k) for k in range(300)]

        def disturb():
            for _ in range(5):
                time.sleep(0.05)
                busy = [w for w in pool.workers if w.item is not None]
                if busy:
                    os.kill(busy[0].proc.pid, signal.SIGKILL)
        t = threading.Thread(target=disturb)
        t.start()
        got = pool.map(responses, golds, timeout=30)
        t.join()
        assert 1 <= len(got.unscored) <= 5 and got.timeouts == 0
        assert all(got[i] == 0.0 for i in got.unscored)
        assert all(got[i] == 1.0 for i in range(300) if i not in got.unscored)
    finally:
        pool.close()
