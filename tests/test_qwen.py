"""The real tokenizer: Qwen2.5-Math's byte-level BPE (151,643 tokens + specials), its chat template and EOS.

Ids below are the published ones of the Qwen2 tokenizer (e.g. "<|im_start|>system\\n" = 151644, 8948, 198),
so these tests pin our prompt building to what a Qwen2.5-Math user gets, not to our own template."""

import pytest
import torch

import reward
import rollout
from eval import SYSTEM_PROMPT, USER_TEMPLATE, build_prompt

IM_START, IM_END, EOT = 151644, 151645, 151643
SYSTEM, USER, ASSISTANT, NEWLINE = 8948, 872, 77091, 198


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def test_vocabulary_and_special_tokens(tok, qwen_tokenizer_dir):
    import json
    import os

    with open(os.path.join(qwen_tokenizer_dir, "tokenizer.json")) as f:
        assert len(json.load(f)["model"]["merges"]) == 151_387  # one per multi-byte token, as Qwen2's merges.txt
    assert len(tok) == 151_665  # 151,643 BPE tokens + 22 special tokens (the model's 151,936 rows are padding)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == EOT
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [IM_START, IM_END, 151664]
    # published Qwen2 encodings
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False).input_ids \
        == [IM_START, SYSTEM, NEWLINE, 2610, 525, 264, 10950, 17847, 13, IM_END, NEWLINE]
    # digits are split one by one (Qwen2's pre-tokenizer, unlike GPT-4's 1-3 digits)
    assert tok("12345", add_special_tokens=False).input_ids == [16, 17, 18, 19, 20]
    text = "Let $f(x)=\\frac{x^2-1}{x+1}$. Then $f(3)=\\boxed{2}$, naïve café 你好"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_prompt_ids_are_what_a_qwen_math_user_gets(tok):
    """system turn + user turn (problem + the paper's instruction) + generation prompt, token for token."""
    problem = "What is $1+1$?"
    ids = build_prompt(tok, problem, SYSTEM_PROMPT, USER_TEMPLATE)

    def enc(s):
        return tok(s, add_special_tokens=False).input_ids

    want = ([IM_START, SYSTEM, NEWLINE] + enc(SYSTEM_PROMPT) + [IM_END, NEWLINE]
            + [IM_START, USER, NEWLINE] + enc(USER_TEMPLATE.format(problem=problem)) + [IM_END, NEWLINE]
            + [IM_START, ASSISTANT, NEWLINE])
    assert ids == want
    assert tok.decode(ids) == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                               "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is $1+1$? Let's think step by step and "
                               "output the final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    # Qwen2.5-Math's template puts its default system prompt in when the messages bring none
    no_system = build_prompt(tok, problem, "", USER_TEMPLATE)
    assert no_system[:3] == [IM_START, SYSTEM, NEWLINE] and no_system[3:3 + len(enc(SYSTEM_PROMPT))] == enc(SYSTEM_PROMPT)


def _scripted_model(tok, script: list[int]):
    """A random tiny Qwen2 at the real vocabulary size (151,936, tied embeddings) whose greedy next token is
    script's successor of the last input token: it 'writes' script, token by token, whatever the weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert len(set(script)) == len(script)
    nxt = torch.zeros(151_936, dtype=torch.long)  # anything else -> "!" (id 0)
    nxt[torch.tensor(script[:-1])] = torch.tensor(script[1:])
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      bos_token_id=EOT, eos_token_id=EOT)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()

    def force(module, args, kwargs, out):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        forced = torch.full_like(out.logits[:, -1], -1e4)
        forced.scatter_(1, nxt[ids[:, -1]][:, None], 0.0)
        out.logits[:, -1] = forced
        return out

    model.register_forward_hook(force, with_kwargs=True)
    return model


@pytest.mark.parametrize("stop_at_im_end", [False, True])
def test_generation_stops_at_eos_and_the_boxed_answer_scores(tok, stop_at_im_end):
    prompt = build_prompt(tok, "What is $1+1$?")
    answer = tok("The answer is $\\boxed{2}$.", add_special_tokens=False).input_ids
    tail = [IM_END, IM_START, USER, EOT]  # end of turn, a made-up next turn, then <|endoftext|>
    model = _scripted_model(tok, [prompt[-1]] + answer + tail)
    eos = rollout.stop_token_ids(tok, model, stop_at_im_end)
    assert eos == ([EOT, IM_END] if stop_at_im_end else [EOT])  # released pipeline: EOS only
    out = rollout.generate(model, [prompt], 2, max_new_tokens=40, eos_ids=eos, pad_id=tok.pad_token_id,
                           temperature=0.0)
    resp = out.responses()
    want = answer + ([IM_END] if stop_at_im_end else tail)
    assert resp == [want, want] and out.finished.all()
    text = tok.batch_decode(resp, skip_special_tokens=True)[0]  # as train.generate_and_score decodes
    assert text == "The answer is $\\boxed{2}$." + ("" if stop_at_im_end else "user")
    assert reward.score(text, "2") == 1.0 and reward.score(text, "3") == 0.0
    # without a stop token the response runs to the length limit and is marked unfinished
    cut = rollout.generate(model, [prompt], 1, max_new_tokens=5, eos_ids=eos, pad_id=tok.pad_token_id, temperature=0.0)
    assert cut.responses() == [answer[:5]] and not cut.finished.any()
