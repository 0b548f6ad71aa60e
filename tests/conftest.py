import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 model and character tokenizer, saved locally (no hub)."""
    from tiny.build import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer()
    build_model(tok, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """The Qwen2.5-Math tokenizer (151,643 BPE tokens + 22 specials, chat template, EOS), built offline."""
    from qwen_tokenizer import save_tokenizer

    return save_tokenizer(str(tmp_path_factory.mktemp("qwen_tokenizer")))
