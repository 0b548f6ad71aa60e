"""infra/models.py: train/eval modes, gradient checkpointing through the real update, no dropout."""


import pytest
import torch

import train
from helpers import small_run
from infra.batching import make_micro_batches
from infra.config import load_config
from infra.models import build_models, train_mode


def _record_modes(monkeypatch):
    """Wrap train.forward_batch and the generation model: per update pass (grad on), the tensor elements
    saved for backward per forwarded position and the policy's mode; per generation forward, its input length
    and mode."""
    seen = {"update": [], "score": [], "gen": []}
    forward_batch = train.forward_batch

    def recording_forward_batch(model, b, device, cfg):
        saved = [0]

        def pack(t):
            saved[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward_batch(model, b, device, cfg)
        key = "update" if torch.is_grad_enabled() else "score"
        training = model.hf.model.layers[0].training  # what transformers' checkpointing reads
        seen[key].append((saved[0] / b["ids"].numel(), training))  # per forwarded position
        return out

    def recording_build_models(cfg, device, world):
        policy, ref, gen = build_models(cfg, device, world)
        gen.register_forward_pre_hook(lambda m, args, kw: seen["gen"].append(
            ((kw.get("input_ids") if "input_ids" in kw else args[0]).shape[1], m.training)), with_kwargs=True)
        return policy, ref, gen

    monkeypatch.setattr(train, "forward_batch", recording_forward_batch)
    monkeypatch.setattr(train, "build_models", recording_build_models)
    return seen


@pytest.mark.parametrize("checkpointing", [True, False])
def test_update_runs_in_train_mode_with_checkpointing(tiny_model_dir, tmp_path, monkeypatch, checkpointing):
    """Through train.main: the update passes run in train mode, so transformers' gradient checkpointing is
    active when configured. Saved for backward per position, as a saved-tensor hook sees it: outside the
    checkpointed layers the embedding output, final norm and head input (about 6 hidden vectors, whatever
    the depth; the checkpoints themselves keep one hidden vector per layer, out of the hook's sight), against
    all of every layer's activations (about 28 hidden vectors per layer here) without checkpointing. Log-prob passes and generation run in eval mode, generation with its KV cache
    (decoding steps of one token), also after an update (the unsharded trainer generates with its policy)."""
    seen = _record_modes(monkeypatch)
    train.main(small_run(tiny_model_dir, str(tmp_path / "run"), "--data.num_subsets=1", "--train.epochs=2",
                         f"--model.gradient_checkpointing={str(checkpointing).lower()}"))
    hidden, layers = 32, 2  # tiny_model_dir
    assert seen["update"] and all(training for _, training in seen["update"])
    assert seen["score"] and not any(training for _, training in seen["score"])
    per_position = max(x for x, _ in seen["update"])
    if checkpointing:
        assert per_position <= 8 * hidden, per_position  # measured: 5.9 hidden vectors
    else:
        assert per_position > 10 * layers * hidden, per_position  # measured: 57 hidden vectors
    assert not any(training for _, training in seen["gen"])
    lengths = [n for n, _ in seen["gen"]]
    assert lengths.count(1) >= 0.8 * len(lengths)  # cached decoding: one new token per forward


def test_train_mode_adds_no_dropout(tmp_path):
    """build_models zeroes every dropout rate: a model configured with dropout gives the same log-probs in the
    update's train mode as in the eval mode of the old-policy and reference passes."""
    from tiny.build import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = load_config([f"--model.path={tmp_path / 'm'}", "--train.kl_coef=0"])
    policy, _, _ = build_models(cfg, torch.device("cpu"), 1)
    seqs = [{"ids": list(range(3, 40)), "prompt_len": 5, "resp_len": 32, "adv": torch.ones(1)}]
    (b,) = make_micro_batches(seqs, 1, 0, "padded")
    with torch.no_grad():
        eval_logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
        with train_mode(policy):
            assert policy.training
            train_logp, _ = train.forward_batch(policy, b, torch.device("cpu"), cfg)
    assert not policy.training
    torch.testing.assert_close(train_logp, eval_logp, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5  # the test model does have dropout
