"""Evaluate a model on the paper's eight math benchmarks (Table 1) with one command.

    python eval.py --model Qwen/Qwen2.5-Math-1.5B --benchmarks all --out out/eval
    torchrun --nproc_per_node=8 eval.py --model out/run/final --benchmarks math500,aime24
    python eval.py --model models/tiny --benchmarks my_set.jsonl --max-problems 20     # any problem/answer jsonl

Metrics as in the paper: pass@1 (mean score over the samples of a problem) with 1 sample on MATH500,
GSM8K, Gaokao-EN 2023, Minerva Math, OlympiadBench and 16 samples on AIME24, AIME25, AMC23 ("avg@16");
"Avg." is the plain mean of the columns. Also unbiased pass@k and majority vote maj@k.
Writes <out>/table.md, <out>/summary.json and <out>/<benchmark>.jsonl (per-problem outputs with scores);
a benchmark whose outputs file is complete is not recomputed (resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter

import numpy as np

import reward

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.join(HERE, "data", "benchmarks")

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
USER_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."

# ----------------------------------------------------------------------------------------------
# Data


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl, .json (a list of objects) or .parquet file. A malformed row is an error that
    names the file and line."""
    if path.endswith(".parquet"):  # the released pipeline's data files, and hub datasets
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
    return rows


def _strip_dollars(s: str) -> str:
    """Drop the math delimiters: "$69$, $84$" -> "69, 84" (an escaped \\$ stays)."""
    return re.sub(r"(?<!\\)\$", "", str(s)).strip()


def _boxed(s: str) -> str:
    return reward.extract_boxed(s) or ""


def _number(x) -> str:
    f = float(x)
    return str(int(f)) if f.is_integer() else str(f)


# name -> (folder, problem field, gold answer from a row, samples per problem in the paper)
BENCHMARKS = {
    "math500": ("math500", "problem", lambda r: str(r["answer"]), 1),
    "gsm8k": ("gsm8k", "question", lambda r: r["answer"].split("####")[-1].strip().replace(",", ""), 1),
    "gaokao2023en": ("gaokao2023en", "question", lambda r: _strip_dollars(r["answer"]), 1),
    "minerva_math": ("minerva_math", "problem", lambda r: _boxed(r["solution"]), 1),
    "olympiadbench": ("olympiadbench", "question", lambda r: _strip_dollars(r["final_answer"][0]), 1),
    "aime24": ("aime24", "problem", lambda r: str(r["answer"]), 16),
    "aime25": ("aime25", "problem", lambda r: str(r["answer"]), 16),
    "amc23": ("amc23", "problem", lambda r: _number(r["answer"]), 16),
}


PROMPT_FILE = "prompt.json"  # written by train.py next to the model it saves: the prompt it was trained with


def prompt_settings(model_path: str, system_prompt: str | None = None, user_template: str | None = None):
    """(system prompt, user template): the flags if given, else what the model was trained with (its
    prompt.json), else the paper's."""
    saved = {}
    path = os.path.join(model_path, PROMPT_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    return (saved.get("system_prompt", SYSTEM_PROMPT) if system_prompt is None else system_prompt,
            saved.get("user_template", USER_TEMPLATE) if user_template is None else user_template)


def load_benchmark(name: str, problem_key: str = "problem", answer_key: str = "answer", keep=()):
    """(problems, no_gold): problems is a list of {"id", "problem", "answer"}, one per row, plus the fields named
    in `keep` that the row has (e.g. "level"). A row with an empty gold answer (two in Gaokao-EN 2023) is kept
    with answer "" and scores 0, so the denominator is the benchmark's size, as in the paper's Table 1 (Gaokao:
    51.43 = 198/385); `no_gold` counts them. `name` is a key of BENCHMARKS or a path to a jsonl/json/parquet
    file with `problem_key`/`answer_key`."""
    if name in BENCHMARKS:
        folder, problem_key, gold, _ = BENCHMARKS[name]
        path = os.path.join(BENCH_DIR, folder, "test.jsonl")
    elif os.path.isfile(name):
        path = name
        gold = lambda r: str(r[answer_key])  # noqa: E731
    else:
        raise ValueError(f"unknown benchmark {name!r}: not a file, nor one of {', '.join(BENCHMARKS)}")
    problems, no_gold = [], 0
    for i, row in enumerate(read_rows(path)):
        if problem_key not in row or not str(row[problem_key]).strip():
            raise ValueError(f"{path}: row {i + 1} has no {problem_key!r}")
        try:
            answer = gold(row).strip()
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"{path}: row {i + 1} has no usable gold answer") from None
        no_gold += not answer  # scored 0 by reward.score, kept in the denominator
        problems.append({"id": i, "problem": str(row[problem_key]), "answer": answer,
                         **{k: row[k] for k in keep if k in row and row[k] is not None}})
    if not problems:
        raise ValueError(f"{path}: no problems in it")
    return problems, no_gold


def build_prompt(tokenizer, problem: str, system_prompt: str = SYSTEM_PROMPT, user_template: str = USER_TEMPLATE):
    """The paper's prompt through the tokenizer's chat template -> token ids."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": user_template.format(problem=problem)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_at_k(answers: list, scores: list[float], k: int) -> float:
    """maj@k: the most frequent extracted answer among the first k samples (ties: first seen) is
    correct. Samples without an extractable answer do not vote."""
    votes = [(a, s) for a, s in zip(answers[:k], scores[:k]) if a is not None]
    if not votes:
        return 0.0
    top = Counter(a for a, _ in votes).most_common(1)[0][0]
    return next(s for a, s in votes if a == top)


def summarize(scores_per_problem: list[list[float]], answers_per_problem: list[list] | None = None) -> dict:
    """pass@1 (mean over samples and problems, i.e. avg@n), pass@k and maj@k for k = n."""
    n = min(len(s) for s in scores_per_problem)
    out = {"pass@1": float(np.mean([np.mean(s) for s in scores_per_problem])), "n": n,
           "problems": len(scores_per_problem)}
    if n > 1:
        out[f"pass@{n}"] = float(np.mean([pass_at_k(len(s), int(sum(s)), n) for s in scores_per_problem]))
        if answers_per_problem is not None:
            out[f"maj@{n}"] = float(np.mean([majority_at_k(a, s, n)
                                             for a, s in zip(answers_per_problem, scores_per_problem)]))
    return out


def markdown_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """rows: model -> {benchmark: accuracy in [0, 1]}; numbers in percent like Table 1, plus Avg."""
    head = "| model | " + " | ".join(columns) + " | Avg. |\n|---|" + "---|" * (len(columns) + 1) + "\n"
    lines = []
    for model, accs in rows.items():
        vals = [accs.get(c) for c in columns]
        avg = np.mean(vals) if all(v is not None for v in vals) else None
        cells = [f"{100 * v:.2f}" if v is not None else "-" for v in vals + [avg]]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Evaluation (also called by train.py for periodic validation)


def stop_setting(model_path: str, stop_at_im_end: bool | None = None) -> bool:
    """Whether responses also stop at <|im_end|>: the flag if given, else what the model was trained with (its
    prompt.json, written by train.py from rollout.stop_at_im_end), else False: the tokenizer's EOS only, as the
    released pipeline's rollouts (PAPER.md section 8.4). One rule for training, its evaluations and Table 1."""
    path = os.path.join(model_path, PROMPT_FILE)
    if stop_at_im_end is None and os.path.isfile(path):
        with open(path) as f:
            stop_at_im_end = json.load(f).get("stop_at_im_end")
    return bool(stop_at_im_end)


def evaluate_problems(model, tokenizer, problems, *, n_samples: int, max_new_tokens: int, temperature: float,
                      top_p: float, seed: int = 0, max_batch_tokens: int = 1 << 20, rank: int = 0,
                      world_size: int = 1, workers: int = 0, timeout: float = 10.0,
                      system_prompt: str = SYSTEM_PROMPT, user_template: str = USER_TEMPLATE,
                      stop_at_im_end: bool = False, should_stop=None, progress: str = "", cache: str = "dynamic"):
    """Generate n_samples per problem for this rank's shard (problems rank, rank + W, ...) and score
    them. Returns a list of per-problem records {"id", "answer", "responses", "scores", "unscored"} for the shard;
    "unscored": the samples the checker never scored (reward.Scores.unscored; their score is a placeholder 0).
    A problem's samples are keyed by (seed, its id, the sample's index) (rollout.sample_tokens), so they do not
    depend on the number of ranks nor on which rank evaluates it.
    cache: rollout.generate's KV cache (paged: continuous batching, the fastest on a GPU for long samples of mixed
    lengths, seeded but not bitwise reproducible)."""
    import rollout

    shard = problems[rank::world_size]
    if not shard:
        return []
    prompts = [build_prompt(tokenizer, p["problem"], system_prompt, user_template) for p in shard]
    eos = rollout.stop_token_ids(tokenizer, model, stop_at_im_end)
    out = rollout.generate(model, prompts, n_samples, max_new_tokens=max_new_tokens, eos_ids=eos,
                           pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                           seed=seed, prompt_keys=[p["id"] for p in shard], max_batch_tokens=max_batch_tokens,
                           should_stop=should_stop, progress=progress, cache=cache)
    texts = out.texts(tokenizer)
    golds = [shard[i]["answer"] for i in out.prompt_index.tolist()]
    scores = reward.score_batch(texts, golds, workers=workers, timeout=timeout)
    records, unscored = [], set(scores.unscored)
    for j, p in enumerate(shard):
        k = slice(j * n_samples, (j + 1) * n_samples)
        records.append({"id": p["id"], "answer": p["answer"], "responses": texts[k], "scores": list(scores[k]),
                        "extracted": [reward.extract_boxed(t) for t in texts[k]],
                        "unscored": [b - k.start for b in range(k.start, k.stop) if b in unscored]})
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local path or hub id")
    ap.add_argument("--name", default=None, help="row name in the table (default: the model path)")
    ap.add_argument("--benchmarks", default="all", help="'all', comma-separated names, or jsonl paths")
    ap.add_argument("--out", default="out/eval")
    ap.add_argument("--max-problems", type=int, default=0, help="first N problems of each benchmark (0: all)")
    ap.add_argument("--samples", type=int, default=0, help="samples per problem (0: the paper's 1 or 16)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--greedy-single", action=argparse.BooleanOptionalAction, default=True,
                    help="greedy decoding for benchmarks evaluated with one sample")
    ap.add_argument("--max-new-tokens", type=int, default=3072)
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 20)
    ap.add_argument("--cache", choices=["dynamic", "slots", "paged"], default="dynamic",
                    help="rollout.generate's KV cache: dynamic (HF generate), slots (our decode loop: CUDA graphs on a "
                    "GPU; the same samples as dynamic) or paged (continuous batching; seeded, not bitwise "
                    "reproducible). Not a setting of the results: a resumed evaluation may change it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--system-prompt", default=None,
                    help="default: the model's prompt.json (written by train.py), else the paper's")
    ap.add_argument("--user-template", default=None, help="with {problem}; default as --system-prompt")
    ap.add_argument("--stop-at-im-end", action=argparse.BooleanOptionalAction, default=None,
                    help="also stop at <|im_end|>; default: as the model was trained (its prompt.json), else no "
                    "(EOS only, as the released pipeline and train.py's rollout.stop_at_im_end)")
    args = ap.parse_args()
    names = list(BENCHMARKS) if args.benchmarks == "all" else args.benchmarks.split(",")
    loaded = {}
    for name in names:  # before the model loads: a wrong name or an empty file fails at once
        problems, no_gold = load_benchmark(name)
        loaded[name] = (problems[:args.max_problems] if args.max_problems else problems, no_gold)
    system_prompt, user_template = prompt_settings(args.model, args.system_prompt, args.user_template)
    stop_at_im_end = stop_setting(args.model, args.stop_at_im_end)

    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "RANK" in os.environ:  # gloo for the records gathered as objects (CPU), NCCL for CUDA tensors
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    row_name = args.name or args.model
    results = summary.setdefault(row_name, {})
    bar = tqdm(total=sum(len(p) for p, _ in loaded.values()), disable=rank != 0, desc="problems", unit="problem")
    done, correct = 0, 0.0
    for name in names:
        key = os.path.splitext(os.path.basename(name))[0]
        problems, no_gold = loaded[name]
        n = args.samples or (BENCHMARKS[name][3] if name in BENCHMARKS else 1)
        temperature = 0.0 if (n == 1 and args.greedy_single) else args.temperature
        settings = {"model": args.model, "max_problems": args.max_problems, "samples": n, "temperature": temperature,
                    "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                    "system_prompt": system_prompt, "user_template": user_template, "stop_at_im_end": stop_at_im_end,
                    "sampling": "keyed by problem"}  # results sampled per rank before 2026-12-06 are redone
        if results.get(key, {}).get("settings") == settings:
            bar.update(len(problems))
            continue  # finished earlier with exactly these settings: resume
        records = evaluate_problems(model, tokenizer, problems, n_samples=n, max_new_tokens=args.max_new_tokens,
                                    temperature=temperature, top_p=args.top_p, seed=args.seed, rank=rank,
                                    world_size=world, max_batch_tokens=args.max_batch_tokens, timeout=args.timeout,
                                    system_prompt=system_prompt, user_template=user_template,
                                    stop_at_im_end=stop_at_im_end, cache=args.cache)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        records.sort(key=lambda r: r["id"])
        stats = summarize([r["scores"] for r in records], [r["extracted"] for r in records])
        stats.update(no_gold=no_gold, max_problems=args.max_problems, temperature=temperature, settings=settings,
                     unscored=sum(len(r["unscored"]) for r in records))
        if stats["unscored"]:  # a lost checker worker, three times over: counted as 0 above, said here
            print(f"warning: {key}: {stats['unscored']} responses could not be scored (their checker worker was "
                  "lost); they count as 0 in the table (summary.json: unscored)")
        results[key] = stats
        done += len(records)
        correct += sum(float(np.mean(r["scores"])) for r in records)
        bar.update(len(records))
        bar.set_postfix(last=f"{key} {100 * stats['pass@1']:.1f}", running_acc=f"{100 * correct / max(done, 1):.1f}")
        if rank == 0:
            with open(os.path.join(args.out, f"{key}.jsonl"), "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
    if rank == 0:
        columns = [os.path.splitext(os.path.basename(n))[0] for n in names]
        table = markdown_table({m: {b: s["pass@1"] for b, s in r.items()} for m, r in summary.items()}, columns)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table)
        print(table)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
