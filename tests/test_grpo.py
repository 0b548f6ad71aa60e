"""grpo.py against hand-computed values and slow loop references; split invariance of token_mean."""

import pytest
import torch

from grpo import aggregate, group_advantages, kl_penalty, policy_loss, rpp_advantages, token_logprobs


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 1, 1, 1, 2])
    adv = group_advantages(r, g, eps=0.0)
    s = 2**-0.5  # unbiased std of [1, 0]
    # group 1: mean 1/3, unbiased std sqrt(1/3)
    want = [0.5 / s, -0.5 / s, (2 / 3) / 3**-0.5, (-1 / 3) / 3**-0.5, (-1 / 3) / 3**-0.5, 0.0]
    torch.testing.assert_close(adv, torch.tensor(want))
    torch.testing.assert_close(group_advantages(r, g, norm_by_std=False), torch.tensor([0.5, -0.5, 2 / 3, -1 / 3, -1 / 3, 0]))
    assert torch.all(group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])) == 0)


def _loop_group_advantages(r, g, eps):
    out = torch.zeros_like(r)
    for k in g.unique():
        idx = (g == k).nonzero().flatten()
        if len(idx) == 1:
            continue
        vals = r[idx]
        out[idx] = (vals - vals.mean()) / (vals.std() + eps)
    return out


def test_group_advantages_match_loop_on_random_variable_groups():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = torch.randint(1, 9, (15,), generator=gen)
        g = torch.repeat_interleave(torch.arange(15), sizes)
        g = g[torch.randperm(len(g), generator=gen)]  # groups need not be contiguous
        r = torch.randint(0, 2, (len(g),), generator=gen).float()
        torch.testing.assert_close(group_advantages(r, g), _loop_group_advantages(r, g, 1e-6))


def test_rpp_advantages_match_token_weighted_whitening():
    gen = torch.Generator().manual_seed(1)
    r = torch.randint(0, 2, (10,), generator=gen).float()
    lengths = torch.randint(1, 7, (10,), generator=gen)
    mask = (torch.arange(7)[None] < lengths[:, None]).float()
    tokens = torch.cat([r[i].repeat(int(lengths[i])) for i in range(10)])
    want = (r - tokens.mean()) / (tokens.var(unbiased=True) + 1e-8).sqrt()
    torch.testing.assert_close(rpp_advantages(r, mask), want)


def _loop_policy_loss(logp, old, adv, mask, cl, ch, c):
    total, n = 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            a = adv[b]
            l = max(-a * ratio, -a * min(max(ratio, 1 - cl), 1 + ch))
            if a < 0:
                l = min(l, -a * c)
            total, n = total + l, n + 1
    return total / n


def test_policy_loss_matches_loop_and_dual_clip():
    gen = torch.Generator().manual_seed(2)
    logp = torch.randn(6, 5, generator=gen) * 0.5
    old = logp + torch.randn(6, 5, generator=gen) * 0.5
    old[0, 0] = logp[0, 0] - 5.0  # ratio e^5 on a token with negative advantage: dual clip binds
    adv = torch.tensor([-1.0, 1.0, -0.5, 0.3, 0.0, 2.0])
    mask = (torch.rand(6, 5, generator=gen) > 0.2).float()
    mask[0, 0] = 1
    loss, metrics = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0)
    torch.testing.assert_close(loss, _loop_policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0))
    assert metrics["actor/clip_frac_lower"] >= 1


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "kl"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([0.125, 0.5]))
    d = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), d.exp() - d - 1)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([30.0]), "low_var_kl").item() == 10.0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_token_mean_gradient_invariant_to_micro_and_rank_split():
    """Whole mini-batch vs 3 micro-batches vs 2 simulated ranks (FSDP averages rank gradients)."""
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 6
    theta0 = torch.randn(B, T, generator=gen) * 0.1
    old = torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    total_tokens = mask.sum()

    def grad_of(slices, denom):
        theta = theta0.clone().requires_grad_(True)
        for s in slices:
            loss, _ = policy_loss(theta[s], old[s], adv[s], mask[s], num_tokens=denom)
            loss.backward()
        return theta.grad

    whole = grad_of([slice(0, B)], None)
    micro = grad_of([slice(0, 3), slice(3, 5), slice(5, 8)], total_tokens)
    torch.testing.assert_close(micro, whole)
    world = 2  # each rank divides by global_tokens / world; FSDP then averages over ranks
    ranks = [grad_of([s], total_tokens / world) for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close((ranks[0] + ranks[1]) / world, whole)
    # the naive per-micro-batch mean is NOT invariant (guards against a vacuous test)
    naive = grad_of([slice(0, 3), slice(3, 5), slice(5, 8)], None)
    assert not torch.allclose(naive, whole)


def test_seq_mean_token_mean():
    v = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx(2.0)
    assert aggregate(v, m, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(v, m, "seq_mean_token_mean", num_seqs=4).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(v, m, "sum")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_equal_full_logits(temperature):
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(37, 8, generator=gen, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=gen)
    logp, ent = token_logprobs(h, w, y, temperature, chunk=5)
    full = torch.log_softmax((h @ w.T) / temperature, -1)
    torch.testing.assert_close(logp, full.gather(-1, y[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).detach())
    g1 = torch.autograd.grad(logp.sum(), (h, w))
    g2 = torch.autograd.grad(full.gather(-1, y[:, None]).sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
