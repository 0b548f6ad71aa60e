"""The models of a run: the policy (the HF causal LM plus a chunked log-prob head), the frozen KL reference,
the plain copy generation runs on, FSDP2 sharding, and the gather of the sharded policy into that copy once
per generation phase.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import grpo
from infra.config import Config


class Policy(torch.nn.Module):
    """The HF causal LM plus a chunked log-prob head, so that FSDP2's root (this module) owns the
    embeddings and lm_head and the (B, T, V) logits are never materialised."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, src, tgt, temperature: float = 1.0, chunk: int = 2048,
                position_ids=None):
        """input_ids (b, L); src, tgt (N,) flat indices into the b * L positions: returns logp and entropy
        (N,) of token tgt[j] under the distribution computed at position src[j] (usually tgt[j] - 1).
        attention_mask: (b, L) padding mask, None for packed rows (position_ids restarting at 0 for each
        sequence; transformers keeps the sequences apart), or a custom (b, 1, L, L) mask (make_micro_batches)."""
        hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state  # (b, L, d)
        return grpo.token_logprobs(hidden.flatten(0, 1)[src], self.hf.lm_head.weight, input_ids.flatten()[tgt],
                                   temperature, chunk)  # (N,), (N,)


def build_models(cfg: Config, device, world: int):
    """Policy (FSDP2-sharded when distributed), frozen reference (only if kl_coef > 0) and the plain
    model used for generation (the policy itself when not sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    for key, value in vars(hf_config).items():  # train mode must not mean dropout: logp and old_logp comparable
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(hf_config, key, 0.0)

    def load(dtype):  # every copy in eval mode (from_pretrained's); update_policy switches the policy to train
        return AutoModelForCausalLM.from_pretrained(cfg.model.path, config=hf_config, dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)

    sharded = dist.is_initialized()
    policy = Policy(load(torch.float32)).eval()
    if cfg.model.gradient_checkpointing:  # active in train mode only, i.e. in update_policy's passes
        enable = getattr(policy.hf, "activation_checkpointing_enable", None)  # the name from transformers 5.24
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = Policy(load(torch.float32)).requires_grad_(False).eval() if cfg.train.kl_coef > 0 else None
    if sharded:
        for m in (policy, ref):
            if m is not None:
                shard_model(m, device, cfg.train.cpu_offload)
        gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = load(gen_dtype).to(device).eval()
    else:
        policy.to(device)
        if ref is not None:
            ref.to(device)
        gen = policy.hf
    return policy, ref, gen


def shard_model(model: Policy, device, cpu_offload: bool = False):
    """FSDP2: shard each decoder layer, then the root; bf16 compute with fp32 master weights and fp32
    gradient reduction on GPU (fp32 throughout on CPU). cpu_offload: the shards live in CPU memory, are
    copied to the GPU layer by layer for the all-gather, gradients go back to the CPU and AdamW steps there."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    kw = {"mp_policy": mp, "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload
          else OffloadPolicy()}
    if not cpu_offload:
        model.to(device)
    for layer in model.hf.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


@torch.no_grad()
def sync_generation_weights(policy: Policy, gen):
    """Gather the sharded policy once per generation phase into the plain generation model: one
    all-gather per parameter (peak memory: one full parameter), never per decoded token. Every rank walks
    the parameters in the same order. No-op when the policy is not sharded."""
    if gen is policy.hf:
        return
    target = dict(gen.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor shard -> full tensor
        target[name.removeprefix("hf.")].copy_(full)


@contextlib.contextmanager
def train_mode(policy: Policy):
    """The policy in train mode for the update passes only (so gradient checkpointing, which transformers
    applies only while training, is active), back in eval mode after: the log-prob passes and, unsharded,
    generation (which turns its KV cache off for a checkpointing model in train mode) run in eval mode.
    build_models zeroes every dropout rate, so the two modes compute the same function."""
    policy.train()
    try:
        yield
    finally:
        policy.eval()
