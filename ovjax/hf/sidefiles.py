"""The files beside the weights that make a directory usable by transformers / lmms-eval: tokenizer,
`chat_template.jinja`, `generation_config.json`, `preprocessor_config.json` (Qwen2-VL image processor with
temporal patch 1 and the run's pixel budget)."""

from __future__ import annotations

import json
import os

from ovjax.data import images
from ovjax.data.tokenizer import special_token_ids
from ovjax.hf.files import CheckpointError
from ovjax.hf.writer import copy_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")

# The Qwen2-VL chat format of spec/model.md section 6 (default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to the image's token count).
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}\n"
)


# model config field -> its key in `token_ids`
TOKEN_KEYS = {"image_token_id": "image_pad", "video_token_id": "video_pad", "vision_start_token_id": "vision_start",
              "vision_end_token_id": "vision_end"}


def find_tokenizer_dir(*candidates) -> str | None:
    """The first candidate directory holding a tokenizer.json."""
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "tokenizer.json")):
            return os.fspath(c)
    return None


def token_ids(tokenizer_dir: str) -> dict[str, int]:
    """The special-token ids of the contract (`ovjax.data.tokenizer.special_token_ids`) of a tokenizer dir."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    return special_token_ids(tok)


def processor_config(min_pixels: int = images.MIN_PIXELS, max_pixels: int = images.MAX_PIXELS) -> dict:
    if not 0 < min_pixels <= max_pixels:
        raise CheckpointError(f"pixel budget must satisfy 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(images.CLIP_MEAN), "image_std": list(images.CLIP_STD),
        "patch_size": images.PATCH_SIZE, "temporal_patch_size": 1, "merge_size": images.MERGE_SIZE,
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
    }


def generation_config(ids: dict[str, int]) -> dict:
    return {"eos_token_id": [ids["im_end"], ids["endoftext"]], "pad_token_id": ids["endoftext"],
            "do_sample": False, "max_new_tokens": 1024}


def write_side_files(out: str, *, tokenizer_dir: str | None, min_pixels: int, max_pixels: int, cfg=None,
                     log=print) -> list[str]:
    """Tokenizer files (copied), chat template, generation config, processor config. Returns the names written.
    With a tokenizer, its special-token ids must equal the model's (cfg) image / vision ids."""
    written = []
    if tokenizer_dir is None:
        log(f"no tokenizer found: {out} gets no tokenizer files and no generation_config.json "
            f"(pass --tokenizer DIR)")
    else:
        ids = token_ids(tokenizer_dir)
        if cfg is not None and cfg.vision is not None:
            for name, key in TOKEN_KEYS.items():
                if ids[key] != cfg[name]:
                    raise CheckpointError(f"tokenizer {tokenizer_dir} has {key} id {ids[key]} but the model's "
                                          f"{name} is {cfg[name]}")
        written += copy_files(tokenizer_dir, out, TOKENIZER_FILES)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump(generation_config(ids), f, indent=2)
        written.append("generation_config.json")
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(processor_config(min_pixels, max_pixels), f, indent=2)
    return written + ["chat_template.jinja", "preprocessor_config.json"]
