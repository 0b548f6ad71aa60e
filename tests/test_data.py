"""infra/data.py: sources -> subsets, gold answers, malformed rows named by file and line, skipped rows counted."""

import json
import os

import pytest

from helpers import ROOT, TRAIN_DATA, numina_rows, small_run, write_rows
from infra.config import load_config
from infra.data import gold_answer, load_subsets


def test_malformed_data_row_names_file_and_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    cfg = load_config([f"--data.train={f}", "--data.num_subsets=1"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*answer"):
        load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))


def test_data_sources_give_one_subset_each(tmp_path, tiny_model_dir):
    """data.train as a list of sources (files of either format, a directory of files): one subset per file,
    in order, as the released pipeline trains on numina_math_1 ... _15; a single source is cut in parts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    write_rows(tmp_path / "s1.parquet", numina_rows("a", 3))
    write_rows(tmp_path / "s2.jsonl", numina_rows("b", 2))
    (tmp_path / "dir").mkdir()
    write_rows(tmp_path / "dir" / "x.jsonl", numina_rows("c", 1))
    write_rows(tmp_path / "dir" / "y.parquet", numina_rows("d", 2))
    sources = f"--data.train=[{tmp_path / 's1.parquet'}, {tmp_path / 's2.jsonl'}, {tmp_path / 'dir'}]"
    for T in (0, 4):
        subsets, skipped = load_subsets(load_config([sources, f"--data.num_subsets={T}"]), tok)
        assert [len(s) for s in subsets] == [3, 2, 1, 2] and skipped == {"too_long": 0, "no_answer": 0}
        assert [s[0]["answer"] for s in subsets] == ["1", "1", "1", "1"]
        assert "a problem 0" in tok.decode(subsets[0][0]["prompt_ids"]) and "d problem 1" in tok.decode(subsets[3][1]["prompt_ids"])
    with pytest.raises(ValueError, match="4 sources"):
        load_subsets(load_config([sources, "--data.num_subsets=15"]), tok)
    one = load_config([f"--data.train={tmp_path / 's1.parquet'}", "--data.num_subsets=3"])
    assert [len(s) for s in load_subsets(one, tok)[0]] == [1, 1, 1]
    # the paper configs and the defaults train on the authors' 15 sets, gold in `answer`
    want = [f"ScaleML-RLHF/numina_math_{i}" for i in range(1, 16)]
    for args in ([], ["--config", os.path.join(ROOT, "configs", "1.5b.yaml")],
                 ["--config", os.path.join(ROOT, "configs", "7b.yaml")]):
        cfg = load_config(args)
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
    write_rows(tmp_path / "math.jsonl", rows)
    cfg = load_config([f"--data.train={tmp_path / 'math.jsonl'}", "--data.num_subsets=1",
                             "--data.answer_key=solution", "--data.answer_format=solution"])
    subsets, skipped = load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    golds = [item["answer"] for item in subsets[0]]
    assert golds == ["x = 1, x = -2", "4"] and skipped == {"too_long": 0, "no_answer": 1}
    assert reward.score("so \\boxed{-2, 1}", golds[0]) == 1.0
    assert reward.score("both: \\boxed{x=1} and \\boxed{x=-2}", golds[0]) == 1.0
    assert reward.score("\\boxed{1}", golds[0]) == 0.0  # half the set is wrong
    assert gold_answer("the answer is \\boxed{7}", "answer") == "7"
    assert gold_answer("7", "answer") == "7"


def test_bad_data_is_named(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    (tmp_path / "d" / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"b.jsonl.*no usable prompt"):
        load_subsets(load_config([f"--data.train={tmp_path / 'd'}", "--data.num_subsets=0"]), tok)
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="has no .jsonl"):
        load_subsets(load_config([f"--data.train={tmp_path / 'e'}", "--data.num_subsets=0"]), tok)
    with pytest.raises(ValueError, match="longer than data.max_prompt_len"):
        load_subsets(load_config([f"--data.train={TRAIN_DATA}", "--data.max_prompt_len=3"]), tok)


def test_empty_or_null_answers_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys):
    rows = [json.loads(l) for l in open(TRAIN_DATA)][:40]
    rows[3]["answer"], rows[7]["answer"] = "", None
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(small_run(tiny_model_dir, tmp_path / "r", f"--data.train={path}", "--data.num_subsets=1"))
    from transformers import AutoTokenizer

    subsets, skipped = load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert skipped["no_answer"] == 2 and sum(map(len, subsets)) == 38
    out = capsys.readouterr().out
    assert f"{path}:4" in out and f"{path}:8" in out
    del rows[5]["answer"]  # the key itself missing: a wrong data.answer_key or a malformed row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{path}:6: row has no 'answer'"):
        load_subsets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))


def _hub_cache(root, repo_id: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A dataset repository in a huggingface_hub cache, laid out as huggingface_hub lays it:
    hub/datasets--owner--name/{refs/main, snapshots/<commit>/<files>} (real files here; blobs and links there)."""
    repo = root / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, rows in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows(path, rows)


def test_hub_datasets_load_without_the_datasets_package(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id in data.train is read through huggingface_hub's cache and pyarrow/json, offline here, with the
    `datasets` package unimportable: the authors' numina_math_k layout (the train split in shards under data/, a
    test split beside it) gives one subset per id, shards in order, the test split left out; an id the cache lacks
    fails naming it and what to do."""
    import sys

    import huggingface_hub.constants as hub
    from transformers import AutoTokenizer

    _hub_cache(tmp_path, "ScaleML-RLHF/numina_math_1", {
        "data/train-00000-of-00002.parquet": numina_rows("a", 2), "data/train-00001-of-00002.parquet": numina_rows("b", 1),
        "data/test-00000-of-00001.parquet": numina_rows("t", 5), "dataset_infos.json": []})
    _hub_cache(tmp_path, "ScaleML-RLHF/numina_math_2", {"train.jsonl": numina_rows("c", 2)})
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(["--data.train=[ScaleML-RLHF/numina_math_1, ScaleML-RLHF/numina_math_2]", "--data.num_subsets=0"])
    subsets, _ = load_subsets(cfg, tok)
    assert [len(s) for s in subsets] == [3, 2]
    texts = [tok.decode(s["prompt_ids"]) for s in subsets[0]]
    assert "a problem 0" in texts[0] and "a problem 1" in texts[1] and "b problem 0" in texts[2]
    with pytest.raises(FileNotFoundError, match=r"'ScaleML-RLHF/numina_math_3' is not a local file or directory.*"
                                                r"could not be fetched .*point data.train at local copies"):
        load_subsets(load_config(["--data.train=[ScaleML-RLHF/numina_math_3]", "--data.num_subsets=0"]), tok)
