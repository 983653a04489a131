"""The declarative key maps: hub tensor names <-> our param paths, with the per-tensor transforms.

One `Entry` per tensor family. `hf` names one stored tensor, or several that become one of ours (MLCD's separate
q/k/v projections -> our fused qkv); "{n}" stands for the layer index of stacked entries (one stored tensor per
layer, stacked on our leading axis). `to_ours(*stored) -> ours` and `to_hf(ours) -> tuple of stored` are exact
inverses (numpy in, numpy out). Stored Linear weights are [out, in]; ours are [in, out] with heads split out.

Maps: `key_map(cfg)` (LLaVA-OV-1.5 hub layout, or Qwen3 when cfg.vision is None) and `mlcd_key_map(vision_cfg)`
(transformers' MLCDVisionModel, the RICE-ViT release). Stored names are first passed through the map's aliases
(`canonical_key`), so the hub prefixes (`visual.`, `model.`), the in-memory ones (`model.visual.`,
`model.language_model.`) and the native port's merger names (`linear_fc1/2`) all resolve.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: tuple[str, ...]                  # stored key(s); "{n}" = layer index when stacked
    path: tuple[str, ...]                # our param path
    to_ours: Callable                    # (*stored numpy) -> ours numpy
    to_hf: Callable                      # ours numpy -> tuple of stored numpy (same order as `hf`)
    stack: str | None = None             # "text" | "vision": one stored tensor per layer of that tower

    def keys(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(k.format(n=layer) for k in self.hf) if self.stack else self.hf


@dataclasses.dataclass(frozen=True)
class KeyMap:
    entries: tuple[Entry, ...]
    layers: dict                         # {"text": n, "vision": n}
    aliases: tuple[tuple[re.Pattern, str], ...] = ()
    ignored: tuple[re.Pattern, ...] = ()  # stored tensors that are read by nobody on purpose

    def canonical_key(self, key: str) -> str:
        for pattern, repl in self.aliases:
            key = pattern.sub(repl, key)
        return key

    def layer_range(self, entry: Entry) -> range:
        return range(self.layers[entry.stack]) if entry.stack else range(1)

    def stored_keys(self, entry: Entry) -> list[tuple[str, ...]]:
        """Per layer (or one item when not stacked), the stored keys that make that slice."""
        return [entry.keys(n) for n in self.layer_range(entry)] if entry.stack else [entry.hf]

    def all_keys(self) -> set[str]:
        return {k for e in self.entries for keys in self.stored_keys(e) for k in keys}

    def is_ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignored)


def _c(x):
    # numpy arrays are made contiguous for writing; jax values (shape evaluation of `to_hf`) pass through.
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x


def _same(x):
    return x


def _one(x):
    return (x,)


def _t(x):
    return _c(x.T)


def _t1(x):
    return (_c(x.T),)


def one(hf: str, path: tuple, to_ours=_same, to_hf=_one, stack=None) -> Entry:
    return Entry((hf,), path, to_ours, to_hf, stack)


def linear(hf: str, path: tuple, stack=None) -> Entry:
    return Entry((hf,), path, _t, _t1, stack)


def heads_in(hidden: int, n_heads: int, head_dim: int):
    """[n*hd, H] stored -> ours [H, n, hd] (q/k/v projections) and back."""
    return (lambda w: _c(w.T.reshape(hidden, n_heads, head_dim)),
            lambda k: (_c(k.reshape(hidden, n_heads * head_dim).T),))


def heads_out(hidden: int, n_heads: int, head_dim: int):
    """[H, n*hd] stored -> ours [n, hd, H] (output projections) and back."""
    return (lambda w: _c(w.T.reshape(n_heads, head_dim, hidden)),
            lambda k: (_c(k.reshape(n_heads * head_dim, hidden).T),))


def patch_embed(d: int, channels: int, patch: int, temporal: int = 1):
    """Conv weight [D, C, (T,) p, p] stored -> ours [C*T*p*p, D] and back (to the 2-D conv of temporal 1)."""
    pix = channels * temporal * patch * patch
    return (lambda w: _c(w.reshape(d, pix).T),
            lambda k: (_c(k.T.reshape(d, channels, patch, patch)),))


# ----------------------------------------------------------------------------------------------------------


LLAVA_ALIASES = (
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^visual\.merger\.linear_fc1\."), "visual.merger.mlp.0."),
    (re.compile(r"^visual\.merger\.linear_fc2\."), "visual.merger.mlp.2."),
)


def text_entries(t) -> list[Entry]:
    h, hq, hkv, hd = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    lm = ("language_model",)
    L = lm + ("layers",)
    q_in, q_out = heads_in(h, hq, hd)
    kv_in, kv_out = heads_in(h, hkv, hd)
    o_in, o_out = heads_out(h, hq, hd)
    n = "model.layers.{n}."
    entries = [
        one("model.embed_tokens.weight", lm + ("embed_tokens",)),
        one("model.norm.weight", lm + ("norm", "scale")),
        one(n + "input_layernorm.weight", L + ("input_layernorm", "scale"), stack="text"),
        one(n + "post_attention_layernorm.weight", L + ("post_attention_layernorm", "scale"), stack="text"),
        Entry((n + "self_attn.q_proj.weight",), L + ("q_proj", "kernel"), q_in, q_out, "text"),
        Entry((n + "self_attn.k_proj.weight",), L + ("k_proj", "kernel"), kv_in, kv_out, "text"),
        Entry((n + "self_attn.v_proj.weight",), L + ("v_proj", "kernel"), kv_in, kv_out, "text"),
        Entry((n + "self_attn.o_proj.weight",), L + ("o_proj", "kernel"), o_in, o_out, "text"),
        one(n + "self_attn.q_norm.weight", L + ("q_norm", "scale"), stack="text"),
        one(n + "self_attn.k_norm.weight", L + ("k_norm", "scale"), stack="text"),
        linear(n + "mlp.gate_proj.weight", L + ("gate_proj", "kernel"), stack="text"),
        linear(n + "mlp.up_proj.weight", L + ("up_proj", "kernel"), stack="text"),
        linear(n + "mlp.down_proj.weight", L + ("down_proj", "kernel"), stack="text"),
    ]
    if not t.tie_word_embeddings:
        entries.append(linear("lm_head.weight", lm + ("lm_head",)))
    return entries


def _vit_entries(v, names: dict, qkv: list[Entry], temporal: int) -> list[Entry]:
    """The RICE-ViT entries both stored layouts share; names[ours] is the stored name stem ("{n}" = layer)."""
    d, heads = v.hidden_size, v.num_heads
    V, B = ("visual",), ("visual", "blocks")
    pe_in, pe_out = patch_embed(d, v.in_channels, v.patch_size, temporal)
    p_in, p_out = heads_out(d, heads, d // heads)
    norms = [one(f"{names[norm]}.{w}", B + (norm, "scale" if w == "weight" else "bias"), stack="vision")
             for norm in ("norm1", "norm2") for w in ("weight", "bias")]
    return [
        Entry((names["patch_embed"],), V + ("patch_embed", "kernel"), pe_in, pe_out),
        one(names["class_embedding"], V + ("class_embedding",)),
        one(names["class_pos_emb"], V + ("class_pos_emb",)),
        one(names["pre_layernorm"] + ".weight", V + ("pre_layernorm", "scale")),
        one(names["pre_layernorm"] + ".bias", V + ("pre_layernorm", "bias")),
        *norms, *qkv,
        Entry((names["proj"] + ".weight",), B + ("proj", "kernel"), p_in, p_out, "vision"),
        one(names["proj"] + ".bias", B + ("proj", "bias"), stack="vision"),
        linear(names["fc1"] + ".weight", B + ("fc1", "kernel"), stack="vision"),
        one(names["fc1"] + ".bias", B + ("fc1", "bias"), stack="vision"),
        linear(names["fc2"] + ".weight", B + ("fc2", "kernel"), stack="vision"),
        one(names["fc2"] + ".bias", B + ("fc2", "bias"), stack="vision"),
    ]


def vision_entries(v) -> list[Entry]:
    """The RICE-ViT in the LLaVA-OV-1.5 hub layout (`visual.*`; fused qkv), merger excluded."""
    d, vh = v.hidden_size, v.num_heads
    vhd = d // vh
    B = ("visual", "blocks")
    n = "visual.blocks.{n}."
    qkv = [
        Entry((n + "attn.qkv.weight",), B + ("qkv", "kernel"),  # [3D, D] -> [D, 3, heads, hd]
              lambda w: _c(w.reshape(3, vh, vhd, d).transpose(3, 0, 1, 2)),
              lambda k: (_c(k.transpose(1, 2, 3, 0).reshape(3 * d, d)),), "vision"),
        Entry((n + "attn.qkv.bias",), B + ("qkv", "bias"),
              lambda b: b.reshape(3, vh, vhd), lambda b: (b.reshape(3 * d),), "vision"),
    ]
    names = {"patch_embed": "visual.patch_embed.proj.weight", "class_embedding": "visual.class_embedding",
             "class_pos_emb": "visual.class_pos_emb", "pre_layernorm": "visual.pre_layernorm",
             "norm1": n + "norm1", "norm2": n + "norm2", "proj": n + "attn.proj", "fc1": n + "mlp.fc1",
             "fc2": n + "mlp.fc2"}
    return _vit_entries(v, names, qkv, v.temporal_patch_size)


def merger_entries() -> list[Entry]:
    M = ("merger",)
    return [
        one("visual.merger.ln_q.weight", M + ("ln_q", "scale")),
        one("visual.merger.ln_q.bias", M + ("ln_q", "bias")),
        linear("visual.merger.mlp.0.weight", M + ("fc1", "kernel")),
        one("visual.merger.mlp.0.bias", M + ("fc1", "bias")),
        linear("visual.merger.mlp.2.weight", M + ("fc2", "kernel")),
        one("visual.merger.mlp.2.bias", M + ("fc2", "bias")),
    ]


def key_map(cfg) -> KeyMap:
    """Every tensor of a model with config `cfg` (a Qwen3 text-only model when cfg.vision is None)."""
    entries = text_entries(cfg.text)
    layers = {"text": cfg.text.num_layers}
    if cfg.vision is not None:
        entries += vision_entries(cfg.vision) + merger_entries()
        layers["vision"] = cfg.vision.depth
    return KeyMap(tuple(entries), layers, LLAVA_ALIASES)


# ----------------------------------------------------------------------------------------------------------
# MLCDVisionModel (transformers `mlcd`): the same network; separate q/k/v, `pre_layrnorm` (sic), and a
# post_layernorm that OV-1.5 does not use (it takes the last block's raw output).

_MLCD_ALIASES = ((re.compile(r"^(model\.)?(vision_model\.)?"), ""),)
_MLCD_IGNORED = (re.compile(r"^post_layernorm\."),)


def mlcd_key_map(v) -> KeyMap:
    d, heads = v.hidden_size, v.num_heads
    hd = d // heads
    B = ("visual", "blocks")
    n = "encoder.layers.{n}."

    def qkv_in(q, k, w):                 # three [D_out, D_in] -> [D, 3, heads, hd]
        return _c(np.stack([q, k, w]).reshape(3, heads, hd, d).transpose(3, 0, 1, 2))

    def qkv_out(kernel):
        w = kernel.transpose(1, 2, 3, 0).reshape(3, d, d)
        return tuple(_c(w[i]) for i in range(3))

    qkv = [
        Entry(tuple(n + f"self_attn.{x}_proj.weight" for x in "qkv"), B + ("qkv", "kernel"), qkv_in, qkv_out,
              "vision"),
        Entry(tuple(n + f"self_attn.{x}_proj.bias" for x in "qkv"), B + ("qkv", "bias"),
              lambda q, k, w: np.stack([q, k, w]).reshape(3, heads, hd),
              lambda b: tuple(b.reshape(3, d)[i] for i in range(3)), "vision"),
    ]
    names = {"patch_embed": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
             "class_pos_emb": "class_pos_emb", "pre_layernorm": "pre_layrnorm", "norm1": n + "layer_norm1",
             "norm2": n + "layer_norm2", "proj": n + "self_attn.out_proj", "fc1": n + "mlp.fc1",
             "fc2": n + "mlp.fc2"}
    return KeyMap(tuple(_vit_entries(v, names, qkv, 1)), {"vision": v.depth}, _MLCD_ALIASES, _MLCD_IGNORED)
