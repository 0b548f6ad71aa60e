"""The run's configuration: one typed dataclass per section of the YAML files.

`Config` is the single source of truth (defaults = the paper's setting, PAPER.md section 5, and the released
pipeline where the paper is silent, section 8); a YAML file holds only what differs; `--section.key=value`
overrides are type-checked and an unknown key fails with the closest valid name. `validate_config` rejects
choices that would otherwise fail only after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

import yaml

import rollout
from eval import SYSTEM_PROMPT, USER_TEMPLATE


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
    cache: str = "dynamic"  # dynamic (HF generate: the reference) | slots (our decode loop: CUDA graphs, all
    #                         rollouts at once) | paged (transformers' continuous batching)
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
    group_key: str = "level"  # a field of the evaluation rows: accuracy also per value (eval/acc/level_2); "": off


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
    stop_grace_s: float = 25.0  # a stop signal to the end of the save: torchrun's SIGKILL comes 30 s after its
                                # SIGTERM (--shutdown-timeout); a stop inside an update that cannot end and save
                                # in this time is abandoned unsaved (train.UpdateStop)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cures: CuresConfig = field(default_factory=CuresConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# What a resumed run may change from its checkpoint's config. Every Config field is in exactly one class
# (tests/test_config.py fails for a field added without one); infra/checkpoint.py acts on them, and
# tests/test_resume_classes.py resumes with each free and numerics key changed and checks its promise.
#   refused:  the model, the data, the method, what the rollouts and rewards are, or which draw comes next: another
#             value is refused, naming the key (rollout.cache: a change to or from paged, whose continuous
#             batching samples another stream; dynamic <-> slots is numerics)
#   applied:  optimiser settings: the new value is applied to the loaded AdamW state and lr schedule
#   numerics: the same computation in another layout (speed, memory): the run equals the uninterrupted one up to
#             float rounding. The rollout batching keys and the cache (dynamic, slots) are exact on a CPU (every
#             rollout samples with its own key), up to the kernels' numerics on a GPU; the others change the
#             weights by rounding, which a later sampled token can amplify, as two GPUs' runs differ
#   free:     where the run writes, how often it saves, when it stops, how it logs and evaluates: the training
#             (rollouts, rewards, posteriors, weights) is the uninterrupted run's, bit for bit
RESUME_REFUSED = (
    "model.path model.tokenizer "  # the tokenizer is compared as used: model.tokenizer or else model.path
    "data.train data.split data.problem_key data.answer_key data.answer_format data.num_subsets data.max_prompts "
    "data.max_prompt_len data.system_prompt data.user_template "
    "cures.sampling cures.allocation cures.sigma cures.grad_param cures.tau cures.prior_alpha cures.prior_beta "
    "cures.cold_start_rollouts cures.n_min cures.n_max "
    "rollout.prompts_per_step rollout.rollouts_per_step rollout.max_new_tokens rollout.temperature rollout.top_p "
    "rollout.stop_at_im_end rollout.dynamic_sampling rollout.max_rounds "
    "train.steps_per_subset train.restart_each_subset train.group_by train.mini_batch_prompts train.epochs "
    "train.advantage train.clip_low train.clip_high train.clip_c train.loss_agg train.kl_coef train.kl_kind "
    "run.seed run.reward_timeout").split()  # the timeout decides which slow answers score 0: part of the reward
RESUME_APPLIED = "train.lr train.warmup_steps train.weight_decay train.betas train.adam_eps train.grad_clip".split()
RESUME_NUMERICS = (
    "model.attn_implementation model.gradient_checkpointing "
    "rollout.max_batch_tokens rollout.max_batch_size rollout.cache rollout.share_prefill "
    "train.micro_batch_tokens train.pack train.share_prompt train.cpu_offload train.logprob_chunk").split()
RESUME_FREE = (
    "train.max_bad_steps "
    "eval.data eval.every eval.max_problems eval.samples eval.temperature eval.max_new_tokens eval.group_key "
    "run.out_dir run.save_every run.save_every_minutes run.keep_checkpoints run.resume run.overwrite run.max_steps "
    "run.reward_workers run.wandb_project run.tensorboard run.dist_timeout_minutes run.stop_grace_s").split()


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every field of the config as "section.key", in declaration order."""
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


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


def usage(doc: str, cfg: Config | None = None) -> str:
    """`python train.py --help`: the first paragraph of `doc` (train.py's docstring), how to call, and every
    config key with its default."""
    cfg = cfg or Config()
    lines = [doc.split("\n\n")[0], "", "usage: [torchrun ...] train.py [--config FILE.yaml] [--section.key=value ...]",
             "", "config keys (defaults = the paper's setting; see docs/config.md):"]
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
               "train.group_by": ("prompt", "draw"), "rollout.cache": ("dynamic", "slots", "paged"),
               "data.answer_format": ("answer", "solution")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    if not (0 < cfg.rollout.top_p <= 1) or cfg.rollout.temperature < 0 or cfg.eval.temperature < 0:
        raise ValueError(f"rollout.top_p must be in (0, 1] and temperatures >= 0, not top_p={cfg.rollout.top_p}, "
                         f"temperature={cfg.rollout.temperature}, eval.temperature={cfg.eval.temperature}")
    micro_batch_layout(cfg)  # train.pack, and share_prompt's attention needs
    cache_tokens, attn = cfg.rollout.max_batch_tokens, cfg.model.attn_implementation
    forward_tokens, mask_limit = min(rollout.PAGED_FORWARD_TOKENS, cache_tokens), 2**32
    dense_mask = "flash" not in attn and not rollout.PAGED_TORCH_FLASH  # else rollout.paged_varlen_attention
    if cfg.rollout.cache == "paged" and dense_mask and forward_tokens * cache_tokens > mask_limit:
        raise ValueError(f"rollout.cache=paged with model.attn_implementation={attn} and rollout.PAGED_TORCH_FLASH "
                         f"off builds a dense (forward tokens x cache tokens) mask: {forward_tokens:,} x "
                         f"{cache_tokens:,} here (on an H200 such a path decoded 8-23x slower a step than the dynamic "
                         f"cache at the same batch). Use flash_attention_2, or rollout.PAGED_TORCH_FLASH, or "
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
