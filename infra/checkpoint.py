"""Checkpoints and resume: the sharded model, optimiser and KL reference (torch.distributed.checkpoint), the
curriculum and counters beside them, written atomically (step_X.tmp renamed when complete); resume from the
newest readable one with the keys that define the run checked against it; the out_dir guard of a fresh run;
the final model in Hugging Face format.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import warnings

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

import eval as evaluation
from infra.config import RESUME_APPLIED, RESUME_REFUSED, Config, config_dict
from infra.distributed import barrier, print0
from infra.models import Policy


def check_out_dir(cfg: Config):
    """A fresh run (no run.resume) into a directory that holds another run's checkpoints or metrics would mix
    the two: refuse, unless run.overwrite, which removes them first."""
    out = cfg.run.out_dir
    found = [p for p in ("checkpoints", "metrics.jsonl", "final", "eval") if os.path.lexists(os.path.join(out, p))]
    found += ["config.yaml"] if found and os.path.islink(os.path.join(out, "config.yaml")) else []
    if not (found and cfg.run.overwrite and not cfg.run.resume):
        for name in set(found + ["config.yaml"]):  # never followed out of the run directory: refused
            refuse_links(os.path.join(out, name), depth=3 if name == "checkpoints" else 1)  # eval/: its files too
    if cfg.run.resume == "auto" and not checkpoint_dirs(out):  # (every rank checks this before the process
        refuse_fresh_start_over_a_run(out)                     # group forms, so before any rank writes)
    if cfg.run.resume or not found:
        return
    if not cfg.run.overwrite:
        raise FileExistsError(f"run.out_dir={out} already holds a run ({', '.join(found)}): continue it with "
                              "--run.resume=auto, write elsewhere with --run.out_dir=..., or replace it with "
                              "--run.overwrite=true")
    if int(os.environ.get("RANK", 0)) == 0:
        for p in found:  # a link is removed, not followed
            target = os.path.join(out, p)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint or run directory holds what this code never writes and what could run code or make the run
    read or write elsewhere (a pickle asking for more than plain data, a rank-local DCP metadata file, a storage
    path outside the checkpoint, a symbolic link): never loaded, never skipped for an older checkpoint."""


# numpy arrays and scalars, as checkpoints written before meta.pt held tensors stored the curriculum (data, not
# code), under numpy 2's module names and numpy 1's
_multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
_OLD_META_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.float64)), _multiarray._reconstruct, _multiarray.scalar,
                     (_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (_multiarray.scalar, "numpy.core.multiarray.scalar")]


def read_meta(path: str) -> dict:
    """A checkpoint's meta.pt (counters, scheduler, curriculum, config), loaded with torch.load(weights_only=True):
    tensors, numbers, strings, lists and dicts only, so a checkpoint handed over cannot run code on resume
    (meta.pt of checkpoints written before it held tensors may also hold numpy arrays: allowed, they are data).
    A file that asks for anything else raises UnsafeCheckpoint naming what it asked for; a corrupt one raises
    what torch.load raised."""
    import pickle

    file = os.path.join(path, "meta.pt")
    refuse_links(file, depth=0)
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception:  # noqa: BLE001  not a torch.save file at all: corrupt, as torch.load said
            raise e from None
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _OLD_META_GLOBALS}
        if set(wanted) - allowed:
            raise UnsafeCheckpoint(f"refusing to load {file}: it asks for {', '.join(sorted(set(wanted) - allowed))}, "
                                   "which a checkpoint of this code never holds and which could run code when loaded. "
                                   "Resume only from checkpoints this code wrote.") from None
        with torch.serialization.safe_globals(_OLD_META_GLOBALS):
            return torch.load(file, weights_only=True)


def _saved(config: dict, key: str):
    """A dotted key of a checkpoint's config; a key the checkpoint predates has its default (the behaviour then).
    data.train was one string before it became a list."""
    section, name = key.split(".")
    value = config.get(section, {}).get(name, getattr(getattr(Config(), section), name))
    value = [value] if key == "data.train" and isinstance(value, str) else value
    return list(value) if key == "train.betas" else value


def _effective(config: dict, key: str):
    """What a key means in a run: model.tokenizer is the tokenizer loaded (model.path when empty), and a local
    model or tokenizer directory is compared by its real path (./models/tiny and models/tiny/ are one)."""
    value = (_saved(config, key) or _saved(config, "model.path")) if key == "model.tokenizer" else _saved(config, key)
    return os.path.realpath(value) if key in ("model.path", "model.tokenizer") and os.path.isdir(value) else value


def check_resume_config(old: dict, cfg: Config, path: str) -> list[str]:
    """Refuse a resume whose config changes a refused key (infra/config.py: RESUME_REFUSED, and rollout.cache to
    or from paged), naming every such key with both values. Returns the applied keys that changed ("train.lr: 1e-06 -> 2e-06")."""
    new = config_dict(cfg)
    changed = {k: (_effective(old, k), _effective(new, k)) for k in RESUME_REFUSED + RESUME_APPLIED
               if _effective(old, k) != _effective(new, k)}
    refused = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in RESUME_REFUSED]
    cache = (_effective(old, "rollout.cache"), cfg.rollout.cache)
    if cache[0] != cache[1] and "paged" in cache:  # dynamic <-> slots: the same keyed tokens (numerics class)
        refused.append(f"rollout.cache: {cache[0]!r} -> {cache[1]!r} (paged's continuous batching samples another "
                       f"stream than the keyed sampler of dynamic and slots)")
    if refused:
        raise ValueError(f"cannot resume {path}: the config differs from the checkpoint's in keys that define the "
                         f"run (resume with the checkpoint's values, or start a new run): {'; '.join(refused)}")
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in RESUME_APPLIED]


def apply_optimizer_settings(optimizer, scheduler, cfg: Config):
    """The config's AdamW settings and lr schedule over the loaded state (RESUME_APPLIED): the loaded moments
    and step count stay, the lr is the new base lr times the (new) warm-up factor at the loaded step. With
    unchanged settings this sets what the loaded state holds (a resume stays the uninterrupted run)."""
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.train.lr, lr=cfg.train.lr * lr_lambda(scheduler.last_epoch),
                     weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def resume_state(cfg: Config, policy, optimizer, scheduler, cur, ref) -> dict:
    """The run's counters, from the checkpoint named by run.resume (auto: the newest) or fresh."""
    state = {"step": 0, "subset": -1, "rollouts_cold": 0, "rollouts_train": 0, "tokens_train": 0, "bad_updates": 0,
             "pending_eval": -1, "cold": {}}
    candidates = checkpoint_dirs(cfg.run.out_dir)[::-1] if cfg.run.resume == "auto" else [cfg.run.resume]
    for path in [p for p in candidates if p]:
        optimizer.state.clear()  # nothing a failed newer attempt created: a fallback loads what a direct load does
        try:
            meta = read_meta(path)
        except UnsafeCheckpoint:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001  corrupt or truncated: try the one before
            if cfg.run.resume != "auto":
                raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e
            print0(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        applied = check_resume_config(meta["config"], cfg, path)
        try:
            meta = load_checkpoint(path, policy, optimizer, cur, ref)
        except UnsafeCheckpoint:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001  an older one overwrites what this half-loaded
            if cfg.run.resume != "auto" or path == candidates[-1]:
                raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e
            print0(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one")
            continue
        state.update({k: meta.get(k, state[k]) for k in state})
        if cfg.run.resume != "auto":  # a roll-back: the newer checkpoints of this run go aside, auto follows this line
            set_aside_newer(cfg.run.out_dir, state["step"])
        scheduler.load_state_dict(meta["scheduler"])
        apply_optimizer_settings(optimizer, scheduler, cfg)
        print0(f"resumed from {path} at step {state['step']}"
               + (f"; applied to the loaded optimiser: {'; '.join(applied)}" if applied else ""))
        return state
    if any(candidates):  # never a fresh start (or half-loaded weights) over checkpoints that exist
        raise RuntimeError(f"checkpoints exist but none could be loaded completely: {', '.join(filter(None, candidates))}; "
                           "move them away to start afresh, or name a good one with --run.resume=PATH")
    return state


def checkpoint_dirs(out_dir: str):
    """Complete checkpoints (step_<n> directories with meta.pt), oldest first; half-written ones (.tmp) are
    ignored. A step re-saved is swapped in as replaced_step_<n> -> the new step_<n>: a replaced_step_<n> left
    without its step_<n> (a kill between the two renames) is the step's checkpoint."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = {}
    for d in sorted(os.listdir(root), key=lambda d: d.startswith("step_")):  # step_<n> over replaced_step_<n>
        if re.fullmatch(r"(?:replaced_)?step_\d+", d) and os.path.exists(os.path.join(root, d, "meta.pt")):
            done[checkpoint_step(d)] = os.path.join(root, d)
    return [done[k] for k in sorted(done)]


def checkpoint_step(path: str) -> int:
    """The step a checkpoint directory (step_<n>, replaced_step_<n>) holds."""
    return int(re.search(r"step_(\d+)$", path).group(1))


def refuse_fresh_start_over_a_run(out_dir: str):
    """--run.resume=auto found no complete checkpoint: start fresh only where no run has left anything (a fresh
    start would empty metrics.jsonl and overwrite final/); otherwise refuse, saying what is there."""
    found = [p for p in ("metrics.jsonl", "final", "eval") if os.path.lexists(os.path.join(out_dir, p))]
    root = os.path.join(out_dir, "checkpoints")
    found += [f"checkpoints/{d}" for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
    if found:
        raise FileExistsError(f"--run.resume=auto found no complete checkpoint in {out_dir}, which holds a run "
                              f"({', '.join(found)}): name a checkpoint with --run.resume=PATH, or start afresh "
                              "without --run.resume, with --run.overwrite=true (removes it) or another --run.out_dir")


def set_aside_newer(out_dir: str, step: int):
    """A run resumed from an earlier checkpoint of its own (--run.resume=PATH, a roll-back): its checkpoints after
    `step` move to checkpoints/abandoned/<time>/, kept, so that --run.resume=auto continues the rolled-back line
    (rank 0 moves them; every rank waits)."""
    import time

    newer = [p for p in checkpoint_dirs(out_dir) if checkpoint_step(p) > step]
    if newer and int(os.environ.get("RANK", 0)) == 0:
        aside = os.path.join(out_dir, "checkpoints", "abandoned", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for p in newer:
            os.rename(p, os.path.join(aside, os.path.basename(p)))
        print0(f"rolled back to step {step}: the later checkpoints ({', '.join(map(os.path.basename, newer))}) "
               f"moved to {aside}")
    barrier()


def save_checkpoint(policy, optimizer, cur, meta: dict, cfg: Config, rank: int, ref=None):
    """Model and optimizer (sharded, torch.distributed.checkpoint), the KL reference when it moves
    (train.restart_each_subset), curriculum state, step, subset, counters and config. Written to
    step_X.tmp and renamed when complete, so a crash mid-write leaves the previous checkpoint usable."""
    import torch.distributed.checkpoint as dcp

    root = os.path.join(cfg.run.out_dir, "checkpoints")
    final = os.path.join(root, f"step_{meta['step']:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.remove(tmp) if os.path.islink(tmp) else shutil.rmtree(tmp, ignore_errors=True)  # a link: never followed
        os.makedirs(tmp, exist_ok=True)
    barrier()
    fresh = not optimizer.state  # no optimiser step yet (a new subset's trainer): saved as such
    meta = {**meta, "optimizer_fresh": fresh}
    state = _state_dicts(policy, optimizer, ref, fresh)
    try:
        with warnings.catch_warnings():  # single process without a process group is fine
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp)
        barrier()
        if rank == 0:
            curriculum = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                          for k, v in cur.state_dict().items()}  # plain data: read_meta loads it without pickle
            torch.save({**meta, "curriculum": curriculum, "config": config_dict(cfg)}, os.path.join(tmp, "meta.pt"))
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                yaml.safe_dump(config_dict(cfg), f, sort_keys=False)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  a full disk: e.g. "unexpected pos 704 vs 598"
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e, root):
            raise OSError(errno.ENOSPC, f"no space left on device while writing checkpoint {tmp} "
                                        f"({shutil.disk_usage(root).free / 2**20:.0f} MiB free); removed it") from e
        raise
    if rank == 0:  # a step saved again (a stop right after a periodic save): the old one goes only once the new
        replaced = os.path.join(root, "replaced_" + os.path.basename(final))  # one is in place
        if os.path.exists(final):
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in checkpoint_dirs(cfg.run.out_dir)[:-cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _disk_full(e: Exception, path: str) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "unexpected pos" in str(e) or shutil.disk_usage(path).free < 2**26  # torch's zip writer on ENOSPC


_DCP_METADATA_GLOBALS = {  # what torch.distributed.checkpoint's .metadata pickle holds (data classes, no code)
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"}, "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"}, "torch": {"Size"}}


def _refuse(path: str, why: str):
    raise UnsafeCheckpoint(f"refusing to load {path}: {why}. Resume only from checkpoints this code wrote.")


def refuse_links(path: str, depth: int = 2):
    """Raise UnsafeCheckpoint naming the first symbolic link at or below `path` (`depth` levels of directories):
    a run reads and writes only real files inside its own directory, so a link planted there (a metrics.jsonl,
    a step_*.tmp, a checkpoint's file) can neither make it write elsewhere nor read a file from elsewhere."""
    if os.path.islink(path):
        _refuse(path, "it is a symbolic link (a run reads and writes only real files inside its directory)")
    if depth > 0 and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            refuse_links(os.path.join(path, name), depth - 1)


def _read_dcp_metadata(path: str):
    """A checkpoint's torch.distributed.checkpoint metadata, read here rather than by torch: torch's
    FileSystemReader unpickles .metadata with plain pickle and, when that does not give it a usable object, falls
    back to a rank-local __<rank>.metadata that it unpickles the same way. Here .metadata is the only metadata
    file read (a checkpoint holding a __<rank>.metadata is refused; this code never writes one), with an
    unpickler that allows only DCP's metadata classes, torch.Size and dtypes, and sets state on instances only
    (pickle's BUILD on a class would change that class for the whole process: pathlib.Path's, say, redirecting
    every later read and write); it must hold a Metadata object; every storage file it names must be a plain
    file name of a real file in the checkpoint directory, with no transforms (this code writes none). Anything
    else raises UnsafeCheckpoint naming it; a truncated file raises what pickle raised (a corrupt checkpoint)."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    class Unpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be overridden
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            if name in _DCP_METADATA_GLOBALS.get(module, ()) or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            _refuse(f"{path}/.metadata", f"it asks for {module}.{name}, which a checkpoint of this code never holds "
                                         "and which could run code when loaded")

        def load_build(self):
            if isinstance(self.stack[-2], type):  # the state would be set on a class, for the whole process
                _refuse(f"{path}/.metadata", f"it sets attributes of the class {self.stack[-2].__qualname__}")
            super().load_build()
        dispatch[pickle.BUILD[0]] = load_build

    refuse_links(path, depth=1)
    others = [n for n in os.listdir(path) if re.fullmatch(r"__\d+\.metadata", n)]
    if others:
        _refuse(f"{path}/{others[0]}", "a rank-local metadata file, which this code never writes and which "
                                       "torch.distributed.checkpoint would unpickle with plain pickle")
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = Unpickler(f).load()
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        _refuse(f"{path}/.metadata", f"it holds a {type(metadata).__name__}, not torch.distributed.checkpoint's "
                                     "Metadata with its storage table")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if (not isinstance(info, _StorageInfo) or not isinstance(name, str) or os.path.basename(name) != name
                or name in ("", ".", "..") or (os.altsep and os.altsep in name)):
            _refuse(f"{path}/.metadata", f"it stores {getattr(index, 'fqn', index)} at {name!r}, not in a file of "
                                         "the checkpoint directory")
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}/{name} (named by .metadata for {getattr(index, 'fqn', index)}) is missing")
        if info.transform_descriptors:
            _refuse(f"{path}/.metadata", f"it asks for the storage transforms {list(info.transform_descriptors)} "
                                         f"for {getattr(index, 'fqn', index)}, which this code never writes")
    return metadata


def _safe_dcp_reading(path: str):
    """What dcp.load needs to read no code: a storage reader whose only metadata is the one _read_dcp_metadata
    checked (it never reads another file for it, whatever torch asks), and a planner that loads non-tensor items
    (the optimiser's param_groups) with torch.load(weights_only=True) where torch's DefaultLoadPlanner uses
    weights_only=False (tensors torch already reads with weights_only=True). Returns (reader, planner)."""
    import pickle

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = _read_dcp_metadata(path)

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # torch's fallback to rank-local metadata: never taken
                _refuse(path, "torch.distributed.checkpoint asked for rank-local metadata")
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                item = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                wanted = re.findall(r"GLOBAL (\S+)", str(e))
                raise UnsafeCheckpoint(f"refusing to load {read_item.dest_index.fqn} of {path}: it asks for "
                                       f"{', '.join(wanted) or 'more than plain data'}.") from None
            plain = io.BytesIO()  # plain data now: the parent's torch.load of it runs nothing
            torch.save(item, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return Reader(path), Planner()


def _dcp_failure(e: CheckpointException, path: str) -> Exception:
    """What a failed dcp.load raises: the UnsafeCheckpoint a rank refused with (never taken for a corrupt file), or
    a RuntimeError naming each rank's cause. DCP keeps a rank's failure as (exception, traceback)."""
    causes = {rank: f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for rank, f in e.failures.items()}
    for cause in causes.values():
        if isinstance(cause, UnsafeCheckpoint):
            return cause
    return RuntimeError(f"torch.distributed.checkpoint could not read {path}: "
                        + "; ".join(f"rank {r}: {type(c).__name__}: {c}" for r, c in causes.items()))


def _state_dicts(policy, optimizer, ref, fresh: bool) -> dict:
    """The sharded state dicts a checkpoint holds: model, optimiser (unless it has taken no step: torch's
    get_optimizer_state_dict would first take a zero-gradient step to create AdamW's moments, and that step
    counts in AdamW's bias correction) and the KL reference (when it moves)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return ({"model": get_model_state_dict(policy)}
            | ({} if fresh else {"optim": get_optimizer_state_dict(policy, optimizer)})
            | ({"ref": get_model_state_dict(ref)} if ref is not None else {}))


def load_checkpoint(path: str, policy, optimizer, cur, ref=None):
    """Weights, optimiser state (left fresh where the checkpoint's had taken no step), KL reference and
    curriculum of a checkpoint. Returns its meta (counters, scheduler, config)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = read_meta(path)
    fresh = meta.get("optimizer_fresh", False)  # checkpoints from before the flag: saved with torch's step
    state = _state_dicts(policy, optimizer, ref, fresh)
    reader, planner = _safe_dcp_reading(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=reader, planner=planner)
        except CheckpointException as e:  # DCP wraps what a rank raised
            raise _dcp_failure(e, path) from None
    set_model_state_dict(policy, state["model"])
    if not fresh:
        set_optimizer_state_dict(policy, optimizer, state["optim"])
    if ref is not None:
        set_model_state_dict(ref, state["ref"])
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
