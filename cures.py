"""CurES: which prompts to train on, and how many rollouts each gets (arXiv 2510.01037).

Read with the paper open (`PAPER.md` sections 1-4). Everything here is numpy in, numpy out, except
`gradient_stats` at the bottom (torch, for the `sigma: gradient` variant of Eq. 21).

    p_i      current policy's accuracy on prompt i, estimated by Beta(alpha_i, beta_i)     Eq. 22
    rho*     softmax(sqrt(p(1-p)) / tau) over all prompts of the current subset           Eq. 14
    sigma_i  std of prompt i's gradient estimate                                           Eq. 21
    n_i      N * sigma_i / sum_j sigma_j rollouts for prompt i of the sampled batch         Eq. 20
    update   alpha_i += #correct, beta_i += #wrong after every rollout                      Eq. 23

Choices the paper leaves open (also in the README's deviation table):
- `n_i` is rounded by largest remainder after clamping to [n_min, n_max] so that sum n_i = N exactly;
  n_min = 2 by default because a group of one has no group-relative advantage.
- The prior is Beta(0, 0) by default: the cold-start counts alone initialise the estimate, as the paper
  describes (the authors' code adds Beta(1, 1)). A prompt never observed reads as p = 0.5.
- `tau` is not reported in the paper; the default (0.1) is discussed in the README.
"""

from __future__ import annotations

import contextlib

import numpy as np

# ----------------------------------------------------------------------------------------------
# Pure formulas


def _check_prob(p: np.ndarray, name: str = "p") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1] (no NaN)")
    return p


def sampling_probs(p: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 14: rho*(x_i) = exp(sqrt(p_i(1-p_i)) / tau) / sum_j exp(sqrt(p_j(1-p_j)) / tau).

    p: (P,) accuracies in [0, 1]; returns (P,) probabilities summing to 1. Stable for any tau > 0
    (log-sum-exp: the largest logit is subtracted before exp). Prompts with p = 0 or 1 keep a non-zero
    probability (soft weighting, no hard filter)."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    p = _check_prob(p)
    if p.size == 0:
        raise ValueError("p is empty")
    logits = np.sqrt(p * (1.0 - p)) / tau  # (P,)
    logits -= logits.max()  # (P,) log-sum-exp shift
    probs = np.exp(logits)  # (P,)
    return probs / probs.sum()  # (P,)


def sigma_from_accuracy(p: np.ndarray) -> np.ndarray:
    """The free approximation of Eq. 21: sigma_i = sqrt(p_i (1 - p_i)).

    With equal expected squared gradient norms for correct and wrong responses, E||g||^2 = c, and the
    mean-difference term dropped, Eq. 21 reads sigma^2 = c [p(1-p)^2 + p^2(1-p)] = c p(1-p). The constant
    c cancels in Eq. 20 (n_i is proportional to sigma_i), so sqrt(p(1-p)) is enough. p: (P,) -> (P,)."""
    p = _check_prob(p)
    return np.sqrt(p * (1.0 - p))  # (P,)


def sigma_from_grad_stats(p, sq_norm_correct, sq_norm_wrong, sq_norm_mean_diff) -> np.ndarray:
    """Eq. 21 exactly:

        sigma^2 = p (1-p)^2 E_c||g||^2 + p^2 (1-p) E_w||g||^2 - p^2 (1-p)^2 ||E_c[g] - E_w[g]||^2

    All arguments (P,). The difference can dip below zero through estimation noise; it is clipped at 0
    before the square root."""
    p = _check_prob(p)
    stats = [np.asarray(x, dtype=np.float64) for x in (sq_norm_correct, sq_norm_wrong, sq_norm_mean_diff)]
    for name, x in zip(("sq_norm_correct", "sq_norm_wrong", "sq_norm_mean_diff"), stats):
        if x.shape != p.shape:
            raise ValueError(f"{name} has shape {x.shape}, p has {p.shape}")
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError(f"{name} must be finite and >= 0")
    sq_c, sq_w, sq_d = stats
    q = 1.0 - p
    var = p * q**2 * sq_c + p**2 * q * sq_w - p**2 * q**2 * sq_d  # (P,) Eq. 21
    return np.sqrt(np.clip(var, 0.0, None))  # (P,)


def _water_fill(sigma: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Real-valued x_i = clip(lambda * sigma_i, n_min, n_max) with sum x = budget (proportional where
    the bounds allow). Each pass fixes the side whose violations dominate: if the mass above n_max exceeds
    the mass missing below n_min, lambda can only grow, so the prompts above n_max stay there (and vice
    versa). At most P passes."""
    x = np.zeros_like(sigma)
    free = np.ones(sigma.shape, dtype=bool)
    while free.any():
        rest = budget - x[~free].sum()
        w = sigma[free]
        share = rest * (w / w.sum() if w.sum() > 0 else np.full(w.shape, 1.0 / w.size))
        excess = np.clip(share - n_max, 0, None).sum()
        deficit = np.clip(n_min - share, 0, None).sum()
        if excess == 0 and deficit == 0:
            x[free] = share
            break
        idx = np.flatnonzero(free)
        fix = idx[share > n_max] if excess >= deficit else idx[share < n_min]
        x[fix] = n_max if excess >= deficit else n_min
        free[fix] = False
    return x


def allocate_rollouts(sigma: np.ndarray, budget: int, n_min: int = 2, n_max: int | None = None) -> np.ndarray:
    """Eq. 20: n_i = N sigma_i / sum_j sigma_j, as integers.

    sigma: (P,) >= 0; returns (P,) int64 with sum == budget and n_min <= n_i <= n_max. The paper gives
    no rounding rule; ours (a choice): clamp the proportional split to the bounds (water-filling), then
    floor and hand the remaining units to the largest remainders (ties: lower index first). All-zero
    sigma gives the uniform split."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 1 or sigma.size == 0:
        raise ValueError(f"sigma must be a non-empty 1-D array, got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("sigma must be finite and >= 0")
    budget, n_min = int(budget), int(n_min)
    n_max = budget if n_max is None else int(n_max)
    P = sigma.size
    if n_min < 0 or n_max < n_min:
        raise ValueError(f"need 0 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    if P * n_min > budget or P * n_max < budget:
        raise ValueError(f"cannot split budget {budget} over {P} prompts with {n_min} <= n_i <= {n_max}")
    x = _water_fill(sigma, budget, n_min, n_max)  # (P,) real-valued target
    n = np.clip(np.floor(x + 1e-9), n_min, n_max).astype(np.int64)  # (P,)
    rem = x - n  # (P,) in about [0, 1)
    left = budget - int(n.sum())
    if left > 0:  # largest remainders get one more
        order = np.argsort(-np.where(n < n_max, rem, -np.inf), kind="stable")
        n[order[:left]] += 1
    elif left < 0:  # float round-off only: take back from the smallest remainders
        order = np.argsort(np.where(n > n_min, rem, np.inf), kind="stable")
        n[order[:-left]] -= 1
    return n


# ----------------------------------------------------------------------------------------------
# The curriculum state: Beta counts over the prompts of the current data subset


class Curriculum:
    """Per-prompt Beta posteriors (Eq. 22-23) with sampling (Eq. 14) and allocation (Eq. 20).

    Ablation switches:
      sampling   'cures' (Eq. 14) | 'uniform'
      allocation 'cures' (Eq. 20) | 'uniform'          ('uniform'/'uniform' is the GRPO baseline)
      sigma      'accuracy' (sqrt(p(1-p))) | 'gradient' (Eq. 21 with stats from `gradient_stats`)
    """

    def __init__(self, num_prompts: int, prior_alpha: float = 0.0, prior_beta: float = 0.0, tau: float = 0.1,
                 sampling: str = "cures", allocation: str = "cures", sigma: str = "accuracy",
                 n_min: int = 2, n_max: int | None = None):
        for name, value, allowed in (("sampling", sampling, ("cures", "uniform")),
                                     ("allocation", allocation, ("cures", "uniform")),
                                     ("sigma", sigma, ("accuracy", "gradient"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if prior_alpha < 0 or prior_beta < 0:
            raise ValueError("Beta prior counts must be >= 0")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.prior_alpha, self.prior_beta, self.tau = float(prior_alpha), float(prior_beta), float(tau)
        self.sampling, self.allocation, self.sigma_mode = sampling, allocation, sigma
        self.n_min, self.n_max = int(n_min), n_max
        self.reset(num_prompts)

    def reset(self, num_prompts: int | None = None) -> None:
        """New data subset (Algorithm 1, line 2): forget all estimates."""
        n = len(self.alpha) if num_prompts is None else int(num_prompts)
        if n <= 0:
            raise ValueError(f"num_prompts must be > 0, got {n}")
        self.alpha = np.full(n, self.prior_alpha)
        self.beta = np.full(n, self.prior_beta)
        self.grad_stats = None  # (3, P) for sigma='gradient': E_c||g||^2, E_w||g||^2, ||E_c g - E_w g||^2

    def __len__(self) -> int:
        return len(self.alpha)

    def accuracy(self) -> np.ndarray:
        """Eq. 22: posterior mean alpha / (alpha + beta); 0.5 where nothing is known yet. (P,)"""
        total = self.alpha + self.beta
        return np.divide(self.alpha, total, out=np.full(total.shape, 0.5), where=total > 0)

    def _check_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError("indices must be a 1-D integer array")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"prompt index out of range [0, {len(self)})")
        return indices

    def observe(self, indices, n_correct, n_total) -> None:
        """Eq. 23: alpha_i += #correct, beta_i += #wrong. Indices may repeat (sampling is with
        replacement): np.add.at accumulates every occurrence."""
        indices = self._check_indices(indices)
        n_correct, n_total = np.asarray(n_correct, dtype=np.float64), np.asarray(n_total, dtype=np.float64)
        if not (indices.shape == n_correct.shape == n_total.shape):
            raise ValueError(f"shapes differ: indices {indices.shape}, n_correct {n_correct.shape}, "
                             f"n_total {n_total.shape}")
        if np.any(n_correct < 0) or np.any(n_correct > n_total):
            raise ValueError("need 0 <= n_correct <= n_total")
        np.add.at(self.alpha, indices, n_correct)
        np.add.at(self.beta, indices, n_total - n_correct)

    def set_grad_stats(self, indices, sq_norm_correct, sq_norm_wrong, sq_norm_mean_diff) -> None:
        """Store the gradient statistics of Eq. 21 (measured at cold start) for `sigma='gradient'`."""
        indices = self._check_indices(indices)
        if self.grad_stats is None:
            self.grad_stats = np.zeros((3, len(self)))
        self.grad_stats[:, indices] = np.stack([sq_norm_correct, sq_norm_wrong, sq_norm_mean_diff])

    def probs(self) -> np.ndarray:
        """rho* over all prompts of the subset (Eq. 14), or uniform. (P,)"""
        if self.sampling == "uniform":
            return np.full(len(self), 1.0 / len(self))
        return sampling_probs(self.accuracy(), self.tau)

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        """Algorithm 1, line 12: m prompt indices drawn with replacement from rho*. Deterministic for a
        given generator state, so every rank draws the same batch. (m,) int64"""
        if self.sampling == "uniform":
            return rng.integers(0, len(self), size=m)
        cdf = np.cumsum(self.probs())  # (P,) inverse-CDF sampling: O(P + m log P)
        return np.minimum(np.searchsorted(cdf, rng.random(m) * cdf[-1], side="right"), len(self) - 1)

    def sigma(self, indices) -> np.ndarray:
        """sigma_i of Eq. 21 for the given prompts, with the current posterior mean as p. (m,)"""
        indices = self._check_indices(indices)
        p = self.accuracy()[indices]
        if self.sigma_mode == "accuracy":
            return sigma_from_accuracy(p)
        if self.grad_stats is None:
            raise RuntimeError("sigma='gradient' needs set_grad_stats() after the cold start")
        return sigma_from_grad_stats(p, *self.grad_stats[:, indices])

    def allocate(self, indices, budget: int) -> np.ndarray:
        """Eq. 20 over the sampled batch (repeats count separately): (m,) ints summing to budget."""
        indices = self._check_indices(indices)
        if self.allocation == "uniform":
            return allocate_rollouts(np.zeros(len(indices)), budget, self.n_min, self.n_max)
        return allocate_rollouts(self.sigma(indices), budget, self.n_min, self.n_max)

    def stats(self) -> dict:
        """Curriculum statistics for the metrics line (slash-namespaced)."""
        p, rho = self.accuracy(), self.probs()
        hist = np.histogram(p, bins=5, range=(0.0, 1.0))[0] / len(p)
        out = {"cures/acc_mean": float(p.mean()), "cures/frac_solved": float(np.mean(p == 1.0)),
               "cures/frac_unsolved": float(np.mean(p == 0.0)),
               "cures/eff_prompts": float(1.0 / np.sum(rho**2))}  # effective number of prompts of rho*
        out.update({f"cures/acc_hist_{i}": float(h) for i, h in enumerate(hist)})
        return out

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.copy(), "beta": self.beta.copy(),
                "grad_stats": None if self.grad_stats is None else self.grad_stats.copy(),
                "config": {"prior_alpha": self.prior_alpha, "prior_beta": self.prior_beta, "tau": self.tau,
                           "sampling": self.sampling, "allocation": self.allocation, "sigma": self.sigma_mode,
                           "n_min": self.n_min, "n_max": self.n_max}}

    def load_state_dict(self, state: dict) -> None:
        alpha, beta = np.asarray(state["alpha"], dtype=np.float64), np.asarray(state["beta"], dtype=np.float64)
        if alpha.shape != beta.shape or alpha.ndim != 1:
            raise ValueError("alpha and beta must be 1-D arrays of equal length")
        self.alpha, self.beta = alpha.copy(), beta.copy()
        gs = state.get("grad_stats")
        if gs is not None and np.shape(gs) != (3, len(alpha)):
            raise ValueError(f"grad_stats has shape {np.shape(gs)}, not (3, {len(alpha)}): one column per prompt")
        self.grad_stats = None if gs is None else np.asarray(gs, dtype=np.float64).copy()


# ----------------------------------------------------------------------------------------------
# Gradient statistics for Eq. 21 (sigma='gradient'), measured on the cold-start responses


def lm_head_gram(hidden, weight, targets, segment, num_responses: int, temperature: float = 1.0,
                 chunk: int = 512, extra=None):
    """Gram matrix K[a, b] = <g_a, g_b> of per-response gradients of sum_t log pi(y_t) with respect to
    the output projection W (V, d), exactly, built one slice of the vocabulary at a time: the norms and
    mean difference of Eq. 21 are read off it by `stats_from_gram`.

    For a linear output layer g_a = sum_{t in a} (onehot(y_t) - pi_t) h_t^T / temperature. When W is tied to
    the input embeddings (Qwen2.5-Math-1.5B), the gradient of the shared matrix also has an input part,
    sum_{t in a} onehot(x_t) delta_t^T with delta_t = d log pi(y) / d (input embedding at t): pass it as
    `extra` = (tokens (K,), response id (K,), vectors (K, d)); `gradient_stats` computes it. For rows
    v0..v1 of W, every response's gradient slice (R, Vc, d) is formed and <slice_a, slice_b> added to K.

    hidden (L, d): final hidden states at the positions that predict the response tokens of one prompt,
    all responses concatenated; targets (L,); segment (L,) response id in [0, R). Cost: 3 L V d flops
    (a log-sum-exp pass, then the slices); memory O(chunk * V): a slice is sized so that its (L, Vc)
    probabilities and (R, Vc, d) gradients each hold at most chunk * V numbers. Returns (R, R) float64."""
    import torch

    h = hidden.float()  # (L, d)
    w = weight.float()  # (V, d)
    (L, d), V, R = h.shape, w.shape[0], num_responses
    # (L,) normaliser of pi_t. Written into one preallocated tensor: a list of small results kept alive
    # between the (chunk, V) temporaries fragments the CPU heap (measured: +400 MB peak instead of +50 MB).
    lse = torch.empty(L, device=h.device)
    for i in range(0, L, chunk):
        lse[i:i + chunk] = torch.logsumexp((h[i:i + chunk] @ w.T).div_(temperature), -1)
    # sparse part of every g_a: onehot(token) vector^T entries (token, response, vector)
    tok, seg, vec = targets.long(), segment.long(), h / temperature  # (K,), (K,), (K, d)
    if extra is not None:
        tok, seg, vec = torch.cat([tok, extra[0].long()]), torch.cat([seg, extra[1].long()]), torch.cat([vec, extra[2].float()])
    Vc = max(1, chunk * V // max(L, R * d, 1))
    rows = [segment == a for a in range(R)]  # (L,) positions of each response
    gram = torch.zeros(R, R, dtype=torch.float64, device=h.device)
    for v0 in range(0, V, Vc):
        v1 = min(V, v0 + Vc)
        probs = (h @ w[v0:v1].T).div_(temperature).sub_(lse[:, None]).exp_()  # (L, Vc) pi_t over this slice
        g = torch.stack([-(probs[r].T @ h[r]) / temperature for r in rows])  # (R, Vc, d)
        inside = (tok >= v0) & (tok < v1)
        g.index_put_((seg[inside], tok[inside] - v0), vec[inside], accumulate=True)  # + onehot(token) vector^T
        g = g.flatten(1).double()  # (R, Vc * d)
        gram += g @ g.T  # (R, R)
    return gram


def stats_from_gram(gram, correct) -> tuple[float, float, float]:
    """The three statistics of Eq. 21 from the Gram matrix of one prompt's response gradients.

    E_c||g||^2 = mean of K[a, a] over correct a; E_w||g||^2 likewise over wrong a;
    ||E_c[g] - E_w[g]||^2 = u^T K u with u = 1_c / n_c - 1_w / n_w. When all responses are correct (or all
    wrong) only one norm is observed: it stands in for both and the mean difference is 0 (a choice; p is
    then 0 or 1 at cold start and sigma is 0 either way, Eq. 21)."""
    import torch

    correct = torch.as_tensor(correct, dtype=torch.bool, device=gram.device)
    diag = gram.diagonal()
    n_c, n_w = int(correct.sum()), int((~correct).sum())
    sq_c = float(diag[correct].mean()) if n_c else None
    sq_w = float(diag[~correct].mean()) if n_w else None
    if sq_c is None or sq_w is None:
        same = sq_c if sq_w is None else sq_w
        return same, same, 0.0
    u = correct.double() / n_c - (~correct).double() / n_w  # (R,)
    return sq_c, sq_w, max(float(u @ gram @ u), 0.0)


GRAM_LOGP_CHUNK = 512  # tokens per log-prob chunk in gradient_stats: (512, V) fp32 temporaries, not (2048, V)


@contextlib.contextmanager
def _frozen(model):
    """Every parameter without requires_grad while the block runs (restored after): a backward for input
    gradients only then saves no layer input for a weight gradient."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_stats(model, prompt_ids, responses, correct, param: str = "lm_head", temperature: float = 1.0):
    """Eq. 21's statistics for one prompt: (E_c||g||^2, E_w||g||^2, ||E_c[g] - E_w[g]||^2), with
    g(y) = d/d theta sum_t log pi(y_t | x, y_<t) restricted to a parameter subset.

    param='lm_head': the output projection, closed form via `lm_head_gram` (one forward pass for all
    responses, no backward). Any other value: the parameters whose name contains it (e.g. 'embed_tokens',
    the authors' choice), exact but one backward pass per response.
    prompt_ids: list[int]; responses: list of list[int]; correct: list[bool]."""
    import torch

    device = next(model.parameters()).device
    seqs = [list(prompt_ids) + list(r) for r in responses]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)  # (R, T) right-padded
    attn = torch.zeros_like(ids)
    for a, s in enumerate(seqs):
        ids[a, :len(s)] = torch.tensor(s)
        attn[a, :len(s)] = 1
    P = len(prompt_ids)
    if param == "lm_head":
        W = model.lm_head.weight  # (V, d)
        pos = [(a, t) for a, r in enumerate(responses) for t in range(P - 1, P - 1 + len(r))]
        rows, cols = torch.tensor(pos, device=device).T  # (L,) (L,) positions predicting response tokens
        targets = ids[rows, cols + 1]  # (L,)
        if W is not model.get_input_embeddings().weight:  # untied: the output part is the whole gradient
            with torch.no_grad():
                hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (R, T, d)
            gram = lm_head_gram(hidden[rows, cols], W.detach(), targets, rows, len(responses), temperature)
            return stats_from_gram(gram, correct)
        # tied (Qwen2.5-Math-1.5B): also the input part, delta_t = d log pi(y_a) / d embedding at t. One response
        # at a time (row a's embeddings reach only row a's log-prob) with the parameters frozen (no layer keeps
        # its input for a weight gradient) and a small log-prob chunk: the pass holds one response's
        # activations, not N' responses' (measured: bench/results/grad_stats_memory.md)
        import grpo

        hid, extra = [], ([], [], [])
        with _frozen(model):
            for a, r in enumerate(responses):
                x = ids[a:a + 1, :len(seqs[a])]  # (1, T_a) no padding
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)  # (1, T_a, d)
                h = model.model(inputs_embeds=emb).last_hidden_state[0, P - 1:P - 1 + len(r)]  # (n_a, d)
                logp, _ = grpo.token_logprobs(h, W.detach(), x[0, P:], temperature, chunk=GRAM_LOGP_CHUNK)
                (delta,) = torch.autograd.grad(logp.sum(), emb)  # (1, T_a, d)
                hid.append(h.detach())
                for part, value in zip(extra, (x[0], torch.full_like(x[0], a), delta[0])):
                    part.append(value)
        with torch.no_grad():
            gram = lm_head_gram(torch.cat(hid), W.detach(), targets, rows, len(responses), temperature,
                                extra=tuple(torch.cat(part) for part in extra))
        return stats_from_gram(gram, correct)
    params = [p for name, p in model.named_parameters() if param in name]
    if not params:
        raise ValueError(f"no parameter name contains {param!r}")
    grads = []
    for a, r in enumerate(responses):  # one backward per response
        logits = model(input_ids=ids[a:a + 1], attention_mask=attn[a:a + 1]).logits[0].float() / temperature
        logp = torch.log_softmax(logits[P - 1:P - 1 + len(r)], -1).gather(-1, ids[a, P:P + len(r), None]).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)]).double())
    G = torch.stack(grads)  # (R, |theta_subset|)
    return stats_from_gram(G @ G.T, correct)
