"""Distributed plumbing: process-group set-up (torchrun or plain python), print0, the few collectives the loop
uses (all_reduce, all_gather_list, barrier), a stop request (SIGTERM, Ctrl-C) agreed on every rank, and
ending a rank cleanly. Everything also works without a process group (one CPU process).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

import reward
import rollout


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


def barrier():
    if dist.is_initialized():
        dist.barrier()


class StopRequested(Exception):
    """A stop signal (SIGTERM, Ctrl-C) arrived while generating: the step is dropped on every rank, and the
    run saves the last finished step."""


class StopAbandoned(Exception):
    """A stop signal arrived inside an update whose end and save would not fit the grace period
    (train.UpdateStop): the run exits without saving; a resume starts from the last checkpoint."""


def check_stop(stop: dict | None, interrupted: bool = False):
    """Collective: raise StopRequested on every rank if any rank was asked to stop."""
    if stop is not None and all_reduce(torch.tensor([float(interrupted or stop["requested"])])).item() > 0:
        raise StopRequested()


@contextlib.contextmanager
def interruptible(stop: dict | None):
    """A generation phase that a stop request ends between two batches: yields the `should_stop` callable
    for rollout.generate and reward.score_batch, then checks on every rank (StopRequested everywhere if any
    rank stopped)."""
    try:
        yield (lambda: stop["requested"]) if stop is not None else None
    except (rollout.Interrupted, reward.Interrupted):
        check_stop(stop, interrupted=True)
        raise  # unreachable: check_stop raised
    check_stop(stop)


def leave(code: int = 0):
    """End a torchrun rank whose work is written and closed, without the interpreter's teardown. Under FSDP2
    the DTensor parameters keep the device mesh, and with it the gloo process group, alive past
    destroy_process_group: its worker threads outlive the interpreter and, rarely, release a Python object
    while it is torn down, and torch aborts the rank ("terminate called without an active exception",
    pytorch/pytorch#190489): torchrun then reports a finished run as failed (seen once in CI, a 2-rank test)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
