"""cures.py against hand-computed values, slow references and brute-force gradients."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cures
from cures import Curriculum, allocate_rollouts, sampling_probs, sigma_from_accuracy, sigma_from_grad_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Eq. 14 -------------------------------------------------------------------------------------

def test_sampling_probs_hand_computed():
    p = np.array([0.0, 0.5, 1.0])
    e = np.exp(0.5 / 0.25)  # sqrt(0.25) / tau
    np.testing.assert_allclose(sampling_probs(p, 0.25), np.array([1, e, 1]) / (2 + e))


def test_sampling_probs_stable_for_tiny_tau_and_large_size():
    p = np.random.default_rng(0).random(1_000_000)
    probs = sampling_probs(p, 1e-6)
    assert np.all(np.isfinite(probs)) and abs(probs.sum() - 1) < 1e-9
    assert probs.argmax() == np.argmin(np.abs(p - 0.5))
    np.testing.assert_allclose(sampling_probs(p[:10], 1e6), np.full(10, 0.1), rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(p=[0.5], tau=0.0), dict(p=[0.5], tau=-1), dict(p=[1.5], tau=1),
                                 dict(p=[np.nan], tau=1), dict(p=[-0.1], tau=1), dict(p=[], tau=1)])
def test_sampling_probs_bad_input(bad):
    with pytest.raises(ValueError):
        sampling_probs(np.array(bad["p"]), bad["tau"])


# --- Eq. 21 -------------------------------------------------------------------------------------

def test_sigma_hand_computed():
    np.testing.assert_allclose(sigma_from_accuracy(np.array([0.0, 0.5, 0.2, 1.0])), [0, 0.5, 0.4, 0])
    # p = 0.5: 0.125 * 4 + 0.125 * 2 - 0.0625 * 1 = 0.6875
    np.testing.assert_allclose(sigma_from_grad_stats(np.array([0.5]), [4.0], [2.0], [1.0]), [np.sqrt(0.6875)])
    # the difference term can exceed the rest: clipped to 0
    assert sigma_from_grad_stats(np.array([0.5]), [0.1], [0.1], [100.0])[0] == 0.0


def test_sigma_grad_stats_reduces_to_accuracy_form():
    p = np.linspace(0, 1, 11)
    c = np.full(11, 3.0)
    np.testing.assert_allclose(sigma_from_grad_stats(p, c, c, np.zeros(11)), np.sqrt(3.0) * sigma_from_accuracy(p))


def test_sigma_bad_input():
    with pytest.raises(ValueError):
        sigma_from_grad_stats(np.array([0.5]), [-1.0], [1.0], [0.0])
    with pytest.raises(ValueError):
        sigma_from_grad_stats(np.array([0.5, 0.5]), [1.0], [1.0], [0.0])


# --- Eq. 20 -------------------------------------------------------------------------------------

def test_allocate_hand_computed():
    np.testing.assert_array_equal(allocate_rollouts(np.array([1.0, 1.0, 2.0]), 8, 0), [2, 2, 4])
    np.testing.assert_array_equal(allocate_rollouts(np.array([1.0, 1.0, 1.0]), 8, 0), [3, 3, 2])
    np.testing.assert_array_equal(allocate_rollouts(np.zeros(4), 8, 2), [2, 2, 2, 2])
    # clamping: proportional would be [0, 0, 12]; n_min = 2 and n_max = 6 move mass to the others
    np.testing.assert_array_equal(allocate_rollouts(np.array([0.0, 0.0, 1.0]), 12, 2, 6), [3, 3, 6])
    np.testing.assert_array_equal(allocate_rollouts(np.array([0.0, 1.0, 3.0]), 12, 2, 12), [2, 3, 7])


def _reference_allocation(sigma, budget, n_min, n_max):
    """Slow and obvious: bisect lambda for sum clip(lambda sigma) = budget, then add one rollout at a
    time to the prompt furthest below its real-valued target."""
    if sigma.sum() == 0:
        sigma = np.ones_like(sigma)
    saturated = np.where(sigma > 0, n_max, n_min)
    if saturated.sum() < budget:  # the zero-sigma prompts must take the rest: evenly
        zero = sigma == 0
        target = np.where(zero, (budget - n_max * (~zero).sum()) / zero.sum(), n_max)
        return _greedy(target, budget, n_min, n_max), target
    lo, hi = 0.0, 1.0
    while np.clip(hi * sigma, n_min, n_max).sum() < budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(mid * sigma, n_min, n_max).sum() < budget else (lo, mid)
    target = np.clip(hi * sigma, n_min, n_max)
    return _greedy(target, budget, n_min, n_max), target


def _greedy(target, budget, n_min, n_max):
    n = np.full(len(target), n_min)
    for _ in range(budget - n.sum()):
        gap = [target[i] - n[i] if n[i] < n_max else -np.inf for i in range(len(target))]
        n[int(np.argmax(gap))] += 1
    return n


def test_allocate_matches_slow_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for trial in range(300):
        P = int(rng.integers(1, 40))
        sigma = rng.random(P) * (rng.random(P) < 0.8)  # some exact zeros
        n_min = int(rng.integers(0, 4))
        n_max = int(rng.integers(n_min + 1, n_min + 20))
        budget = int(rng.integers(P * n_min, P * n_max + 1))
        n = allocate_rollouts(sigma, budget, n_min, n_max)
        ref, target = _reference_allocation(sigma, budget, n_min, n_max)
        assert n.sum() == budget and n.min() >= n_min and n.max() <= n_max, trial
        assert np.all(np.abs(n - target) < 1 + 1e-6), trial
        np.testing.assert_allclose(np.sum((n - target) ** 2), np.sum((ref - target) ** 2), atol=1e-6)


def test_allocation_is_bell_shaped_in_p():
    p = np.linspace(0, 1, 21)
    n = allocate_rollouts(sigma_from_accuracy(p), 21 * 8, 2, 32)
    peak = 10  # p = 0.5
    assert n[peak] == n.max() and n[peak] > n[5] > n[0]
    assert np.all(np.diff(n[:peak + 1]) >= 0) and np.all(np.diff(n[peak:]) <= 0)
    assert n[0] == n[-1] == 2 and n.sum() == 21 * 8


@pytest.mark.parametrize("args", [(np.ones(4), 7, 2, 8), (np.ones(4), 40, 2, 8), (np.array([1.0, np.nan]), 4, 2, 4),
                                  (np.array([1.0, -1.0]), 4, 2, 4), (np.ones(2), 4, 3, 2)])
def test_allocate_bad_input(args):
    with pytest.raises(ValueError):
        allocate_rollouts(*args)


# --- Curriculum ---------------------------------------------------------------------------------

def test_observe_accumulates_repeated_indices():
    cur = Curriculum(4)
    cur.observe(np.array([1, 1, 2, 1]), np.array([2, 1, 0, 3]), np.array([4, 4, 4, 4]))
    np.testing.assert_array_equal(cur.alpha, [0, 6, 0, 0])
    np.testing.assert_array_equal(cur.beta, [0, 6, 4, 0])
    np.testing.assert_allclose(cur.accuracy(), [0.5, 0.5, 0.0, 0.5])  # unobserved reads 0.5


def test_observe_bad_input():
    cur = Curriculum(3)
    with pytest.raises(IndexError):
        cur.observe(np.array([3]), np.array([1]), np.array([2]))
    with pytest.raises(ValueError):
        cur.observe(np.array([0, 1]), np.array([1]), np.array([2]))
    with pytest.raises(ValueError):
        cur.observe(np.array([0]), np.array([3]), np.array([2]))


def test_prior_and_reset():
    cur = Curriculum(2, prior_alpha=1, prior_beta=1)
    cur.observe(np.array([0]), np.array([4]), np.array([4]))
    assert cur.accuracy()[0] == pytest.approx(5 / 6)
    cur.reset(5)
    np.testing.assert_allclose(cur.accuracy(), np.full(5, 0.5))


def test_sample_deterministic_with_replacement_and_follows_rho():
    cur = Curriculum(50, tau=0.1)
    cur.observe(np.arange(50), np.arange(50) % 5, np.full(50, 4))
    a = cur.sample(20000, np.random.default_rng(7))
    b = cur.sample(20000, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) < len(a)  # with replacement
    freq = np.bincount(a, minlength=50) / len(a)
    np.testing.assert_allclose(freq, cur.probs(), atol=0.01)


def test_uniform_switches_are_grpo():
    cur = Curriculum(10, sampling="uniform", allocation="uniform")
    cur.observe(np.arange(10), np.arange(10) % 5, np.full(10, 4))
    np.testing.assert_allclose(cur.probs(), np.full(10, 0.1))
    np.testing.assert_array_equal(cur.allocate(np.arange(4), 32), [8, 8, 8, 8])


def test_allocate_uses_posterior():
    cur = Curriculum(3)
    cur.observe(np.arange(3), np.array([0, 2, 4]), np.array([4, 4, 4]))
    n = cur.allocate(np.array([0, 1, 2, 1]), 16)
    assert n.sum() == 16 and n[0] == n[2] == 2 and n[1] == n[3] == 6


def test_state_round_trip():
    cur = Curriculum(6, sigma="gradient")
    cur.observe(np.arange(6), np.array([0, 1, 2, 3, 4, 2]), np.full(6, 4))
    cur.set_grad_stats(np.arange(6), np.ones(6), 2 * np.ones(6), 0.1 * np.ones(6))
    other = Curriculum(1, sigma="gradient")
    other.load_state_dict(cur.state_dict())
    idx = np.array([1, 2, 2, 5])
    np.testing.assert_array_equal(other.allocate(idx, 20), cur.allocate(idx, 20))
    np.testing.assert_array_equal(other.sample(10, np.random.default_rng(1)), cur.sample(10, np.random.default_rng(1)))


def test_stats_effective_prompts():
    cur = Curriculum(8, sampling="uniform")
    assert cur.stats()["cures/eff_prompts"] == pytest.approx(8)


# --- gradient statistics of Eq. 21 vs brute force ----------------------------------------------------------

def _tiny_model(tied: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def _brute_force_stats(model, prompt, responses, correct, names, temperature=1.0):
    params = [p for n, p in model.named_parameters() if any(k in n for k in names)]
    if not params:  # tied: named_parameters() lists the shared matrix once, as embed_tokens
        params = [model.lm_head.weight]
    grads = []
    for r in responses:
        ids = torch.tensor([prompt + r])
        logits = model(input_ids=ids).logits[0] / temperature
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, ids[0, len(prompt):, None]).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)]).double())
    G = torch.stack(grads)
    c = torch.tensor(correct)
    sq = (G**2).sum(1)
    diff = G[c].mean(0) - G[~c].mean(0)
    return float(sq[c].mean()), float(sq[~c].mean()), float(diff @ diff)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("param", ["lm_head", "embed_tokens"])
def test_gradient_stats_match_brute_force(param, tied):
    """Per-response autograd gradients of the parameter (for a tied model: the one matrix that is both the
    input embedding and the output projection, both parts of its gradient) against gradient_stats."""
    model = _tiny_model(tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    prompt = [3, 5, 7, 11]
    responses = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    correct = [True, False, True, False]
    for temperature in (1.0, 0.7):
        got = cures.gradient_stats(model, prompt, responses, correct, param=param, temperature=temperature)
        want = _brute_force_stats(model, prompt, responses, correct, [param], temperature)
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_gram_memory_is_chunk_by_vocab():
    """lm_head_gram never holds the (L, V) probabilities: L = 4,096 positions over V = 32,768 would be
    512 MB of float32; with chunk=64 the whole call stays within ~100 MB of the process's baseline."""
    code = ("import resource, torch, cures\n"
            "torch.manual_seed(0)\n"
            "L, V, d = 4096, 32768, 8\n"
            "h, w = torch.randn(L, d), torch.randn(V, d) * 0.1\n"
            "y, seg = torch.randint(0, V, (L,)), torch.arange(L) % 4\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "cures.lm_head_gram(h, w, y, seg, 4, chunk=64)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    # Run under the inherited environment and single-threaded: the CPU heap's fragmentation depends on both
    # (an earlier version kept small results alive between (chunk, V) temporaries: +50 MB in one, +540 MB
    # in the other).
    for env in (os.environ, {**os.environ, "OMP_NUM_THREADS": "1"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert int(out.stdout.split()[-1]) < 100  # MB above baseline


def test_gram_chunking_invariant():
    torch.manual_seed(1)
    h, w = torch.randn(50, 8), torch.randn(20, 8)
    y, seg = torch.randint(0, 20, (50,)), torch.randint(0, 3, (50,))
    full = cures.lm_head_gram(h, w, y, seg, 3, chunk=1000)
    small = cures.lm_head_gram(h, w, y, seg, 3, chunk=7)
    # float64 out, float32 inside: chunks change the float32 summation order (3.6e-7 relative on an AMD EPYC)
    torch.testing.assert_close(full, small, rtol=1e-5, atol=1e-6)
    assert cures.stats_from_gram(full, [True, True, True])[2] == 0.0
