"""A small byte-level BPE tokenizer with the Qwen2-VL special tokens, and special-token look-up.

`build_tokenizer` trains on a text corpus with the `tokenizers` library and saves an HF tokenizer directory
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
`transformers.AutoTokenizer.from_pretrained(dir)` loads without remote code. It is for tests and the
synthetic demo dataset; real runs use the Qwen tokenizer directory, whose special-token ids differ, so code
must always look ids up by string with `special_token_ids`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

# Strings of the contract's special tokens. Order fixes their ids (0..6) in tokenizers built here.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Keys of `special_token_ids`' result, one per string above.
_KEYS = {ENDOFTEXT: "endoftext", IM_START: "im_start", IM_END: "im_end", VISION_START: "vision_start",
         VISION_END: "vision_end", IMAGE_PAD: "image_pad", VIDEO_PAD: "video_pad"}

_BYTE_ALPHABET = 256


class TokenizerError(ValueError):
    """The tokenizer lacks something the data pipeline needs."""


def build_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str], vocab_size: int = 1024, *,
                    min_frequency: int = 2) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it as an HF tokenizer directory.

    The same corpus (same strings, same order) and arguments give a byte-identical tokenizer.json.
    Special tokens get ids 0..6 in the order of `SPECIAL_TOKENS`; eos is <|im_end|>, pad <|endoftext|>.
    Returns `out_dir` as a Path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise TokenizerError(f"vocab_size {vocab_size} is below {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} "
                             "special tokens)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_checked_corpus(corpus), trainer=trainer)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   clean_up_tokenization_spaces=False)
    # Registering them as special keeps them atomic when encoding and skipped by decode(skip_special_tokens).
    fast.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)]})
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # The generic class name loads in transformers 4.x too ("TokenizersBackend" is 5.x only).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    stm = out / "special_tokens_map.json"
    if not stm.exists():
        # transformers 5 keeps the map inside tokenizer_config.json only; older readers expect the file.
        stm.write_text(json.dumps({"eos_token": IM_END, "pad_token": ENDOFTEXT,
                                   "additional_special_tokens": [t for t in SPECIAL_TOKENS
                                                                 if t not in (IM_END, ENDOFTEXT)]},
                                  indent=2) + "\n")
    return out


def _checked_corpus(corpus: Iterable[str]) -> Iterable[str]:
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise TokenizerError(f"corpus item {i} is a {type(text).__name__}, expected str")
        yield text


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the contract's special tokens, looked up by string in any HF tokenizer.

    Returns {"endoftext", "im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad"} -> id.
    Raises TokenizerError naming the token if one is missing or is not an atomic (added) token, i.e. if
    encoding its string does not give exactly that one id.
    """
    vocab = tokenizer.get_vocab()
    missing = [s for s in SPECIAL_TOKENS if s not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks the special token(s) "
                             f"{' '.join(missing)}")
    ids: dict[str, int] = {}
    for s in SPECIAL_TOKENS:
        tid = int(vocab[s])
        enc = tokenizer.encode(s, add_special_tokens=False)
        if list(enc) != [tid]:
            raise TokenizerError(f"tokenizer encodes {s} as {list(enc)}, not as its single id {tid}: it must be "
                                 "an added (special) token")
        ids[_KEYS[s]] = tid
    return ids
