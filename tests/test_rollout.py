"""rollout.py: batching plan, output layout, stop tokens, reproducibility, and the log-probs of sampled
responses against the trainer's forward pass."""

import os

import pytest
import torch

import rollout
from infra.batching import make_micro_batches
from infra.config import load_config
from helpers import ROOT, varlen_calls
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


def test_an_unknown_cache_is_refused(tiny_model_dir):
    model, tok = _model_and_tok(tiny_model_dir)
    with pytest.raises(ValueError, match="cache must be dynamic, slots or paged, not 'static'"):
        rollout.generate(model, [tok("Hi").input_ids], 1, max_new_tokens=2, eos_ids=[tok.eos_token_id],
                         pad_id=tok.pad_token_id, cache="static")


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


def _dense_causal_attention(q, k, v, scale):
    """One sequence's attention written out: q (nq, h, d) the last nq positions of k, v (nk, h_kv, d); every KV
    head repeated for its query heads, scores masked above the diagonal, softmax in float64."""
    nq, h, _ = q.shape
    nk, h_kv, _ = k.shape
    k, v = k.double().repeat_interleave(h // h_kv, 1), v.double().repeat_interleave(h // h_kv, 1)  # (nk, h, d)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(nk - nq, nk)[:, None]  # (nq, 1) each query's position among the keys
    scores = scores.masked_fill(torch.arange(nk)[None] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_varlen_attention_matches_dense_causal_attention():
    """rollout.varlen_attention (paged_varlen_attention's kernel; its CPU branch, the reference the GPU check holds
    torch's flash kernel to) against attention written out per sequence: packed sequences of a prompt prefilled
    whole, a prompt chunk after its cached part, decoding tokens, an empty one; GQA, 6 query heads on 2 KV heads."""
    torch.manual_seed(0)
    shapes = [(7, 7), (3, 10), (1, 12), (0, 4), (1, 1), (5, 9)]  # (queries, keys) per sequence
    h, h_kv, d, scale = 6, 2, 16, 0.3
    cu_q = torch.tensor([0] + [sum(s[0] for s in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s[1] for s in shapes[:i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]) + 2, h, d)  # two padding rows past the last sequence
    k, v = torch.randn(int(cu_k[-1]), h_kv, d), torch.randn(int(cu_k[-1]), h_kv, d)
    out = rollout.varlen_attention(q, k, v, cu_q, cu_k, max(s[0] for s in shapes), max(s[1] for s in shapes), scale)
    assert out.shape == q.shape and not out[int(cu_q[-1]):].any()
    for i in range(len(shapes)):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        want = _dense_causal_attention(q[q0:q1], k[k0:k1], v[k0:k1], scale)
        torch.testing.assert_close(out[q0:q1].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("torch_flash", [True, False])
def test_paged_path_attention_without_flash_attn(monkeypatch, torch_flash):
    """A model on sdpa generates on the paged path through paged_varlen_attention (torch's flash kernel on a GPU,
    its reference here) for every layer of every forward, prefill and decoding, or, with PAGED_TORCH_FLASH off,
    through transformers' sdpa; the same greedy tokens as the dynamic path either way (a pretrained model, whose
    tokens depend on attention), for prompts of different lengths, and the model's attention setting given back."""
    model, tok = _model_and_tok(os.path.join(ROOT, "models", "arith"))  # pretrained: its tokens depend on attention
    calls = varlen_calls(monkeypatch)
    monkeypatch.setattr(rollout, "PAGED_TORCH_FLASH", torch_flash)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {q}?"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for q in ("7+77", "26-816", "3*4")]
    kw = dict(max_new_tokens=24, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.0)
    dynamic = rollout.generate(model, prompts, 2, **kw)
    paged = rollout.generate(model, prompts, 2, cache="paged", **kw)
    assert torch.equal(paged.response_ids, dynamic.response_ids)
    assert len({tuple(r) for r in dynamic.responses()}) == 3  # the prompts' responses differ
    layers = model.config.num_hidden_layers
    if torch_flash:  # a call per layer per forward: a decoding forward packs one token per running sequence
        assert len(calls) % layers == 0 and len(calls) >= layers * int(dynamic.lengths.max()) and min(calls) >= 1
    else:
        assert calls == []
    assert model.config._attn_implementation == "sdpa"


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


@pytest.mark.parametrize("gqa", [False, True])
def test_sampled_logprobs_match_training_forward(tiny_model_dir, gqa):
    """The policy that samples (left-padded, KV cache; transformers' sdpa or sdpa_gqa_attention, as rollout.generate
    decodes) and the one that is trained (right-padded, one forward) give the same log-probabilities: the PPO ratio
    starts at exactly 1."""
    import train

    model, tok = _model_and_tok(tiny_model_dir)
    cfg = load_config([f"--model.path={tiny_model_dir}"])
    policy = Policy(model)
    prompts = [tok("What is 1+1?").input_ids, tok("What is 12+345?").input_ids]
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    torch.manual_seed(0)
    with rollout._generating(model, gqa_attention=gqa):
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
    to continuous batching in chunks of PAGED_CHUNK KV budgets (a preempted job must not finish a whole cold start
    first), with the same progress display as the other caches."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(f"What is {k}+{k}?").input_ids for k in range(12)]
    kw = dict(max_new_tokens=6, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=0, max_batch_tokens=64,
              cache=cache)
    name = "continuous_batching_context_manager" if cache == "paged" else "generate"
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


def test_dynamic_stop_request_acted_on_inside_a_call(tiny_model_dir, monkeypatch):
    """The dynamic path asks should_stop after every token of a generate call (a stopping criterion), not only
    between calls: one batch of 200 tokens with no reachable EOS, a stop requested at the 5th ask ends it after
    5 tokens with Interrupted; with should_stop never True the tokens equal a call without it."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(f"What is {k}+{k}?").input_ids for k in range(4)]
    kw = dict(max_new_tokens=200, eos_ids=[len(tok) + 5], pad_id=tok.pad_token_id, seed=0, cache="dynamic")
    forwards, real = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    asked = []
    with pytest.raises(rollout.Interrupted, match="inside a generate call, 5 tokens in"):
        rollout.generate(model, prompts, 2, should_stop=lambda: asked.append(1) or len(asked) >= 6, **kw)
    assert len(forwards) == 6 and len(asked) == 7  # forwards: the shared prefill, then one a token (not 200);
    # asks: before the batch, after each of the 5 tokens, after the call
    kw["max_new_tokens"] = 12
    plain, asked_never = rollout.generate(model, prompts, 2, **kw), rollout.generate(model, prompts, 2,
                                                                                    should_stop=lambda: False, **kw)
    assert torch.equal(plain.response_ids, asked_never.response_ids)


def test_paged_stop_request_acted_on_inside_a_call(tiny_model_dir, monkeypatch):
    """The paged path asks should_stop while continuous batching generates, not only between calls: a stop
    requested inside a call (one call: 64 requests of 192 tokens, seconds of work) ends it within about
    PAGED_STOP_POLL_S plus the manager's shutdown (0.6 s here), with requests still unfinished, and the
    manager's thread is gone after."""
    import threading
    import time

    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(f"What is {k}+{k}?").input_ids for k in range(8)]
    kw = dict(max_new_tokens=192, eos_ids=[len(tok) + 5], pad_id=tok.pad_token_id, seed=0, cache="paged",
              max_batch_tokens=1 << 16)  # an EOS never sampled: every request runs its 192 tokens; one call
    monkeypatch.setattr(rollout, "PAGED_STOP_POLL_S", 0.05)
    asked = []
    others = lambda: sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor")  # noqa: E731
    threads = others()

    def should_stop():  # False before the call and at its first 4 polls inside it (0.2 s), then True
        asked.append(time.perf_counter())
        return len(asked) > 5

    with pytest.raises(rollout.Interrupted, match=r"with \d+ of 64 requests") as stopped:
        rollout.generate(model, prompts, 8, should_stop=should_stop, **kw)
    took = time.perf_counter() - asked[-1]
    assert took < 2.0, took
    done = int(str(stopped.value).split("with ")[1].split(" of")[0])
    assert done < 64
    time.sleep(0.2)
    assert others() == threads


def test_no_rollouts_decode_to_no_texts(tiny_model_dir):
    """A rank that owns no prompt this step gets no rollouts and no texts (transformers < 5.24 decodes an empty
    batch as [''], which once failed a two-rank run: '1 responses but 0 gold answers')."""
    model, tok = _model_and_tok(tiny_model_dir)
    out = rollout.generate(model, [], [], max_new_tokens=4, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert out.response_ids.shape[0] == 0 and out.texts(tok) == []
    one = rollout.generate(model, [tok("Hi").input_ids], 1, max_new_tokens=4, eos_ids=[tok.eos_token_id],
                           pad_id=tok.pad_token_id)
    assert one.texts(tok) == tok.batch_decode(one.responses(), skip_special_tokens=True)


def test_gqa_decoding_attention_equals_sdpa():
    """sdpa_gqa_attention on one query token (8 query heads over 2 KV heads, a left-padding mask) is transformers'
    sdpa with the cache copied 4 times wide; on several query tokens it is transformers' sdpa itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    b, S, d = 3, 11, 16
    key, value = torch.randn(b, 2, S, d), torch.randn(b, 2, S, d)
    mask = (torch.arange(S)[None] >= torch.tensor([0, 4, 9])[:, None])[:, None, None, :]  # (b, 1, 1, S)
    for q_len, m in ((1, mask), (1, None), (S, mask.expand(b, 1, S, S) & torch.ones(S, S, dtype=torch.bool).tril())):
        query = torch.randn(b, 8, q_len, d)
        got, _ = rollout.sdpa_gqa_attention(module, query, key, value, m, scaling=d ** -0.5)
        want, _ = sdpa_attention_forward(module, query, key, value, m, scaling=d ** -0.5)
        assert got.shape == want.shape == (b, q_len, 8, d)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_gqa_decoding_gives_the_same_rollouts(temperature, monkeypatch):
    """rollout.generate decodes the bundled tiny model (4 query heads over 2 KV heads) with sdpa_gqa_attention:
    called on every decoding step of every layer, the same tokens as transformers' sdpa, greedy and sampled, with
    mixed prompt lengths (a padding mask) and both caches; the model's own setting is given back."""
    import os

    from transformers import AttentionInterface

    model, tok = _model_and_tok(os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "tiny"))
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    prompts = [tok(f"What is {a}+{b}?").input_ids for a, b in ((1, 2), (12, 345), (7, 80), (4321, 5))]
    kw = dict(max_new_tokens=10, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=4, temperature=temperature)
    calls = []
    rollout._register_gqa_attention()

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return rollout.sdpa_gqa_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, rollout.GQA_ATTENTION, counted)
    gqa = rollout.generate(model, prompts, 3, **kw)
    decode_calls = sum(q == 1 for q in calls)
    assert decode_calls >= model.config.num_hidden_layers * (gqa.response_ids.shape[1] - 1)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(rollout, "DECODE_GQA", False)
    calls.clear()
    plain = rollout.generate(model, prompts, 3, **kw)
    assert not calls and torch.equal(gqa.response_ids, plain.response_ids)


@pytest.mark.parametrize("cache", ["slots", "paged"])
def test_weights_updated_in_place_are_seen(tiny_model_dir, cache):
    """The trainer updates the generation model's weights in place between phases: the next call of either
    cache decodes with the new weights (greedy tokens equal to the dynamic path's on the updated model), nothing
    kept from the previous call."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok("What is 1+1?").input_ids, tok("What is 12+345?").input_ids, tok("Hi").input_ids]
    kw = dict(max_new_tokens=8, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=1, temperature=0.0)
    before = rollout.generate(model, prompts, 2, cache=cache, **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = rollout.generate(model, prompts, 2, cache=cache, **kw)
    assert torch.equal(after.response_ids, rollout.generate(model, prompts, 2, **kw).response_ids)
    assert not torch.equal(after.response_ids, before.response_ids)


@pytest.mark.parametrize("share_prefill", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_preallocated_cache_gives_transformers_dynamic_cache_tokens(tiny_model_dir, monkeypatch, share_prefill,
                                                                    temperature):
    """The dynamic path's cache (rollout.PreallocatedLayer: written in place into buffers allocated once, attention
    given a view) decodes exactly the tokens of transformers' DynamicCache (concatenation every step), greedy and
    sampled, mixed prompt lengths, with and without the shared prefill (whose reorder replaces the layer's keys:
    the next step copies them into fresh buffers); and it is the cache generate used, written in place."""
    from transformers import DynamicCache

    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(t).input_ids for t in ("What is 1+1?", "What is 12+345?", "Hi", "What is 4321+5?")]
    kw = dict(max_new_tokens=12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=3, temperature=temperature,
              share_prefill=share_prefill)
    made = []
    real = rollout.kv_cache
    monkeypatch.setattr(rollout, "kv_cache", lambda *a: made.append(real(*a)) or made[-1])
    ours = rollout.generate(model, prompts, 3, **kw)
    layers = made[0].layers
    assert isinstance(made[0], DynamicCache) and all(isinstance(l, rollout.PreallocatedLayer) for l in layers)
    assert all(l.keys.data_ptr() == l.buffers[0].data_ptr() and l.buffers[0].shape[-2] == l.capacity
               and l.buffers[0].shape[0] == 4 * 3 for l in layers)  # one buffer a layer, every row (no prompts' left)
    assert layers[0].get_seq_length() == max(map(len, prompts)) + ours.response_ids.shape[1] - 1  # the last token
    monkeypatch.setattr(rollout, "PREALLOCATE", False)                                              # is not cached
    theirs = rollout.generate(model, prompts, 3, **kw)
    assert torch.equal(ours.response_ids, theirs.response_ids) and torch.equal(ours.lengths, theirs.lengths)


def test_preallocated_layer_follows_crop_reorder_and_growth():
    """PreallocatedLayer's bookkeeping against a plain concatenation: appends in place, a crop (a view of its
    buffer) is overwritten by the next update, a reorder (keys replaced) is copied into fresh buffers, and an
    update past the capacity grows the buffers (doubling) without losing what was cached."""
    torch.manual_seed(0)
    layer, ref = rollout.PreallocatedLayer(capacity=6), None
    steps = [("add", 3), ("add", 1), ("crop", 2), ("add", 2), ("reorder", None), ("add", 1), ("add", 4), ("add", 1)]
    for op, n in steps:
        if op == "add":
            k, v = torch.randn(3, 2, n, 4), torch.randn(3, 2, n, 4)
            ref = (k, v) if ref is None else (torch.cat([ref[0], k], -2), torch.cat([ref[1], v], -2))
            keys, values = layer.update(k, v)
            assert torch.equal(keys, ref[0]) and torch.equal(values, ref[1])
        elif op == "crop":
            layer.crop(-n)
            ref = (ref[0][..., :-n, :], ref[1][..., :-n, :])
        else:
            idx = torch.tensor([2, 0, 0])
            layer.reorder_cache(idx)
            ref = (ref[0][idx], ref[1][idx])
        assert layer.get_seq_length() == ref[0].shape[-2]
    assert layer.capacity >= 12 and layer.keys.data_ptr() == layer.buffers[0].data_ptr()


# --- batch-invariant sampling and the decode loop (cache="slots") ---------------------------------------------------

def test_sampler_draws_from_softmax_restricted_to_top_p():
    """sample_tokens over 40,000 rollout keys at fixed logits: each token's frequency matches softmax(logits / T)
    renormalised over the top-p nucleus (chi-square, 1e-3 level), tokens outside the nucleus are never drawn,
    draws at another position are a fresh stream (agreement near sum p^2, not 1), temperature 0 is argmax."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    T, top_p, n = 0.8, 0.9, 40_000
    probs = torch.softmax(logits / T, -1)
    keep = (probs.cumsum(-1) - probs) < top_p  # logits sorted already: the nucleus is a prefix
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    keys = rollout.rollout_keys(7, [0] * n, list(range(n)))
    rows = logits.expand(n, -1)
    draws = rollout.sample_tokens(rows, keys, torch.zeros(n, dtype=torch.long), T, top_p)
    counts = torch.bincount(draws, minlength=8).double()
    assert counts[~keep].sum() == 0
    e = expected[keep].double() * n
    chi2 = float(((counts[keep] - e) ** 2 / e).sum())
    assert chi2 < 20.5, chi2  # chi-square with 4 degrees of freedom (5 tokens kept): P(> 18.5) = 1e-3
    other = rollout.sample_tokens(rows, keys, torch.ones(n, dtype=torch.long), T, top_p)
    agree = float((other == draws).double().mean())
    assert abs(agree - float((expected ** 2).sum())) < 0.02, agree
    assert torch.equal(rollout.sample_tokens(rows[:3], keys[:3], torch.zeros(3, dtype=torch.long), 0.0), torch.zeros(3, dtype=torch.long))
    # a rollout's draw does not depend on its batch: one row alone equals the same row among others
    assert all(int(rollout.sample_tokens(rows[i:i + 1], keys[i:i + 1], torch.zeros(1, dtype=torch.long), T, top_p)) == int(draws[i])
               for i in range(0, n, 4_999))


def _random_model(tok, **kw):
    from tiny.build import build_model

    torch.manual_seed(0)
    return build_model(tok, **{**dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64), **kw}).eval()


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_every_cache_and_batching_samples_the_same_rollouts(tiny_model_dir, temperature, top_p, monkeypatch):
    """A rollout's tokens are a function of (seed, its prompt's key, its index) only: HF generate on the dynamic
    cache and the decode loop (cache="slots") sample the same tokens, greedy and sampled, under any
    max_batch_tokens / max_batch_size (the loop with 1, 3 and all slots: refills and tail compaction), and a
    prompt generated in another call with the same prompt key gets the same rollouts. Prompts of 1 to 16 tokens,
    a random model (a flat distribution: every draw matters) and EOS tokens it samples (lengths vary)."""
    from tiny.build import build_tokenizer

    tok = build_tokenizer()
    model = _random_model(tok)
    prompts = [tok(t).input_ids for t in ("1", "12+35=", "What is 7*8?", "100-1=", "What is 4321+5678?")]
    n = [2, 1, 3, 2, 4]
    eos = [int(torch.tensor([t for p in prompts for t in p]).mode().values), *range(100, 116)]  # lengths vary
    kw = dict(max_new_tokens=24, eos_ids=eos, pad_id=tok.pad_token_id, seed=11, temperature=temperature, top_p=top_p)
    steps = []
    real = rollout._decode_step
    monkeypatch.setattr(rollout, "_decode_step", lambda m, c, st, n, **k: steps.append(n) or real(m, c, st, n, **k))
    ref = rollout.generate(model, prompts, n, **kw)
    assert 1 < len(set(ref.lengths.tolist()))
    runs = {"dynamic, batches of 2": rollout.generate(model, prompts, n, max_batch_size=2, share_prefill=False, **kw),
            "dynamic, 60-token budget": rollout.generate(model, prompts, n, max_batch_tokens=60, **kw)}
    shapes = {}
    for slots in (1, 3, 12):
        steps.clear()
        runs[f"slots x{slots}"] = rollout.generate(model, prompts, n, cache="slots", max_batch_size=slots, **kw)
        shapes[slots] = sorted(set(steps))
        assert max(steps) == slots
    assert any(len(s) > 1 for s in shapes.values()), shapes  # some tail ran compacted on fewer slots
    for name, out in runs.items():
        assert torch.equal(out.response_ids, ref.response_ids) and torch.equal(out.finished, ref.finished), name
    alone = rollout.generate(model, [prompts[3]], [2], prompt_keys=[3], cache="slots", **kw)
    assert torch.equal(alone.response_ids, ref.response_ids[ref.prompt_index == 3][:, :alone.response_ids.shape[1]])
    if temperature > 0:
        assert len({tuple(r) for r in ref.responses()}) > len(prompts)  # rollouts of a prompt differ


def test_slots_greedy_equals_hf_generate_on_the_pretrained_model():
    """The decode loop's greedy tokens equal HF generate's (dynamic cache) token for token on the bundled
    pretrained tiny model, chat-formatted problems of mixed lengths, with more rollouts than slots."""
    model, tok = _model_and_tok(os.path.join(ROOT, "models", "tiny"))
    prompts = [tok(f"{a}+{b}=").input_ids for a, b in ((1, 2), (12, 345), (7, 80), (4321, 5), (99, 1))]
    kw = dict(max_new_tokens=16, eos_ids=rollout.stop_token_ids(tok, model), pad_id=tok.pad_token_id, seed=0,
              temperature=0.0)
    ref = rollout.generate(model, prompts, 2, **kw)
    loop = rollout.generate(model, prompts, 2, cache="slots", max_batch_size=4, **kw)
    assert torch.equal(loop.response_ids, ref.response_ids) and torch.equal(loop.lengths, ref.lengths)


def test_slots_stop_request_acted_on_within_a_few_steps(tiny_model_dir, monkeypatch, capsys):
    """The decode loop asks should_stop at every look of the host (every SLOT_CHECK_EVERY steps under CUDA graphs,
    every step eagerly): a stop requested at the third look (after the admission and one step) raises Interrupted
    with every rollout unfinished; the progress bar counts rollouts as they finish."""
    model, tok = _model_and_tok(tiny_model_dir)
    prompts = [tok(f"What is {k}+{k}?").input_ids for k in range(4)]
    kw = dict(max_new_tokens=200, eos_ids=[len(tok) + 5], pad_id=tok.pad_token_id, seed=0, cache="slots")
    steps, real = [], rollout._decode_step
    monkeypatch.setattr(rollout, "_decode_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    asked = []
    with pytest.raises(rollout.Interrupted, match=r"with 0 of 16 rollouts done"):
        rollout.generate(model, prompts, 4, should_stop=lambda: asked.append(1) or len(asked) >= 3, **kw)
    assert len(steps) == 1
    rollout.generate(model, prompts, 4, progress="rollouts", **{**kw, "max_new_tokens": 6})
    assert "rollouts: 100%" in capsys.readouterr().err


def test_slots_graph_schedule_on_cpu(monkeypatch):
    """The decode loop's CUDA-graph schedule, run on a CPU with a stand-in graph (capture records the step without
    running it, replay runs it; what a CUDA graph does, minus the kernels): each batch shape's first step runs
    eagerly, is captured once, then replayed; the tokens equal the eager loop's and HF generate's, sampled, with
    refills and a compacted tail."""
    from tiny.build import build_tokenizer

    class Graph:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

        def pool(self):
            return "pool"

    tok = build_tokenizer()
    model = _random_model(tok)
    prompts = [tok(t).input_ids for t in ("1", "12+35=", "What is 7*8?", "100-1=")]
    kw = dict(max_new_tokens=40, eos_ids=list(range(100, 120)), pad_id=tok.pad_token_id, seed=2, temperature=1.0)
    ref = rollout.generate(model, prompts, 3, **kw)
    captured = []
    monkeypatch.setattr(rollout, "_can_capture", lambda device: True)
    monkeypatch.setattr(rollout, "_capture", lambda fn, pool: captured.append((fn.args, pool)) or Graph(fn))
    graphed = rollout.generate(model, prompts, 3, cache="slots", max_batch_size=8, **kw)
    assert torch.equal(graphed.response_ids, ref.response_ids)
    shapes = [args[-1] for args, _ in captured]  # the batch shape n, the partial's last argument
    assert len(shapes) == len(set(shapes)) > 1 and shapes[0] == 8  # once per shape; the tail's smaller ones too
    assert [pool for _, pool in captured] == [None] + ["pool"] * (len(captured) - 1)  # one memory pool


def test_slots_sampled_logprobs_match_training_forward(tiny_model_dir, monkeypatch):
    """The decode loop's logits (prefill into the slot cache, then one token a row over it) give the sampled tokens
    the log-probabilities the trainer's forward gives them: the PPO ratio starts at 1 on this path too."""
    import train

    model, tok = _model_and_tok(tiny_model_dir)
    cfg = load_config([f"--model.path={tiny_model_dir}"])
    prompts = [tok("What is 1+1?").input_ids, tok("What is 12+345?").input_ids]
    seen, real = [], rollout.sample_tokens

    def recording(logits, *a, **k):
        token = real(logits, *a, **k)
        seen.append(torch.log_softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0])  # (rows,)
        return token
    monkeypatch.setattr(rollout, "sample_tokens", recording)
    out = rollout.generate(model, prompts, 2, max_new_tokens=8, eos_ids=[len(tok) + 5], pad_id=tok.pad_token_id,
                           seed=3, cache="slots")  # an EOS never sampled: 4 rows, all at once, 8 tokens each
    sampled = torch.stack(seen, 1)  # (4, 8): the first token from the prefill, then a step each, slot = row
    policy = Policy(model)
    for i, r in enumerate(out.responses()):
        p = prompts[int(out.prompt_index[i])]
        seqs = [{"ids": p + r, "prompt_len": len(p), "resp_len": len(r)}]
        logp = train.score_logprobs(policy, make_micro_batches(seqs, 1, 0), torch.device("cpu"), cfg)[0]
        torch.testing.assert_close(logp, sampled[i], atol=1e-4, rtol=1e-4)
