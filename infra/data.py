"""Training data: sources (local jsonl/json/parquet files, directories of them, hub dataset ids) -> the T
subsets of Algorithm 1, each prompt tokenised with the chat template and its gold answer. A malformed row is
an error naming its file and line; rows without a gold answer or too long a prompt are skipped and counted.
"""

from __future__ import annotations

import os

import numpy as np

import reward
from eval import build_prompt, read_rows
from infra.config import Config
from infra.distributed import print0


def gold_answer(text: str, answer_format: str) -> str | None:
    """The gold answer of a training row. answer_format "answer": the field is the answer (a \\boxed{} inside
    is unwrapped). "solution": the field is a worked solution and its \\boxed{} contents are the gold; several
    different ones are one set ("x = 1 and x = -2" boxed twice -> "1, -2" as math-verify reads a set), and a
    solution with none has no gold (None: the row is skipped and counted, never matched whole)."""
    if answer_format == "answer":
        return reward.extract_boxed(text) or text
    if answer_format == "solution":
        boxed = list(dict.fromkeys(b.strip() for b in reward.extract_all_boxed(text) if b.strip()))
        return ", ".join(boxed) or None
    raise ValueError(f"data.answer_format must be answer or solution, not {answer_format!r}")


def read_source(source: str, split: str) -> list[list[tuple]]:
    """One data source -> its files (a directory: one per file, sorted by name, as the authors shipped
    them) as lists of (file name, line, row); a hub dataset id is one list."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.endswith((".jsonl", ".json", ".parquet")))
        if not files:
            raise ValueError(f"data.train: directory {source!r} has no .jsonl, .json or .parquet file")
        return [_numbered(f, read_rows(f)) for f in files]
    if os.path.exists(source):
        return [_numbered(source, read_rows(source))]
    root, files = hub_dataset_files(source, split)
    return [_numbered(f"{source} ({split}: {', '.join(files)})",
                      [row for f in files for row in read_rows(os.path.join(root, f))])]


def hub_dataset_files(repo_id: str, split: str) -> tuple[str, list[str]]:
    """A hub dataset's files of `split`, without the `datasets` package: the repository's snapshot through
    huggingface_hub (its cache: HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads the cache only), downloaded by one
    process per node (LOCAL_RANK 0) while the others wait, then read from the cache by all. The split's files:
    those in a folder named after it or named `<split>-...` / `<split>.<ext>` (the hub's conventions, e.g.
    data/train-00000-of-00001.parquet); a repository without split names is all train. Returns (snapshot
    folder, the files relative to it, sorted)."""
    import re

    from huggingface_hub import snapshot_download

    from infra.distributed import barrier

    kw = dict(repo_id=repo_id, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"])
    first, error, root = int(os.environ.get("LOCAL_RANK", 0)) == 0, None, None
    try:
        if first:
            root = snapshot_download(**kw)
    except Exception as e:  # noqa: BLE001  raised after the barrier, so that no rank waits for ever
        error = e
    barrier()
    try:
        root = root or snapshot_download(**kw, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        error = error or e
    if error is not None:
        raise FileNotFoundError(f"data.train: {repo_id!r} is not a local file or directory, and as a hub dataset it "
                                f"could not be fetched ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                                "with no network, point data.train at local copies or fill the hub cache "
                                "(HF_HOME) where there is one") from None
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
                   if f.endswith((".parquet", ".jsonl", ".json")))
    def split_of(f):  # the split a file's folder or name gives, if any
        names = f.split(os.sep)[:-1] + [re.split(r"[-._]", os.path.basename(f))[0]]
        return next((n for n in names if n in (split, "train", "test", "validation", "valid", "dev")), None)
    named = [f for f in files if split_of(f) == split]
    unnamed = split == "train" and all(split_of(f) is None for f in files)
    chosen = named or ([f for f in files if not f.endswith(".json")] if unnamed else [])
    if not chosen:
        raise ValueError(f"hub dataset {repo_id!r} ({root}): no data file for split {split!r} among {files[:8]}")
    return root, chosen


def _numbered(name: str, rows) -> list[tuple]:
    """(name, line, row) for each row; an empty source is an error that names it."""
    rows = [(name, i, r) for i, r in enumerate(rows, 1)]
    if not rows:
        raise ValueError(f"{name}: no usable prompt in 0 rows (an empty file)")
    return rows


def load_subsets(cfg: Config, tokenizer):
    """The training prompts as the T subsets of Algorithm 1. Several sources (the entries of
    `data.train`, a directory's files) give one subset each, in order, as the released pipeline trains on
    `numina_math_1` ... `_15`; a single source is cut into `data.num_subsets` contiguous parts. Each item:
    {"prompt_ids", "answer", "level"} (the row's difficulty level if it has one). Returns (subsets, {"too_long": n, "no_answer": n}), the rows skipped."""
    groups = [g for source in cfg.data.train for g in read_source(source, cfg.data.split)]
    items, skipped = [], {"too_long": 0, "no_answer": 0}
    for group in groups:
        part, before = [], dict(skipped)
        for fname, line, row in group[:cfg.data.max_prompts or None]:
            problem, answer = row.get(cfg.data.problem_key), row.get(cfg.data.answer_key)
            for key in (cfg.data.problem_key, cfg.data.answer_key):
                if key not in row:  # a wrong *_key or a malformed row
                    raise ValueError(f"{fname}:{line}: row has no {key!r} (fields: {sorted(row)[:8]})")
            if problem is None or not str(problem).strip():
                raise ValueError(f"{fname}:{line}: row has an empty {cfg.data.problem_key!r}")
            answer = gold_answer(str(answer), cfg.data.answer_format) if answer is not None else None
            if answer is None or not answer.strip():  # an empty or null answer, a solution without \boxed{}
                skipped["no_answer"] += 1
                if skipped["no_answer"] <= 5:
                    print0(f"skipped {fname}:{line}: no gold answer in {cfg.data.answer_key!r}"
                           + (" (and more, counted as data/skipped_no_answer)" if skipped["no_answer"] == 5 else ""))
                continue
            ids = build_prompt(tokenizer, str(problem), cfg.data.system_prompt, cfg.data.user_template)
            if len(ids) > cfg.data.max_prompt_len:
                skipped["too_long"] += 1
                continue
            part.append({"prompt_ids": ids, "answer": answer, "level": row.get("level")})  # level: metrics only
        if not part:
            name = group[0][0] if group else "a data source"
            raise ValueError(f"{name}: no usable prompt in {len(group)} rows ({skipped['too_long'] - before['too_long']} "
                             f"longer than data.max_prompt_len={cfg.data.max_prompt_len}, "
                             f"{skipped['no_answer'] - before['no_answer']} without a \\boxed{{}} answer)")
        items.append(part)
    T = cfg.data.num_subsets
    if len(items) > 1:
        if T not in (0, len(items)):
            raise ValueError(f"data.train gives {len(items)} sources (one subset each) but data.num_subsets={T}: "
                             f"set data.num_subsets={len(items)} (or 0)")
    else:
        flat = items[0]
        if T < 1:  # a directory holding one file gets here past validate_config
            raise ValueError(f"{groups[0][0][0]}: one data source and data.num_subsets={T}: a single source needs "
                             ">= 1 subsets")
        if len(flat) < T:
            raise ValueError(f"{len(flat)} prompts cannot make {T} subsets")
        bounds = np.linspace(0, len(flat), T + 1).astype(int)
        items = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return items, skipped
