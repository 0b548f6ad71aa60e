"""Supervised pre-training of the bundled tiny model to partial competence on the addition task.

The answer format is the one the RL prompt asks for, `\\boxed{<sum>}`, and the prompt goes through the
chat template like the paper's, but without the paper's long system prompt and user suffix (configs/tiny.yaml
sets the same): a character-level model would spend most of its compute reading them. RL starts from a
model that knows the format but not the harder sums.

Fresh problems are drawn for every batch (never one of the held-out test set). A 0.6M-parameter model does
not learn each level gradually: its accuracy on 2-digit sums sits near 10 % for thousands of steps and then
climbs to ~100 % within about a thousand (3-digit sums follow much later). Training stops in the middle of
that climb (`--stop-when 2:0.5`: greedy accuracy on 100 fresh validation 2-digit sums reaches 50 %), so the
model starts RL near-perfect on 1-digit sums, half-way on 2-digit ones (about a third at temperature 1),
near zero on 3 and 4 digits: the spread of difficulty a curriculum needs, with room for RL to finish a
half-learned skill within CPU minutes. Options for other starting points: `--label-smoothing` (probability
mass on wrong tokens, i.e. a gap between greedy and sampled accuracy) and `--noise` (per level, a fraction
of supervised answers with one digit changed).

    python tiny/pretrain.py            # writes models/tiny (about 7 minutes on 2 CPU cores)

The arith continuum testbed's model (`--task arith`: sums and differences of 1- to 3-digit operands, tiny/make_data.py)
is made by the same recipe, model and schedule, stopped in the middle of its climb, when greedy accuracy on 100
fresh validation problems of the whole task (`--stop-when 0:0.3`, level 0 meaning all levels) reaches 30 %:

    python tiny/pretrain.py --task arith       # writes models/arith (about 8 minutes on 2 CPU cores)

The sums task (`--task sums`, the arith task with sums only; a candidate continuum testbed whose pilots did not pass,
bench/results/arith_v2) is pretrained by the same recipe.
"""

import argparse
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from eval import PROMPT_FILE, build_prompt  # noqa: E402
from tiny.build import build_model, build_tokenizer  # noqa: E402
from tiny.make_data import DATA_DIR, OPS, arith_problem, arith_splits, arith_validation, problem  # noqa: E402


SYSTEM_PROMPT, USER_TEMPLATE = "", "{problem}"  # as in configs/tiny.yaml


def encode(tok, row):
    p = build_prompt(tok, row["problem"], SYSTEM_PROMPT, USER_TEMPLATE)
    r = tok(f"\\boxed{{{row['answer']}}}", add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p, r


def corrupt(row, rate, gen):
    """With probability `rate`, the same problem with one digit of the answer changed."""
    if float(torch.rand(1, generator=gen)) >= rate:
        return row
    answer = list(row["answer"])
    i = int(torch.randint(0, len(answer), (1,), generator=gen))
    answer[i] = str((int(answer[i]) + int(torch.randint(1, 10, (1,), generator=gen))) % 10)
    return {**row, "answer": "".join(answer)}


@torch.no_grad()
def row_accuracy(model, tok, rows, temperature=0.0, n=1) -> list[float]:
    """Per row, the share of its n responses (greedy at temperature 0) that score 1."""
    import rollout
    import reward

    prompts = [build_prompt(tok, r["problem"], SYSTEM_PROMPT, USER_TEMPLATE) for r in rows]
    out = rollout.generate(model, prompts, n, max_new_tokens=16, eos_ids=[tok.eos_token_id],
                           pad_id=tok.pad_token_id, temperature=temperature)
    texts = out.texts(tok)
    return [sum(reward.score(t, r["answer"]) for t in texts[i * n:(i + 1) * n]) / n for i, r in enumerate(rows)]


def by_level(rows, scores) -> dict:
    """Mean score of the rows of each level, levels in order."""
    acc = {}
    for r, s in zip(rows, scores):
        acc.setdefault(r["level"], []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def accuracy_by_level(model, tok, rows, temperature=0.0, n=1):
    return by_level(rows, row_accuracy(model, tok, rows, temperature, n))


def greedy_accuracy(model, tok, rows) -> list[float]:
    """row_accuracy (greedy) in the middle of training: eval mode for the measurement, then back."""
    model.eval()
    scores = row_accuracy(model, tok, rows)
    model.train()
    return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["add", "arith", "sums"], default="add")
    ap.add_argument("--out", default=None, help="default: models/tiny (add), models/arith or models/sums")
    ap.add_argument("--steps", type=int, default=5000, help="length of the one-cycle lr schedule")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--level-weights", default="0.25,0.35,0.3,0.1", help="add: sampling weight of each level "
                    "(arith and sums draw their problems as tiny/make_data.py does)")
    ap.add_argument("--report-every", type=int, default=0, help="steps between held-out reports (0: end only)")
    ap.add_argument("--test", default=None, help="the held-out split (default: data/<tiny|arith|sums>/test.jsonl)")
    ap.add_argument("--noise", default="0,0,0,0", help="per level: fraction of corrupted answers")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--stop-when", default=None, help="LEVEL:ACC, stop once greedy accuracy at LEVEL (0: the whole "
                    "task) on 100 fresh validation problems (not the test set) reaches ACC; checked every 100 steps; "
                    "'' never (default 2:0.5 for add, 0:0.3 for arith and sums)")
    ap.add_argument("--also-save", action="append", default=[], metavar="ACC:DIR",
                    help="also save the model to DIR when the stopping rule's validation accuracy first reaches ACC "
                         "(the model a run stopping there would have written; repeatable)")
    args = ap.parse_args()
    name = DATA_DIR[args.task]
    if args.stop_when is None:
        args.stop_when = "2:0.5" if args.task == "add" else "0:0.3"
    args.out = args.out or os.path.join(HERE, "..", "models", name)
    args.test = args.test or os.path.join(HERE, "..", "data", name, "test.jsonl")
    draw = stream_draw(args.task)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    tok = build_tokenizer()
    model = build_model(tok, hidden=128, layers=3, heads=4, kv_heads=2, intermediate=384)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    weights = [float(w) for w in args.level_weights.split(",")]
    noise = [float(x) for x in args.noise.split(",")]
    # Fresh problems every batch, never one of the held-out test set (RL's training prompts may appear).
    test = [json.loads(line) for line in open(args.test)]
    held_out = {r["problem"] for r in test}
    rng = random.Random(100)
    if args.stop_when:
        stop_level, stop_acc = int(args.stop_when.split(":")[0]), float(args.stop_when.split(":")[1])
        val_rng = random.Random(7)
        if args.task != "add":  # distinct, in the training split's level mix (issue 37)
            val = arith_validation(held_out, arith_splits(ops=OPS[args.task])[0], ops=OPS[args.task])
        else:
            val = [r for r in (draw(val_rng, stop_level) for _ in range(120)) if r["problem"] not in held_out][:100]
    also = sorted((float(a.split(":", 1)[0]), a.split(":", 1)[1]) for a in args.also_save)
    saved = []  # (dir, steps done) of the --also-save copies, reported at the end (a report draws random numbers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))  # >= 2 warm-up steps
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        levels = torch.multinomial(torch.tensor(weights), args.batch, replacement=True, generator=gen)
        rows = []
        for lv in levels.tolist():
            row = draw(rng, lv + 1)
            while row["problem"] in held_out:
                row = draw(rng, lv + 1)
            rows.append(corrupt(row, noise[lv], gen))
        pairs = [encode(tok, r) for r in rows]
        L = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), L), tok.pad_token_id)
        labels = torch.full((len(pairs), L), -100)
        for i, (p, r) in enumerate(pairs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, label_smoothing=args.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        if args.report_every and step % args.report_every == 0 and step:
            print("greedy held-out accuracy by level:", by_level(test, greedy_accuracy(model, tok, test)), flush=True)
        if args.stop_when and step % 100 == 0 and step:
            scores = [s for r, s in zip(val, greedy_accuracy(model, tok, val)) if stop_level in (0, r["level"])]
            acc = sum(scores) / len(scores)
            print(f"validation level {stop_level}: {acc:.2f}", flush=True)
            while also and acc >= also[0][0]:  # the model this run would have stopped at, with that threshold
                save(model, tok, also[0][1])
                saved.append((also.pop(0)[1], step + 1, round(time.time() - t0)))
            if acc >= stop_acc:
                break
    save(model, tok, args.out)
    root = os.path.dirname(HERE)
    for out, steps_done, seconds in saved + [(args.out, step + 1, round(time.time() - t0))]:
        report(out, test, {**vars(args), "out": os.path.relpath(out, root), "test": os.path.relpath(args.test, root),
                           "steps_done": steps_done, "seconds": seconds})


def save(model, tok, out: str):
    model.save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, PROMPT_FILE), "w") as f:  # eval.py prompts the model as it was trained
        json.dump({"system_prompt": SYSTEM_PROMPT, "user_template": USER_TEMPLATE}, f, indent=1)


def stream_draw(task: str):
    """draw(rng, level) -> a problem of the pretraining stream: the add task's of that level; arith and sums draw
    from the whole task (the level is ignored). bench/pretrain_coverage.py replays the stream with it."""
    return problem if task == "add" else (lambda rng, level: arith_problem(rng, OPS[task]))


def report_rows(test: list[dict], task: str = "add") -> list[dict]:
    """The held-out test set plus, for the add task, 100 fresh problems (fixed seed) of each level it lacks (the
    arith task's held-out split has every level; the sums task's lacks level 1, all 100 of whose sums are in
    train, and its reports go without it)."""
    if task != "add":
        return test
    rng = random.Random(8)
    return test + [problem(rng, lv) for lv in (1, 2, 3, 4) if lv not in {r["level"] for r in test} for _ in range(100)]


def level_accuracies(model, tok, rows, samples: int):
    """(greedy, sampled at T=1 with `samples` each) accuracy by level, seeded."""
    torch.manual_seed(0)
    return accuracy_by_level(model, tok, rows), accuracy_by_level(model, tok, rows, temperature=1.0, n=samples)


def report(out: str, test: list[dict], args: dict):
    """Accuracy by level of the files as users load them (from_pretrained): greedy and at temperature 1
    (4 samples each) on the held-out test set, plus 100 fresh problems of each level it lacks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    acc, sampled = level_accuracies(model, tok, report_rows(test, args["task"]), samples=4)
    print("accuracy by level, greedy:", acc, "sampled (T=1, 4 each):", sampled)
    with open(os.path.join(out, "pretrain_report.json"), "w") as f:
        json.dump({"args": args, "greedy_accuracy_by_level": acc, "sampled_accuracy_by_level": sampled,
                   "levels_held_out": sorted({r["level"] for r in test})}, f, indent=1)


if __name__ == "__main__":
    main()
