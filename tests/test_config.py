"""infra/config.py: YAML and --key=value loading, type checks, unknown keys, validation before anything loads."""

import os

import pytest

import rollout
import train
from helpers import ROOT, TRAIN_DATA, small_run
from infra.config import load_config, micro_batch_layout, validate_config


def test_micro_batch_layout_switches():
    layout = lambda *a: micro_batch_layout(load_config(list(a)))  # noqa: E731
    assert layout() == "padded"  # sdpa default
    assert layout("--model.attn_implementation=flash_attention_2") == "packed"
    assert layout("--train.pack=true") == "packed"
    assert layout("--train.share_prompt=true") == "shared"
    with pytest.raises(ValueError, match="train.pack"):
        layout("--train.pack=maybe")
    for bad in (["--train.pack=true"], ["--model.attn_implementation=flash_attention_2"]):
        with pytest.raises(ValueError, match="share_prompt"):
            layout("--train.share_prompt=true", *bad)


def test_config_yaml_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-5\ncures:\n  tau: 0.3\n")
    cfg = load_config(["--config", str(f), "--cures.tau=0.5", "--rollout.prompts_per_step=7",
                             "--model.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-5 and cfg.cures.tau == 0.5 and cfg.rollout.prompts_per_step == 7
    assert cfg.model.gradient_checkpointing is True
    with pytest.raises(KeyError, match="cures.tau"):
        load_config(["--cures.tua=0.1"])
    with pytest.raises(KeyError, match="train"):
        load_config(["--trian.lr=0.1"])
    with pytest.raises(TypeError):
        load_config(["--rollout.prompts_per_step=1.5"])
    with pytest.raises(TypeError):
        load_config(["--train.lr=fast"])


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        load_config(["--config", os.path.join(ROOT, "configs", name)])


def test_help_and_config_flag_forms(capsys, tmp_path):
    assert train.main(["--help"]) is None
    out = capsys.readouterr().out
    assert "usage:" in out and "--train.restart_each_subset=True" in out and "--run.overwrite=False" in out
    f = tmp_path / "c.yaml"
    f.write_text("cures:\n  tau: 0.3\n")
    assert load_config([f"--config={f}"]).cures.tau == 0.3
    with pytest.raises(ValueError, match="--config needs a YAML file"):
        load_config(["--config"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("args, match", [
    (["--train.advantage=grpoo"], "train.advantage must be one of grpo, rpp"),
    (["--train.kl_kind=k3"], "train.kl_kind"), (["--train.loss_agg=mean"], "train.loss_agg"),
    (["--train.pack=yes"], "train.pack"), (["--rollout.cache=paged2"], "rollout.cache"),
    (["--rollout.top_p=0"], "rollout.top_p must be in"),
    (["--rollout.rollouts_per_step=0"], "rollouts_per_step >= 2048"),
    (["--data.num_subsets=0", f"--data.train={TRAIN_DATA}"], "data.num_subsets=0"),
    (["--model.path=./no/such/model"], "model.path='./no/such/model': no such directory"),
    (["--rollout.cache=paged", "--model.attn_implementation=sdpa"], "dense .* mask: 8,192 x 2,097,152"),
])
def test_bad_config_fails_before_anything_loads(tmp_path, args, match, monkeypatch):
    """Checked before the tokenizer, the data or the model are touched (no model exists at the default path). The
    paged path's dense mask only where it would be built: rollout.PAGED_TORCH_FLASH off (with it, the same
    settings pass)."""
    if "dense" in match:
        validate_config(load_config(args))  # passes
        monkeypatch.setattr(rollout, "PAGED_TORCH_FLASH", False)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.main([f"--run.out_dir={tmp_path / 'x'}", *args])
    assert not (tmp_path / "x").exists()


def test_zero_subsets_fail_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """A directory with one data file and data.num_subsets=0 once gave zero subsets, trained zero steps and saved
    the untrained model as final/."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "part.jsonl").write_text(open(TRAIN_DATA).read())
    monkeypatch.setattr(train, "build_models", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="num_subsets=0"):
        train.main(small_run(tiny_model_dir, tmp_path / "r", f"--data.train={data}", "--data.num_subsets=0"))
    assert not (tmp_path / "r" / "final").exists()


def test_every_config_key_has_one_resume_class():
    """Each Config field is refused, applied, numerics or free on resume (infra/config.py), exactly once: a field
    added without a class fails here, so nobody can add a method key that a resume silently changes."""
    from infra.config import RESUME_APPLIED, RESUME_FREE, RESUME_NUMERICS, RESUME_REFUSED, config_keys

    classes = RESUME_REFUSED + RESUME_APPLIED + RESUME_NUMERICS + RESUME_FREE
    assert sorted(classes) == sorted(set(classes)), "a key in two classes"
    assert sorted(config_keys()) == sorted(classes), (set(config_keys()) ^ set(classes))
    for key in ("train.advantage", "train.loss_agg", "train.kl_coef", "train.kl_kind", "train.epochs",
                "train.mini_batch_prompts", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens",
                "rollout.stop_at_im_end", "rollout.dynamic_sampling", "rollout.max_rounds", "cures.prior_alpha",
                "cures.prior_beta", "cures.grad_param", "model.path", "model.tokenizer",  # issue 27's list
                "run.reward_timeout"):  # which slow answers score 0 (issue 36)
        assert key in RESUME_REFUSED, key
    assert set(RESUME_APPLIED) == {"train.lr", "train.warmup_steps", "train.weight_decay", "train.betas",
                                   "train.adam_eps", "train.grad_clip"}
