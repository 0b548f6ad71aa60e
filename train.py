"""CurES training: Algorithm 1 of arXiv 2510.01037 with GRPO, in one file you can read top to bottom.

    torchrun --nproc_per_node=8 train.py --config configs/1.5b.yaml     # the paper's setting, one 8-GPU node
    python train.py --config configs/1.5b.yaml --rollout.prompts_per_step=64   # one GPU
    python train.py --config configs/tiny.yaml                          # CPU, bundled tiny model, minutes
    python train.py --config configs/tiny.yaml --cures.sampling=uniform --cures.allocation=uniform   # GRPO

What the method does, and where (main() holds Algorithm 1's two loops, train_step one inner step):
 1. Split the training set into T subsets (one per source, as released); M steps on each     load_subsets
 2. New subset: a fresh trainer (AdamW state, KL reference = policy; as released), then      main
    the cold start: N' rollouts of every prompt initialise Beta(alpha, beta) (Eq. 22-23;     cold_start
    with sigma=gradient also the gradient statistics of Eq. 21)                           cures.gradient_stats
 3. Draw m prompts with replacement from rho* = softmax(sqrt(p(1-p)) / tau)  (Eq. 14)       Curriculum.sample
 4. Give prompt i n_i = N sigma_i / sum sigma rollouts (Eq. 20-21)                          Curriculum.allocate
 5. Generate, score with math-verify, update the Beta counts (Eq. 23)                       train_step
 6. GRPO advantages per group, PPO-clip loss with dual clip and k3 KL (verl's settings)      grpo.py
 7. AdamW over mini-batches of 256 prompts, one epoch, token-mean loss                      update_policy

Config: `Config` below is the single source of truth; a YAML file holds what differs; override anything
with --section.key=value. Distributed: FSDP2 under torchrun (NCCL on GPU, gloo on CPU); plain
`python train.py` runs in one process (one GPU through a one-rank FSDP group, or the CPU without FSDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import errno
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

import cures
import grpo
import reward
import eval as evaluation
import rollout
from eval import SYSTEM_PROMPT, USER_TEMPLATE, build_prompt, read_rows

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    path: str = "Qwen/Qwen2.5-Math-1.5B"  # local path or hub id
    tokenizer: str = ""  # defaults to path
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager
    gradient_checkpointing: bool = False


# The released pipeline's training data: one hub set per subset, in order, about 10k prompts each with a ready
# `answer` field (the authors' runs/data_preprocess/numina_process.py; PAPER.md section 8).
AUTHORS_NUMINA = [f"ScaleML-RLHF/numina_math_{i}" for i in range(1, 16)]


@dataclass
class DataConfig:
    train: list = field(default_factory=lambda: list(AUTHORS_NUMINA))  # sources: hub ids, files, directories
    split: str = "train"  # for a hub dataset
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_format: str = "answer"  # answer (a \boxed{} inside is unwrapped) | solution (its \boxed{} answers)
    num_subsets: int = 15  # T for one source cut in parts; several sources give one subset each (0: their number)
    max_prompts: int = 0  # use only the first N prompts of each source (0: all)
    max_prompt_len: int = 1024  # longer prompts are dropped and counted
    system_prompt: str = SYSTEM_PROMPT
    user_template: str = USER_TEMPLATE


@dataclass
class CuresConfig:
    sampling: str = "cures"  # cures | uniform
    allocation: str = "cures"  # cures | uniform  (uniform/uniform = GRPO baseline)
    sigma: str = "accuracy"  # accuracy | gradient (Eq. 21 with measured gradient statistics)
    grad_param: str = "lm_head"  # parameter subset for sigma=gradient (lm_head: closed form; else name substring)
    tau: float = 0.1  # Eq. 14 temperature; not reported in the paper
    prior_alpha: float = 0.0
    prior_beta: float = 0.0
    cold_start_rollouts: int = 4  # N'
    n_min: int = 2
    n_max: int = 0  # 0: no upper bound


@dataclass
class RolloutConfig:
    prompts_per_step: int = 1024  # m
    rollouts_per_step: int = 8192  # N
    max_new_tokens: int = 3072
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch_tokens: int = 1 << 21  # KV-cache budget per generate call, in tokens
    max_batch_size: int = 1024
    cache: str = "dynamic"  # dynamic | static (on GPU: torch.compile + CUDA graphs) | paged (continuous batching)
    share_prefill: bool = True  # dynamic cache: prefill each distinct prompt once for all its rollouts
    stop_at_im_end: bool = False  # also stop at <|im_end|> (released: the tokenizer's EOS only)
    # Beyond the paper, DAPO's dynamic sampling (the baseline curricula are compared against): groups whose
    # rollouts all score the same are dropped, and m more prompts are drawn, allocated and generated until
    # the step holds m groups with mixed rewards (at most max_rounds rounds; then the uniform groups fill it).
    # Every generated rollout is charged (rollouts/total) and observed by the posteriors.
    dynamic_sampling: bool = False
    max_rounds: int = 10


@dataclass
class TrainConfig:
    steps_per_subset: int = 10  # M
    restart_each_subset: bool = True  # as released: fresh AdamW state and lr schedule, KL reference = policy
    group_by: str = "prompt"  # prompt (a prompt drawn k times is one GRPO group, as released) | draw
    lr: float = 1e-6
    warmup_steps: int = 0  # linear lr warm-up over this many optimiser steps (the paper: constant lr, 0)
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    mini_batch_prompts: int = 256
    epochs: int = 1
    advantage: str = "grpo"  # grpo | rpp (REINFORCE++)
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float = 3.0
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"  # low_var_kl | kl | mse
    micro_batch_tokens: int = 16384  # tokens (padded, or packed) per forward/backward
    pack: str = "auto"  # auto | true | false: one unpadded row per micro-batch (auto: with flash-attention)
    share_prompt: bool = False  # one forward of each prompt for all its responses (sdpa; pays with short responses)
    cpu_offload: bool = False  # FSDP2: sharded parameters, gradients and AdamW state in CPU memory (7B on small GPUs)
    logprob_chunk: int = 2048  # tokens per chunk of the log-softmax
    max_bad_steps: int = 3  # consecutive non-finite losses before aborting


@dataclass
class EvalConfig:
    data: str = ""  # held-out jsonl with problem/answer (or a benchmark name of eval.py); empty: off
    every: int = 0  # steps between evaluations (0: only at start and end when data is set)
    max_problems: int = 0
    samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens


@dataclass
class RunConfig:
    out_dir: str = "out/run"
    seed: int = 0
    save_every: int = 10  # steps between checkpoints (0: only the last and on a stop request)
    save_every_minutes: float = 0.0  # also a checkpoint when this long has passed since the last one (0: off)
    keep_checkpoints: int = 2
    resume: str = ""  # "" (fresh) | auto | path of a checkpoint directory
    overwrite: bool = False  # a fresh run into an out_dir that holds a run: replace it (else refuse)
    max_steps: int = 0  # stop after this many steps in total (0: T * M)
    reward_workers: int = 0  # answer-checking processes per rank; 0: the node's cores / ranks per node (<= 32)
    reward_timeout: float = 10.0
    wandb_project: str = ""
    tensorboard: bool = False
    dist_timeout_minutes: float = 30.0  # a rank that hangs in a collective fails the run after this long


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cures: CuresConfig = field(default_factory=CuresConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _cast(value, current, name):
    """Type-check a YAML or command-line value against the default's type."""
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif isinstance(current, (int, float)):
        if not isinstance(value, bool):
            try:
                v = float(value)  # also "1e-4", which YAML 1.1 reads as a string
                if isinstance(current, float):
                    return v
                if v.is_integer():
                    return int(v)
            except (TypeError, ValueError):
                pass
    elif isinstance(current, tuple):
        v = yaml.safe_load(value) if isinstance(value, str) else value
        if isinstance(v, (list, tuple)) and len(v) == len(current):
            return tuple(float(x) for x in v)
    elif isinstance(current, list):  # a YAML list, "[a, b]" on the command line, or one item
        v = yaml.safe_load(value) if isinstance(value, str) and value.lstrip().startswith("[") else value
        v = v if isinstance(v, (list, tuple)) else [v]
        if v and all(isinstance(x, str) and x for x in v):
            return list(v)
    elif isinstance(current, str):
        return str(value)
    raise TypeError(f"config {name}: expected {type(current).__name__}, got {value!r}")


def _set(cfg, dotted: str, value):
    section, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections or not key:
        keys = [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))]
        close = difflib.get_close_matches(dotted, keys, n=1)
        raise KeyError(f"unknown config key {dotted!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    sub = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(sub)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        raise KeyError(f"unknown config key {dotted!r}" + (f"; did you mean '{section}.{close[0]}'?" if close else ""))
    setattr(sub, key, _cast(value, getattr(sub, key), dotted))


def usage(cfg: Config | None = None) -> str:
    """`python train.py --help`: how to call, and every config key with its default."""
    cfg = cfg or Config()
    lines = [__doc__.split("\n\n")[0], "", "usage: [torchrun ...] train.py [--config FILE.yaml] [--section.key=value ...]",
             "", "config keys (defaults = the paper's setting; see README, Config reference):"]
    for section in dataclasses.fields(cfg):
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"    --{section.name}.{f.name}={getattr(getattr(cfg, section.name), f.name)!r}")
    return "\n".join(lines)


def load_config(argv: list[str]) -> Config:
    """Defaults <- --config YAML (nested sections) <- --section.key=value overrides."""
    cfg = Config()
    args = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ValueError("--config needs a YAML file: --config configs/tiny.yaml")
        if not os.path.isfile(args[i + 1]):
            raise FileNotFoundError(f"--config {args[i + 1]}: no such file")
        with open(args[i + 1]) as f:
            data = yaml.safe_load(f) or {}
        del args[i:i + 2]
        for section, values in data.items():
            if not isinstance(values, dict):
                raise KeyError(f"config file: {section!r} must be a section (mapping)")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value)
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"expected --section.key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        _set(cfg, key, value)
    return cfg


def validate_config(cfg: Config):
    """Choices that would otherwise fail only after the model is loaded or the cold start has run."""
    choices = {"cures.sampling": ("cures", "uniform"), "cures.allocation": ("cures", "uniform"),
               "cures.sigma": ("accuracy", "gradient"), "train.advantage": ("grpo", "rpp"),
               "train.kl_kind": ("low_var_kl", "kl", "mse"), "train.loss_agg": ("token_mean", "seq_mean_token_mean"),
               "train.group_by": ("prompt", "draw"), "rollout.cache": ("dynamic", "static", "paged"),
               "data.answer_format": ("answer", "solution")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    micro_batch_layout(cfg)  # train.pack, and share_prompt's attention needs
    cache_tokens, attn = cfg.rollout.max_batch_tokens, cfg.model.attn_implementation
    forward_tokens, mask_limit = min(rollout.PAGED_FORWARD_TOKENS, cache_tokens), 2**32
    if cfg.rollout.cache == "paged" and not attn.startswith("flash_attention") and forward_tokens * cache_tokens > mask_limit:
        raise ValueError(f"rollout.cache=paged with model.attn_implementation={attn} builds a dense (forward tokens x "
                         f"cache tokens) mask: {forward_tokens:,} x {cache_tokens:,} here. Use flash_attention_2, or "
                         f"rollout.cache=dynamic, or a rollout.max_batch_tokens of at most "
                         f"{mask_limit // rollout.PAGED_FORWARD_TOKENS:,}")
    if cfg.cures.sigma == "gradient" and cfg.cures.allocation == "cures" and cfg.cures.cold_start_rollouts <= 0:
        raise ValueError("cures.sigma=gradient measures Eq. 21's gradients on the cold start: "
                         "cures.cold_start_rollouts must be > 0")
    m, N, n_min = cfg.rollout.prompts_per_step, cfg.rollout.rollouts_per_step, cfg.cures.n_min
    if m < 1 or N < m * n_min:
        raise ValueError(f"rollout.rollouts_per_step={N} cannot give each of rollout.prompts_per_step={m} prompts "
                         f"cures.n_min={n_min} rollouts: need rollouts_per_step >= {max(m, 1) * n_min}")
    for key in ("train.steps_per_subset", "train.mini_batch_prompts", "train.epochs", "train.micro_batch_tokens",
                "rollout.max_new_tokens", "rollout.max_rounds", "data.max_prompt_len"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ValueError(f"{key} must be >= 1")
    if cfg.data.num_subsets < 0 or (len(cfg.data.train) == 1 and cfg.data.num_subsets == 0
                                    and not os.path.isdir(cfg.data.train[0])):
        raise ValueError(f"data.num_subsets={cfg.data.num_subsets}: a single source needs >= 1 subsets")
    path = cfg.model.path
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"model.path={path!r}: no such directory (and not a hub id like org/name)")


def config_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ----------------------------------------------------------------------------------------------
# Distributed


def setup_distributed(timeout_minutes: float = 30.0):
    """(rank, world_size, device). torchrun -> a process group (on GPU: NCCL for CUDA tensors and gloo for
    CPU ones, such as the small counters reduced every step and, with train.cpu_offload, the gradient norm
    of CPU-resident shards; on CPU: gloo); plain python on a GPU -> a one-rank group so the same FSDP2 code
    runs; plain python on CPU -> no group."""
    if "RANK" not in os.environ and torch.cuda.is_available():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cpu")


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_gather_list(items: list) -> list:
    """Concatenate a Python list over ranks in rank order (identical result on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


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


# ----------------------------------------------------------------------------------------------
# Data


def gold_answer(text: str, answer_format: str) -> str | None:
    """The gold answer of a training row. answer_format "answer": the field is the answer (a \\boxed{} inside
    is unwrapped). "solution": the field is a worked solution and its \\boxed{} contents are the gold; several
    different ones are one set ("x = 1 and x = -2" boxed twice -> "1, -2" as math-verify reads a set), and a
    solution with none has no gold (None: the row is skipped and counted, never matched whole)."""
    if answer_format == "answer":
        return reward.extract_boxed(text) or text
    if answer_format == "solution":
        boxed = list(dict.fromkeys(b.strip() for b in reward.extract_all_boxed(text) if b.strip()))
        return ", ".join(boxed) or None
    raise ValueError(f"data.answer_format must be answer or solution, not {answer_format!r}")


def read_source(source: str, split: str) -> list[list[tuple]]:
    """One data source -> its files (a directory: one per file, sorted by name, as the authors shipped
    them) as lists of (file name, line, row); a hub dataset id is one list."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.endswith((".jsonl", ".json", ".parquet")))
        if not files:
            raise ValueError(f"data.train: directory {source!r} has no .jsonl, .json or .parquet file")
        return [_numbered(f, read_rows(f)) for f in files]
    if os.path.exists(source):
        return [_numbered(source, read_rows(source))]
    try:
        import datasets  # hub dataset id; optional dependency
    except ImportError:
        raise ImportError(f"{source!r} is not a local file or directory; to load it as a hub dataset, "
                          "pip install datasets") from None
    return [_numbered(source, datasets.load_dataset(source, split=split))]


def _numbered(name: str, rows) -> list[tuple]:
    """(name, line, row) for each row; an empty source is an error that names it."""
    rows = [(name, i, r) for i, r in enumerate(rows, 1)]
    if not rows:
        raise ValueError(f"{name}: no usable prompt in 0 rows (an empty file)")
    return rows


def load_subsets(cfg: Config, tokenizer):
    """The training prompts as the T subsets of Algorithm 1. Several sources (the entries of
    `data.train`, a directory's files) give one subset each, in order, as the released pipeline trains on
    `numina_math_1` ... `_15`; a single source is cut into `data.num_subsets` contiguous parts. Each item:
    {"prompt_ids", "answer", "level"} (the row's difficulty level if it has one). Returns (subsets, {"too_long": n, "no_answer": n}), the rows skipped."""
    groups = [g for source in cfg.data.train for g in read_source(source, cfg.data.split)]
    items, skipped = [], {"too_long": 0, "no_answer": 0}
    for group in groups:
        part, before = [], dict(skipped)
        for fname, line, row in group[:cfg.data.max_prompts or None]:
            problem, answer = row.get(cfg.data.problem_key), row.get(cfg.data.answer_key)
            for key in (cfg.data.problem_key, cfg.data.answer_key):
                if key not in row:  # a wrong *_key or a malformed row
                    raise ValueError(f"{fname}:{line}: row has no {key!r} (fields: {sorted(row)[:8]})")
            if problem is None or not str(problem).strip():
                raise ValueError(f"{fname}:{line}: row has an empty {cfg.data.problem_key!r}")
            answer = gold_answer(str(answer), cfg.data.answer_format) if answer is not None else None
            if answer is None or not answer.strip():  # an empty or null answer, a solution without \boxed{}
                skipped["no_answer"] += 1
                if skipped["no_answer"] <= 5:
                    print0(f"skipped {fname}:{line}: no gold answer in {cfg.data.answer_key!r}"
                           + (" (and more, counted as data/skipped_no_answer)" if skipped["no_answer"] == 5 else ""))
                continue
            ids = build_prompt(tokenizer, str(problem), cfg.data.system_prompt, cfg.data.user_template)
            if len(ids) > cfg.data.max_prompt_len:
                skipped["too_long"] += 1
                continue
            part.append({"prompt_ids": ids, "answer": answer, "level": row.get("level")})  # level: metrics only
        if not part:
            name = group[0][0] if group else "a data source"
            raise ValueError(f"{name}: no usable prompt in {len(group)} rows ({skipped['too_long'] - before['too_long']} "
                             f"longer than data.max_prompt_len={cfg.data.max_prompt_len}, "
                             f"{skipped['no_answer'] - before['no_answer']} without a \\boxed{{}} answer)")
        items.append(part)
    T = cfg.data.num_subsets
    if len(items) > 1:
        if T not in (0, len(items)):
            raise ValueError(f"data.train gives {len(items)} sources (one subset each) but data.num_subsets={T}: "
                             f"set data.num_subsets={len(items)} (or 0)")
    else:
        flat = items[0]
        if T < 1:  # a directory holding one file gets here past validate_config
            raise ValueError(f"{groups[0][0][0]}: one data source and data.num_subsets={T}: a single source needs "
                             ">= 1 subsets")
        if len(flat) < T:
            raise ValueError(f"{len(flat)} prompts cannot make {T} subsets")
        bounds = np.linspace(0, len(flat), T + 1).astype(int)
        items = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return items, skipped


# ----------------------------------------------------------------------------------------------
# Rollouts spread over ranks


def training_groups(idx: np.ndarray, n: np.ndarray, mini_batch_prompts: int, group_by: str = "prompt"):
    """The step's GRPO groups from the draw (Algorithm 1, line 12: m prompts with replacement, n_i rollouts
    each by Eq. 20). The draw is cut into mini-batches of `mini_batch_prompts` draws, in order.
    group_by "draw": each draw is a group. "prompt" (as released: responses are grouped by dataset index): a
    prompt drawn k times is one group of sum n rollouts, with one baseline, placed in the mini-batch of its
    first draw. Returns (prompt (g,), rollouts (g,), mini-batch (g,) numbered 0..), g = groups."""
    mb = np.arange(len(idx)) // max(1, mini_batch_prompts)  # (m,)
    if group_by == "draw":
        return idx, n, mb
    if group_by != "prompt":
        raise ValueError(f"train.group_by must be prompt or draw, not {group_by!r}")
    prompts, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first draw
    counts = np.bincount(inverse, weights=n, minlength=len(prompts)).astype(np.int64)  # (g,)
    mb_first = mb[first[order]]
    return prompts[order], counts[order], np.unique(mb_first, return_inverse=True)[1]  # no empty mini-batch


def assign_groups(n: np.ndarray, mb: np.ndarray, world: int) -> np.ndarray:
    """Spread each mini-batch's whole groups over ranks balanced by rollout count (largest first, to the
    least loaded rank). Deterministic, so every rank computes the same plan. n, mb: (g,) rollouts and
    mini-batch of each group. Returns the rank of each group (g,)."""
    owner = np.zeros(len(n), dtype=np.int64)
    for b in np.unique(mb):
        load = np.zeros(world)
        idx = np.flatnonzero(mb == b)
        for i in idx[np.argsort(-n[idx], kind="stable")]:
            r = int(np.argmin(load))
            owner[i] = r
            load[r] += n[i]
    return owner


SEED_PURPOSES = ("cold_start", "sample", "rollout", "eval")


def stream_seed(seed: int, purpose: str, subset: int, step: int, rank: int = 0, rnd: int = 0) -> int:
    """The seed of one random stream, derived from the run's seed by np.random.SeedSequence keyed by
    (purpose, subset, step, rank, and the dynamic-sampling round rnd when > 0): no two purposes, subsets,
    steps, ranks or rounds share a stream, and a resumed run draws what the uninterrupted run drew."""
    key = [seed, SEED_PURPOSES.index(purpose), subset, step, rank] + ([rnd] if rnd else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class StopRequested(Exception):
    """A stop signal (SIGTERM, Ctrl-C) arrived while generating: the step is dropped on every rank, and the
    run saves the last finished step."""


def check_stop(stop: dict | None, interrupted: bool = False):
    """Collective: raise StopRequested on every rank if any rank was asked to stop."""
    if stop is not None and all_reduce(torch.tensor([float(interrupted or stop["requested"])])).item() > 0:
        raise StopRequested()


@contextlib.contextmanager
def interruptible(stop: dict | None):
    """A generation phase that a stop request ends between two batches: yields the `should_stop` callable
    for rollout.generate, then checks on every rank (StopRequested everywhere if any rank stopped)."""
    try:
        yield (lambda: stop["requested"]) if stop is not None else None
    except rollout.Interrupted:
        check_stop(stop, interrupted=True)
        raise  # unreachable: check_stop raised
    check_stop(stop)


def generate_and_score(gen, tokenizer, prompts, answers, counts, cfg: Config, seed: int, stop: dict | None = None,
                       progress: str = ""):
    """Rollouts for this rank's prompts and their binary rewards. Returns (Rollouts, rewards (B,),
    number of checker timeouts). `stop`: {"requested": bool}, checked between generation batches (then
    StopRequested on every rank)."""
    with interruptible(stop) as should_stop:
        out = rollout.generate(gen, prompts, counts, max_new_tokens=cfg.rollout.max_new_tokens,
                               eos_ids=rollout.stop_token_ids(tokenizer, gen, cfg.rollout.stop_at_im_end),
                               pad_id=tokenizer.pad_token_id, temperature=cfg.rollout.temperature,
                               top_p=cfg.rollout.top_p, seed=seed, max_batch_tokens=cfg.rollout.max_batch_tokens,
                               max_batch_size=cfg.rollout.max_batch_size, cache=cfg.rollout.cache,
                               share_prefill=cfg.rollout.share_prefill, should_stop=should_stop, progress=progress)
    texts = out.texts(tokenizer)
    golds = [answers[i] for i in out.prompt_index.tolist()]
    workers = cfg.run.reward_workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    scores = reward.score_batch(texts, golds, workers=min(workers, 32), timeout=cfg.run.reward_timeout)
    return out, torch.tensor(list(scores), dtype=torch.float32), scores.timeouts


def cold_start(cur: cures.Curriculum, subset, gen, tokenizer, cfg: Config, rank: int, world: int, seed: int,
               stop: dict | None = None):
    """Algorithm 1, line 3: N' rollouts of every prompt of the subset -> Beta counts (Eq. 23) and,
    for sigma=gradient, the gradient statistics of Eq. 21. Prompts are spread over ranks (i = rank mod W)."""
    t0 = time.time()
    mine = list(range(rank, len(subset), world))
    k = cfg.cures.cold_start_rollouts
    out, rewards, _ = generate_and_score(gen, tokenizer, [subset[i]["prompt_ids"] for i in mine],
                                            [subset[i]["answer"] for i in mine], k, cfg, seed, stop,
                                            "cold start" if rank == 0 else "")
    correct = rewards.view(len(mine), k) if mine else rewards.view(0, k)
    counts = [(mine[j], float(correct[j].sum()), k) for j in range(len(mine))]
    stats, t_grad = [], time.time()
    if cfg.cures.sigma == "gradient":
        responses = out.responses()
        for j, i in enumerate(mine):
            rs = responses[j * k:(j + 1) * k]
            stats.append((i, *cures.gradient_stats(gen, subset[i]["prompt_ids"], rs, (correct[j] > 0).tolist(),
                                                   cfg.cures.grad_param, cfg.rollout.temperature)))
    t_grad = time.time() - t_grad
    counts = all_gather_list(counts)
    idx, c, n = (np.array(x) for x in zip(*counts))
    cur.observe(idx.astype(np.int64), c, n)
    if cfg.cures.sigma == "gradient":  # every rank gathers, also one that had no prompts
        s = np.array(all_gather_list(stats))
        cur.set_grad_stats(s[:, 0].astype(np.int64), s[:, 1], s[:, 2], s[:, 3])
    return {"cold/rollouts": len(subset) * k, "cold/acc": float(c.sum() / n.sum()),
            "time/cold_start": time.time() - t0, "time/grad_stats": t_grad}


# ----------------------------------------------------------------------------------------------
# The update


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


def plan_micro_batches(seqs: list[dict], cfg: Config):
    """This rank's micro-batches of a mini-batch: as many as the token budget needs on the busiest rank,
    in the layout the config asks for."""
    return make_micro_batches(seqs, num_micro_batches(seqs, cfg.train.micro_batch_tokens), 0,
                              micro_batch_layout(cfg))


def forward_batch(model: Policy, b: dict, device, cfg: Config):
    """logp, entropy (N,) of one micro-batch's response tokens, in any layout."""
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return model(to(b["ids"]), to(b["attn"]), to(b["src"]), to(b["tgt"]), cfg.rollout.temperature,
                 cfg.train.logprob_chunk, position_ids=to(b["pos"]))


def micro_batch_layout(cfg: Config) -> str:
    """train.share_prompt -> "shared" (sdpa only: it needs a custom mask). Otherwise train.pack: auto packs
    only with flash-attention (its varlen kernels skip padding entirely); with sdpa or eager a packed row
    needs a dense (P, P) block-diagonal mask, slower than length-sorted padding."""
    value = str(cfg.train.pack).lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"train.pack must be auto, true or false, not {cfg.train.pack!r}")
    if cfg.train.share_prompt:
        if value == "true" or cfg.model.attn_implementation != "sdpa":
            raise ValueError("train.share_prompt needs model.attn_implementation=sdpa and train.pack off "
                             "(its attention mask is not block-diagonal)")
        return "shared"
    if value == "auto":
        return "packed" if cfg.model.attn_implementation.startswith("flash_attention") else "padded"
    return "packed" if value == "true" else "padded"


def num_micro_batches(seqs, micro_batch_tokens: int) -> int:
    """Micro-batches needed on this rank, maxed over ranks."""
    tokens = sum(len(s["ids"]) for s in seqs)
    n = torch.tensor([max(1, math.ceil(tokens / micro_batch_tokens))])
    return int(all_reduce(n, dist.ReduceOp.MAX if dist.is_initialized() else None).item())


@torch.no_grad()
def score_logprobs(model: Policy, batches, device, cfg: Config):
    """Per-sequence response log-probs (no grad) for old_logp / ref_logp: {index into seqs: logp (n,)}."""
    out = {}
    for b in batches:
        logp, _ = forward_batch(model, b, device, cfg)
        for i, part in zip(b["rows"], torch.split(logp, b["sizes"]) if b["rows"] else []):
            out[i] = part
    if hasattr(model, "reshard"):  # FSDP2 keeps the root (embeddings, lm_head) gathered after a forward
        model.reshard()  # without backward: 0.9 GB (1.5B) to 4.4 GB (7B) fp32 per rank for the KL reference
    return out


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


def update_policy(policy: Policy, optimizer, seqs: list[dict], device, cfg: Config, world: int, scheduler=None,
                  batches=None):
    """One optimiser step on one mini-batch (this rank's share `seqs`). The token_mean normaliser is the
    token count of the whole mini-batch over all ranks, divided by W because FSDP averages gradients over
    ranks: the result does not depend on how the mini-batch is cut into ranks and micro-batches
    (tests/test_train.py). `batches`: the micro-batch plan of `seqs` if already made (make_micro_batches).
    Returns (metrics sums, grad norm, ok)."""
    tokens = torch.tensor([float(sum(s["resp_len"] for s in seqs)), float(len(seqs))])
    tokens = all_reduce(tokens)
    num_tokens, num_seqs = tokens[0].item() / world, tokens[1].item() / world
    if batches is None:
        batches = plan_micro_batches(seqs, cfg)
    sums = {k: 0.0 for k in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/clip_frac",
                             "actor/clip_frac_lower", "actor/approx_kl_old", "actor/ratio_mean")}
    finite = True
    with train_mode(policy):  # gradient checkpointing, when configured, runs in train mode only
        # FSDP2 reduce-scatters every micro-batch's gradients into the fp32 shards, which accumulate them.
        # Skipping that until the last micro-batch (set_requires_gradient_sync) would keep every layer's
        # gradient unsharded in fp32 in between: 4 bytes a parameter per rank (6 GB for 1.5B, 30 GB for
        # 7B; bench/memory.py --check measured it) to save one reduce-scatter per micro-batch.
        for b in batches:
            logp, entropy = forward_batch(policy, b, device, cfg)  # (N,)
            rows = b["rows"]
            if rows:
                adv = torch.cat([seqs[i]["adv"].expand(seqs[i]["resp_len"]) for i in rows]).to(device)  # (N,)
                old = (torch.cat([seqs[i]["old_logp"] for i in rows]).to(device) if "old_logp" in seqs[rows[0]]
                       else logp.detach())  # (N,) on-policy (first mini-batch, one epoch): ratio = 1
            else:  # dummy micro-batch: zero-weight loss keeps FSDP's collectives in step
                adv, old = torch.zeros_like(logp), logp.detach()
            seq_id = torch.cat([torch.full((seqs[i]["resp_len"],), k) for k, i in enumerate(rows)]) if rows else \
                torch.zeros(logp.shape[0], dtype=torch.long)
            mask = torch.ones(1, logp.shape[0], device=device) if rows else torch.zeros(1, logp.shape[0], device=device)
            if cfg.train.loss_agg == "seq_mean_token_mean":  # as (B, T): one row per sequence
                B = max(1, len(rows))
                T = max([seqs[i]["resp_len"] for i in rows] or [logp.shape[0]])
                pos = torch.cat([torch.arange(seqs[i]["resp_len"]) for i in rows]) if rows else torch.arange(logp.shape[0])
                shape = lambda x, fill=0.0: torch.full((B, T), fill, device=device, dtype=x.dtype).index_put_(  # noqa: E731
                    (seq_id.to(device), pos.to(device)), x)
                logp2, old2, adv2, mask2 = shape(logp), shape(old), shape(adv), shape(mask[0])
            else:
                logp2, old2, adv2, mask2 = logp[None], old[None], adv[None], mask
            loss, m = grpo.policy_loss(logp2, old2, adv2, mask2, cfg.train.clip_low, cfg.train.clip_high,
                                       cfg.train.clip_c, cfg.train.loss_agg, num_tokens, num_seqs)
            sums["actor/pg_loss"] += loss.item() * world
            if cfg.train.kl_coef > 0:
                ref = torch.cat([seqs[i]["ref_logp"] for i in rows]).to(device) if rows else logp.detach()
                ref2 = shape(ref) if cfg.train.loss_agg == "seq_mean_token_mean" else ref[None]
                kl = grpo.aggregate(grpo.kl_penalty(logp2, ref2, cfg.train.kl_kind), mask2, cfg.train.loss_agg,
                                    num_tokens, num_seqs)
                loss = loss + cfg.train.kl_coef * kl
                sums["actor/kl"] += kl.item() * world
            finite = finite and bool(torch.isfinite(loss).item())
            loss.backward()
            sums["actor/entropy"] += float((entropy * mask[0]).sum())
            for k, v in m.items():
                sums[k] += float(v)
    flag = all_reduce(torch.tensor([0.0 if finite else 1.0]))
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = flag.item() == 0 and math.isfinite(grad_norm)
    if ok:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, ok


def make_optimizer(policy: Policy, cfg: Config):
    """AdamW with an empty state and its lr schedule (linear warm-up, then constant as in the paper)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=cfg.train.betas, eps=cfg.train.adam_eps)
    warmup = max(1, cfg.train.warmup_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))


@torch.no_grad()
def reanchor_reference(policy: Policy, ref: Policy | None):
    """KL reference <- the current policy (a subset's fresh trainer, as released). Both are sharded the
    same way, so each rank copies its own shards."""
    if ref is not None:
        for p_ref, p in zip(ref.parameters(), policy.parameters()):
            p_ref.copy_(p)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(out_dir: str):
    """Complete checkpoints (directories with meta.pt), oldest first; half-written ones are ignored."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(root, d, "meta.pt"))]
    return [os.path.join(root, d) for d in sorted(done)]


def save_checkpoint(policy, optimizer, cur, meta: dict, cfg: Config, rank: int, ref=None):
    """Model and optimizer (sharded, torch.distributed.checkpoint), the KL reference when it moves
    (train.restart_each_subset), curriculum state, step, subset, counters and config. Written to
    step_X.tmp and renamed when complete, so a crash mid-write leaves the previous checkpoint usable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    root = os.path.join(cfg.run.out_dir, "checkpoints")
    final = os.path.join(root, f"step_{meta['step']:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    barrier()
    msd, osd = get_state_dict(policy, optimizer)
    state = {"model": msd, "optim": osd} | ({"ref": get_model_state_dict(ref)} if ref is not None else {})
    try:
        with warnings.catch_warnings():  # single process without a process group is fine
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp)
        barrier()
        if rank == 0:
            torch.save({**meta, "curriculum": cur.state_dict(), "config": config_dict(cfg)},
                       os.path.join(tmp, "meta.pt"))
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                yaml.safe_dump(config_dict(cfg), f, sort_keys=False)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  a full disk: e.g. "unexpected pos 704 vs 598"
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e, root):
            raise OSError(errno.ENOSPC, f"no space left on device while writing checkpoint {tmp} "
                                        f"({shutil.disk_usage(root).free / 2**20:.0f} MiB free); removed it") from e
        raise
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoint_dirs(cfg.run.out_dir)[:-cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _disk_full(e: Exception, path: str) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "unexpected pos" in str(e) or shutil.disk_usage(path).free < 2**26  # torch's zip writer on ENOSPC


def load_checkpoint(path: str, policy, optimizer, cur, ref=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    msd, osd = get_state_dict(policy, optimizer)
    state = {"model": msd, "optim": osd} | ({"ref": get_model_state_dict(ref)} if ref is not None else {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref is not None:
        set_model_state_dict(ref, state["ref"])
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
    cur.load_state_dict(meta["curriculum"])
    return meta


def save_hf(policy: Policy, tokenizer, path: str, rank: int, cfg: Config):
    """The final model in Hugging Face format (loadable with AutoModelForCausalLM.from_pretrained)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        policy.hf.save_pretrained(path, state_dict={k.removeprefix("hf."): v for k, v in full.items()})
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, evaluation.PROMPT_FILE), "w") as f:  # eval.py prompts it the same way
            json.dump({"system_prompt": cfg.data.system_prompt, "user_template": cfg.data.user_template,
                       "stop_at_im_end": cfg.rollout.stop_at_im_end}, f, indent=1)
    barrier()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Logging


class Logger:
    """metrics.jsonl on rank 0, plus wandb / tensorboard when asked for and installed."""

    def __init__(self, cfg: Config, rank: int, step: int = 0):
        self.rank, self.sinks, self.closers = rank, [], []
        if rank != 0:
            return
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        path = os.path.join(cfg.run.out_dir, "metrics.jsonl")
        if os.path.exists(path):  # resumed at `step`: rows written after that checkpoint are written again
            rows = [line for line in open(path) if step > 0 and json.loads(line)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(rows)
        self.file = open(path, "a")
        if cfg.run.wandb_project:
            try:
                import wandb

                wandb.init(project=cfg.run.wandb_project, config=config_dict(cfg))
                self.sinks.append(lambda m, s: wandb.log(m, step=s))
                self.closers.append(wandb.finish)
            except ImportError:
                print0("wandb is not installed: logging to metrics.jsonl only")
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(os.path.join(cfg.run.out_dir, "tb"))
                self.sinks.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items()])
                self.closers.append(tb.close)
            except ImportError:
                print0("tensorboard is not installed: logging to metrics.jsonl only")

    def log(self, metrics: dict, step: int):
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(metrics, step)

    def close(self):
        """Flush and close every sink (the run may end with `leave`, which runs no exit hooks)."""
        if self.rank == 0:
            self.file.close()
            for close in self.closers:
                close()


def log_step(logger: Logger, bar, metrics: dict, step: int):
    """metrics.jsonl (and wandb / tensorboard), the progress bar, and one printed line."""
    logger.log(metrics, step)
    bar.update(1)
    bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", eval=metrics.get("eval/acc", ""))
    print0(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                    if k.split("/")[0] in ("train", "eval", "actor", "cures", "time") and "hist" not in k))


def run_eval(gen, tokenizer, problems, cfg: Config, rank: int, world: int, seed: int, stop: dict | None = None):
    with interruptible(stop) as should_stop:
        records = evaluation.evaluate_problems(
            gen, tokenizer, problems, n_samples=cfg.eval.samples,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, temperature=cfg.eval.temperature,
            top_p=cfg.rollout.top_p, seed=seed, rank=rank, world_size=world, workers=cfg.run.reward_workers,
            timeout=cfg.run.reward_timeout, max_batch_tokens=cfg.rollout.max_batch_tokens,
            system_prompt=cfg.data.system_prompt, user_template=cfg.data.user_template,
            stop_at_im_end=cfg.rollout.stop_at_im_end, should_stop=should_stop,
            progress="eval" if rank == 0 else "")
    scores = all_gather_list([s for r in records for s in r["scores"]])
    return float(np.mean(scores)) if scores else 0.0


# ----------------------------------------------------------------------------------------------
# One training step: the inner loop of Algorithm 1 (draw, allocate, generate, observe, update)


@contextlib.contextmanager
def timed(metrics: dict, key: str):
    """Seconds of a phase in metrics[key] ("time/<phase>"); on a GPU also the phase's peak allocated memory
    in GiB ("perf/peak_gb/<phase>"), which bench/gpu_smoke.sh holds against bench/memory.py's prediction."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    yield
    if cuda:
        torch.cuda.synchronize()
        peak = "perf/peak_gb/" + key.split("/", 1)[1]
        metrics[peak] = max(metrics.get(peak, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    metrics[key] = metrics.get(key, 0.0) + time.time() - t0  # a phase run several times (rounds) adds up


def sample_and_allocate(cur: cures.Curriculum, subset_id: int, step: int, cfg: Config, world: int, rnd: int = 0):
    """Draw m prompts with replacement from rho* (Eq. 14), allocate N rollouts over the draws (Eq. 20), form
    the GRPO groups and give each a mini-batch and a rank. Identical on every rank (one random stream per
    step and round). Returns (prompt (g,), rollouts (g,), mini-batch (g,), rank (g,), rollouts per draw (m,),
    draws (m,))."""
    rng = np.random.default_rng(stream_seed(cfg.run.seed, "sample", subset_id, step, rnd=rnd))
    draws = cur.sample(cfg.rollout.prompts_per_step, rng)  # (m,)
    n_draws = cur.allocate(draws, cfg.rollout.rollouts_per_step)  # (m,) sums to N
    idx, n, mb = training_groups(draws, n_draws, cfg.train.mini_batch_prompts, cfg.train.group_by)  # (g,)
    return idx, n, mb, assign_groups(n, mb, world), n_draws, draws


def observe_rollouts(cur: cures.Curriculum, prompts: np.ndarray, n: np.ndarray, group: torch.Tensor,
                     rewards: torch.Tensor):
    """Eq. 23 with every rank's rollouts: alpha += #correct, beta += #wrong for this rank's groups
    (prompts, n: (g_rank,); group, rewards: (B,)), gathered so every rank holds the same posteriors."""
    correct = torch.zeros(len(prompts)).index_add_(0, group, rewards)  # (g_rank,)
    counts = all_gather_list([(int(prompts[j]), float(correct[j]), int(n[j])) for j in range(len(prompts))])
    i_all, c_all, n_all = (np.array(x) for x in zip(*counts))
    cur.observe(i_all.astype(np.int64), c_all, n_all)


def compute_advantages(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor, cfg: Config,
                       rank: int) -> torch.Tensor:
    """GRPO: per group, whole on this rank. REINFORCE++: rewards whitened over every rank's response
    tokens. rewards, group, lengths: (B,) -> (B,)."""
    if cfg.train.advantage == "grpo":
        return grpo.group_advantages(rewards, group)  # (B,)
    if cfg.train.advantage == "rpp":
        everything = all_gather_list([(rank, r, l) for r, l in zip(rewards.tolist(), lengths.tolist())])
        r_all = torch.tensor([r for _, r, _ in everything])
        l_all = torch.tensor([l for _, _, l in everything])
        mask_all = (torch.arange(int(l_all.max()))[None] < l_all[:, None]).float()  # (B_all, T)
        return grpo.rpp_advantages(r_all, mask_all)[torch.tensor([k == rank for k, _, _ in everything])]
    raise ValueError(f"unknown advantage {cfg.train.advantage!r}")


P_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # posterior-accuracy bins of the difficulty metrics


def difficulty_shares(p: np.ndarray) -> dict:
    """The share of the step's draws in each bin of posterior accuracy p (Eq. 22) at draw time: where the
    curriculum spends its prompts (uniform sampling spends them as the data lies)."""
    counts, _ = np.histogram(p, bins=P_BINS)  # the last bin includes 1.0
    return {f"draws/p_{a:.1f}-{b:.1f}": float(c) / max(len(p), 1) for a, b, c in zip(P_BINS, P_BINS[1:], counts)}


def level_shares(levels: list) -> dict:
    """The share of the step's draws at each difficulty level of the data (a row's "level", when it has one:
    MATH's "Level 1-5", the tiny task's digit count), a difficulty the curriculum does not see."""
    known = [str(x) for x in levels if x is not None]
    return {f"draws/level_{v}": known.count(v) / len(known) for v in sorted(set(known))}


def group_uniform(rewards: torch.Tensor, group: torch.Tensor, G: int) -> torch.Tensor:
    """(G,) True for each group whose rollouts all score the same (zero GRPO advantage). rewards, group: (B,)."""
    lo = torch.full((G,), float("inf")).scatter_reduce(0, group, rewards, "amin")
    hi = torch.full((G,), float("-inf")).scatter_reduce(0, group, rewards, "amax")
    return lo == hi


def mechanism_sums(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor) -> dict:
    """What the paper argues a curriculum changes: rollouts in groups with mixed rewards (a non-zero GRPO
    advantage: where the gradient is) and response tokens in groups whose rollouts all score the same
    (zero advantage: generated, scored and trained on for no gradient). rewards, group, lengths: (B,);
    sums over this rank's groups (every group lies whole on one rank), reduced over ranks by name."""
    uniform = group_uniform(rewards, group, int(group.max()) + 1 if len(group) else 0)[group]  # (B,)
    return {"mixed_rollouts": float((~uniform).sum()), "zero_adv_tokens": float(lengths[uniform].sum())}


def mini_batch_sequences(subset: list[dict], prompts: np.ndarray, mb: np.ndarray, out, adv: torch.Tensor,
                         num_mb: int) -> list[list[dict]]:
    """This rank's sequences (prompt + response, advantage) for the update, one list per mini-batch.
    prompts, mb: (g_rank,) for this rank's groups; out: their Rollouts; adv (B,)."""
    responses = out.responses()
    parts = [[] for _ in range(num_mb)]
    for b, j in enumerate(out.prompt_index.tolist()):
        p = subset[prompts[j]]["prompt_ids"]
        parts[mb[j]].append({"ids": p + responses[b], "prompt_len": len(p), "resp_len": len(responses[b]),
                             "adv": adv[b:b + 1]})
    return parts


def add_logprobs(parts, plans, policy: Policy, ref, device, cfg: Config):
    """old_logp under the sampling policy and ref_logp under the KL reference, for every mini-batch.
    The first mini-batch of a one-epoch update is trained before any optimiser step, by the policy that
    sampled it: its old_logp would equal logp.detach(), which update_policy uses when it is absent."""
    for b_id, (part, batches) in enumerate(zip(parts, plans)):
        on_policy = b_id == 0 and cfg.train.epochs == 1
        models = ([] if on_policy else [("old_logp", policy)]) + ([("ref_logp", ref)] if ref is not None else [])
        for key, model in models:
            for i, lp in score_logprobs(model, batches, device, cfg).items():
                part[i][key] = lp.cpu()


def update_epochs(policy: Policy, optimizer, scheduler, parts, plans, state: dict, device, cfg: Config,
                  world: int):
    """PPO: `epochs` passes over the mini-batches, one optimiser step each. A non-finite update is skipped
    with a warning; `train.max_bad_steps` in a row abort. Returns (summed actor metrics, grad norms)."""
    sums, norms = {}, []
    for _ in range(cfg.train.epochs):
        for part, batches in zip(parts, plans):
            s_mb, norm, ok = update_policy(policy, optimizer, part, device, cfg, world, scheduler, batches)
            norms.append(norm)
            for k, v in s_mb.items():
                sums[k] = sums.get(k, 0.0) + v
            state["bad_updates"] = 0 if ok else state["bad_updates"] + 1
            if not ok:
                print0(f"warning: non-finite loss or gradient at step {state['step']}: update skipped")
                if state["bad_updates"] >= cfg.train.max_bad_steps:
                    raise RuntimeError(f"{state['bad_updates']} non-finite updates in a row: aborting")
    return sums, norms


def reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Each named value summed over ranks (every rank holds the same names)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce(torch.tensor([float(sums[k]) for k in keys])).tolist()))


def draw_and_generate(subset, subset_id: int, step: int, cur: cures.Curriculum, gen, tokenizer, cfg: Config,
                      rank: int, world: int, metrics: dict, stop=None, rnd: int = 0) -> dict:
    """One round of a step: draw m prompts and allocate N rollouts (Eq. 14, Eq. 20), generate and score this
    rank's groups, update the posteriors with every rank's rollouts (Eq. 23). A step has one round, or
    several with rollout.dynamic_sampling. Returns the round: the draw (idx, n, mb, owner: (g,), draws,
    n_draws, p_draws: (m,)), this rank's groups `mine`, their Rollouts, rewards (B,), checker timeouts."""
    with timed(metrics, "time/curriculum"):  # draw m prompts (Eq. 14, Alg. 1 l. 12), allocate N rollouts (Eq. 20)
        idx, n, mb, owner, n_draws, draws = sample_and_allocate(cur, subset_id, step, cfg, world, rnd)
        mine = np.flatnonzero(owner == rank)  # this rank's groups
        p_draws = cur.accuracy()[draws]  # what was drawn, by its difficulty then
    with timed(metrics, "time/rollout_and_reward"):  # generate n_i rollouts per prompt, score them
        out, rewards, timeouts = generate_and_score(
            gen, tokenizer, [subset[i]["prompt_ids"] for i in idx[mine]], [subset[i]["answer"] for i in idx[mine]],
            n[mine].tolist(), cfg, stream_seed(cfg.run.seed, "rollout", subset_id, step, rank, rnd), stop,
            "rollouts" if rank == 0 else "")
    observe_rollouts(cur, idx[mine], n[mine], out.prompt_index, rewards)  # Beta counts, Eq. 23
    return {"idx": idx, "n": n, "mb": mb, "owner": owner, "draws": draws, "n_draws": n_draws, "p_draws": p_draws,
            "mine": mine, "out": out, "rewards": rewards, "timeouts": timeouts,
            "mixed": group_mixed(rewards, out.prompt_index, len(mine), mine, len(idx))
            if cfg.rollout.dynamic_sampling else None}  # a collective: only where the filter needs it


def group_mixed(rewards: torch.Tensor, group: torch.Tensor, g_rank: int, mine: np.ndarray, g: int) -> np.ndarray:
    """Which of the round's g groups have mixed rewards (a non-zero GRPO advantage), known on every rank.
    rewards, group: (B,) this rank's rollouts and their group among its g_rank groups `mine`."""
    mixed = np.zeros(g, dtype=bool)
    for j, is_mixed in all_gather_list(list(zip(mine.tolist(), (~group_uniform(rewards, group, g_rank)).tolist()))):
        mixed[j] = is_mixed
    return mixed


def count_mixed(rounds: list[dict]) -> int:
    return int(sum(r["mixed"].sum() for r in rounds))


def keep_mixed_groups(rounds: list[dict], cfg: Config, rank: int, world: int, pad_id: int):
    """DAPO's dynamic sampling filter: of every round's groups in the order generated, the first m with mixed
    rewards (then, after rollout.max_rounds rounds short of m, the uniform ones in order), cut into mini-batches
    of train.mini_batch_prompts groups and spread over ranks afresh; each kept group's rollouts move to its new
    rank. Returns (prompt (k,), mini-batch (k,), this rank's kept groups, their Rollouts, rewards) like one round."""
    groups = [(r, j) for mixed_first in (True, False) for r, R in enumerate(rounds)
              for j in np.flatnonzero(R["mixed"] == mixed_first)][:cfg.rollout.prompts_per_step]
    idx = np.array([rounds[r]["idx"][j] for r, j in groups], dtype=np.int64)
    n = np.array([rounds[r]["n"][j] for r, j in groups], dtype=np.int64)
    mb = np.arange(len(groups)) // max(1, cfg.train.mini_batch_prompts)
    owner = assign_groups(n, mb, world)
    new_slot = {key: k for k, key in enumerate(groups)}
    payload = []  # (kept position, responses, rewards, finished) of the kept groups this rank generated
    for r, R in enumerate(rounds):
        responses, group = R["out"].responses(), R["out"].prompt_index
        for local, j in enumerate(R["mine"].tolist()):
            if (r, j) in new_slot:
                rows = torch.nonzero(group == local).flatten().tolist()
                payload.append((new_slot[(r, j)], [responses[b] for b in rows], R["rewards"][rows].tolist(),
                                R["out"].finished[rows].tolist()))
    mine = np.flatnonzero(owner == rank)
    got = {k: rest for k, *rest in all_gather_list(payload) if owner[k] == rank}
    responses, rewards, finished, prompt_index = [], [], [], []
    for local, k in enumerate(mine.tolist()):
        rs, rw, fin = got[k]
        responses += rs
        rewards += rw
        finished += fin
        prompt_index += [local] * len(rs)
    out = rollout.Rollouts.from_responses(responses, prompt_index, finished, pad_id)
    return idx, mb, mine, out, torch.tensor(rewards, dtype=torch.float32)


def train_step(subset: list[dict], subset_id: int, cur: cures.Curriculum, policy: Policy, ref, gen, tokenizer,
               optimizer, scheduler, state: dict, cfg: Config, rank: int, world: int, device, stop=None) -> dict:
    """One step of Algorithm 1 on this rank, in the paper's order. Advances the counters in `state`
    (not the step) and returns the step's metrics, reduced over ranks. A stop request during generation
    raises StopRequested before anything has changed (curriculum, weights, counters)."""
    step, metrics, t_step = state["step"], {}, time.time()
    with timed(metrics, "time/sync"):  # the policy that samples: one all-gather per phase, not per token
        sync_generation_weights(policy, gen)
    rounds = [draw_and_generate(subset, subset_id, step, cur, gen, tokenizer, cfg, rank, world, metrics, stop)]
    if cfg.rollout.dynamic_sampling:  # DAPO (beyond the paper): more rounds until m groups have mixed rewards
        while count_mixed(rounds) < cfg.rollout.prompts_per_step and len(rounds) < cfg.rollout.max_rounds:
            rounds.append(draw_and_generate(subset, subset_id, step, cur, gen, tokenizer, cfg, rank, world, metrics,
                                            stop, rnd=len(rounds)))
        idx, mb, mine, out, rewards = keep_mixed_groups(rounds, cfg, rank, world, tokenizer.pad_token_id)
        metrics.update({"dynamic/rounds": len(rounds), "dynamic/mixed_groups": count_mixed(rounds)})
    else:
        idx, mb, mine, out, rewards = (rounds[0][k] for k in ("idx", "mb", "mine", "out", "rewards"))
    draws = np.concatenate([r["draws"] for r in rounds])
    metrics.update(difficulty_shares(np.concatenate([r["p_draws"] for r in rounds])))  # by difficulty at draw time
    metrics.update(level_shares([subset[i]["level"] for i in draws]))
    adv = compute_advantages(rewards, out.prompt_index, out.lengths, cfg, rank)  # (B,) GRPO or REINFORCE++
    num_mb = int(mb.max()) + 1
    parts = mini_batch_sequences(subset, idx[mine], mb[mine], out, adv, num_mb)
    with timed(metrics, "time/logprobs"):
        plans = [plan_micro_batches(p, cfg) for p in parts]
        add_logprobs(parts, plans, policy, ref, device, cfg)
    with timed(metrics, "time/update"):  # policy update: PPO-clip, dual clip, k3 KL, token-mean (grpo.py)
        sums, norms = update_epochs(policy, optimizer, scheduler, parts, plans, state, device, cfg, world)

    # one metrics dict, reduced over ranks by name
    generated = {}  # every rollout of every round (what was paid for), on this rank
    for r in rounds:
        o, rw = r["out"], r["rewards"]
        for k, v in {"reward": rw.sum(), "responses": len(rw), "response_tokens": o.lengths.sum(),
                     "truncated": (~o.finished).sum(), "timeouts": r["timeouts"],
                     **mechanism_sums(rw, o.prompt_index, o.lengths)}.items():
            generated[k] = generated.get(k, 0.0) + float(v)
    tok = reduce_sums({**generated, "trained_tokens": sum(s["resp_len"] for p in parts for s in p),
                       "update_tokens": sum(len(s["ids"]) for p in parts for s in p), **sums})
    B, ntok = tok["responses"], tok["trained_tokens"] * max(1, cfg.train.epochs)
    metrics.update({"train/reward": tok["reward"] / B, "train/response_len": tok["response_tokens"] / B,
                    "train/truncated": tok["truncated"] / B, "reward/timeouts": tok["timeouts"],
                    "mech/mixed_rollouts": tok["mixed_rollouts"] / B,  # share in groups with mixed rewards
                    "mech/zero_adv_tokens": tok["zero_adv_tokens"],  # response tokens spent for no gradient
                    "mech/zero_adv_token_share": tok["zero_adv_tokens"] / max(tok["response_tokens"], 1),
                    "actor/grad_norm": float(np.mean(norms)), "actor/lr": scheduler.get_last_lr()[0]})
    for k in sorted(sums):  # losses: mean over optimiser steps; the rest: per trained token
        metrics[k] = tok[k] / (num_mb * cfg.train.epochs) if k in ("actor/pg_loss", "actor/kl") else tok[k] / max(ntok, 1)
    state["rollouts_train"] += int(sum(r["n"].sum() for r in rounds))
    state["tokens_train"] += int(tok["response_tokens"])
    metrics.update(cur.stats())
    n_draws = np.concatenate([r["n_draws"] for r in rounds])
    metrics.update({"cures/n_min": int(n_draws.min()), "cures/n_max": int(n_draws.max()),
                    "cures/unique_prompts": len(np.unique(draws)), "rollouts/train": state["rollouts_train"],
                    "rollouts/cold_start": state["rollouts_cold"],
                    "rollouts/total": state["rollouts_train"] + state["rollouts_cold"],
                    "tokens/train": state["tokens_train"], "subset": subset_id, "time/step": time.time() - t_step,
                    "perf/rollout_tokens_per_s": tok["response_tokens"] / max(metrics["time/rollout_and_reward"], 1e-9),
                    "perf/update_tokens_per_s": tok["update_tokens"] / max(metrics["time/update"], 1e-9)})
    if device.type == "cuda":  # the step's peak: the largest of its phases'
        metrics["perf/peak_mem_gb"] = max(v for k, v in metrics.items() if k.startswith("perf/peak_gb/"))
    return metrics


# ----------------------------------------------------------------------------------------------
# Main: Algorithm 1


def check_out_dir(cfg: Config):
    """A fresh run (no run.resume) into a directory that holds another run's checkpoints or metrics would mix
    the two: refuse, unless run.overwrite, which removes them first."""
    out = cfg.run.out_dir
    found = [p for p in ("checkpoints", "metrics.jsonl", "final") if os.path.exists(os.path.join(out, p))]
    if cfg.run.resume or not found:
        return
    if not cfg.run.overwrite:
        raise FileExistsError(f"run.out_dir={out} already holds a run ({', '.join(found)}): continue it with "
                              "--run.resume=auto, write elsewhere with --run.out_dir=..., or replace it with "
                              "--run.overwrite=true")
    if int(os.environ.get("RANK", 0)) == 0:
        for p in found:
            target = os.path.join(out, p)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


# keys a resumed run must share with its checkpoint (they define which subset and step come next)
RESUME_MUST_MATCH = {"model": ("tokenizer",),
                     "data": ("train", "split", "problem_key", "answer_key", "answer_format", "num_subsets",
                              "max_prompts", "max_prompt_len", "system_prompt", "user_template"),
                     "cures": ("sampling", "allocation", "sigma", "tau", "n_min", "n_max", "cold_start_rollouts"),
                     "train": ("steps_per_subset", "restart_each_subset", "group_by"),
                     "rollout": ("prompts_per_step", "rollouts_per_step"), "run": ("seed",)}


def _saved(config: dict, section: str, key: str):
    """A key of a checkpoint's config (data.train was one string before it became a list)."""
    value = config.get(section, {}).get(key)
    return [value] if (section, key) == ("data", "train") and isinstance(value, str) else value


def resume_state(cfg: Config, policy, optimizer, scheduler, cur, ref) -> dict:
    """The run's counters, from the checkpoint named by run.resume (auto: the newest) or fresh."""
    state = {"step": 0, "subset": -1, "rollouts_cold": 0, "rollouts_train": 0, "tokens_train": 0, "bad_updates": 0}
    candidates = checkpoint_dirs(cfg.run.out_dir)[::-1] if cfg.run.resume == "auto" else [cfg.run.resume]
    for path in [p for p in candidates if p]:
        try:
            meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
        except (Exception, CheckpointException) as e:  # noqa: BLE001  corrupt or truncated: try the one before
            if cfg.run.resume != "auto":
                raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e
            print0(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        old, new = meta["config"], config_dict(cfg)
        changed = [f"{s}.{k}: {_saved(old, s, k)!r} -> {v!r}" for s in RESUME_MUST_MATCH for k, v in new[s].items()
                   if k in RESUME_MUST_MATCH[s] and _saved(old, s, k) != v]
        if changed:
            raise ValueError(f"cannot resume {path}: the config differs from the checkpoint's in keys that define "
                             f"the run: {'; '.join(changed)}")
        try:
            meta = load_checkpoint(path, policy, optimizer, cur, ref)
        except (Exception, CheckpointException) as e:  # noqa: BLE001  an older one overwrites what this half-loaded
            if cfg.run.resume != "auto" or path == candidates[-1]:
                raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e
            print0(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        state.update({k: meta.get(k, state[k]) for k in state})
        scheduler.load_state_dict(meta["scheduler"])
        print0(f"resumed from {path} at step {state['step']}")
        return state
    if any(candidates):  # never a fresh start (or half-loaded weights) over checkpoints that exist
        raise RuntimeError(f"checkpoints exist but none could be loaded completely: {', '.join(filter(None, candidates))}; "
                           "move them away to start afresh, or name a good one with --run.resume=PATH")
    return state


def main(argv=None):
    argv, t_start = sys.argv[1:] if argv is None else argv, time.time()
    if "--help" in argv or "-h" in argv:
        print(usage())
        return None
    cfg = load_config(argv)
    validate_config(cfg)
    check_out_dir(cfg)
    rank, world, device = setup_distributed(cfg.run.dist_timeout_minutes)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.run.seed)
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    print0(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    if rank == 0:
        with open(os.path.join(cfg.run.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict(cfg), f, sort_keys=False)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    subsets, skipped = load_subsets(cfg, tokenizer)  # the T subsets of Algorithm 1
    print0(f"data: {sum(map(len, subsets))} prompts in {len(subsets)} subsets; skipped: {skipped['too_long']} "
           f"longer than data.max_prompt_len, {skipped['no_answer']} solutions without a \\boxed{{}} answer")
    eval_problems = []
    if cfg.eval.data:
        eval_problems = evaluation.load_benchmark(cfg.eval.data)[0][:cfg.eval.max_problems or None]
    policy, ref, gen = build_models(cfg, device, world)
    optimizer, scheduler = make_optimizer(policy, cfg)
    saved_ref = ref if cfg.train.restart_each_subset else None  # the reference moves: checkpoint it
    cur = cures.Curriculum(1, cfg.cures.prior_alpha, cfg.cures.prior_beta, cfg.cures.tau, cfg.cures.sampling,
                           cfg.cures.allocation, cfg.cures.sigma, cfg.cures.n_min, cfg.cures.n_max or None)
    M, T = cfg.train.steps_per_subset, len(subsets)
    total_steps = min(T * M, cfg.run.max_steps or T * M)
    state = resume_state(cfg, policy, optimizer, scheduler, cur, saved_ref)
    if 0 <= state["subset"] < T and len(cur.alpha) != len(subsets[state["subset"]]):
        raise ValueError(f"cannot resume: the checkpoint's curriculum covers {len(cur.alpha)} prompts, subset "
                         f"{state['subset']} now has {len(subsets[state['subset']])}: the data or its filtering changed")
    logger = Logger(cfg, rank, state["step"])
    stop = {"requested": False}
    for sig in (signal.SIGTERM, signal.SIGINT):  # save a checkpoint at the next safe point, then exit
        signal.signal(sig, lambda *_: stop.update(requested=True))
    if state["step"] == 0:
        first = {"data/prompts": sum(map(len, subsets)), "data/skipped_too_long": skipped["too_long"],
                 "data/skipped_no_answer": skipped["no_answer"], "time/startup": time.time() - t_start}  # load, shard
        if eval_problems:
            with timed(first, "time/eval"):
                sync_generation_weights(policy, gen)
                first["eval/acc"] = run_eval(gen, tokenizer, eval_problems, cfg, rank, world,
                                             stream_seed(cfg.run.seed, "eval", 0, 0))  # not interrupted: no step yet
        logger.log(first, 0)
    # the Beta estimates steer sampling (Eq. 14) or allocation (Eq. 20-21); GRPO (uniform/uniform) never reads them
    estimates_used = cfg.cures.sampling == "cures" or cfg.cures.allocation == "cures"
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0, desc="steps")
    stopped, last_save = False, time.time()
    save = lambda: save_checkpoint(policy, optimizer, cur, {**state, "scheduler": scheduler.state_dict()},  # noqa: E731
                                   cfg, rank, saved_ref)

    for subset_id in range(state["step"] // M, T):  # Algorithm 1: one data subset at a time
        if state["step"] >= total_steps or stopped:
            break
        subset, cold = subsets[subset_id], {}
        try:
            if state["subset"] != subset_id:  # a new subset (a run resumed inside one goes straight to its steps)
                if cfg.train.restart_each_subset:  # as released: a fresh trainer from the previous subset's weights
                    optimizer, scheduler = make_optimizer(policy, cfg)
                    reanchor_reference(policy, ref)
                cur.reset(len(subset))  # forget the previous subset's estimates (no decay, a reset)
                if estimates_used and cfg.cures.cold_start_rollouts > 0:  # cold start: N' rollouts of every prompt
                    sync_generation_weights(policy, gen)
                    cold = cold_start(cur, subset, gen, tokenizer, cfg, rank, world,
                                      stream_seed(cfg.run.seed, "cold_start", subset_id, state["step"], rank), stop)
                    state["rollouts_cold"] += cold["cold/rollouts"]
                state["subset"] = subset_id

            while state["step"] < min((subset_id + 1) * M, total_steps):  # M steps on the subset
                metrics = cold | train_step(subset, subset_id, cur, policy, ref, gen, tokenizer, optimizer,
                                            scheduler, state, cfg, rank, world, device, stop)
                cold = {}
                state["step"] += 1

                # --- log, eval, checkpoint -----------------------------------------------------------
                last = state["step"] == total_steps
                try:
                    if eval_problems and ((cfg.eval.every and state["step"] % cfg.eval.every == 0) or last):
                        with timed(metrics, "time/eval"):
                            sync_generation_weights(policy, gen)
                            metrics["eval/acc"] = run_eval(gen, tokenizer, eval_problems, cfg, rank, world,
                                                           stream_seed(cfg.run.seed, "eval", 0, state["step"]), stop)
                finally:  # an interrupted evaluation still logs its finished step
                    log_step(logger, bar, metrics, state["step"])
                due = rank == 0 and 0 < 60 * cfg.run.save_every_minutes < time.time() - last_save  # rank 0's clock
                flags = all_reduce(torch.tensor([float(stop["requested"]), float(due)]))  # the same on every rank
                stopped, due = flags[0].item() > 0, flags[1].item() > 0
                if last or stopped or due or (cfg.run.save_every and state["step"] % cfg.run.save_every == 0):
                    save()
                    last_save = time.time()
                if stopped:
                    break
        except StopRequested:  # inside generation: the unfinished step is dropped, the last finished one saved
            stopped = True
            save()
        if stopped:
            print0(f"stop requested (SIGTERM or Ctrl-C): checkpoint saved at step {state['step']}, exiting")
    bar.close()
    logger.close()
    if state["step"] > 0 and (state["step"] == T * M or (cfg.run.max_steps and state["step"] >= cfg.run.max_steps)):
        save_hf(policy, tokenizer, os.path.join(cfg.run.out_dir, "final"), rank, cfg)
        print0(f"done: {cfg.run.out_dir}/final (Hugging Face model), metrics.jsonl, config.yaml, checkpoints/")
    if dist.is_initialized():
        dist.destroy_process_group()
    return state, cur


def leave(code: int = 0):
    """End a torchrun rank whose work is written and closed, without the interpreter's teardown. Under FSDP2
    the DTensor parameters keep the device mesh, and with it the gloo process group, alive past
    destroy_process_group: its worker threads outlive the interpreter and, rarely, release a Python object
    while it is torn down, and torch aborts the rank ("terminate called without an active exception",
    pytorch/pytorch#190489): torchrun then reports a finished run as failed (seen once in CI, a 2-rank test)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:  # a process group was set up (torchrun, or plain python on a GPU)
        leave()
