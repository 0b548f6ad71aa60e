"""infra/metrics.py: the mechanism metrics on a constructed batch, every logging sink closed."""

import json
import sys

import numpy as np
import torch

from infra.config import load_config
from infra.metrics import Logger, difficulty_shares, level_shares, mechanism_sums, rollout_sums, step_metrics


def test_mechanism_metrics_on_a_constructed_batch():
    """The rollouts in groups with mixed rewards (non-zero GRPO advantage) and the response tokens spent on
    groups that all score the same, against the advantages themselves; draw shares by difficulty."""
    import grpo

    rewards = torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 1, 0, 0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    lengths = torch.tensor([5, 6, 7, 8, 3, 4, 1, 2, 3, 9])
    got = mechanism_sums(rewards, group, lengths)
    zero = grpo.group_advantages(rewards, group) == 0
    assert got == {"mixed_rollouts": 7.0, "zero_adv_tokens": 16.0}
    assert got["mixed_rollouts"] == float((~zero).sum()) and got["zero_adv_tokens"] == float(lengths[zero].sum())
    shares = difficulty_shares(np.array([0.1, 0.5, 0.5, 1.0, 0.0, 0.8, 0.79, 0.2]))
    assert shares == {"draws/p_0.0-0.2": 0.25, "draws/p_0.2-0.4": 0.125, "draws/p_0.4-0.6": 0.25,
                      "draws/p_0.6-0.8": 0.125, "draws/p_0.8-1.0": 0.25}
    assert level_shares([1, 2, 2, None, "Level 5"]) == {"draws/level_1": 0.25, "draws/level_2": 0.5,
                                                              "draws/level_Level 5": 0.25}
    assert level_shares([None, None]) == {}


def test_logger_close_finishes_every_sink(tmp_path, monkeypatch):
    """A torchrun rank ends with os._exit (leave), which runs no exit hooks: Logger.close must finish the
    sinks that rely on them (wandb here, a stand-in module) and leave metrics.jsonl complete."""
    import types

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append("init"), log=lambda m, step: calls.append(step),
                                 finish=lambda: calls.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config([f"--run.out_dir={tmp_path}", "--run.wandb_project=p"])
    logger = Logger(cfg, rank=0)
    logger.log({"train/reward": 0.5}, 1)
    logger.close()
    assert calls == ["init", 1, "finish"]
    assert logger.file.closed
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "train/reward": 0.5}]
    Logger(cfg, rank=1).close()  # other ranks hold no sinks


def test_mechanism_shares_count_scored_rollouts_only():
    """A rollout the checker could not score is in no group's advantage: the mechanism shares are over the scored
    rollouts and their tokens (an unscored one counted in the denominator once made them look smaller)."""
    from rollout import Rollouts

    responses = [[1] * n for n in (5, 6, 7, 8, 9)]
    out = Rollouts.from_responses(responses, [0, 0, 1, 1, 1], [True] * 5, pad_id=0)
    rewards = torch.tensor([1.0, 0, 1, 1, 0])
    scored = torch.tensor([True, True, True, True, False])  # the last one unscored: group 1 is then uniform
    sums = rollout_sums(out, rewards, scored, 0)
    m = step_metrics({**sums, "trained_tokens": 1.0}, [], [0.0], 1, 1, 1e-6)
    assert m["mech/mixed_rollouts"] == 2 / 4  # group 0 mixed (2 rollouts), group 1's scored two uniform
    assert m["mech/zero_adv_tokens"] == 7 + 8 and m["mech/zero_adv_token_share"] == 15 / (5 + 6 + 7 + 8)
