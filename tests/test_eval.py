"""eval.py: benchmark loaders, metrics against hand-computed values, and an end-to-end run."""

import filecmp
import json
import os
import subprocess
import sys

import pytest

import eval as evaluation
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "benchmarks")
COUNTS = {"math500": 500, "gsm8k": 1319, "gaokao2023en": 385, "minerva_math": 272, "olympiadbench": 675,
          "aime24": 30, "aime25": 30, "amc23": 40}


@pytest.mark.parametrize("name", list(COUNTS))
def test_benchmark_loads_with_exact_count(name):
    problems, no_gold = evaluation.load_benchmark(name)
    assert len(problems) == COUNTS[name]  # Table 1's denominators: every row, also those without a gold
    assert no_gold == (2 if name == "gaokao2023en" else 0)  # the two empty Gaokao answers are reported...
    assert sum(not p["answer"] for p in problems) == no_gold and all(p["problem"] for p in problems)
    if no_gold:  # ...and score 0 whatever the response
        assert reward.score("\\boxed{3}", problems[[p["answer"] for p in problems].index("")]["answer"]) == 0.0
    assert "$" not in "".join(p["answer"] for p in problems if name == "olympiadbench")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/benchmarks not present")
@pytest.mark.parametrize("name", list(COUNTS))
def test_committed_copy_is_the_shared_file(name):
    assert filecmp.cmp(os.path.join(evaluation.BENCH_DIR, name, "test.jsonl"),
                       os.path.join(SHARED, name, "test.jsonl"), shallow=False)


def test_gold_extraction_examples():
    gsm = evaluation.load_benchmark("gsm8k")[0]
    assert gsm[0]["answer"] == "18"
    assert all("," not in p["answer"] for p in gsm)
    amc = evaluation.load_benchmark("amc23")[0]
    assert amc[0]["answer"] == "27"  # 27.0 in the file
    minerva = evaluation.load_benchmark("minerva_math")[0]
    assert all("\\boxed" not in p["answer"] for p in minerva)


def test_pass_at_k_and_majority_hand_computed():
    assert evaluation.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluation.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert evaluation.pass_at_k(4, 0, 2) == 0.0 and evaluation.pass_at_k(4, 3, 2) == 1.0
    assert evaluation.majority_at_k(["1", "2", "2", None], [1, 0, 0, 0], 4) == 0
    assert evaluation.majority_at_k(["1", "2", "1", None], [1, 0, 1, 0], 4) == 1
    assert evaluation.majority_at_k([None, None], [0, 0], 2) == 0
    s = evaluation.summarize([[1, 0, 0, 1], [0, 0, 0, 0]], [["a", "b", "c", "a"], ["x"] * 4])
    assert s["pass@1"] == pytest.approx(0.25) and s["pass@4"] == pytest.approx(0.5) and s["maj@4"] == 0.5


def test_markdown_table_avg_is_plain_mean():
    table = evaluation.markdown_table({"m": {"a": 0.5, "b": 0.25}}, ["a", "b"])
    assert "| m | 50.00 | 25.00 | 37.50 |" in table


def test_malformed_benchmark_row(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"problem": "p", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        evaluation.load_benchmark(str(f))


@pytest.mark.slow
def test_eval_end_to_end_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_model_dir, "--benchmarks", "all",
           "--max-problems", "2", "--max-new-tokens", "6", "--out", str(out), "--samples", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))[tiny_model_dir]
    assert set(summary) == set(COUNTS)
    assert all(s["problems"] == 2 and s["n"] == 2 for s in summary.values())
    rows = [json.loads(l) for l in open(out / "aime24.jsonl")]
    assert len(rows) == 2 and len(rows[0]["responses"]) == 2 and len(rows[0]["scores"]) == 2
    table = (out / "table.md").read_text()
    assert "math500" in table and "Avg." in table
    before = os.path.getmtime(out / "math500.jsonl")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0 and os.path.getmtime(out / "math500.jsonl") == before  # not recomputed
    again = subprocess.run(cmd[:-2] + ["--samples", "3", "--cache", "paged"], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(out / "math500.jsonl") > before  # new settings: recomputed (on the paged cache)
    assert json.load(open(out / "summary.json"))[tiny_model_dir]["math500"]["n"] == 3


def test_unknown_or_empty_benchmark_fails_before_the_model_loads(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(tmp_path / "no-such-model"), "--out",
           str(tmp_path / "ev")]
    res = subprocess.run(cmd + ["--benchmarks", "math500,aime2099"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "unknown benchmark 'aime2099'" in res.stderr and "math500" in res.stderr
    (tmp_path / "empty.jsonl").write_text("")
    res = subprocess.run(cmd + ["--benchmarks", str(tmp_path / "empty.jsonl")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "no problems" in res.stderr


@pytest.mark.slow
def test_eval_uses_the_prompt_the_model_was_trained_with(tmp_path):
    """The bundled tiny model reads the bare problem (no system prompt): its prompt.json says so, and eval.py
    uses it by default (with the paper's prompt it would score about 0); flags override it."""
    model = os.path.join(ROOT, "models", "tiny")
    assert evaluation.prompt_settings(model) == ("", "{problem}")
    assert evaluation.prompt_settings(model, "sys", "Q: {problem}") == ("sys", "Q: {problem}")
    assert evaluation.prompt_settings(str(tmp_path)) == (evaluation.SYSTEM_PROMPT, evaluation.USER_TEMPLATE)
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data", "tiny", "test.jsonl"))]
    data = tmp_path / "level2.jsonl"  # the level the model half-learned in pretraining (greedy 0.64, its report)
    data.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["level"] == 2][:20]))
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, "--benchmarks", str(data),
           "--max-problems", "20", "--max-new-tokens", "16"]
    scores = {}
    for name, flags in {"own": [], "paper": ["--system-prompt", evaluation.SYSTEM_PROMPT,
                                             "--user-template", evaluation.USER_TEMPLATE]}.items():
        res = subprocess.run(cmd + flags + ["--out", str(tmp_path / name)], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        scores[name] = json.load(open(tmp_path / name / "summary.json"))[model]["level2"]["pass@1"]
    assert scores["own"] > 0.3 and scores["paper"] < 0.1, scores


def test_one_stopping_rule_for_training_and_evaluation(tmp_path, monkeypatch):
    """eval.py stops where the model's training rollouts stopped (its prompt.json, from rollout.stop_at_im_end;
    EOS only without one, as released), a flag overrides it, and the setting is part of the result cache's
    key: a finished benchmark is evaluated again when it changes."""
    model = tmp_path / "m"
    model.mkdir()
    assert evaluation.stop_setting(str(model)) is False  # no prompt.json: the released pipeline's EOS only
    (model / evaluation.PROMPT_FILE).write_text(json.dumps({"stop_at_im_end": True}))
    assert evaluation.stop_setting(str(model)) is True
    assert evaluation.stop_setting(str(model), False) is False
    tiny = os.path.join(ROOT, "models", "tiny")
    data = os.path.join(ROOT, "data", "tiny", "test.jsonl")
    out = tmp_path / "ev"

    def run(*flags):  # eval.py's command line, in this process
        monkeypatch.setattr(sys, "argv", ["eval.py", "--model", tiny, "--benchmarks", data, "--max-problems", "3",
                                          "--max-new-tokens", "4", "--out", str(out), *flags])
        evaluation.main()
        return os.stat(out / "test.jsonl").st_mtime_ns, json.load(open(out / "summary.json"))[tiny]["test"]

    first, stats = run()
    assert stats["settings"]["stop_at_im_end"] is False  # models/tiny's prompt.json has no setting: EOS only
    assert run()[0] == first  # same settings: taken from the cache
    again, stats = run("--stop-at-im-end")
    assert again != first and stats["settings"]["stop_at_im_end"] is True


def test_paged_evaluation_scores_what_the_dynamic_cache_scores(monkeypatch):
    """evaluate_problems (train.py's held-out evaluation and eval.py's) on the paged cache (rollout.cache, eval.py
    --cache): greedy answers of the pretrained models/arith equal the dynamic cache's, response for response, and
    so do their scores; the model is on sdpa, so the paged path decodes through rollout.paged_varlen_attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import varlen_calls

    path = os.path.join(ROOT, "models", "arith")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "arith", "test.jsonl"))][:12]
    problems = [{"id": i, "problem": r["problem"], "answer": r["answer"]} for i, r in enumerate(rows)]
    calls = varlen_calls(monkeypatch)
    kw = dict(n_samples=1, max_new_tokens=16, temperature=0.0, top_p=1.0, system_prompt="", user_template="{problem}")
    dynamic = evaluation.evaluate_problems(model, tok, problems, **kw)
    assert not calls
    paged = evaluation.evaluate_problems(model, tok, problems, cache="paged", **kw)
    assert calls
    assert [r["responses"] for r in paged] == [r["responses"] for r in dynamic]
    assert [r["scores"] for r in paged] == [r["scores"] for r in dynamic]
    assert 0 < sum(r["scores"][0] for r in dynamic) < len(problems)  # some right, some wrong: the answers matter


def test_sampled_evaluation_does_not_depend_on_the_rank_split():
    """A problem's samples are keyed by (seed, its id, the sample's index): evaluate_problems on two ranks (rank 0
    takes problems 0, 2, ..., rank 1 the others) returns, problem for problem, the samples of one rank, at
    temperature 1 with 4 samples each on the pretrained models/arith; another seed samples differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(ROOT, "models", "arith")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "arith", "test.jsonl"))][:10]
    problems = [{"id": i, "problem": r["problem"], "answer": r["answer"]} for i, r in enumerate(rows)]
    kw = dict(n_samples=4, max_new_tokens=16, temperature=1.0, top_p=1.0, system_prompt="", user_template="{problem}",
              seed=3)
    one = evaluation.evaluate_problems(model, tok, problems, **kw)
    two = sorted(evaluation.evaluate_problems(model, tok, problems, rank=0, world_size=2, **kw)
                 + evaluation.evaluate_problems(model, tok, problems, rank=1, world_size=2, **kw), key=lambda r: r["id"])
    assert [r["responses"] for r in two] == [r["responses"] for r in one]
    assert [r["scores"] for r in two] == [r["scores"] for r in one]
    other = evaluation.evaluate_problems(model, tok, problems, **{**kw, "seed": 4})
    assert [r["responses"] for r in other] != [r["responses"] for r in one]
    assert len({t for r in one for t in r["responses"]}) > len(problems)  # sampled: the 4 samples differ
