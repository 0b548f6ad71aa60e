"""Checkpoints and resume: the sharded model, optimiser and KL reference (torch.distributed.checkpoint), the
curriculum and counters beside them, written atomically (step_X.tmp renamed when complete); resume from the
newest readable one with the keys that define the run checked against it; the out_dir guard of a fresh run;
the final model in Hugging Face format.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

import eval as evaluation
from infra.config import Config, config_dict
from infra.distributed import barrier, print0
from infra.models import Policy


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
