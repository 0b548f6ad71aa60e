"""The policy-gradient loss the paper trained with (verl's GRPO / REINFORCE++ settings, PAPER.md section 5).

Pure functions over tensors. Shapes: B sequences (responses), T response tokens, V vocabulary,
N packed tokens, d hidden size. `rewards` are per response; `adv` are advantages, never rewards.

    advantage  GRPO: (r - mean_group) / (std_group + eps), unbiased std      group_advantages
               REINFORCE++: rewards whitened over the whole batch           rpp_advantages
    ratio      exp(logp - old_logp)
    loss       PPO clip (low = high = 0.2) with dual clip c = 3 for A < 0    policy_loss
               + 0.001 * low_var_kl(pi, pi_ref) as a loss term              kl_penalty
    aggregate  token_mean: sum over all tokens / tokens of the global mini-batch
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                     norm_by_std: bool = True) -> torch.Tensor:
    """GRPO advantage for groups of any size (CurES gives prompt i its own n_i).

    rewards (B,) float; group_index (B,) long in [0, num_groups). Returns adv (B,):
    (r - mean_g) / (std_g + eps) with the unbiased std (as verl, torch.std), or r - mean_g when
    norm_by_std is False (Dr. GRPO). A group of one has no baseline: its advantage is 0 (verl instead
    uses mean 0, std 1, i.e. adv = r; with n_min >= 2 this never happens in training).
    A group whose rewards are all equal gets 0."""
    rewards = rewards.float()  # (B,)
    group_index = group_index.long()  # (B,)
    G = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(G, device=rewards.device).index_add_(0, group_index, torch.ones_like(rewards))  # (G,)
    mean = torch.zeros(G, device=rewards.device).index_add_(0, group_index, rewards) / count.clamp(min=1)  # (G,)
    centred = rewards - mean[group_index]  # (B,)
    adv = centred
    if norm_by_std:
        sq = torch.zeros(G, device=rewards.device).index_add_(0, group_index, centred**2)  # (G,)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # (G,) unbiased
        adv = centred / (std[group_index] + eps)  # (B,)
    return torch.where(count[group_index] > 1, adv, torch.zeros_like(adv))  # (B,)


def rpp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ advantage (verl's `reinforce_plus_plus`, gamma = 1, no KL in the reward): the return
    of every token is the sequence reward, and the returns are whitened over all response tokens of the
    batch: (r - mean) / sqrt(var + eps) with token-weighted mean and unbiased token-weighted variance.

    rewards (B,); response_mask (B, T). Returns adv (B,), the same for every token of a response."""
    rewards = rewards.float()  # (B,)
    tokens = response_mask.float().sum(-1)  # (B,) each response counts once per token
    n = tokens.sum()
    mean = (rewards * tokens).sum() / n
    var = ((rewards - mean) ** 2 * tokens).sum() / (n - 1).clamp(min=1)
    return (rewards - mean) * torch.rsqrt(var + eps)  # (B,)


# ----------------------------------------------------------------------------------------------
# Losses


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean", num_tokens=None,
              num_seqs=None) -> torch.Tensor:
    """Reduce per-token values (B, T) to a scalar with a named normaliser.

    token_mean: sum(values * mask) / num_tokens; num_tokens defaults to mask.sum() (this micro-batch).
        Pass the token count of the whole mini-batch to make the gradient independent of how it is cut
        into micro-batches; under FSDP (which averages gradients over W ranks) pass
        global_tokens / W, so that the averaged gradient equals sum over all tokens / global_tokens.
    seq_mean_token_mean: mean over sequences of each sequence's token mean; num_seqs likewise."""
    mask = mask.float()
    if agg == "token_mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / denom
    elif agg == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        denom = mask.shape[0] if num_seqs is None else num_seqs
        return per_seq.sum() / denom
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss(logp, old_logp, adv, mask, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float = 3.0,
                agg: str = "token_mean", num_tokens=None, num_seqs=None):
    """PPO clipped surrogate with dual clip (verl's `compute_policy_loss`).

    logp, old_logp, mask (B, T); adv (B,) or (B, T). For A < 0 the loss is also capped at -c * A
    (dual clip, c = clip_c > 1) so a huge ratio on a bad token cannot blow up the step.
    Returns (loss scalar, metrics dict of detached scalars summed over tokens for later averaging)."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)  # (B, T)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T)
    ratio = log_ratio.exp()  # (B, T)
    loss1 = -adv * ratio  # (B, T)
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    clipped = torch.maximum(loss1, loss2)  # (B, T)
    loss3 = -adv * clip_c  # (B, T)
    dual = torch.minimum(clipped, loss3)  # (B, T)
    losses = torch.where(adv < 0, dual, clipped)  # (B, T)
    loss = aggregate(losses, mask, agg, num_tokens, num_seqs)
    m = mask.float()
    with torch.no_grad():
        metrics = {
            "actor/clip_frac": ((loss2 > loss1).float() * m).sum(),
            "actor/clip_frac_lower": ((clipped > loss3) & (adv < 0)).float().mul(m).sum(),
            "actor/approx_kl_old": (-log_ratio * m).sum(),
            "actor/ratio_mean": (ratio * m).sum(),
        }
    return loss, metrics


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (B, T) -> (B, T).

    kl (k1): logp - ref_logp;  mse (k2): (logp - ref_logp)^2 / 2;
    low_var_kl (k3, the paper's setting): exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10]."""
    if kind == "kl":
        return logp - ref_logp
    elif kind == "mse":
        return 0.5 * (logp - ref_logp) ** 2
    elif kind == "low_var_kl":
        d = (ref_logp - logp).clamp(-20.0, 20.0)  # (B, T)
        return (d.exp() - d - 1.0).clamp(-10.0, 10.0)  # (B, T)
    else:
        raise ValueError(f"unknown KL estimator {kind!r}")


# ----------------------------------------------------------------------------------------------
# Log-probabilities without the (B, T, V) float32 logits


def _chunk_logp(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature  # (C, V) one chunk only
    logz = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz  # (C,)
    probs = torch.softmax(logits, dim=-1)  # (C, V)
    entropy = logz - (probs * logits).sum(-1)  # (C,)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 2048):
    """log pi(y_t) and the entropy of pi at each position, with pi = softmax(W h / temperature).

    hidden (N, d): final hidden states at the positions predicting `targets` (N,); weight (V, d).
    Logits exist one chunk of `chunk` tokens at a time; under autograd each chunk is recomputed in the
    backward pass (activation checkpointing), so peak memory is O(chunk * V), not O(N * V).
    Returns (logp (N,) float32, entropy (N,) float32; the entropy carries no gradient)."""
    logps, entropies = [], []
    for i in range(0, hidden.shape[0], chunk):
        args = (hidden[i:i + chunk], weight, targets[i:i + chunk], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            logp, ent = checkpoint(_chunk_logp, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logp(*args)
        logps.append(logp)
        entropies.append(ent.detach())
    if not logps:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(logps), torch.cat(entropies)
