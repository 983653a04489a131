"""`load`: a hub checkpoint directory -> Model, every tensor streamed into its target sharding."""

from __future__ import annotations

import os

import jax
import numpy as np

from ovjax import sharding as sharding_lib
from ovjax.configs import models as model_configs
from ovjax.hf.config import config_from_hf
from ovjax.hf.files import CheckpointError, TensorSource, read_json
from ovjax.hf.keymap import KeyMap, key_map
from ovjax.hf.model import Model
from ovjax.hf.reader import check_keys, read_params
from ovjax.models.vlm import abstract_params, dtype_of

TIED_HEAD_NOTE = "tie_word_embeddings is true in text_config: the head is the embedding matrix, as in transformers"


def target_shardings(cfg, shardings=None, mesh=None):
    """The param shardings to load into: given, or from the logical-axis rules over `mesh`, or None."""
    if shardings is not None or mesh is None:
        return shardings
    return sharding_lib.param_shardings(abstract_params(cfg, boxed=True), mesh)


def check_coverage(kmap: KeyMap, target, where: str) -> None:
    """Every model param is written by exactly one key-map entry."""
    want = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = [e.path for e in kmap.entries]
    if len(set(have)) != len(have) or want != set(have):
        diff = sorted(want.symmetric_difference(have))[:5]
        raise CheckpointError(f"{where}: key map and model params differ, e.g. {diff}")


def check_vocab(source: TensorSource, stored: dict, cfg) -> None:
    rows = source.shape(stored["model.embed_tokens.weight"])[0]
    if rows != cfg.text.vocab_size:
        raise CheckpointError(f"{source.path}: config.json says vocab_size={cfg.text.vocab_size} but "
                              f"model.embed_tokens.weight has {rows} rows")


def load_params(path: str, cfg, dtype="float32", *, shardings=None, mesh=None) -> dict:
    """Read every tensor of `cfg`'s key map from `path` into our param tree (jax.Arrays, streamed)."""
    kmap = key_map(cfg)
    target = abstract_params(cfg)
    check_coverage(kmap, target, path)
    with TensorSource(path) as src:
        extra = ("lm_head.weight",) if cfg.text.tie_word_embeddings else ()
        stored = check_keys(src, kmap, extra_ok=extra, why=TIED_HEAD_NOTE)
        check_vocab(src, stored, cfg)
        return read_params(src, kmap, target, stored=stored, dtype=np.dtype(dtype_of(dtype)),
                           shardings=target_shardings(cfg, shardings, mesh))


def load(path, dtype: str = "float32", *, remote_code_quirks: bool = True, shardings=None, mesh=None) -> Model:
    """Load a hub-layout checkpoint directory (config.json + safetensors) as a Model with `dtype` params.

    remote_code_quirks: reproduce the released remote code exactly, including its CLS-stripping offsets
    (image k of a call comes out displaced by k slots; see `ovjax.models.vision._remote_code_cls_windows`).
    Training (Megatron) strips correctly; pass False for that.
    shardings (a param-shaped tree of Sharding, or of ShapeDtypeStruct with one) or mesh (shardings from the
    logical-axis rules): each tensor goes straight to its devices, each device receiving only its slice.
    Default: the default device.
    """
    path = os.fspath(path)
    cfg = config_from_hf(read_json(os.path.join(path, "config.json")), where=os.path.join(path, "config.json"))
    cfg.dtype = cfg.param_dtype = dtype
    if cfg.vision is not None:
        cfg.vision.remote_code_cls_shift = bool(remote_code_quirks)
    model_configs.validate(cfg)
    params = load_params(path, cfg, dtype, shardings=shardings, mesh=mesh)
    return Model(cfg, params, source=path)
