"""The Qwen2 / Qwen2.5-Math tokenizer, offline: 151,643 byte-level BPE tokens + Qwen2.5's 22 special tokens.

Built from `tests/assets/qwen2/qwen.tiktoken` (the BPE ranks Qwen1 and Qwen2 share; Apache-2.0, as shipped in
Alibaba's `dashscope` package, see tests/assets/qwen2/README.md). Qwen2's vocab.json/merges.txt are these
ranks in GPT-2's byte-to-unicode spelling, and its pre-tokenizer is the split pattern below followed by
byte-level mapping; we rebuild that as a `tokenizers.Tokenizer`, give it Qwen2.5-Math's chat template and EOS
(`<|endoftext|>`, as in Qwen2.5-Math-1.5B's tokenizer_config.json), and save it like a hub checkpoint.

    python tests/qwen_tokenizer.py OUT_DIR      # writes tokenizer.json, tokenizer_config.json, ...
"""

import base64
import os
import sys

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "qwen2", "qwen.tiktoken")
# Qwen2's pre-tokenizer split (one digit per piece, unlike GPT-4's 1-3)
SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # ids 151643...
# Qwen2.5-Math's chat template without the tool-calling branch: a system turn (the model's default one when
# the messages bring none), the turns, and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _parts(ranks: dict, token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE of `token` using only merges that rank below max_rank (lowest rank merged first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _bpe(path: str = ASSET):
    """vocab {byte-level string: id} and merges [(left, right)] in rank order from tiktoken ranks: a token's
    merge is the last step of its own BPE under the lower-ranked merges (one merge per multi-byte token, as
    in Qwen2's merges.txt)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    to_unicode = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _parts(ranks, token, rank)  # exactly two: every token is reachable by BPE
            merges.append((spell(left), spell(right)))
    return {spell(t): r for t, r in ranks.items()}, merges


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast equal in ids to Qwen2.5-Math-1.5B's tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _bpe()
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])  # ids 151643.. in order
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:], clean_up_tokenization_spaces=False,
                                   model_max_length=131072)
    fast.chat_template = CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids(SPECIAL) == list(range(151643, 151643 + len(SPECIAL)))
    return fast


def save_tokenizer(out_dir: str) -> str:
    build_tokenizer().save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(save_tokenizer(sys.argv[1]))
