"""build_tokenizer: a loadable, deterministic HF tokenizer directory; special_token_ids look-up."""

import json

import pytest

from ovjax.data import tokenizer as tk
from tests.data._make_inputs import CORPUS, make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_directory_loads_with_autotokenizer(tok_dir):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file(), name
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "A cat sits on a red mat.\nTwo birds!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # merges were learnt


def test_special_token_ids(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tk.special_token_ids(tok)
    assert ids == {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4,
                   "image_pad": 5, "video_pad": 6}
    # atomic inside text, and skipped when decoding with skip_special_tokens
    enc = tok.encode("hi<|image_pad|><|image_pad|>there<|im_end|>", add_special_tokens=False)
    assert enc.count(5) == 2 and enc[-1] == 2
    assert tok.decode(enc, skip_special_tokens=True) == "hithere"


def test_deterministic(tmp_path):
    a = make_tokenizer(tmp_path / "a")
    b = make_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "tokenizer_config.json").read_bytes() == (b / "tokenizer_config.json").read_bytes()


def test_missing_special_token_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>"],
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path))
    with pytest.raises(tk.TokenizerError, match=r"lacks .*<\|endoftext\|> <\|im_end\|>") as e:
        tk.special_token_ids(AutoTokenizer.from_pretrained(str(tmp_path)))
    assert "<|im_start|>" not in str(e.value)


def test_vocab_too_small(tmp_path):
    with pytest.raises(tk.TokenizerError, match="vocab_size"):
        tk.build_tokenizer(tmp_path, CORPUS, vocab_size=100)
