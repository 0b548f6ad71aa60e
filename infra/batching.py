"""A mini-batch's sequences (prompt + response) packed into micro-batches for the log-prob and update passes:
balanced by tokens, the same number on every rank, in one of three layouts (padded rows, one packed row,
or one row per prompt shared by its responses). The log-probs do not depend on the layout (tested).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from infra.config import Config, micro_batch_layout
from infra.distributed import all_reduce


SHARED_ROW_RESPONSES = 8  # the "shared" layout's responses per row (the paper's N / m)


def make_micro_batches(seqs: list[dict], num: int, pad_id: int, layout: str = "padded"):
    """Split sequences into exactly `num` micro-batches balanced by tokens (sorted by length to limit
    padding); an empty one gets a dummy row with no target token (every FSDP rank must run the same number
    of forward/backward passes). Each: ids (b, L), attn, pos, src and tgt (N,) flat indices into the
    (b * L) positions (the hidden state at src predicts the token at tgt), rows (indices into seqs, in the
    order of the targets) and sizes (target tokens of each row's sequence).
    layout "padded": one right-padded row per sequence (attn marks real tokens, pos None).
    layout "packed": all sequences of the micro-batch in one row of exactly their total length, no padding
    (attn None, pos restarts at 0 per sequence; transformers keeps the sequences apart).
    layout "shared": one row per prompt, its tokens once, then up to SHARED_ROW_RESPONSES of its responses
    (a larger group takes several rows), with a (b, 1, L, L) boolean mask that lets a response see the
    prompt and itself only, and pos continuing from the prompt for every response: the prompt's forward
    (and its backward) is shared by its n rollouts. The same log-probs as the padded layout, at
    Lp + sum(l_i) tokens instead of n * Lp + sum(l_i)."""
    if layout not in ("padded", "packed", "shared"):
        raise ValueError(f"unknown micro-batch layout {layout!r}")
    if layout == "shared":  # a unit is a prompt with its responses, at most SHARED_ROW_RESPONSES of them
        groups = {}
        for i, s in enumerate(seqs):
            groups.setdefault(tuple(s["ids"][:s["prompt_len"]]), []).append(i)
        units = []
        for g in groups.values():  # a large group in near-equal rows: attention cost grows with the square
            k = math.ceil(len(g) / SHARED_ROW_RESPONSES)
            units += [g[j::k] for j in range(k)]
        size = lambda u: seqs[u[0]]["prompt_len"] + sum(seqs[i]["resp_len"] for i in u)  # noqa: E731
    else:
        units = [[i] for i in range(len(seqs))]
        size = lambda u: len(seqs[u[0]]["ids"])  # noqa: E731
    total = sum(size(u) for u in units)
    cuts, acc, cur = [], 0, []
    for u in sorted(units, key=size):
        cur.append(u)
        acc += size(u)
        if acc >= total * (len(cuts) + 1) / num and len(cuts) < num - 1:
            cuts.append(cur)
            cur = []
    cuts.append(cur)
    cuts += [[] for _ in range(num - len(cuts))]
    batches = []
    for mb_units in cuts:
        rows = [i for u in mb_units for i in u]
        if not rows:
            batches.append({"ids": torch.full((1, 2), pad_id), "attn": torch.ones(1, 2, dtype=torch.long),
                            "pos": None, "src": torch.tensor([0]), "tgt": torch.tensor([1]), "rows": [],
                            "sizes": []})  # one token, weighted 0
            continue
        if layout == "shared":
            batches.append(_shared_rows(seqs, mb_units, pad_id))
            continue
        lengths = [len(seqs[i]["ids"]) for i in rows]
        if layout == "packed":
            ids = torch.tensor([t for i in rows for t in seqs[i]["ids"]])[None]  # (1, P)
            pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, P)
            attn, starts = None, list(itertools.accumulate(lengths, initial=0))[:-1]  # flat start of each sequence
        else:
            L = max(lengths)
            ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
            attn, pos, starts = torch.zeros_like(ids), None, [r * L for r in range(len(rows))]
            for r, i in enumerate(rows):
                ids[r, :lengths[r]] = torch.tensor(seqs[i]["ids"])
                attn[r, :lengths[r]] = 1
        tgt = torch.cat([starts[r] + torch.arange(seqs[i]["prompt_len"], lengths[r]) for r, i in enumerate(rows)])
        # (N,) response tokens; each is predicted by the position before it
        batches.append({"ids": ids, "attn": attn, "pos": pos, "src": tgt - 1, "tgt": tgt, "rows": rows,
                        "sizes": [seqs[i]["resp_len"] for i in rows]})
    return batches


def _shared_rows(seqs: list[dict], units: list[list[int]], pad_id: int) -> dict:
    """The "shared" layout of make_micro_batches: row r = prompt + responses of units[r], right-padded."""
    L = max(seqs[u[0]]["prompt_len"] + sum(seqs[i]["resp_len"] for i in u) for u in units)
    ids = torch.full((len(units), L), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    seg = torch.full_like(ids, -1)  # -1 padding, 0 prompt, k > 0 the k-th response
    src, tgt = [], []
    for r, u in enumerate(units):
        lp = seqs[u[0]]["prompt_len"]
        ids[r, :lp] = torch.tensor(seqs[u[0]]["ids"][:lp])
        pos[r, :lp], seg[r, :lp] = torch.arange(lp), 0
        start = lp
        for k, i in enumerate(u, 1):
            n = seqs[i]["resp_len"]
            ids[r, start:start + n] = torch.tensor(seqs[i]["ids"][lp:])
            pos[r, start:start + n], seg[r, start:start + n] = torch.arange(lp, lp + n), k
            at = r * L + torch.arange(start, start + n)  # (n,) flat positions of this response
            src.append(torch.cat([torch.tensor([r * L + lp - 1]), at[:-1]]))  # the last prompt token, then each
            tgt.append(at)
            start += n
    query, key = seg[:, :, None], seg[:, None, :]  # (b, L, 1), (b, 1, L) segment of each position
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal & (query >= 0) & ((key == 0) | (key == query))  # a response sees the prompt and itself
    mask |= torch.eye(L, dtype=torch.bool) & (query < 0)  # padding sees itself (no empty softmax row)
    return {"ids": ids, "attn": mask[:, None], "pos": pos, "src": torch.cat(src), "tgt": torch.cat(tgt),
            "rows": [i for u in units for i in u], "sizes": [seqs[i]["resp_len"] for u in units for i in u]}


def num_micro_batches(seqs, micro_batch_tokens: int) -> int:
    """Micro-batches needed on this rank, maxed over ranks."""
    tokens = sum(len(s["ids"]) for s in seqs)
    n = torch.tensor([max(1, math.ceil(tokens / micro_batch_tokens))])
    return int(all_reduce(n, dist.ReduceOp.MAX if dist.is_initialized() else None).item())


def plan_micro_batches(seqs: list[dict], cfg: Config):
    """This rank's micro-batches of a mini-batch: as many as the token budget needs on the busiest rank,
    in the layout the config asks for."""
    return make_micro_batches(seqs, num_micro_batches(seqs, cfg.train.micro_batch_tokens), 0,
                              micro_batch_layout(cfg))
