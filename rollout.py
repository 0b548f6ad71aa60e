"""Rollouts with Hugging Face `generate` and its KV cache: token ids in, responses out.

Used for cold starts, training rollouts and evaluation alike. It knows nothing about sharding: the
trainer hands it an ordinary (unsharded) model.

    prompts (list of token-id lists) x n_i rollouts each
      -> sort by prompt length, cut into batches whose KV cache fits `max_batch_tokens`
      -> left-pad, prefill each distinct prompt once for all its rollouts,
         `generate` (stops as soon as every sequence of the batch has finished)
      -> Rollouts: response ids (B, T), response mask (B, T), finished-with-EOS flag (B,)
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor
from transformers.cache_utils import DynamicLayer


class Interrupted(Exception):
    """`generate` was asked to stop: should_stop() returned True (between two of its batches, or inside one)."""


@dataclass
class Rollouts:
    prompt_index: torch.Tensor  # (B,) which prompt each response answers, prompt-major order
    response_ids: torch.Tensor  # (B, T) right-padded with pad_id
    response_mask: torch.Tensor  # (B, T) 1 up to and including the EOS token
    finished: torch.Tensor  # (B,) True where the response ended with EOS (not truncated)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)

    def responses(self) -> list[list[int]]:
        return [ids[:n].tolist() for ids, n in zip(self.response_ids, self.lengths.tolist())]

    @classmethod
    def from_responses(cls, responses: list[list[int]], prompt_index: list[int], finished: list[bool],
                       pad_id: int) -> Rollouts:
        """Rollouts from token lists (each response up to and including its EOS when finished), right-padded."""
        T = max([len(r) for r in responses] + [1])
        ids = torch.full((len(responses), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(responses), T), dtype=torch.long)
        for b, r in enumerate(responses):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
        return cls(torch.tensor(prompt_index, dtype=torch.long), ids, mask, torch.tensor(finished, dtype=torch.bool))

    def texts(self, tokenizer) -> list[str]:
        """The decoded responses, special tokens skipped; none for no rollouts (a rank without prompts:
        transformers < 5.24 decodes an empty batch as [''])."""
        responses = self.responses()
        return tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []


def stop_token_ids(tokenizer, model=None, im_end: bool = True) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's generation_config EOS ids (what the
    authors' vLLM rollout stops at: `<|endoftext|>` for the base Qwen2.5-Math models), plus, with
    `im_end`, the chat template's end-of-turn token `<|im_end|>` when the vocabulary has it (a base model
    prompted through the chat template ends its turn with it and may then run on into a made-up next turn)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end and isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, eos_ids: list[int], pad_id: int,
                    cache: str = "dynamic") -> GenerationConfig:
    """Every field that changes what is sampled, set explicitly: temperature and top-p as given, top-k off,
    no repetition penalty, no min-p / typical / epsilon / eta cutoff, no n-gram ban; temperature 0 is
    greedy. (`generate` fills the fields a config leaves unset from the model's own generation_config, so
    a checkpoint that ships repetition_penalty or top_k would otherwise change our sampling; `generate`
    below also hides the model's config while it runs.)"""
    sample = temperature > 0 and cache == "paged"  # elsewhere KeyedSampling samples and `generate` runs greedy
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0, top_k=0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
        suppress_tokens=None, begin_suppress_tokens=None, min_length=0, min_new_tokens=None, num_beams=1,
        num_return_sequences=1, eos_token_id=list(eos_ids), pad_token_id=pad_id, use_cache=True)


# --- sampling that no batching can change --------------------------------------------------------------------------
# A rollout's random draws are a function of its key (run seed, purpose, subset, step via `seed`; the prompt's key;
# the rollout's index in its group) and the response position only: the same rollout samples the same tokens in
# any batch, slot, chunk or cache (exactly on a CPU; on a GPU up to the kernels' numerics), which is what makes
# rollout.max_batch_tokens / max_batch_size free on resume. One uniform a token, inverse-CDF over the tokens in
# vocabulary order: exact sampling from softmax(logits / T) restricted to top-p.

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit values held in an int64 tensor (every product stays below 2**63)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x1B873593) & _M32
    return x ^ (x >> 16)


def rollout_keys(seed: int, prompt_keys: list[int], rollout_index: list[int]) -> torch.Tensor:
    """(B,) int64: one 32-bit key per rollout from (seed, its prompt's key, its index in the prompt's group).
    seed may be any non-negative Python int (folded 32 bits at a time), a prompt key one below 2**64."""
    def words(v: int) -> list[int]:
        out = [v & _M32]
        while v > _M32:
            v >>= 32
            out.append(v & _M32)
        return out
    h = torch.zeros(len(prompt_keys), dtype=torch.long)
    for i, w in enumerate(words(seed)):
        h = _mix32(h ^ _mix32(torch.full_like(h, w + i * 0x9E3779B9)))
    pk = torch.tensor([[*words(k), 0][:2] for k in prompt_keys], dtype=torch.long).reshape(-1, 2)  # (B, 2)
    h = _mix32(h ^ _mix32(pk[:, 0] + 0x85EBCA6B))
    h = _mix32(h ^ _mix32(pk[:, 1] + 0xC2B2AE35))
    return _mix32(h ^ _mix32(torch.tensor(rollout_index, dtype=torch.long) + 0x27D4EB2F))


def token_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in (0, 1): the uniform draw of rollout `keys` (B,) at response position `positions` (B,), one
    32-bit hash of the two (a resolution of 2.3e-10, finer than the float32 CDF it is compared with)."""
    h = _mix32(keys ^ _mix32(positions + 0x165667B1))  # (B,)
    return (h.double() + 0.5) / 2.0**32


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, temperature: float,
                  top_p: float = 1.0) -> torch.Tensor:
    """One token a row from softmax(logits / temperature), restricted to top-p (the smallest set of most
    probable tokens whose mass reaches top_p, ties broken by vocabulary index, as a stable sort orders them):
    the first token, in vocabulary order, whose cumulative probability exceeds the row's uniform
    (token_uniforms). logits (B, V); keys, positions (B,) int64 -> (B,) int64. temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
        before = p_sorted.cumsum(-1) - p_sorted  # (B, V) mass of the more probable tokens
        probs = probs.scatter(-1, order, p_sorted * (before < top_p))  # (B, V) the nucleus only
    cdf = probs.cumsum(-1)  # (B, V)
    u = (token_uniforms(keys, positions).to(cdf.device) * cdf[:, -1].double()).to(cdf.dtype)  # (B,)
    u = torch.minimum(u, torch.nextafter(cdf[:, -1], torch.zeros_like(u)))  # below the total: a positive token
    token = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)  # (B,)
    # a float32 scan on a GPU can step by an ulp where p = 0, and u can fall in that step: never such a token (the
    # row's most probable one instead: a bias of that ulp's width at most)
    return torch.where(probs.gather(-1, token[:, None])[:, 0] > 0, token, probs.argmax(-1))


class KeyedSampling(LogitsProcessor):
    """A logits processor that makes HF `generate` (run greedy) sample with sample_tokens: each row's token at
    response position (input length - prompt_len) from its key; every other token's score -inf, so greedy
    search picks the sampled one."""

    def __init__(self, keys: torch.Tensor, prompt_len: int, temperature: float, top_p: float):
        self.keys, self.prompt_len, self.temperature, self.top_p = keys, prompt_len, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.keys = self.keys.to(scores.device)  # once
        positions = torch.full_like(self.keys, input_ids.shape[1] - self.prompt_len)  # (b,)
        token = sample_tokens(scores, self.keys, positions, self.temperature, self.top_p)  # (b,)
        return torch.full_like(scores, -float("inf")).scatter(-1, token[:, None], 0.0)


@contextlib.contextmanager
def attention_backends():
    """sdpa without cuDNN's attention while we generate and train (every other backend as it was): on Hopper (and
    newer) torch puts cuDNN first for sdpa (with cuDNN >= 9.15), and cuDNN builds an execution plan for every shape
    it has not seen (its plan cache keys on the batch, the key length and the strides). A decoding step's key
    length is new at every step, and the trainer's micro-batches vary in shape, so each step would pay a plan
    build (tens of ms: bench/results/gpu, 2026-11-29). The flag is process-wide, so threads (continuous batching's
    manager, autograd's) see it too. Nothing changes on a CPU, which has no cuDNN attention."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    if SKIP_CUDNN_ATTENTION:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


SKIP_CUDNN_ATTENTION = True  # False: torch's own choice (bench/gen_in_trainer.py compares the two)
GQA_ATTENTION = "sdpa_gqa"  # the name under which sdpa_gqa_attention is registered with transformers
DECODE_GQA = True  # a model on sdpa decodes with sdpa_gqa_attention (False: transformers' sdpa, for comparisons)


def sdpa_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, except that a decoding step (one query token) reads each KV head once: the g
    query heads that share a KV head attend as g query positions of that head, (b, h, 1, d) -> (b, h_kv, g, d),
    against the cache as it is, (b, h_kv, S, d). transformers' sdpa instead copies the cache g times wide under a
    padding mask (`repeat_kv`: every version under torch.compile, and 5.17 eagerly), which moves g + 1 times the
    bytes attention must read (bench/decode_cost.py). Same arithmetic per head, so the same result up to float
    summation order. Anything else (prefill, training, masks that differ by head) is transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1)
    if query.shape[2] != 1 or groups == 1 or per_head_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, h, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(  # (b, h_kv, g, d)
        query.reshape(b, h // groups, groups, d), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, h, d), None  # heads in the order kv-major, as repeat_kv lays them out


def _register_gqa_attention():
    """Register sdpa_gqa_attention (and sdpa's mask builder) under GQA_ATTENTION, once."""
    _register(GQA_ATTENTION, sdpa_gqa_attention, "sdpa")


def _register(name: str, fn, mask_like: str | None = None):
    """Register `fn` with transformers' attention interface under `name` (and `mask_like`'s mask builder), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, fn)
        if mask_like is not None:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])


TORCH_FLASH = "torch_flash_varlen"  # the name under which paged_varlen_attention is registered (see there)
PAGED_TORCH_FLASH = True  # a paged call on a model not on flash-attention decodes with paged_varlen_attention
#                          (False: transformers' sdpa, which builds a dense mask: 8-23x slower a step, bench/results/gpu)


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None = None, seqused_k=None):
    """Causal attention over packed sequences: q (Tq, h, d), k and v (Tk, h_kv, d), h a multiple of h_kv (GQA);
    sequence i's queries are q[cu_q[i]:cu_q[i+1]], its keys k[cu_k[i]:cu_k[i+1]] (with seqused_k (n,) int32,
    only the first seqused_k[i] of them: the decode loop's slots), and its queries are the last positions of its
    keys (bottom-right causal: a prompt chunk after its cached part, or one decoding token).
    Rows of q past cu_q[-1] (padding) are zeros on the CPU and unspecified on the kernel. -> (Tq, h, d).
    On CUDA (fp16/bf16): torch's own FlashAttention-2 kernel (aten::_flash_attention_forward, what
    torch.nn.attention.varlen calls; no flash-attn package needed): one launch, no host sync (CUDA-graph
    capturable); with max_q = 1 it reads each KV head once for its h / h_kv query heads, with more (the padded
    queries of transformers' graphed steps) once per query head (bench/varlen_check.py measures both). On the CPU:
    varlen_attention_reference, which bench/varlen_check.py holds the kernel to on a GPU."""
    if not q.is_cuda:
        return varlen_attention_reference(q, k, v, cu_q, cu_k, scale, seqused_k)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"varlen_attention on CUDA runs torch's flash kernel, fp16 or bf16 only, not {q.dtype}")
    return torch.ops.aten._flash_attention_forward(q.contiguous(), k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale, seqused_k=seqused_k)[0]


def varlen_attention_reference(q, k, v, cu_q, cu_k, scale: float | None = None, seqused_k=None):
    """varlen_attention as the obvious loop: one sdpa call per sequence, its queries the last positions of its keys
    (the first seqused_k[i] of them, when given)."""
    out = q.new_zeros(q.shape)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    used = None if seqused_k is None else seqused_k.tolist()
    for i in range(len(cq) - 1):
        (q0, q1), (k0, k1) = cq[i:i + 2], ck[i:i + 2]
        k1 = k1 if used is None else k0 + used[i]
        if q1 == q0:
            continue
        nq, nk = q1 - q0, k1 - k0
        allowed = torch.arange(nk, device=q.device)[None] <= torch.arange(nk - nq, nk, device=q.device)[:, None]
        out[q0:q1] = torch.nn.functional.scaled_dot_product_attention(  # (h, nq, d)
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), attn_mask=allowed,
            scale=scale, enable_gqa=True).transpose(0, 1)
    return out


def paged_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Continuous batching's attention (`generate_batch`, rollout.cache=paged) on varlen_attention, for a model
    without the flash-attn package: transformers' paged path on sdpa builds a dense (forward tokens x cache
    tokens) mask and cannot capture CUDA graphs; registered under a name with "flash" in it (TORCH_FLASH),
    transformers builds no mask and captures its graphs, as for flash-attention, and with no version digit in the
    name it does not look for flash-attn's paged decoding kernel: every step takes transformers' varlen path, which
    lists every cached token's place in the cache on the host and gathers each sequence's keys (bench/phase_cost.py
    charges both, bench/cb_host.py measures the first). query (1, h, Tq, d): the forward's tokens packed; key and value: the
    tokens of each sequence so far, gathered from the paged cache, (1, h_kv, Tk, d) or (Tk, h_kv, d);
    cu_seq_lens_q/k and their maxima from the batch (per layer type when the model mixes them)."""
    if getattr(module, "sliding_window", None) or kwargs.get("block_table") is not None or dropout:
        raise ValueError(f"{TORCH_FLASH} is full causal attention over gathered keys: no sliding window, block "
                         "table or dropout (use a flash-attention implementation)")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    max_q = kwargs.get("max_length_q", kwargs.get("max_seqlen_q"))
    max_k = kwargs.get("max_length_k", kwargs.get("max_seqlen_k"))
    if isinstance(cu_k, dict):  # per layer type
        cu_k, max_k = cu_k["full_attention"], max_k["full_attention"]
    if key.dim() == 4:
        key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (Tk, h_kv, d)
    out = varlen_attention(query[0].transpose(0, 1).contiguous(), key.contiguous(), value.contiguous(),
                           cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), scaling)
    return out[None], None  # (1, Tq, h, d), as the flash implementations return it


def _paged_varlen_attention_writing(module, query, key, value, attention_mask, cache=None, **kwargs):
    """paged_varlen_attention for transformers before 5.24, whose continuous batching hands the attention
    function the forward's new keys and values with the cache (as `paged|<name>`): written to the cache and each
    sequence's keys gathered here (the layer does it itself from 5.24)."""
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    return paged_varlen_attention(module, query, key, value, attention_mask, **kwargs)


def _paged_attention(model) -> str:
    """The attention implementation a paged call runs with: the model's own when it is a flash-attention one, when
    flash-attn is installed (transformers then switches a model on sdpa to it itself) or when the model is on
    CUDA in fp32 (torch's flash kernel takes fp16/bf16); else paged_varlen_attention, registered now (no mask
    builder: continuous batching builds none for flash-like attention). transformers before 5.24 runs
    continuous batching on `paged|<name>` and hands that function the new tokens to write into the cache (its
    `update` takes the read and write indices); given the prefixed name already, it keeps it instead of
    re-checking the name for a flash-attn package."""
    from transformers.generation.continuous_batching import PagedAttentionCache
    from transformers.utils import is_flash_attn_2_available

    attn = model.config._attn_implementation
    p = next(model.parameters())
    fp32_cuda = p.is_cuda and p.dtype not in (torch.float16, torch.bfloat16)
    if not PAGED_TORCH_FLASH or "flash" in attn or fp32_cuda or is_flash_attn_2_available():
        return attn
    if "read_index" in inspect.signature(PagedAttentionCache.update).parameters:  # transformers < 5.24
        _register(f"paged|{TORCH_FLASH}", _paged_varlen_attention_writing)
        return f"paged|{TORCH_FLASH}"
    _register(TORCH_FLASH, paged_varlen_attention)
    return TORCH_FLASH


@contextlib.contextmanager
def _generating(model, gqa_attention: bool | None = None, attention: str | None = None):
    """While `generate` runs: the model in eval mode (transformers turns the KV cache off for a model in
    train mode with gradient checkpointing on; the unsharded trainer generates with its policy) and its
    generation_config hidden (a default one in its place), so that no field we left unset is filled from
    the checkpoint's settings; with `gqa_attention` (default DECODE_GQA), a model on sdpa decodes with
    sdpa_gqa_attention; `attention`: another registered implementation to run with instead; sdpa without cuDNN
    (attention_backends). All restored after."""
    saved, training = model.generation_config, model.training
    attn = model.config._attn_implementation
    model.generation_config = GenerationConfig()
    model.eval()
    if attention is not None:
        model.config._attn_implementation = attention
    elif (DECODE_GQA if gqa_attention is None else gqa_attention) and attn == "sdpa":
        _register_gqa_attention()
        model.config._attn_implementation = GQA_ATTENTION
    try:
        with attention_backends():
            yield
    finally:
        model.generation_config = saved
        model.train(training)
        model.config._attn_implementation = attn


def plan_batches(prompt_lens: list[int], max_new_tokens: int, max_batch_tokens: int, max_batch_size: int = 1024):
    """Group sequence indices into batches of similar prompt length whose padded KV cache,
    batch * (longest prompt + max_new_tokens) tokens, stays within max_batch_tokens (at least one
    sequence per batch). Returns a list of index lists, longest prompts first."""
    order = sorted(range(len(prompt_lens)), key=lambda i: -prompt_lens[i])
    batches, cur = [], []
    for i in order:
        longest = prompt_lens[cur[0]] if cur else prompt_lens[i]
        if cur and ((len(cur) + 1) * (longest + max_new_tokens) > max_batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def generate(model, prompts: list[list[int]], n: list[int] | int, *, max_new_tokens: int, eos_ids: list[int],
             pad_id: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             max_batch_tokens: int = 1 << 20, max_batch_size: int = 1024, cache: str = "dynamic",
             share_prefill: bool = True, should_stop=None, progress: str = "",
             prompt_keys: list[int] | None = None) -> Rollouts:
    """n[i] rollouts of prompt i (an int means the same for all). Sampling with temperature and top-p
    (pure sampling: top-k off, no repetition penalty, whatever the model's generation_config says);
    temperature 0 is greedy. Rollout j of prompt i samples with the key (seed, prompt_keys[i] (default i), j)
    (sample_tokens): on the dynamic and slots caches its tokens do not depend on the batching
    (max_batch_tokens, max_batch_size, the other prompts of the call), and a call is independent of the global
    RNG. cache: "dynamic" (HF `generate` with its default KV cache: the reference), "slots" (our decode loop,
    _generate_slots: every rollout the KV budget holds at once, a CUDA graph a step, finished rows replaced by
    waiting ones) or "paged" (transformers' continuous batching,
    `generate_batch`; its scheduler runs in a thread and samples with torch's RNG: seeded, but neither bitwise
    reproducible nor batch-invariant).
    share_prefill (dynamic cache): each distinct prompt of a batch is prefilled once for all its rollouts (the
    slots cache always does).
    should_stop: called before each batch (every SLOT_CHECK_EVERY steps in the decode loop, every
    PAGED_STOP_POLL_S seconds inside a paged call); when it returns True, `Interrupted` is raised (a preempted job
    stops within one batch, or about a second, instead of after the whole phase). progress: a label shows a
    progress bar on stderr (rollouts done of all, tokens/s, ETA), redrawn at most every 30 s when stderr is not a
    terminal."""
    if cache not in ("dynamic", "slots", "paged"):
        raise ValueError(f"cache must be dynamic, slots or paged, not {cache!r}")
    n = [n] * len(prompts) if isinstance(n, int) else list(n)
    if len(n) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(n)} rollout counts")
    seq_prompt = [i for i, k in enumerate(n) for _ in range(k)]  # (B,) prompt-major
    B = len(seq_prompt)
    pk = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    keys = rollout_keys(seed, [pk[p] for p in seq_prompt], [j for k in n for j in range(k)])  # (B,)
    gen_cfg = sampling_config(max_new_tokens, temperature, top_p, eos_ids, pad_id, cache)
    tty = sys.stderr.isatty()  # a log file gets a line every 30 s and the final one, a terminal a live bar
    bar = tqdm(total=B, desc=progress, unit="rollout", disable=not progress, leave=not tty,
               mininterval=0.5 if tty else 30.0)
    if cache == "slots":
        response_ids = _generate_slots(model, prompts, seq_prompt, keys, max_new_tokens, eos_ids, pad_id, temperature,
                                       top_p, max_batch_tokens, max_batch_size, should_stop, bar) if B else \
            torch.full((0, max_new_tokens), pad_id, dtype=torch.long)
        bar.close()
        return _finish(response_ids, seq_prompt, eos_ids, pad_id, max_new_tokens)
    response_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    lens = [len(prompts[p]) for p in seq_prompt]
    chunk = PAGED_CHUNK if cache == "paged" else 1  # paged: one generate_batch per PAGED_CHUNK cache-fulls
    batches = plan_batches(lens, max_new_tokens, chunk * max_batch_tokens, chunk * max_batch_size)
    tokens = 0
    for b, batch in enumerate(batches):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped before batch {b} of {len(batches)}")
        if cache == "paged":
            batch_seed = seed * 1_000_003 + int(keys[batch[0]])  # torch's RNG: a stream per batch, rank and step
            for row, toks in zip(batch, _generate_paged(model, [prompts[seq_prompt[i]] for i in batch], gen_cfg,
                                                        batch_seed, max_batch_tokens, should_stop)):
                response_ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        else:
            gen = _generate_padded(model, [prompts[seq_prompt[i]] for i in batch], [seq_prompt[i] for i in batch],
                                   gen_cfg, keys[batch], temperature, top_p, pad_id, cache, share_prefill, should_stop)
            response_ids[batch, :gen.shape[1]] = gen
        tokens += int((response_ids[batch] != pad_id).sum())
        bar.update(len(batch))
        bar.set_postfix(tokens_per_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
    bar.close()
    return _finish(response_ids, seq_prompt, eos_ids, pad_id, max_new_tokens)


def _generate_padded(model, rows: list[list[int]], prompt_of_row: list[int], gen_cfg: GenerationConfig,
                     keys: torch.Tensor, temperature: float, top_p: float, pad_id: int, cache: str,
                     share_prefill: bool, should_stop=None) -> torch.Tensor:
    """One `generate` call on left-padded rows (prompt token ids): the generated ids (b, t), t <= max_new_tokens.
    `generate` runs greedy over KeyedSampling's scores: each row samples with its key (b,). cache "dynamic":
    kv_cache's, for the prompt and max_new_tokens; share_prefill (dynamic): each distinct prompt (prompt_of_row)
    is prefilled once for all its rows. should_stop is asked after every token (a stopping criterion: a batch
    can be minutes of decoding on a GPU); True ends the call with Interrupted."""
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class StopRequest(StoppingCriteria):  # every row done once should_stop() says so; no effect until then
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (b, L) left-padded
    attn = torch.zeros_like(ids)
    for row, p in enumerate(rows):
        ids[row, L - len(p):] = torch.tensor(p)
        attn[row, L - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    sampling = LogitsProcessorList([KeyedSampling(keys, L, temperature, top_p)])
    with _generating(model):
        extra = {}
        if cache == "dynamic":
            kv = extra[_cache_kwarg(model)] = kv_cache(model, L + gen_cfg.max_new_tokens)
            if share_prefill and L > 1 and len(set(prompt_of_row)) < len(rows):  # some prompt has several rows
                prefill_once_per_prompt(model, ids, attn, prompt_of_row, kv)
        if should_stop is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([StopRequest()])
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg, logits_processor=sampling,
                             **extra)
    if should_stop is not None and should_stop():
        raise Interrupted(f"stopped inside a generate call, {out.shape[1] - L} tokens in")
    return out[:, L:].cpu()


class PreallocatedLayer(DynamicLayer):
    """transformers' DynamicLayer (one decoder layer's KV cache, as `generate` uses it by default), except that each
    step's keys and values are written into buffers allocated for `capacity` tokens when the call starts, and
    attention is handed a view of their filled part. DynamicLayer concatenates the layer's whole cache with the
    new token at every step: it reads and rewrites the cache, twice the bytes attention reads
    (bench/decode_cost.py). The same values (attention reads a strided view), so the same tokens (tested).
    Whatever replaces `keys` from outside (crop's view is kept; batch_select_indices, ...) is honoured: the next
    update copies it into fresh buffers. reorder_cache (the shared prefill's prompts -> rows) writes straight
    into fresh full-size buffers, so the prompts' buffers are freed layer by layer."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self.buffers = None  # (keys, values): (b, kv_heads, capacity, head_dim) each

    def _fresh(self, keys, values, need: int):
        """New buffers for at least `need` tokens (twice that when past the capacity) holding `keys`/`values`
        (b, h, n, d) at their start; keys and values become views of them."""
        if need > self.capacity:
            self.capacity = 2 * need
        b, h, n, d = keys.shape
        self.buffers = (keys.new_empty(b, h, self.capacity, d), values.new_empty(b, h, self.capacity, values.shape[-1]))
        self.buffers[0][:, :, :n].copy_(keys)
        self.buffers[1][:, :, :n].copy_(values)
        self.keys, self.values = self.buffers[0][:, :, :n], self.buffers[1][:, :, :n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q, buf = self.get_seq_length(), key_states.shape[-2], self.buffers
        ours = buf is not None and n > 0 and self.keys.data_ptr() == buf[0].data_ptr() \
            and self.keys.stride() == buf[0].stride() and self.keys.shape[:2] == buf[0].shape[:2]
        if not ours or n + q > self.capacity:  # first update, keys replaced from outside, or full
            self.buffers = None  # freed now unless keys still view them (then after the copy)
            self._fresh(self.keys if n else key_states[:, :, :0], self.values if n else value_states[:, :, :0], n + q)
            buf = self.buffers
        buf[0][:, :, n:n + q].copy_(key_states)
        buf[1][:, :, n:n + q].copy_(value_states)
        self.keys, self.values = buf[0][:, :, :n + q], buf[1][:, :, :n + q]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.keys.device)
            keys, values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
            self.buffers = self.keys = self.values = None  # this layer's old buffers freed first
            self._fresh(keys, values, keys.shape[-2])

    def reset(self) -> None:
        self.buffers = None
        super().reset()


PREALLOCATE = True  # the dynamic path's KV cache: PreallocatedLayer (False: transformers' DynamicLayer, to compare)


def kv_cache(model, capacity: int):
    """The dynamic path's KV cache for `generate`: transformers' DynamicCache with its layer types from the model's
    config (sliding-window layers stay transformers'), full-attention layers preallocated for `capacity` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if PREALLOCATE:
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def prefill_once_per_prompt(model, ids, attn, prompt_of_row: list[int], cache):
    """The KV cache of ids[:, :-1] (left-padded, (b, L)), computed once per distinct prompt and copied to the
    rows of its rollouts; `generate` then starts from the last prompt token. With n rollouts per prompt this
    divides the prefill compute by n (what vLLM's prefix caching does for a group), which matters when
    prompts are long against responses. Position ids as `generate` computes them from the mask. `cache`: an
    empty dynamic cache (kv_cache), filled here and returned."""
    first_row = {}
    for row, p in enumerate(prompt_of_row):
        first_row.setdefault(p, row)
    index = {p: k for k, p in enumerate(first_row)}  # distinct prompts in first-seen order
    first = torch.tensor(list(first_row.values()), device=ids.device)  # (u,) one row per distinct prompt
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)  # (b, L)
    model(input_ids=ids[first, :-1], attention_mask=attn[first, :-1], position_ids=pos[first, :-1],
          use_cache=True, **{_cache_kwarg(model): cache})
    cache.reorder_cache(torch.tensor([index[p] for p in prompt_of_row], device=ids.device))  # (u,) -> (b,)
    return cache


@contextlib.contextmanager
def _seeded(device, seed: int):
    """Sample with torch's RNG (and the device's) seeded to `seed`, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed % 2**63)  # any Python int (derived seeds can exceed 64 bits)
        yield


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _generate_paged(model, inputs: list[list[int]], gen_cfg: GenerationConfig, seed: int,
                    max_batch_tokens: int, should_stop=None) -> list[list[int]]:
    """Continuous batching: one request per rollout (not num_return_sequences, whose children are forked
    from their parent's state), generated tokens in the order of `inputs`; the cache as `paged_cache_config`.
    transformers' manager generates in its own thread while this one collects the finished requests and asks
    `should_stop` every PAGED_STOP_POLL_S seconds: a stop request ends the call within about that (plus the
    forward pass under way), not when the whole chunk is done."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    device = next(model.parameters()).device
    cb = paged_cache_config([len(p) for p in inputs], gen_cfg.max_new_tokens, max_batch_tokens)
    hints = WorkloadHints(max_prompt_length=max(map(len, inputs)), max_generated_length=gen_cfg.max_new_tokens,
                          num_requests=len(inputs))
    results = {}
    with _seeded(device, seed), _generating(model, attention=_paged_attention(model)), \
            model.continuous_batching_context_manager(
                generation_config=gen_cfg, continuous_batching_config=cb, block=True, timeout=5,
                warmup=device.type == "cuda", workload_hints=hints) as manager:
        ids = manager.add_requests(inputs=inputs, max_new_tokens=gen_cfg.max_new_tokens)
        while len(results) < len(ids):
            if should_stop is not None and should_stop():  # pending requests dropped, not flushed to their end
                manager.stop(block=True, timeout=30, hard_stop=True)
                raise Interrupted(f"stopped with {len(results)} of {len(ids)} requests of a paged call done")
            result = manager.get_result(timeout=PAGED_STOP_POLL_S)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"continuous batching stopped with {len(results)} of {len(ids)} requests done")
            elif result.is_finished():
                results[result.request_id] = result
    failed = [i for i in ids if results[i].error is not None]
    if failed:
        raise RuntimeError(f"continuous batching failed on requests {failed[:5]}: {results[failed[0]].error}")
    return [results[i].generated_tokens[:gen_cfg.max_new_tokens] for i in ids]


PAGED_STOP_POLL_S = 1.0  # how often a paged call asks should_stop while the manager generates
PAGED_FORWARD_TOKENS = 8192  # tokens per continuous-batching forward, as the authors' vLLM
PAGED_CHUNK = 4  # requests per continuous-batching call: 4 KV budgets' worth at full length


def paged_cache_config(prompt_lens: list[int], max_new_tokens: int, max_batch_tokens: int, page: int = 256):
    """Continuous batching's cache: what all requests need at once (whole pages of `page` tokens), capped by
    the KV budget `max_batch_tokens`; PAGED_FORWARD_TOKENS per forward. Left to itself,
    transformers sizes the cache from free memory (most of the RAM on a CPU), and with sdpa the paged path
    also builds a dense (forward tokens x cache tokens) mask."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    need = sum(-(-(n + max_new_tokens) // page) for n in prompt_lens) * page
    cache_tokens = max(page, min(max_batch_tokens, need))
    page_kwarg = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else \
        "block_size"  # transformers < 5.24
    return ContinuousBatchingConfig(**{page_kwarg: page}, num_blocks=-(-cache_tokens // page),
                                    max_batch_tokens=min(PAGED_FORWARD_TOKENS, cache_tokens))


# --- the decode loop of our own (cache="slots") ---------------------------------------------------------------------
# gpt-fast's shape around transformers' model: a KV cache object of ours with a fixed number of rows ("slots"),
# every rollout the budget allows admitted at once, one decoding step = one token for every row (forward through
# the HF model and its attention interface, sampling, stop and cache write), captured once per batch shape in a
# CUDA graph and replayed; every SLOT_CHECK_EVERY steps the host retires the finished rows and prefills waiting
# prompts into the freed slots. On a CPU the same loop runs eagerly.

SLOT_ATTENTION = "slot_varlen"  # the name under which slot_attention is registered with transformers
SLOT_CHECK_EVERY = 16  # graphed decoding steps between two looks of the host at which rows have finished (eager: 1)
SLOT_PREFILL_TOKENS = 8192  # prompt tokens per prefill forward
SLOT_GRAPHS = True  # on CUDA, each batch shape's step is captured in a CUDA graph (False: eager, to compare)


class SlotCache:
    """The decode loop's KV cache, a plain object. For each layer, keys and values of `slots` rows with room for
    `width` tokens each: k[l], v[l] (slots * width, h_kv, d), row r's token t at r * width + t: the layout torch's
    varlen attention kernel reads with cu_seq_lens_k = r * width and seqused_k = the row's length, touching only
    the keys a row has. The model's attention layers call update() with the forward's new keys and values
    (b, h_kv, q, d); they go to the flat places `write_at` (b * q,). A prefill (prompts packed in one row) gets
    its own new keys back (causal attention among them), a decoding step the whole cache."""

    def __init__(self, model, slots: int, width: int):
        cfg, p = model.config, next(model.parameters())
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            raise ValueError("rollout.cache=slots is full causal attention: no sliding-window layers")
        h_kv = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.slots, self.width = slots, width
        self.k = [p.new_zeros(slots * width, h_kv, d) for _ in range(cfg.num_hidden_layers)]
        self.v = [p.new_zeros(slots * width, h_kv, d) for _ in range(cfg.num_hidden_layers)]
        self.write_at = None  # (b * q,) flat places of the forward's tokens
        self.prefill = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, q, d = key_states.shape
        k = key_states.transpose(1, 2).reshape(b * q, h, d)  # (b * q, h_kv, d)
        v = value_states.transpose(1, 2).reshape(b * q, h, -1)
        self.k[layer_idx].index_copy_(0, self.write_at, k)
        self.v[layer_idx].index_copy_(0, self.write_at, v)
        return (k, v) if self.prefill else (self.k[layer_idx], self.v[layer_idx])

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, n: int):
        """The first n tokens of rows src (r,) copied to rows dst (r,), every layer."""
        for buf in self.k + self.v:
            rows = buf.view(self.slots, self.width, *buf.shape[1:])
            rows[dst, :n] = rows[src, :n]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for SlotCache, registered as SLOT_ATTENTION. query (b, h, q, d). A prefill (b = 1, prompts
    packed, no slot_width given): causal attention of each prompt over its own new keys (varlen_attention,
    cu_seq_lens = slot_cu_q). A decoding step (q = 1): each row's query over the first slot_used_k[r] keys of its
    slot (key, value: the whole cache). On CUDA in fp16/bf16 both are one call of torch's flash varlen kernel (no flash-attn package, no
    host sync: capturable); elsewhere the obvious reference (per prompt / one masked sdpa over the slots)."""
    b, h, q, d = query.shape
    packed = query.transpose(1, 2).reshape(b * q, h, d)  # (b * q, h, d)
    fast = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if "slot_width" not in kwargs:  # a prefill
        cu = kwargs["slot_cu_q"]
        out = varlen_attention(packed, key, value, cu, cu, kwargs["slot_max_q"], kwargs["slot_max_q"], scaling) \
            if fast else varlen_attention_reference(packed, key, value, cu, cu, scaling)
    elif fast:  # one query a row: bottom-right causal over its used keys is all of them
        out = varlen_attention(packed, key, value, kwargs["slot_cu_q"], kwargs["slot_cu_k"], 1, kwargs["slot_width"],
                               scaling, seqused_k=kwargs["slot_used_k"])
    else:
        width, h_kv = kwargs["slot_width"], key.shape[1]
        keys = key[:b * width].view(b, width, h_kv, d).transpose(1, 2)  # (b, h_kv, width, d)
        values = value[:b * width].view(b, width, h_kv, -1).transpose(1, 2)
        seen = torch.arange(width, device=key.device)[None] < kwargs["slot_used_k"][:, None]  # (b, width)
        out = torch.nn.functional.scaled_dot_product_attention(  # (b, h_kv, g, d): a KV head's query heads together
            packed.view(b, h_kv, h // h_kv, d), keys, values, attn_mask=seen[:, None, None], scale=scaling)
        out = out.reshape(b, h, d)
    return out.view(b, q, h, d), None


class _Slots:
    """The loop's per-slot state, on the model's device (static addresses: a captured step reads and writes them):
    the next input token, the row's tokens in the cache, its response tokens so far, its sampling key, whether
    it is still generating, and its response."""

    def __init__(self, slots: int, width: int, max_new_tokens: int, eos_ids: list[int], pad_id: int, device):
        z = lambda: torch.zeros(slots, dtype=torch.long, device=device)  # noqa: E731
        self.token, self.length, self.count, self.key = z(), z(), z(), z()
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self.out = torch.full((slots, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.base = torch.arange(slots, device=device) * width  # (slots,) where each row starts in the cache
        self.cu_q = torch.arange(slots + 1, dtype=torch.int32, device=device)
        self.cu_k = self.cu_q * width


def _forward(model, cache, ids, positions, **attention_kwargs):
    """The HF model's own forward over our cache, with no mask built (our attention needs none)."""
    masks = {"full_attention": None}
    return model(input_ids=ids, position_ids=positions, attention_mask=masks, use_cache=True,
                 **{_cache_kwarg(model): cache}, **attention_kwargs).logits


def _decode_step(model, cache: SlotCache, st: _Slots, n: int, temperature: float, top_p: float):
    """One token for each of the first n slots (the part a CUDA graph captures): forward, sampling, cache write,
    stop at EOS or at the length limit. Rows that are not live compute too and change nothing but their own slot's
    cache past its end (a finished or free slot's, never read)."""
    live, length, count = st.live[:n], st.length[:n], st.count[:n]
    cache.write_at = st.base[:n] + length.clamp(max=cache.width - 1)  # (n,)
    used = torch.where(live, length + 1, 1).to(torch.int32)  # (n,) a finished row reads one key
    logits = _forward(model, cache, st.token[:n, None], length[:, None], slot_cu_q=st.cu_q[:n + 1],
                      slot_cu_k=st.cu_k[:n + 1], slot_width=cache.width, slot_used_k=used)[:, -1]  # (n, V)
    token = sample_tokens(logits, st.key[:n], count, temperature, top_p)  # (n,)
    at = count.clamp(max=st.out.shape[1] - 1)[:, None]  # (n, 1)
    st.out[:n].scatter_(1, at, torch.where(live[:, None], token[:, None], st.out[:n].gather(1, at)))
    st.token[:n] = torch.where(live, token, st.token[:n])
    length += live
    count += live
    live &= ~(torch.isin(token, st.eos) | (count >= st.out.shape[1]))


def _admit(model, cache: SlotCache, st: _Slots, slots: list[int], rows: list[int], prompts: list[list[int]],
           prompt_of_row: list[int], keys: torch.Tensor, temperature: float, top_p: float):
    """Rows `rows` into slots `slots` (outside any graph): each distinct prompt prefilled once (prompts packed,
    SLOT_PREFILL_TOKENS a forward) into its first row's slot and copied to its other rows' slots; each row's
    first response token sampled from the prompt's last logits with its own key."""
    device, first = st.token.device, {}
    for row, slot in zip(rows, slots):
        first.setdefault(prompt_of_row[row], slot)
    distinct, logits = list(first), {}
    while distinct:
        chunk, total = [], 0
        while distinct and (not chunk or total + len(prompts[distinct[0]]) <= SLOT_PREFILL_TOKENS):
            chunk.append(distinct.pop(0))
            total += len(prompts[chunk[-1]])
        lens = [len(prompts[p]) for p in chunk]
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)  # (u + 1,)
        ids = torch.tensor([t for p in chunk for t in prompts[p]], device=device)[None]  # (1, T)
        pos = torch.cat([torch.arange(n, device=device) for n in lens])  # (T,)
        cache.write_at = torch.cat([st.base[first[p]] + torch.arange(n, device=device) for p, n in zip(chunk, lens)])
        cache.prefill = True
        try:
            out = _forward(model, cache, ids, pos[None], logits_to_keep=(cu[1:] - 1).long(), slot_cu_q=cu,
                           slot_max_q=max(lens))[0]  # (u, V)
        finally:
            cache.prefill = False
        logits.update(zip(chunk, out))
    copies = [(first[prompt_of_row[r]], s) for r, s in zip(rows, slots) if first[prompt_of_row[r]] != s]
    if copies:  # a prompt's other rows: its cache copied (up to the longest such prompt: the rest is never read)
        cache.move_rows(torch.tensor([a for a, _ in copies], device=device),
                        torch.tensor([b for _, b in copies], device=device),
                        max(len(prompts[prompt_of_row[r]]) for r in rows))
    s, row_keys = torch.tensor(slots, device=device), keys[rows].to(device)
    token = sample_tokens(torch.stack([logits[prompt_of_row[r]] for r in rows]), row_keys,
                          torch.zeros(len(rows), dtype=torch.long, device=device), temperature, top_p)  # (r,)
    st.token[s], st.key[s] = token, row_keys
    st.length[s] = torch.tensor([len(prompts[prompt_of_row[r]]) for r in rows], device=device)
    st.count[s] = 1
    st.out[s] = st.pad_id
    st.out[s, 0] = token
    st.live[s] = ~(torch.isin(token, st.eos) | (st.out.shape[1] <= 1))


def _generate_slots(model, prompts: list[list[int]], prompt_of_row: list[int], keys: torch.Tensor,
                    max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float, top_p: float,
                    max_batch_tokens: int, max_batch_size: int, should_stop=None, bar=None) -> torch.Tensor:
    """All rows (prompt_of_row (B,), keys (B,)) through the decode loop: as many slots as the KV budget holds at
    the longest prompt + max_new_tokens (at most max_batch_size), waiting rows admitted as slots free up; while
    rows wait every slot decodes, after that the live rows are moved to the first slots and the step runs on
    the smallest power of two that holds them. Returns the responses (B, max_new_tokens), pad_id after the end."""
    device, B = next(model.parameters()).device, len(prompt_of_row)
    if device.type == "cuda" and next(model.parameters()).dtype not in (torch.float16, torch.bfloat16):
        warnings.warn("rollout.cache=slots on a CUDA model in fp32: torch's flash kernel takes bf16/fp16, so every "
                      "step attends over whole slots with a masked sdpa; generate with a bf16 copy (torchrun does)")
    width = max(len(prompts[p]) for p in set(prompt_of_row)) + max_new_tokens
    n_slots = max(1, min(B, max_batch_size, max_batch_tokens // width))
    cache, st = SlotCache(model, n_slots, width), _Slots(n_slots, width, max_new_tokens, eos_ids, pad_id, device)
    result = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    row_in = [-1] * n_slots  # the row each slot holds (-1: free)
    waiting, n, graphs, pool, tokens = list(range(B))[::-1], n_slots, {}, None, 0
    step = partial(_decode_step, model, cache, st, temperature=temperature, top_p=top_p)
    graphed = SLOT_GRAPHS and _can_capture(device)
    _register(SLOT_ATTENTION, slot_attention)  # no mask builder: the loop hands the model no mask to build
    with _generating(model, attention=SLOT_ATTENTION):
        while True:
            live = st.live[:n].tolist()  # the host's look (a sync)
            done = [s for s in range(n) if row_in[s] >= 0 and not live[s]]
            if done:
                result[[row_in[s] for s in done]] = st.out[done].cpu()
                tokens += int(st.count[done].sum())
                for s in done:
                    row_in[s] = -1
                if bar is not None:
                    bar.update(len(done))
                    bar.set_postfix(tokens_per_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}",
                                    refresh=False)
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped with {B - len(waiting) - sum(r >= 0 for r in row_in)} of {B} rollouts "
                                  "done")
            free = [s for s in range(n) if row_in[s] < 0]
            if waiting and free:
                rows = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
                _admit(model, cache, st, free[:len(rows)], rows, prompts, prompt_of_row, keys, temperature, top_p)
                for s, r in zip(free, rows):
                    row_in[s] = r
                continue  # rows that ended at their first token retire at once
            held = [s for s in range(n) if row_in[s] >= 0]
            if not held:
                break
            if not waiting and len(held) <= n // 2:  # the tail: live rows to the first slots, a smaller step
                n = 1 << (len(held) - 1).bit_length()
                _compact(cache, st, row_in, held, n)
            for _ in range(SLOT_CHECK_EVERY if graphed else 1):  # eager: a look costs nothing, none is wasted
                if not graphed:
                    step(n)
                elif n in graphs:
                    graphs[n].replay()
                else:  # this shape's first step runs eagerly (warming up), then is captured for the next ones. The
                    # graphs share one memory pool: safe because n only shrinks in a call (a larger graph is never
                    # replayed after a smaller one is captured)
                    assert all(n < m for m in graphs), (n, list(graphs))
                    step(n)
                    graphs[n] = _capture(partial(step, n), pool)
                    pool = graphs[n].pool()
    return result


def _can_capture(device) -> bool:
    return device.type == "cuda"


def _capture(fn, pool):
    """fn's kernels recorded in a CUDA graph (not run), its memory from `pool` (shared by a call's graphs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # other threads' CUDA calls (NCCL's
        fn()                                                                      # watchdog) do not break it
    return graph


def _compact(cache: SlotCache, st: _Slots, row_in: list[int], held: list[int], n: int):
    """Move the rows held in slots >= n to the free slots below n: their cache (up to the longest) and state."""
    src = [s for s in held if s >= n]
    dst = [s for s in range(n) if row_in[s] < 0][:len(src)]
    if not src:
        return
    a, b = torch.tensor(src, device=st.token.device), torch.tensor(dst, device=st.token.device)
    cache.move_rows(a, b, int(st.length[a].max()))
    for t in (st.token, st.length, st.count, st.key, st.live, st.out):
        t[b] = t[a]
    st.live[a] = False
    for s, d in zip(src, dst):
        row_in[d], row_in[s] = row_in[s], -1


def _finish(response_ids, seq_prompt, eos_ids, pad_id: int, max_new_tokens: int) -> Rollouts:
    """Cut each (B, max_new_tokens) response after its first EOS; mask, lengths, finished flags."""
    B = len(seq_prompt)
    eos = torch.tensor(list(eos_ids))
    is_eos = torch.isin(response_ids, eos)  # (B, T)
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((B,), max_new_tokens))  # (B,)
    finished = is_eos.any(-1)  # (B,)
    lengths = torch.clamp(first_eos + 1, max=max_new_tokens)  # (B,) EOS included
    mask = (torch.arange(max_new_tokens)[None] < lengths[:, None]).long()  # (B, T)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    T = max(int(lengths.max()) if B else 0, 1)
    return Rollouts(torch.tensor(seq_prompt, dtype=torch.long), response_ids[:, :T], mask[:, :T], finished)
