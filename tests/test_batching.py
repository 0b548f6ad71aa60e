"""infra/batching.py: every micro-batch layout gives the padded layout's log-probs."""


import pytest
import torch

import train
from infra.batching import make_micro_batches
from infra.config import load_config
from infra.models import Policy


def _per_sequence(policy, batches, cfg):
    """logp and entropy of each sequence (by index into seqs), whatever the layout and row order."""
    out = {}
    for b in batches:
        logp, ent = train.forward_batch(policy, b, torch.device("cpu"), cfg)
        if not b["rows"]:  # a dummy micro-batch (fewer units than micro-batches)
            continue
        for i, lp, e in zip(b["rows"], torch.split(logp, b["sizes"]), torch.split(ent, b["sizes"])):
            out[i] = (lp, e)
    return out


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("num", [1, 3])
def test_micro_batch_layouts_equal_padded(tiny_model_dir, layout, num):
    """No compute on padding (packed) or on repeated prompts (shared): the same log-probs, entropies and
    gradients as one right-padded row per sequence (sdpa here: transformers builds the block-diagonal mask
    of a packed row; flash-attention would use varlen kernels)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config([f"--model.path={tiny_model_dir}", "--train.kl_coef=0"])
    policy = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    seqs = []
    for k, n in enumerate([2, 3, 10, 1]):  # 4 prompts of mixed lengths, responses of mixed lengths (10: two rows)
        prompt = torch.randint(3, 250, (3 + 2 * k,), generator=g).tolist()
        for j in range(n):
            r = 1 + (5 * k + 3 * j) % 9
            seqs.append({"ids": prompt + torch.randint(3, 250, (r,), generator=g).tolist(), "prompt_len": len(prompt),
                         "resp_len": r, "adv": torch.randn(1, generator=g)})
    padded = make_micro_batches(seqs, num, 0, "padded")
    other = make_micro_batches(seqs, num, 0, layout)
    tokens = sum(b["ids"].numel() for b in other)
    if layout == "packed":
        assert all(b["ids"].shape[0] == 1 and b["attn"] is None for b in other)
        assert tokens == sum(len(s["ids"]) for s in seqs)  # not one pad token
    else:
        assert tokens < sum(len(s["ids"]) for s in seqs)  # each prompt once per row
        assert sum(b["ids"].shape[0] for b in other) == 5  # the group of 10 in two rows of 5
    assert sum(b["ids"].numel() for b in padded) > sum(len(s["ids"]) for s in seqs)
    ref, got = _per_sequence(policy, padded, cfg), _per_sequence(policy, other, cfg)
    assert sorted(got) == list(range(len(seqs)))
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i][0], ref[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[i][1], ref[i][1], atol=1e-5, rtol=1e-5)
    grads = []
    for batches in (padded, other):
        policy.zero_grad()
        for b in batches:
            logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
            if not b["rows"]:
                continue
            adv = torch.cat([seqs[i]["adv"].expand(seqs[i]["resp_len"]) for i in b["rows"]])
            (-(logp * adv).sum()).backward()
        grads.append(torch.cat([p.grad.flatten().clone() for p in policy.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
