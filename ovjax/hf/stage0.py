"""Stage 0: a RICE-ViT in the transformers `mlcd` layout + a Qwen3 LLM + a fresh projector, streamed.

The head is always untied (the released checkpoints have their own `lm_head`); a tied LLM's head starts as a
copy of its embedding matrix. Special token ids are the tokenizer's (the LLM directory's, or `tokenizer`), else
the Qwen2 ones (configs/models.py QWEN_TOKENS).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovjax.configs import models as model_configs
from ovjax.hf import keymap, sidefiles
from ovjax.hf.config import config_from_hf, vision_config_from_mlcd
from ovjax.hf.files import CheckpointError, DictSource, TensorSource, read_json
from ovjax.hf.loading import TIED_HEAD_NOTE, check_vocab, target_shardings
from ovjax.hf.model import Model
from ovjax.hf.reader import check_keys, get_path, place, read_params, set_path
from ovjax.models.projector import PatchMerger
from ovjax.models.vision import VisionTower
from ovjax.models.vlm import abstract_params, dtype_of, freeze


def stage0_config(vit_path: str, llm_path: str, dtype: str = "float32",
                  tokenizer: str | None = None) -> tuple[ml_collections.ConfigDict, bool]:
    """-> (our config, whether the source LLM was tied). Token ids from `tokenizer` or the LLM dir's tokenizer."""
    where = os.path.join(llm_path, "config.json")
    cfg = config_from_hf(read_json(where), where=where)
    if cfg.vision is not None:
        raise CheckpointError(f"{llm_path} is not a plain Qwen3 checkpoint (model_type qwen3)")
    tied = bool(cfg.text.tie_word_embeddings)
    cfg.text.tie_word_embeddings = False
    where = os.path.join(vit_path, "config.json")
    cfg.vision = vision_config_from_mlcd(read_json(where), cfg.text.hidden_size, where=where)
    tok = sidefiles.find_tokenizer_dir(tokenizer, llm_path)
    ids = sidefiles.token_ids(tok) if tok else None
    for k, v in model_configs.QWEN_TOKENS.items():
        cfg[k] = v if ids is None else ids[sidefiles.TOKEN_KEYS[k]]
    cfg.name = "stage0"
    cfg.dtype = cfg.param_dtype = dtype
    model_configs.validate(cfg)
    return cfg, tied


def _text_map(cfg, tied_source: bool) -> keymap.KeyMap:
    entries = keymap.text_entries(cfg.text)
    if tied_source:   # the untied head is read from the embedding matrix
        entries = [e for e in entries if e.path[-1] != "lm_head"]
        entries.append(keymap.linear("model.embed_tokens.weight", ("language_model", "lm_head")))
    return keymap.KeyMap(tuple(entries), {"text": cfg.text.num_layers}, keymap.LLAVA_ALIASES)


def fresh_merger(cfg, seed: int, dtype) -> dict:
    v = cfg.vision
    group = v.spatial_merge_size ** 2
    module = PatchMerger(v, param_dtype=dtype_of(cfg.param_dtype))
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, group, v.hidden_size), jnp.float32))
    return jax.device_get(nn.meta.unbox(params["params"]))


def assemble_stage0(vit_path: str, llm_path: str, *, seed: int = 0, dtype: str = "float32", shardings=None,
                    mesh=None, tokenizer: str | None = None) -> Model:
    """The stage-0 Model from two hub directories. shardings / mesh as in `hf.load`; tokenizer: the dir whose
    special-token ids the model takes (default: the LLM dir's, when it has a tokenizer.json)."""
    vit_path, llm_path = os.fspath(vit_path), os.fspath(llm_path)
    cfg, tied = stage0_config(vit_path, llm_path, dtype, tokenizer)
    target = abstract_params(cfg)
    shardings = target_shardings(cfg, shardings, mesh)
    np_dtype = np.dtype(dtype_of(dtype))
    text_map = _text_map(cfg, tied)
    with TensorSource(llm_path) as src:
        extra = ("lm_head.weight",) if tied else ()
        stored = check_keys(src, text_map, extra_ok=extra, why=TIED_HEAD_NOTE)
        check_vocab(src, stored, cfg)
        params = read_params(src, text_map, target, stored=stored, dtype=np_dtype, shardings=shardings)
    vision_map = keymap.mlcd_key_map(cfg.vision)
    with TensorSource(vit_path) as src:
        stored = check_keys(src, vision_map)
        params.update(read_params(src, vision_map, target, stored=stored, dtype=np_dtype, shardings=shardings))
    merger = fresh_merger(cfg, seed, np_dtype)
    for path, value in jax.tree_util.tree_flatten_with_path(merger)[0]:
        keys = ("merger",) + tuple(k.key for k in path)
        want = get_path(target, keys)
        if want is None or tuple(want.shape) != tuple(value.shape):
            raise CheckpointError(f"fresh merger param {'/'.join(keys)} does not fit the model")
        target_sharding = get_path(shardings, keys) if shardings is not None else None
        set_path(params, keys, place(np.asarray(value, np_dtype), target_sharding))
    return Model(cfg, params)


def vision_params_from_mlcd(tensors: dict, vcfg) -> dict:
    """An in-memory MLCD state dict ({key: numpy}, any of the usual prefixes) -> our `visual` subtree, through
    the same declarative map as `assemble_stage0`. post_layernorm is dropped (OV-1.5 uses the last block's raw
    output)."""
    pix = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    tower = VisionTower(freeze(vcfg))
    shapes = jax.eval_shape(lambda: tower.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, pix)),
                                               jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4, 2), jnp.int32),
                                               num_images=1))
    target = {"visual": nn.meta.unbox(shapes["params"])}
    source = DictSource(tensors)
    kmap = keymap.mlcd_key_map(vcfg)
    stored = check_keys(source, kmap)
    return read_params(source, kmap, target, stored=stored, dtype=np.float32)["visual"]
