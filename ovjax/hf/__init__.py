"""Hugging Face interop: import, export and stage-0 assembly in the hub checkpoint layout.

    model = ovjax.hf.load(path, dtype="float32")        # a LLaVA-OV-1.5 or a Qwen3 checkpoint directory
    model = ovjax.hf.load(path, mesh=mesh)               # streamed straight into the param shardings
    logits = model.logits(input_ids, pixel_values=None, image_grid_thw=None)   # [B, T, vocab], float32
    ovjax.hf.save(model, out_dir)                         # config.json + (sharded) safetensors
    model = ovjax.hf.assemble_stage0(mlcd_dir, qwen3_dir) # RICE-ViT + Qwen3 + fresh projector

Modules, one job each: `keymap` (declarative tensor maps + transforms, LLaVA-OV-1.5/Qwen3 and MLCD),
`config` (config.json <-> our config, unsupported values refused), `files` (safetensors index, streaming
sharded writer), `reader` / `loading` (streamed import), `writer` (streamed export), `model` (the runtime
wrapper), `stage0` (assembly), `sidefiles` (tokenizer/processor/chat template/generation files),
`export_cmd` / `import_cmd` / `assemble_cmd` (the verbs).
"""

from __future__ import annotations

import os

from ovjax.hf.config import config_from_hf, config_to_hf, vision_config_from_mlcd
from ovjax.hf.files import INDEX_NAME, SAFE_NAME, CheckpointError
from ovjax.hf.keymap import key_map, mlcd_key_map
from ovjax.hf.loading import load, load_params
from ovjax.hf.model import Model, from_params
from ovjax.hf.stage0 import assemble_stage0, vision_params_from_mlcd
from ovjax.hf.writer import copy_files, export_tensors, write_hf

# Files a hub directory may carry besides the weights; `save` copies them from the source directory.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                "generation_config.json")


def save(model: Model, path, *, max_shard_bytes: int = 5 * 1024 ** 3, copy_from: str | None = None,
         dtype=None) -> str:
    """Write `model` as config.json + safetensors (sharded with an index above max_shard_bytes), copy tokenizer
    and processor files from `copy_from` (default: the directory it was loaded from), then reopen what was
    written and compare every tensor's name, shape and dtype."""
    path = os.fspath(path)
    write_hf(model.cfg, model.params, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    copy_files(copy_from if copy_from is not None else model.source, path, COPIED_FILES)
    return path


__all__ = ["CheckpointError", "COPIED_FILES", "INDEX_NAME", "Model", "SAFE_NAME", "assemble_stage0",
           "config_from_hf", "config_to_hf", "copy_files", "export_tensors", "from_params", "key_map", "load",
           "load_params", "mlcd_key_map", "save", "vision_config_from_mlcd", "vision_params_from_mlcd", "write_hf"]
