"""rollout.py: batching plan, output layout, stop tokens, reproducibility, and the log-probs of sampled
responses against the trainer's forward pass."""

import pytest
import torch

import rollout
from infra.batching import make_micro_batches
from infra.config import load_config
from infra.models import Policy


def test_plan_batches_respects_kv_budget_and_covers_everything():
    lens = [5, 30, 7, 30, 12, 3, 25, 8]
    batches = rollout.plan_batches(lens, max_new_tokens=10, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lens[i] for i in b) + 10) <= 100
    assert lens[batches[0][0]] == 30  # longest first
    assert rollout.plan_batches([50], 100, 10) == [[0]]  # one sequence always fits


def _model_and_tok(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_generate_layout_and_reproducibility(tiny_model_dir):
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is 1+1?").input_ids, tok("Hi").input_ids, tok("What is 12+345?").input_ids]
    kw = dict(max_new_tokens=6, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=3)
    out = rollout.generate(model, prompts, [2, 0, 3], **kw)
    assert out.prompt_index.tolist() == [0, 0, 2, 2, 2]
    B, T = out.response_ids.shape
    assert B == 5 and T <= 6 and out.response_mask.shape == (B, T)
    for ids, mask, fin, n in zip(out.response_ids, out.response_mask, out.finished, out.lengths):
        assert mask[:n].all() and not mask[n:].any()
        if fin:  # ends with its first EOS
            assert ids[n - 1] == tok.eos_token_id and (ids[:n - 1] != tok.eos_token_id).all()
        else:
            assert n == 6
    again = rollout.generate(model, prompts, [2, 0, 3], **kw)
    assert torch.equal(out.response_ids, again.response_ids)
    greedy = rollout.generate(model, prompts, 2, **{**kw, "seed": 9}, temperature=0.0)
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])  # greedy: both samples equal


def test_static_cache_gives_the_same_rollouts(tiny_model_dir):
    """rollout.cache=static (preallocated KV cache; compiled on GPU) samples exactly what the default does."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is 1+1?").input_ids, tok("Hi").input_ids, tok("What is 12+345?").input_ids]
    kw = dict(max_new_tokens=6, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=3, max_batch_tokens=40)
    for temperature in (0.0, 1.0):
        dynamic = rollout.generate(model, prompts, [2, 1, 3], temperature=temperature, **kw)
        static = rollout.generate(model, prompts, [2, 1, 3], temperature=temperature, cache="static", **kw)
        assert torch.equal(dynamic.response_ids, static.response_ids)
    with pytest.raises(ValueError, match="cache"):
        rollout.generate(model, prompts, 1, cache="paged_attention", **kw)


def test_shared_prefill_gives_the_same_rollouts(tiny_model_dir):
    """Prefilling each distinct prompt once and copying its KV cache to its rollouts samples exactly what
    prefilling every rollout does: mixed prompt lengths, 1 to 5 rollouts per prompt, several batches."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is " + "1+" * k + "1?").input_ids for k in range(7)] + [tok("Hi").input_ids]
    n = [1 + k % 5 for k in range(len(prompts))]
    kw = dict(max_new_tokens=7, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=5, max_batch_tokens=120)
    assert len(rollout.plan_batches([len(prompts[i]) for i, k in enumerate(n) for _ in range(k)], 7, 120)) > 1
    for temperature in (0.0, 1.0):
        shared = rollout.generate(model, prompts, n, temperature=temperature, **kw)
        each = rollout.generate(model, prompts, n, temperature=temperature, share_prefill=False, **kw)
        assert torch.equal(shared.response_ids, each.response_ids) and torch.equal(shared.finished, each.finished)
    assert len({tuple(r) for r in shared.responses()}) > len(prompts)  # the copies sample independently


def test_paged_cache_continuous_batching(tiny_model_dir):
    """rollout.cache=paged (transformers' continuous batching, generate_batch): greedy responses equal the
    default path's, in prompt-major order; sampled ones are independent draws (one request per rollout),
    not copies of one another."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is 1+1?").input_ids, tok("Hi").input_ids, tok("What is 12+345?").input_ids]
    kw = dict(max_new_tokens=6, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=3)
    dynamic = rollout.generate(model, prompts, [2, 1, 3], temperature=0.0, **kw)
    paged = rollout.generate(model, prompts, [2, 1, 3], temperature=0.0, cache="paged", **kw)
    assert torch.equal(paged.prompt_index, dynamic.prompt_index)
    assert torch.equal(paged.response_ids, dynamic.response_ids)
    assert torch.equal(paged.response_mask, dynamic.response_mask) and torch.equal(paged.finished, dynamic.finished)
    sampled = rollout.generate(model, [prompts[1]], 8, temperature=1.0, cache="paged", **kw)
    assert sampled.response_ids.shape[0] == 8 and len({tuple(r) for r in sampled.responses()}) > 1


def test_stop_token_ids_eos_and_optional_end_of_turn():
    """As released, a rollout stops at the tokenizer's EOS (and the model's generation_config EOS);
    `<|im_end|>` is added only when asked for (rollout.stop_at_im_end)."""
    from tiny.build import build_tokenizer

    tok = build_tokenizer()
    tok.eos_token = "<|endoftext|>"  # like a base Qwen2.5-Math tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert rollout.stop_token_ids(tok, im_end=False) == [tok.eos_token_id]
    assert rollout.stop_token_ids(tok) == sorted([tok.eos_token_id, im_end])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_model_generation_config_does_not_change_sampling(tiny_model_dir, temperature):
    """A checkpoint whose generation_config sets repetition_penalty, top_k, temperature, top_p and min_p
    samples exactly what the same weights with a default generation_config sample: every field is ours."""
    from transformers import GenerationConfig

    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is 1+1?").input_ids, tok("What is 12+345?").input_ids]
    kw = dict(max_new_tokens=10, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=5, temperature=temperature)
    model.generation_config = GenerationConfig()
    plain = rollout.generate(model, prompts, 4, **kw)
    odd = GenerationConfig(repetition_penalty=5.0, top_k=2, temperature=0.05, top_p=0.5, min_p=0.3,
                           no_repeat_ngram_size=1, do_sample=True)
    model.generation_config = odd
    got = rollout.generate(model, prompts, 4, **kw)
    assert torch.equal(got.response_ids, plain.response_ids)
    assert model.generation_config is odd  # given back


def test_sampled_logprobs_match_training_forward(tiny_model_dir):
    """The policy that samples (left-padded, KV cache) and the one that is trained (right-padded, one
    forward) give the same log-probabilities: the PPO ratio starts at exactly 1."""
    import train

    model, tok = _model_and_tok(tiny_model_dir)
    cfg = load_config([f"--model.path={tiny_model_dir}"])
    policy = Policy(model)
    prompts = [tok("What is 1+1?").input_ids, tok("What is 12+345?").input_ids]
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, max_new_tokens=8,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, output_scores=True,
                         return_dict_in_generate=True)
    gen = out.sequences[:, L:]
    sampled = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, gen[..., None])[..., 0]
    for i, p in enumerate(prompts):
        r = gen[i].tolist()
        n = r.index(tok.eos_token_id) + 1 if tok.eos_token_id in r else len(r)
        seqs = [{"ids": p + r[:n], "prompt_len": len(p), "resp_len": n}]
        logp = train.score_logprobs(policy, make_micro_batches(seqs, 1, 0), torch.device("cpu"), cfg)[0]
        torch.testing.assert_close(logp, sampled[i, :n], atol=1e-4, rtol=1e-4)


def test_progress_bar_counts_rollouts(tiny_model_dir, capsys):
    model, tok = _model_and_tok(tiny_model_dir)
    kw = dict(max_new_tokens=4, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_batch_size=2)
    rollout.generate(model, [tok("1+1").input_ids], 5, progress="rollouts", **kw)
    err = capsys.readouterr().err
    assert "rollouts" in err and "5/5" in err and "tokens_per_s" in err
    rollout.generate(model, [tok("1+1").input_ids], 5, **kw)
    assert capsys.readouterr().err == ""  # no label, no bar


def test_paged_cache_is_sized_from_the_work():
    """The paged KV cache holds what the requests need, not what free memory allows (it took 15 GB of RAM in
    the test above before), and never more than the rollout.max_batch_tokens budget."""
    cb = rollout.paged_cache_config([5, 12, 300], max_new_tokens=6, max_batch_tokens=1 << 20)
    assert cb.num_blocks == 1 + 1 + 2 and cb.max_batch_tokens == 4 * 256
    cb = rollout.paged_cache_config([1000] * 100, max_new_tokens=3072, max_batch_tokens=1 << 18)
    assert cb.num_blocks * 256 == 1 << 18 and cb.max_batch_tokens == 8192


@pytest.mark.parametrize("cache", ["dynamic", "paged"])
def test_stop_request_acted_on_within_one_batch(tiny_model_dir, cache, monkeypatch, capsys):
    """A stop request (should_stop) is acted on before the next batch: with the paged cache too, which is fed
    to generate_batch in chunks of PAGED_CHUNK KV budgets (a preempted job must not finish a whole cold start
    first), with the same progress display as the other caches."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(f"What is {k}+{k}?").input_ids for k in range(12)]
    kw = dict(max_new_tokens=6, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=0, max_batch_tokens=64,
              cache=cache)
    name = "generate_batch" if cache == "paged" else "generate"
    calls, original = [], getattr(model, name)
    monkeypatch.setattr(model, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    done = rollout.generate(model, prompts, 4, progress="rollouts", **kw)
    batches = len(calls)
    assert batches >= 3 and done.response_ids.shape[0] == 48
    assert "rollouts: 100%" in capsys.readouterr().err
    calls.clear()
    asked = []
    with pytest.raises(rollout.Interrupted):
        rollout.generate(model, prompts, 4, should_stop=lambda: asked.append(1) or len(asked) > 1, **kw)
    assert len(calls) == 1  # one batch (paged: one chunk), then the stop; not the whole phase


def test_no_rollouts_decode_to_no_texts(tiny_model_dir):
    """A rank that owns no prompt this step gets no rollouts and no texts (transformers < 5.24 decodes an empty
    batch as [''], which once failed a two-rank run: '1 responses but 0 gold answers')."""
    model, tok = _model_and_tok(tiny_model_dir)
    out = rollout.generate(model, [], [], max_new_tokens=4, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert out.response_ids.shape[0] == 0 and out.texts(tok) == []
    one = rollout.generate(model, [tok("Hi").input_ids], 1, max_new_tokens=4, eos_ids=[tok.eos_token_id],
                           pad_id=tok.pad_token_id)
    assert one.texts(tok) == tok.batch_decode(one.responses(), skip_special_tokens=True)
