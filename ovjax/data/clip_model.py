"""CLIPModel's vision and text towers in Flax (our port; transformers 5 has no Flax classes), and weight loading.

Why a port: the issue asks to run the encoder in JAX with transformers' Flax classes if the pinned version
has them, else with a small Flax port checked against transformers. transformers 5 (pinned 5.24.0) removed
every Flax class (there is no FlaxCLIPModel any more), so this module is that port. It runs on the same JAX
devices and mesh as the rest of ovjax; torch is needed only by the parity test (the `parity` extra), which
checks both towers against `transformers.CLIPModel` on tiny random configs at 1e-4 in float32. MetaCLIP
checkpoints use the CLIP classes (`model_type` "clip"), so they load here as they are.

Loading (`load_clip`): `config.json` + safetensors only (`model.safetensors` or a sharded index, read by
`ovjax.hf`'s reader), never pickle, never remote code. Layers are stacked and scanned (`nn.scan`), so compile
time does not grow with depth.

Shapes: pixels float32 [B, C, S, S] (CLIPModel's layout), token ids int32 [B, T], features float32 [B, E]
(E = projection_dim, not normalised here).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class EncoderError(ValueError):
    """An encoder directory or input that cannot be used; the message names it and the problem."""


# ----------------------------------------------------------------------------------------------- config

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    hidden: int
    heads: int
    layers: int
    mlp: int
    eps: float
    act: str


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    vision: TowerConfig
    text: TowerConfig
    image_size: int
    patch_size: int
    channels: int
    vocab_size: int
    max_positions: int
    eos_token_id: int
    projection_dim: int


def config_from_hf(hf: dict, where: str = "config.json") -> ClipConfig:
    """ClipConfig from a transformers CLIPConfig dict (model_type "clip")."""
    if hf.get("model_type") != "clip":
        raise EncoderError(f"{where}: model_type {hf.get('model_type')!r}, expected 'clip' (CLIP / MetaCLIP)")

    def tower(sub: dict, name: str) -> TowerConfig:
        try:
            act = sub.get("hidden_act", "quick_gelu")
            if act not in _ACTIVATIONS:
                raise EncoderError(f"{where}: {name}.hidden_act {act!r} is not one of {sorted(_ACTIVATIONS)}")
            cfg = TowerConfig(int(sub["hidden_size"]), int(sub["num_attention_heads"]),
                              int(sub["num_hidden_layers"]), int(sub["intermediate_size"]),
                              float(sub.get("layer_norm_eps", 1e-5)), act)
        except KeyError as e:
            raise EncoderError(f"{where}: {name} misses {e.args[0]!r}") from None
        if cfg.hidden % cfg.heads:
            raise EncoderError(f"{where}: {name}.hidden_size {cfg.hidden} is not divisible by its heads {cfg.heads}")
        return cfg

    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vision, text = tower(v, "vision_config"), tower(t, "text_config")
    try:
        return ClipConfig(vision, text, int(v["image_size"]), int(v["patch_size"]), int(v.get("num_channels", 3)),
                          int(t["vocab_size"]), int(t["max_position_embeddings"]),
                          int(t.get("eos_token_id", 2)), int(hf.get("projection_dim", 512)))
    except KeyError as e:
        raise EncoderError(f"{where}: misses {e.args[0]!r}") from None


# ----------------------------------------------------------------------------------------------- model

class EncoderLayer(nn.Module):
    """Pre-LN transformer block of CLIP. x [B, T, D]; mask bool [B, 1, T, T] (True = may attend) or None."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        head_dim = c.hidden // c.heads
        ln = lambda name: nn.LayerNorm(epsilon=c.eps, use_fast_variance=False, name=name)  # noqa: E731
        h = ln("layer_norm1")(x)
        split = lambda y: y.reshape(*y.shape[:-1], c.heads, head_dim)  # noqa: E731  [B, T, H, Dh]
        q = split(nn.Dense(c.hidden, name="q_proj")(h))
        k = split(nn.Dense(c.hidden, name="k_proj")(h))
        v = split(nn.Dense(c.hidden, name="v_proj")(h))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.Dense(c.hidden, name="out_proj")(attn.reshape(*x.shape[:-1], c.hidden))
        h = ln("layer_norm2")(x)
        h = nn.Dense(c.hidden, name="fc2")(_ACTIVATIONS[c.act](nn.Dense(c.mlp, name="fc1")(h)))
        return x + h, None


class Encoder(nn.Module):
    """`layers` EncoderLayers scanned over stacked weights (compile time independent of depth)."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, mask):
        scanned = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=self.cfg.layers)
        x, _ = scanned(self.cfg, name="layers")(x, mask)
        return x


class ClipModel(nn.Module):
    """CLIPModel's two towers and projections; `image_features` / `text_features` are the entry points."""
    cfg: ClipConfig

    def setup(self):
        c = self.cfg
        grid = c.image_size // c.patch_size
        init = nn.initializers.normal(0.02)
        self.class_embedding = self.param("class_embedding", init, (c.vision.hidden,))
        self.patch_embedding = nn.Dense(c.vision.hidden, use_bias=False)
        self.vision_positions = self.param("vision_positions", init, (grid * grid + 1, c.vision.hidden))
        self.pre_layrnorm = nn.LayerNorm(epsilon=c.vision.eps, use_fast_variance=False)
        self.vision_encoder = Encoder(c.vision)
        self.post_layernorm = nn.LayerNorm(epsilon=c.vision.eps, use_fast_variance=False)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False)
        self.token_embedding = self.param("token_embedding", init, (c.vocab_size, c.text.hidden))
        self.text_positions = self.param("text_positions", init, (c.max_positions, c.text.hidden))
        self.text_encoder = Encoder(c.text)
        self.final_layer_norm = nn.LayerNorm(epsilon=c.text.eps, use_fast_variance=False)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False)

    def image_features(self, pixels):
        """pixels float32 [B, C, S, S] -> projected (unnormalised) features [B, E]."""
        c = self.cfg
        b, ch, s, _ = pixels.shape
        g, p = s // c.patch_size, c.patch_size
        # [B, C, g, p, g, p] -> [B, g*g, C*p*p]: the flattening order of the conv weight [D, C, p, p]
        patches = pixels.reshape(b, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        x = self.patch_embedding(patches)
        cls = jnp.broadcast_to(self.class_embedding, (b, 1, c.vision.hidden))
        x = jnp.concatenate([cls, x], axis=1) + self.vision_positions[None]
        x = self.vision_encoder(self.pre_layrnorm(x), None)
        return self.visual_projection(self.post_layernorm(x[:, 0]))

    def text_features(self, ids, attention_mask):
        """ids int32 [B, T], attention_mask int/bool [B, T] (1 = token) -> projected features [B, E]."""
        c = self.cfg
        t = ids.shape[1]
        x = self.token_embedding[ids] + self.text_positions[None, :t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        x = self.final_layer_norm(self.text_encoder(x, mask))
        # CLIPTextModel's pooling: the first eos token (legacy configs with eos id 2: the highest id)
        pos = jnp.argmax(ids, axis=-1) if c.eos_token_id == 2 else jnp.argmax(ids == c.eos_token_id, axis=-1)
        return self.text_projection(x[jnp.arange(ids.shape[0]), pos])


def init_params(cfg: ClipConfig, seed: int = 0) -> dict:
    """Random params (for benchmarks); real runs load a checkpoint with `load_clip`."""
    model = ClipModel(cfg)
    pixels = jnp.zeros((1, cfg.channels, cfg.image_size, cfg.image_size), jnp.float32)
    ids = jnp.zeros((1, cfg.max_positions), jnp.int32)

    def both(m, pixels, ids):
        return m.image_features(pixels), m.text_features(ids, jnp.ones_like(ids))

    return jax.jit(lambda r: model.init(r, pixels, ids, method=both))(jax.random.key(seed))["params"]


# ----------------------------------------------------------------------------------------------- weights

_TOWER_RENAMES = {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "self_attn.q_proj": "q_proj",
                  "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.out_proj": "out_proj",
                  "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_FIXED = {  # HF key -> (our path, transform)
    "vision_model.embeddings.class_embedding": (("class_embedding",), None),
    "vision_model.embeddings.position_embedding.weight": (("vision_positions",), None),
    "vision_model.embeddings.patch_embedding.weight": (("patch_embedding", "kernel"), "conv"),
    "vision_model.pre_layrnorm.weight": (("pre_layrnorm", "scale"), None),
    "vision_model.pre_layrnorm.bias": (("pre_layrnorm", "bias"), None),
    "vision_model.post_layernorm.weight": (("post_layernorm", "scale"), None),
    "vision_model.post_layernorm.bias": (("post_layernorm", "bias"), None),
    "visual_projection.weight": (("visual_projection", "kernel"), "T"),
    "text_model.embeddings.token_embedding.weight": (("token_embedding",), None),
    "text_model.embeddings.position_embedding.weight": (("text_positions",), None),
    "text_model.final_layer_norm.weight": (("final_layer_norm", "scale"), None),
    "text_model.final_layer_norm.bias": (("final_layer_norm", "bias"), None),
    "text_projection.weight": (("text_projection", "kernel"), "T"),
}
_IGNORED_SUFFIXES = ("position_ids", "logit_scale")  # buffers and the contrastive temperature


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ClipConfig, where: str) -> dict:
    """transformers CLIPModel state dict (numpy) -> our param tree; checks every key and shape."""
    flat: dict[tuple, np.ndarray] = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key in _FIXED:
            path, how = _FIXED[key]
            if how == "T":
                value = value.T
            elif how == "conv":
                value = value.reshape(value.shape[0], -1).T
            flat[path] = value
            continue
        parts = key.split(".")
        if len(parts) >= 6 and parts[0] in ("vision_model", "text_model") and parts[1:3] == ["encoder", "layers"]:
            module = ".".join(parts[4:-1])
            if module in _TOWER_RENAMES and parts[-1] in ("weight", "bias"):
                tower = "vision_encoder" if parts[0] == "vision_model" else "text_encoder"
                is_ln = module.startswith("layer_norm")
                leaf = ("scale" if is_ln else "kernel") if parts[-1] == "weight" else "bias"
                path = (tower, "layers", _TOWER_RENAMES[module], leaf)
                stacks.setdefault(path, {})[int(parts[3])] = value if (is_ln or leaf == "bias") else value.T
                continue
        raise EncoderError(f"{where}: unexpected tensor {key!r} (not a CLIPModel weight)")
    for path, layers in stacks.items():
        n = 1 + max(layers)
        if sorted(layers) != list(range(n)):
            raise EncoderError(f"{where}: layers of {'/'.join(path)} are not 0..{n - 1}: {sorted(layers)}")
        flat[path] = np.stack([layers[i] for i in range(n)])
    want = jax.eval_shape(lambda: init_params(cfg))
    want_flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    missing = sorted("/".join(p) for p in want_flat.keys() - flat.keys())
    if missing:
        raise EncoderError(f"{where}: {len(missing)} weight(s) missing, e.g. {missing[:4]}")
    for path, spec in want_flat.items():
        if tuple(flat[path].shape) != tuple(spec.shape):
            raise EncoderError(f"{where}: {'/'.join(path)} has shape {flat[path].shape}, config.json implies "
                               f"{tuple(spec.shape)}")
    params: dict = {}
    for path in want_flat:
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = flat[path]
    return params


def load_clip(path: str | os.PathLike) -> tuple[ClipConfig, dict]:
    """(config, params as numpy) from a local transformers CLIP/MetaCLIP directory (safetensors only)."""
    from ovjax.hf.files import CheckpointError, TensorSource

    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise EncoderError(f"{path} has no config.json (not a transformers model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    try:
        with TensorSource(path) as src:
            tensors = {k: src.get(k) for k in src.keys()}
    except CheckpointError as e:
        raise EncoderError(str(e)) from None
    return cfg, params_from_hf(tensors, cfg, path)


def weights_sha256(path: str | os.PathLike) -> str:
    """One sha256 over config.json and the safetensors files (in name order): the encoder's identity."""
    import hashlib

    h = hashlib.sha256()
    files = ["config.json"] + sorted(p.name for p in Path(path).glob("*.safetensors"))
    for name in files:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
