"""Import from and export to the Hugging Face checkpoint layout.

    model = ovjax.hf.load(path, dtype="float32")        # a LLaVA-OV-1.5 or a Qwen3 checkpoint directory
    logits = model.logits(input_ids, pixel_values=None, image_grid_thw=None)   # [B, T, vocab], float32
    ovjax.hf.save(model, out_dir)                         # config.json + (sharded) safetensors

The key map is declarative (`key_map`): one entry per tensor family, with the transform to our layout and
its inverse. Stored keys may use the hub prefixes (`visual.`, `model.`, `lm_head.`) or the in-memory ones
(`model.visual.`, `model.language_model.`); the native port's merger names (`linear_fc1/2`) are accepted.
Tensors are read one at a time (safetensors, never pickle) and written into preallocated stacked arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ovjax.configs import models as model_configs
from ovjax.models.vlm import VLM, abstract_params, dtype_of, freeze, init_params, upstream_to_batch

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what it should."""


# ----------------------------------------------------------------------------------------------------------
# The key map


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str                              # hub key; "{n}" stands for the layer index of stacked entries
    path: tuple[str, ...]                # our param path
    to_ours: Callable                    # numpy [hf shape] -> numpy [our shape]
    to_hf: Callable                      # inverse
    stacked: bool = False                # one tensor per layer, stacked on our leading axis


def _t(x):
    return np.ascontiguousarray(x.T)


def _same(x):
    return x


def key_map(cfg) -> list[Entry]:
    """All tensors of a model with config `cfg` (a text-only model when cfg.vision is None)."""
    t = cfg.text
    h, hq, hkv, hd, inter = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    lm = ("language_model",)
    L = lm + ("layers",)

    def heads_in(n_heads):   # [n*hd, H] -> [H, n, hd]
        return (lambda w: np.ascontiguousarray(w.T.reshape(h, n_heads, hd)),
                lambda k: np.ascontiguousarray(k.reshape(h, n_heads * hd).T))

    q_in, q_out = heads_in(hq)
    kv_in, kv_out = heads_in(hkv)
    entries = [
        Entry("model.embed_tokens.weight", lm + ("embed_tokens",), _same, _same),
        Entry("model.norm.weight", lm + ("norm", "scale"), _same, _same),
        Entry("model.layers.{n}.input_layernorm.weight", L + ("input_layernorm", "scale"), _same, _same, True),
        Entry("model.layers.{n}.post_attention_layernorm.weight", L + ("post_attention_layernorm", "scale"),
              _same, _same, True),
        Entry("model.layers.{n}.self_attn.q_proj.weight", L + ("q_proj", "kernel"), q_in, q_out, True),
        Entry("model.layers.{n}.self_attn.k_proj.weight", L + ("k_proj", "kernel"), kv_in, kv_out, True),
        Entry("model.layers.{n}.self_attn.v_proj.weight", L + ("v_proj", "kernel"), kv_in, kv_out, True),
        Entry("model.layers.{n}.self_attn.o_proj.weight", L + ("o_proj", "kernel"),
              lambda w: np.ascontiguousarray(w.T.reshape(hq, hd, h)),
              lambda k: np.ascontiguousarray(k.reshape(hq * hd, h).T), True),
        Entry("model.layers.{n}.self_attn.q_norm.weight", L + ("q_norm", "scale"), _same, _same, True),
        Entry("model.layers.{n}.self_attn.k_norm.weight", L + ("k_norm", "scale"), _same, _same, True),
        Entry("model.layers.{n}.mlp.gate_proj.weight", L + ("gate_proj", "kernel"), _t, _t, True),
        Entry("model.layers.{n}.mlp.up_proj.weight", L + ("up_proj", "kernel"), _t, _t, True),
        Entry("model.layers.{n}.mlp.down_proj.weight", L + ("down_proj", "kernel"), _t, _t, True),
    ]
    if not t.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", lm + ("lm_head",), _t, _t))
    if cfg.vision is None:
        return entries
    v = cfg.vision
    d, vh = v.hidden_size, v.num_heads
    vhd = d // vh
    pix = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    V, B = ("visual",), ("visual", "blocks")
    entries += [
        Entry("visual.patch_embed.proj.weight", V + ("patch_embed", "kernel"),
              lambda w: np.ascontiguousarray(w.reshape(d, pix).T),
              lambda k: np.ascontiguousarray(k.T.reshape(d, v.in_channels, v.patch_size, v.patch_size))),
        Entry("visual.class_embedding", V + ("class_embedding",), _same, _same),
        Entry("visual.class_pos_emb", V + ("class_pos_emb",), _same, _same),
        Entry("visual.pre_layernorm.weight", V + ("pre_layernorm", "scale"), _same, _same),
        Entry("visual.pre_layernorm.bias", V + ("pre_layernorm", "bias"), _same, _same),
        Entry("visual.blocks.{n}.norm1.weight", B + ("norm1", "scale"), _same, _same, True),
        Entry("visual.blocks.{n}.norm1.bias", B + ("norm1", "bias"), _same, _same, True),
        Entry("visual.blocks.{n}.norm2.weight", B + ("norm2", "scale"), _same, _same, True),
        Entry("visual.blocks.{n}.norm2.bias", B + ("norm2", "bias"), _same, _same, True),
        Entry("visual.blocks.{n}.attn.qkv.weight", B + ("qkv", "kernel"),
              lambda w: np.ascontiguousarray(w.reshape(3, vh, vhd, d).transpose(3, 0, 1, 2)),
              lambda k: np.ascontiguousarray(k.transpose(1, 2, 3, 0).reshape(3 * d, d)), True),
        Entry("visual.blocks.{n}.attn.qkv.bias", B + ("qkv", "bias"),
              lambda b: b.reshape(3, vh, vhd), lambda b: b.reshape(3 * d), True),
        Entry("visual.blocks.{n}.attn.proj.weight", B + ("proj", "kernel"),
              lambda w: np.ascontiguousarray(w.T.reshape(vh, vhd, d)),
              lambda k: np.ascontiguousarray(k.reshape(d, d).T), True),
        Entry("visual.blocks.{n}.attn.proj.bias", B + ("proj", "bias"), _same, _same, True),
        Entry("visual.blocks.{n}.mlp.fc1.weight", B + ("fc1", "kernel"), _t, _t, True),
        Entry("visual.blocks.{n}.mlp.fc1.bias", B + ("fc1", "bias"), _same, _same, True),
        Entry("visual.blocks.{n}.mlp.fc2.weight", B + ("fc2", "kernel"), _t, _t, True),
        Entry("visual.blocks.{n}.mlp.fc2.bias", B + ("fc2", "bias"), _same, _same, True),
        Entry("visual.merger.ln_q.weight", ("merger", "ln_q", "scale"), _same, _same),
        Entry("visual.merger.ln_q.bias", ("merger", "ln_q", "bias"), _same, _same),
        Entry("visual.merger.mlp.0.weight", ("merger", "fc1", "kernel"), _t, _t),
        Entry("visual.merger.mlp.0.bias", ("merger", "fc1", "bias"), _same, _same),
        Entry("visual.merger.mlp.2.weight", ("merger", "fc2", "kernel"), _t, _t),
        Entry("visual.merger.mlp.2.bias", ("merger", "fc2", "bias"), _same, _same),
    ]
    return entries


_ALIASES = [  # (pattern, replacement) applied to stored keys before lookup
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^visual\.merger\.linear_fc1\."), "visual.merger.mlp.0."),
    (re.compile(r"^visual\.merger\.linear_fc2\."), "visual.merger.mlp.2."),
]


def canonical_key(key: str) -> str:
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


def _num_layers(cfg, entry: Entry) -> int:
    return cfg.vision.depth if entry.path[0] == "visual" else cfg.text.num_layers


def _hf_keys(cfg, entry: Entry) -> list[str]:
    if not entry.stacked:
        return [entry.hf]
    return [entry.hf.format(n=n) for n in range(_num_layers(cfg, entry))]


# ----------------------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our model config from a hub config.json (LLaVA-OV-1.5 remote-code or native layout, or Qwen3)."""
    mt = hf.get("model_type")
    if mt == "qwen3":
        text_hf, vision_hf, top = hf, None, {}
    elif mt in ("llavaonevision1_5", "llava_onevision1_5"):
        text_hf, vision_hf, top = hf.get("text_config") or {}, hf.get("vision_config") or {}, hf
    else:
        raise CheckpointError(f"unsupported model_type {mt!r} (expected llavaonevision1_5, llava_onevision1_5 or qwen3)")
    cfg = model_configs.tiny()
    theta = text_hf.get("rope_theta") or (text_hf.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        raise CheckpointError("text config has no rope_theta / rope_parameters.rope_theta")
    heads = text_hf["num_attention_heads"]
    cfg.text = model_configs._text(
        vocab=text_hf["vocab_size"], hidden=text_hf["hidden_size"], layers=text_hf["num_hidden_layers"],
        heads=heads, kv_heads=text_hf.get("num_key_value_heads", heads),
        head_dim=text_hf.get("head_dim") or text_hf["hidden_size"] // heads,
        mlp=text_hf["intermediate_size"], theta=float(theta), max_pos=text_hf.get("max_position_embeddings", 32768))
    cfg.text.rms_norm_eps = float(text_hf.get("rms_norm_eps", 1e-6))
    cfg.text.tie_word_embeddings = bool(hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings", False)))
    cfg.name = hf.get("_name_or_path") or mt
    if vision_hf is None:
        cfg.vision = None
        return cfg
    vh = vision_hf.get("num_heads") or vision_hf.get("num_attention_heads")
    out = vision_hf.get("text_hidden_size") or vision_hf.get("out_hidden_size") or cfg.text.hidden_size
    cfg.vision = model_configs._vision(depth=vision_hf["depth"], hidden=vision_hf["hidden_size"], heads=vh,
                                       mlp=vision_hf["intermediate_size"], out_hidden=out)
    cfg.vision.patch_size = vision_hf.get("patch_size", 14)
    cfg.vision.in_channels = vision_hf.get("in_channels", 3)
    cfg.vision.temporal_patch_size = vision_hf.get("temporal_patch_size", 1)
    cfg.vision.spatial_merge_size = vision_hf.get("spatial_merge_size", 2)
    cfg.vision.layer_norm_eps = float(vision_hf.get("layer_norm_eps", 1e-5))
    if vision_hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"vision hidden_act {vision_hf.get('hidden_act')!r} is not supported (exact gelu only)")
    cfg.image_token_id = hf.get("image_token_id", 151655)
    cfg.video_token_id = hf.get("video_token_id", 151656)
    cfg.vision_start_token_id = hf.get("vision_start_token_id", 151652)
    # Qwen's vocabulary puts <|vision_end|> right after <|vision_start|>; config files often omit it.
    cfg.vision_end_token_id = hf.get("vision_end_token_id", cfg.vision_start_token_id + 1)
    return cfg


def config_to_hf(cfg, params) -> dict:
    """A hub config.json derived from the tensors (sizes) and cfg (constants), in the fixture's layout."""
    lm = params["language_model"]
    vocab, hidden = lm["embed_tokens"].shape
    layers = lm["layers"]
    n_layers, _, hq, hd = layers["q_proj"]["kernel"].shape
    hkv = layers["k_proj"]["kernel"].shape[2]
    inter = layers["gate_proj"]["kernel"].shape[2]
    t = cfg.text
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": int(hd), "hidden_act": "silu",
        "hidden_size": int(hidden), "initializer_range": 0.02, "intermediate_size": int(inter),
        "layer_types": ["full_attention"] * int(n_layers), "max_position_embeddings": int(t.max_position_embeddings),
        "num_attention_heads": int(hq), "num_hidden_layers": int(n_layers), "num_key_value_heads": int(hkv),
        "rms_norm_eps": float(t.rms_norm_eps), "rope_theta": float(t.rope_theta), "sliding_window": None,
        "use_cache": True, "use_sliding_window": False, "vocab_size": int(vocab),
    }
    tied = "lm_head" not in lm
    if "visual" not in params:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": _dtype_name(lm["embed_tokens"]),
                "tie_word_embeddings": tied, "rope_parameters": {"rope_type": "default", "rope_theta": float(t.rope_theta)},
                **text}
    vis = params["visual"]
    depth, d = vis["blocks"]["norm1"]["scale"].shape
    vhd = vis["class_pos_emb"].shape[1] * 2
    v = cfg.vision
    vision = {
        "depth": int(depth), "embed_dim": int(d), "hidden_act": "gelu", "hidden_size": int(d),
        "in_channels": int(v.in_channels), "initializer_range": 0.02,
        "intermediate_size": int(vis["blocks"]["fc1"]["kernel"].shape[2]), "layer_norm_eps": float(v.layer_norm_eps),
        "model_type": "rice_vit", "num_heads": int(d // vhd), "patch_size": int(v.patch_size),
        "spatial_merge_size": int(v.spatial_merge_size), "temporal_patch_size": int(v.temporal_patch_size),
        "text_hidden_size": int(params["merger"]["fc2"]["kernel"].shape[1]),
    }
    text.update({"model_type": "LLaVAOneVision1_5_text", "rope_scaling": None,
                 "image_token_id": None, "video_token_id": None})
    return {"architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"], "dtype": _dtype_name(lm["embed_tokens"]),
            "image_token_id": int(cfg.image_token_id), "model_type": "llavaonevision1_5", "text_config": text,
            "tie_word_embeddings": tied, "video_token_id": int(cfg.video_token_id), "vision_config": vision,
            "vision_start_token_id": int(cfg.vision_start_token_id), "vocab_size": int(vocab)}


def _dtype_name(x) -> str:
    return str(np.dtype(x.dtype)) if x.dtype != jnp.bfloat16 else "bfloat16"


# ----------------------------------------------------------------------------------------------------------
# The model object


class Model:
    """A config + a param pytree, with a jit'ed `logits` that takes the upstream processor's layout."""

    def __init__(self, cfg, params, source: str | None = None):
        model_configs.validate(cfg)
        self.cfg = freeze(cfg)
        self.params = params
        self.source = source
        self.module = VLM(self.cfg)
        self._forward = jax.jit(self._logits_fn, static_argnames=("num_images",))

    def _logits_fn(self, params, batch, num_images):
        hidden, _ = self.module.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                      batch.get("patches"), batch.get("patch_segment"), batch.get("patch_hw"),
                                      num_images=num_images)
        return self.module.apply({"params": params}, hidden, method=VLM.logits)

    def logits(self, input_ids, pixel_values=None, image_grid_thw=None):
        """input_ids [B, T], pixel_values [N, 588], image_grid_thw [I, 3] (the upstream layout) -> [B, T, V]."""
        if pixel_values is not None and self.cfg.vision is None:
            raise ValueError("this is a text-only model; pixel_values cannot be used")
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision is not None else 2
        batch = upstream_to_batch(input_ids, pixel_values, image_grid_thw, image_token_id=self.cfg.image_token_id,
                                  merge=merge)
        num_images = batch.pop("num_images", 0)
        vocab = self.cfg.text.vocab_size
        if (batch["tokens"] < 0).any() or (batch["tokens"] >= vocab).any():
            raise ValueError(f"input_ids must lie in [0, {vocab})")
        return self._forward(self.params, batch, num_images=num_images)


# ----------------------------------------------------------------------------------------------------------
# Import


def _read_index(path: str) -> dict[str, str]:
    """Stored key -> shard file name."""
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        for shard in set(weight_map.values()):
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index_path} names an unsafe shard file {shard!r}")
            if not os.path.exists(os.path.join(path, shard)):
                raise CheckpointError(f"shard {shard} listed in {INDEX_NAME} is missing from {path}")
        return weight_map
    single = os.path.join(path, SAFE_NAME)
    if not os.path.exists(single):
        raise CheckpointError(f"{path} has neither {SAFE_NAME} nor {INDEX_NAME} (only safetensors are read)")
    with safe_open(single, framework="numpy") as f:
        return {k: SAFE_NAME for k in f.keys()}


def load_params(path: str, cfg, dtype=np.float32) -> dict:
    """Read every tensor of the key map from `path` into our param pytree (numpy arrays)."""
    weight_map = _read_index(path)
    stored = {canonical_key(k): k for k in weight_map}
    entries = key_map(cfg)
    expected = {k for e in entries for k in _hf_keys(cfg, e)}
    missing = sorted(expected - stored.keys())
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {path}, e.g. {missing[:5]}")
    unexpected = sorted(set(stored) - expected)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensors in {path} (wrong config?), e.g. {unexpected[:5]}")
    handles = {}
    try:
        def tensor(key):
            name = stored[key]
            shard = weight_map[name]
            if shard not in handles:
                handles[shard] = safe_open(os.path.join(path, shard), framework="numpy")
            return handles[shard].get_tensor(name)

        params: dict = {}
        for e in entries:
            keys = _hf_keys(cfg, e)
            if e.stacked:
                first = e.to_ours(tensor(keys[0]))
                value = np.empty((len(keys),) + first.shape, dtype)
                value[0] = first
                for n, key in enumerate(keys[1:], start=1):
                    value[n] = e.to_ours(tensor(key))
            else:
                value = np.asarray(e.to_ours(tensor(keys[0])), dtype)
            node = params
            for p in e.path[:-1]:
                node = node.setdefault(p, {})
            node[e.path[-1]] = value
    finally:
        handles.clear()
    return params


def _check_shapes(cfg, params) -> None:
    """The imported tree must be exactly the tree the model builds for cfg."""
    want = abstract_params(cfg)
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    flat_got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if flat_want.keys() != flat_got.keys():
        raise CheckpointError(f"param tree mismatch: {sorted(flat_want.keys() ^ flat_got.keys())[:5]}")
    for k, shape in flat_want.items():
        if tuple(flat_got[k]) != tuple(shape):
            raise CheckpointError(f"{k}: checkpoint shape {flat_got[k]} != config shape {shape}")


def load(path: str, dtype: str = "float32", *, remote_code_quirks: bool = True) -> Model:
    """Load a hub-layout checkpoint directory (config.json + safetensors) as a Model with `dtype` params.

    remote_code_quirks: reproduce the released remote code exactly, including its CLS-stripping offset
    (image k of a call comes out displaced by k slots; see
    `ovjax.models.vision._remote_code_cls_windows`). Training (Megatron) strips correctly; pass False for that.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f))
    cfg.dtype = cfg.param_dtype = dtype
    if cfg.vision is not None:
        cfg.vision.remote_code_cls_shift = bool(remote_code_quirks)
    model_configs.validate(cfg)
    np_dtype = np.float32 if dtype == "float32" else jnp.dtype(dtype_of(dtype))
    params = load_params(path, cfg, np_dtype)
    _check_shapes(cfg, params)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Model(cfg, params, source=path)


# ----------------------------------------------------------------------------------------------------------
# Export


def export_tensors(cfg, params) -> dict[str, np.ndarray]:
    """Our param pytree -> {hub key: numpy tensor}."""
    out = {}
    for e in key_map(cfg):
        node = params
        for p in e.path:
            node = node[p]
        value = np.asarray(jax.device_get(node))
        for n, key in enumerate(_hf_keys(cfg, e)):
            out[key] = np.ascontiguousarray(e.to_hf(value[n] if e.stacked else value))
    return out


def save(model: Model, path: str, *, max_shard_bytes: int = 5 * 1024 ** 3, copy_from: str | None = None) -> str:
    """Write `model` as config.json + safetensors (sharded with an index above max_shard_bytes), copy tokenizer
    and processor files from `copy_from` (default: the directory it was loaded from), then reload the index
    and compare every written tensor's name, shape and dtype."""
    os.makedirs(path, exist_ok=True)
    cfg, params = model.cfg, model.params
    tensors = export_tensors(cfg, params)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, params), f, indent=2, sort_keys=True)
        f.write("\n")
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    for stale in (SAFE_NAME, INDEX_NAME):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    source = copy_from if copy_from is not None else model.source
    if source and os.path.abspath(source) != os.path.abspath(path):
        for name in COPIED_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    _verify_written(path, tensors)
    return path


def _verify_written(path: str, tensors: dict[str, np.ndarray]) -> None:
    weight_map = _read_index(path)
    if set(weight_map) != set(tensors):
        raise CheckpointError(f"export check failed: written keys differ from the model's ({path})")
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="numpy") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != tensors[key].shape:
                    raise CheckpointError(f"export check failed: {key} shape {sl.get_shape()} != {tensors[key].shape}")


def from_params(cfg, params) -> Model:
    """Wrap a param pytree (e.g. from training) as a Model for `logits` and `save`."""
    return Model(cfg, params)


# ----------------------------------------------------------------------------------------------------------
# Stage 0: a RICE-ViT in the MLCD layout (transformers' MLCDVisionModel) + any Qwen3 + a fresh projector


def _mlcd_prefix(tensors: dict) -> str:
    for prefix in ("", "vision_model.", "model.vision_model.", "model."):
        if prefix + "embeddings.class_embedding" in tensors:
            return prefix
    raise CheckpointError("not an MLCD vision checkpoint: no embeddings.class_embedding tensor")


def vision_config_from_mlcd(hf: dict, out_hidden: int) -> ml_collections.ConfigDict:
    hf = hf.get("vision_config", hf)
    v = model_configs._vision(depth=hf["num_hidden_layers"], hidden=hf["hidden_size"], heads=hf["num_attention_heads"],
                              mlp=hf["intermediate_size"], out_hidden=out_hidden)
    v.patch_size = hf.get("patch_size", 14)
    v.in_channels = hf.get("num_channels", 3)
    v.layer_norm_eps = float(hf.get("layer_norm_eps", 1e-5))
    v.rope_theta = float((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"MLCD hidden_act {hf.get('hidden_act')!r} is not supported (exact gelu only)")
    return v


def vision_params_from_mlcd(tensors: dict, vcfg) -> dict:
    """MLCD state dict (numpy, any of the usual prefixes) -> our `visual` subtree. post_layernorm is dropped
    (OV-1.5 uses the last block's raw output)."""
    p = _mlcd_prefix(tensors)
    d, heads, depth = vcfg.hidden_size, vcfg.num_heads, vcfg.depth
    hd = d // heads
    pix = vcfg.in_channels * vcfg.patch_size ** 2

    def get(key):
        if p + key not in tensors:
            raise CheckpointError(f"MLCD checkpoint misses {p + key}")
        return np.asarray(tensors[p + key], np.float32)

    def stack(fn):
        return np.stack([fn(n) for n in range(depth)])

    def layer(n, key):
        return get(f"encoder.layers.{n}.{key}")

    def qkv_kernel(n):  # three [D, D] -> [D, 3, heads, hd]
        w = np.stack([layer(n, f"self_attn.{x}_proj.weight") for x in "qkv"])  # [3, out, in]
        return w.reshape(3, heads, hd, d).transpose(3, 0, 1, 2)

    return {
        "patch_embed": {"kernel": get("embeddings.patch_embedding.weight").reshape(d, pix).T.copy()},
        "class_embedding": get("embeddings.class_embedding"),
        "class_pos_emb": get("class_pos_emb"),
        "pre_layernorm": {"scale": get("pre_layrnorm.weight"), "bias": get("pre_layrnorm.bias")},
        "blocks": {
            "norm1": {"scale": stack(lambda n: layer(n, "layer_norm1.weight")),
                      "bias": stack(lambda n: layer(n, "layer_norm1.bias"))},
            "norm2": {"scale": stack(lambda n: layer(n, "layer_norm2.weight")),
                      "bias": stack(lambda n: layer(n, "layer_norm2.bias"))},
            "qkv": {"kernel": stack(qkv_kernel),
                    "bias": stack(lambda n: np.stack([layer(n, f"self_attn.{x}_proj.bias") for x in "qkv"])
                                  .reshape(3, heads, hd))},
            "proj": {"kernel": stack(lambda n: layer(n, "self_attn.out_proj.weight").T.reshape(heads, hd, d)),
                     "bias": stack(lambda n: layer(n, "self_attn.out_proj.bias"))},
            "fc1": {"kernel": stack(lambda n: layer(n, "mlp.fc1.weight").T),
                    "bias": stack(lambda n: layer(n, "mlp.fc1.bias"))},
            "fc2": {"kernel": stack(lambda n: layer(n, "mlp.fc2.weight").T),
                    "bias": stack(lambda n: layer(n, "mlp.fc2.bias"))},
        },
    }


def _read_all(path: str) -> dict:
    weight_map = _read_index(path)
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="numpy") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def assemble_stage0(vit_path: str, llm_path: str, *, seed: int = 0, dtype: str = "float32") -> Model:
    """The stage-0 model: a RICE-ViT (MLCD layout) + a Qwen3 LLM (both hub directories) + a fresh projector.
    Special token ids keep the Qwen2 defaults of configs/models.py."""
    with open(os.path.join(llm_path, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    if cfg.vision is not None:
        raise CheckpointError(f"{llm_path} is not a plain Qwen3 checkpoint")
    with open(os.path.join(vit_path, "config.json")) as f:
        cfg.vision = vision_config_from_mlcd(json.load(f), cfg.text.hidden_size)
    for k, v in model_configs.QWEN_TOKENS.items():
        cfg[k] = v
    cfg.dtype = cfg.param_dtype = dtype
    model_configs.validate(cfg)
    text = load_params(llm_path, _text_only(cfg))
    fresh = jax.device_get(init_params(cfg, jax.random.PRNGKey(seed)))
    params = {"visual": vision_params_from_mlcd(_read_all(vit_path), cfg.vision), "merger": fresh["merger"],
              "language_model": text["language_model"]}
    _check_shapes(cfg, params)
    return Model(cfg, jax.tree_util.tree_map(jnp.asarray, params))


def _text_only(cfg):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.vision = None
    return c
