"""Run under torchrun by tests/test_train.py (and with plain python for world size 1).

    dist_worker.py train OUT_DIR [overrides...]  -> train.main, then each rank saves its curriculum (STOP_IN=[agent:]name:k
                                                    in the environment: a stop request inside that call)
    dist_worker.py grad MODEL_DIR OUT_FILE [overrides...]
                                                 -> one update on a fixed global batch, saves the full gradient
    dist_worker.py rehearse [train.py arguments...]
                                                 -> train.main with about a quarter of the responses marked
                                                    correct on top of the real checker (a random model never
                                                    answers right), then each rank saves its curriculum and
                                                    peak memory (bench/rehearsal.py)
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from infra.config import load_config  # noqa: E402
from infra.distributed import leave, setup_distributed  # noqa: E402
from infra.models import build_models, sync_generation_weights  # noqa: E402


def stop_in(out_dir):
    """STOP_IN=[agent:]name:k: rank 0 sends SIGTERM to itself (or to its parent, the torchrun agent, as a
    scheduler does) as train.<name> is called the k-th time, and writes the time it sent it (time.time()) to
    OUT_DIR/stop_sent_at."""
    if os.environ.get("STOP_IN"):
        from helpers import sigterm_at  # tests/, this script's directory

        *to, name, k = os.environ["STOP_IN"].split(":")
        rank0 = int(os.environ.get("RANK", 0)) == 0

        def when(calls, a, kw):
            if rank0 and calls == int(k):
                with open(os.path.join(out_dir, "stop_sent_at"), "w") as f:
                    f.write(repr(time.time()))
                return True
            return False
        pid = os.getppid() if to == ["agent"] else os.getpid()
        setattr(train, name, sigterm_at(getattr(train, name), when, pid)[0])


def run_train(out_dir, overrides):
    stop_in(out_dir)
    state, cur = train.main([f"--run.out_dir={out_dir}", *overrides])
    rank = int(os.environ.get("RANK", 0))
    np.savez(os.path.join(out_dir, f"curriculum_rank{rank}.npz"), alpha=cur.alpha, beta=cur.beta,
             step=state["step"])


class GradRecorder:
    """Stands in for the optimizer: keeps the (full) gradient instead of stepping."""

    def __init__(self, model):
        self.model = model
        self.grads = None

    def step(self):
        self.grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def run_grad(model_dir, out_file, overrides=()):
    cfg = load_config([f"--model.path={model_dir}", "--train.kl_coef=0", "--train.micro_batch_tokens=40",
                             "--train.grad_clip=1e9", *overrides])
    rank, world, device = setup_distributed()
    policy, _, gen_model = build_models(cfg, device, world)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for k in range(8):  # the same global mini-batch whatever the world size
        plen, rlen = 3 + k % 3, 2 + (5 * k) % 7
        ids = torch.randint(3, 90, (plen + rlen,), generator=gen).tolist()
        seqs.append({"ids": ids, "prompt_len": plen, "resp_len": rlen, "adv": torch.randn(1, generator=gen),
                     "old_logp": -torch.rand(rlen, generator=gen) - 3.0})
    mine = seqs[rank::world]
    rec = GradRecorder(policy)
    train.update_policy(policy, rec, mine, device, cfg, world)
    # the generation copy must equal the (sharded) policy after a sync
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    sync_generation_weights(policy, gen_model)
    full = {n.removeprefix("hf."): (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in policy.named_parameters()}
    gen_diff = max(float((dict(gen_model.named_parameters())[n] - v).abs().max()) for n, v in full.items())
    if rank == 0:
        torch.save({"grads": rec.grads, "gen_diff": gen_diff}, out_file)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def track_update_memory() -> list:
    """Wrap train.update_policy in torch's FSDP2 memory tracker (every tensor allocated on the CPU, by category:
    parameters, gradients, optimizer states, activations, temporaries, FSDP2's all-gather and reduce-scatter
    buffers), plus the bytes the KL reference and the generation copy hold at the time. Each call appends
    its peak ({device: {category: bytes}}) and its largest micro-batch (bench/memory.py --check)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    update, build, others, peaks = train.update_policy, train.build_models, [], []

    def build_models(cfg, device, world):
        policy, ref, gen = build(cfg, device, world)
        others[:] = [m for m in (ref, gen) if m is not None and m is not policy.hf]
        return policy, ref, gen

    def update_policy(policy, optimizer, *args, **kwargs):
        tracker, forward_batch = FSDPMemTracker(policy, optimizer), train.forward_batch

        def each_micro_batch(*a, **k):  # the tracker's per-module statistics take one forward at a time
            tracker.reset_mod_stats()
            return forward_batch(*a, **k)
        train.forward_batch = each_micro_batch
        try:
            with tracker:
                result = update(policy, optimizer, *args, **kwargs)
        finally:
            train.forward_batch = forward_batch
        peak = tracker.get_tracker_snapshot("peak")
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in others
                    for t in (p.to_local() if hasattr(p, "to_local") else p for p in m.parameters())}
        for d in peak.values():  # the reference and generation copies as they are (sharded or not): static
            d["Total"] += sum(storages.values())
            d["EXTERNAL"] = sum(storages.values())
        batches = args[5] if len(args) > 5 else kwargs["batches"]  # update_policy(..., scheduler, batches)
        peaks.append({"peak": {str(dev): {str(k).split(".")[-1]: v for k, v in d.items()} for dev, d in peak.items()},
                      "tokens": max(b["ids"].numel() for b in batches),  # the largest micro-batch, padding included
                      "resp_tokens": max(len(b["tgt"]) for b in batches), "micro_batches": len(batches)})
        return result

    train.build_models, train.update_policy = build_models, update_policy
    return peaks


def run_rehearsal(argv):
    import json
    import resource
    import zlib

    import reward

    real = reward.score_batch

    def score_batch(responses, golds, **kwargs):  # the real checker, plus a hash-chosen quarter marked correct
        scores = real(responses, golds, **kwargs)
        forced = reward.Scores(max(s, float(zlib.crc32(r.encode()) % 4 == 0)) for s, r in zip(scores, responses))
        forced.timeouts, forced.unscored = scores.timeouts, scores.unscored
        return forced

    reward.score_batch = score_batch
    peaks = track_update_memory() if os.environ.get("TRACK_UPDATE_MEMORY") else []
    cfg = load_config(argv)
    stop_in(cfg.run.out_dir)
    state, cur = train.main(argv)
    rank = int(os.environ.get("RANK", 0))
    if peaks:
        with open(os.path.join(cfg.run.out_dir, f"update_memory_rank{rank}.json"), "w") as f:
            json.dump(peaks, f)
    np.savez(os.path.join(cfg.run.out_dir, f"curriculum_rank{rank}.npz"), alpha=cur.alpha, beta=cur.beta,
             grad_stats=cur.grad_stats, step=state["step"])
    with open(os.path.join(cfg.run.out_dir, f"memory_rank{rank}.json"), "w") as f:
        json.dump({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, f)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        run_train(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "rehearse":
        run_rehearsal(sys.argv[2:])
    else:
        run_grad(sys.argv[2], sys.argv[3], sys.argv[4:])
    if "RANK" in os.environ:  # under torchrun: end as train.py does (infra.distributed.leave)
        leave()
