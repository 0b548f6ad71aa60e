"""The bundled tiny default: its data are what tiny/make_data.py writes, the committed model is what its report
says, and tiny/pretrain.py runs end to end."""

import json
import os
import subprocess
import sys

import torch

import reward
from tiny.make_data import splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA, MODEL = os.path.join(ROOT, "data", "tiny"), os.path.join(ROOT, "models", "tiny")


def _rows(name):
    return [json.loads(line) for line in open(os.path.join(DATA, f"{name}.jsonl"))]


def test_committed_splits_are_the_generator_output():
    train, test = splits()
    assert _rows("train") == train and _rows("test") == test
    assert {r["level"] for r in train} == {1, 2, 3, 4} and {r["level"] for r in test} == {2}
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}  # held out
    for r in test[:10] + train[:10]:
        a, b = r["problem"].removeprefix("What is ").removesuffix("?").split("+")
        assert int(r["answer"]) == int(a) + int(b)
        assert reward.score(f"\\boxed{{{r['answer']}}}", r["answer"]) == 1.0
        assert reward.score(f"\\boxed{{{int(r['answer']) + 1}}}", r["answer"]) == 0.0


def test_committed_model_matches_its_report():
    """Greedy decoding is deterministic: the committed model's held-out accuracy is the report's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny.pretrain import accuracy_by_level

    size = sum(os.path.getsize(os.path.join(MODEL, f)) for f in os.listdir(MODEL))
    assert size < 10 * 2**20
    model, tok = AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) < 5e6
    report = json.load(open(os.path.join(MODEL, "pretrain_report.json")))
    acc = accuracy_by_level(model, tok, _rows("test"))
    assert abs(acc[2] - report["greedy_accuracy_by_level"]["2"]) < 1e-9
    assert 0.2 < acc[2] < 0.8  # half-way: what RL can finish within the tiny config's budget


def test_pretrain_script_runs(tmp_path):
    out = tmp_path / "m"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tiny", "pretrain.py"), "--steps", "30", "--out", str(out),
                          "--stop-when", ""], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(out / "pretrain_report.json"))
    assert report["args"]["steps_done"] == 30 and set(report["greedy_accuracy_by_level"]) == {"1", "2", "3", "4"}
    from transformers import AutoModelForCausalLM

    assert torch.isfinite(torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(out).parameters()])).all()
