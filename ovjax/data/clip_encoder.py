"""A CLIP-family image/text encoder in Flax (vision + text towers of transformers' CLIPModel), for `balance`.

Why our own port: the issue asks to run the encoder in JAX with transformers' Flax classes if the pinned
version has them, else with a small Flax port checked against transformers. transformers 5 (pinned 5.24.0)
removed every Flax class (there is no FlaxCLIPModel any more), so this module is that port. It runs on the
same JAX devices and mesh as the rest of ovjax; torch is needed only by the parity test (the `parity` extra),
which checks both towers against `transformers.CLIPModel` on a tiny random config at 1e-4 in float32.
MetaCLIP checkpoints use the CLIP classes (`model_type` "clip"), so they load here as they are.

Loading (`load_clip`): `config.json` + safetensors only (`model.safetensors` or a sharded index, read by
`ovjax.hf`'s reader), never pickle, never remote code; the tokenizer with `AutoTokenizer` (no
trust_remote_code). Image preprocessing follows CLIPImageProcessor's steps: RGB, resize the shortest side to
`size.shortest_edge` (PIL bicubic), center crop to `crop_size`, scale to [0, 1], normalise by image_mean /
image_std (`preprocessor_config.json` when present, else the CLIP defaults at the config's image_size).

Shapes: pixels float32 [B, 3, S, S] (the layout CLIPModel takes); token ids int32 [B, T] with T the text
tower's max_position_embeddings; embeddings float32 [B, E] (E = projection_dim), L2-normalised.
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
from PIL import Image

from ovjax.data import images as image_ops


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
    from ovjax import hf

    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise EncoderError(f"{path} has no config.json (not a transformers model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    try:
        tensors = hf._read_all(path)
    except hf.CheckpointError as e:
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


# ----------------------------------------------------------------------------------------------- encoder

@dataclasses.dataclass(frozen=True)
class ImagePrep:
    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_prep(path: str | os.PathLike, cfg: ClipConfig) -> ImagePrep:
    """Preprocessing of `preprocessor_config.json` if present, else CLIP's defaults at the model's size."""
    prep = ImagePrep(cfg.image_size, (cfg.image_size, cfg.image_size), tuple(image_ops.CLIP_MEAN),
                     tuple(image_ops.CLIP_STD))
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return prep
    with open(file, encoding="utf-8") as f:
        pc = json.load(f)
    size, crop = pc.get("size", {}), pc.get("crop_size", {})
    edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    prep = ImagePrep(int(edge or prep.shortest_edge), tuple(int(c or cfg.image_size) for c in crop_hw),
                     tuple(pc.get("image_mean", prep.mean)), tuple(pc.get("image_std", prep.std)))
    if prep.crop != (cfg.image_size, cfg.image_size):
        raise EncoderError(f"{file}: crop_size {prep.crop} differs from the model's image_size {cfg.image_size}")
    return prep


def preprocess(data: bytes, prep: ImagePrep) -> np.ndarray:
    """Encoded image bytes -> float32 [3, H, W] (CLIPImageProcessor's steps, see the module docstring)."""
    im = image_ops.decode_image(data)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = prep.shortest_edge, int(prep.shortest_edge * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    im = im.resize(size, resample=Image.Resampling.BICUBIC)
    ch, cw = prep.crop
    top, left = int((im.height - ch) / 2.0), int((im.width - cw) / 2.0)
    arr = np.asarray(im.crop((left, top, left + cw, top + ch)), np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _l2_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipEncoder:
    """Batched, jitted image and text embedding (L2-normalised float32 [N, E]) of a local CLIP checkpoint.

    Batches are padded to `batch_size` (a multiple of the batch-shard count when a mesh is given, rows
    split over the mesh's batch axes, params replicated), so each tower compiles once.
    """

    def __init__(self, path: str | os.PathLike | None, *, batch_size: int = 64, mesh=None,
                 weights: tuple[ClipConfig, dict] | None = None):
        """path: a local transformers CLIP directory; or None with weights=(config, params) (no tokenizer:
        images only, default CLIP preprocessing; what the benchmark uses)."""
        from transformers import AutoTokenizer

        if path is not None:
            self.cfg, params = load_clip(path)
            self.prep = image_prep(path, self.cfg)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        elif weights is not None:
            self.cfg, params = weights
            self.prep = ImagePrep(self.cfg.image_size, (self.cfg.image_size,) * 2, tuple(image_ops.CLIP_MEAN),
                                  tuple(image_ops.CLIP_STD))
            self.tokenizer = None
        else:
            raise EncoderError("ClipEncoder needs a model directory or weights=(config, params)")
        model = ClipModel(self.cfg)
        row_sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            from ovjax import sharding

            shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
            batch_size = -(-batch_size // shards) * shards
            row_sharding = NamedSharding(mesh, sharding.batch_spec(2, False))
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.batch_size = batch_size
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        out = {} if row_sharding is None else {"out_shardings": row_sharding}
        self._images = jax.jit(lambda p, x: _l2_normalize(model.apply({"params": p}, x,
                                                                      method=ClipModel.image_features)), **out)
        self._texts = jax.jit(lambda p, i, m: _l2_normalize(model.apply({"params": p}, i, m,
                                                                        method=ClipModel.text_features)), **out)

    @property
    def dim(self) -> int:
        return self.cfg.projection_dim

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(n, start + self.batch_size)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        pad = self.batch_size - x.shape[0]
        return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(pixels)):
            out.append(np.asarray(self._images(self.params, self._pad(pixels[a:b])))[: b - a])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, encoded: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(encoded)):
            pixels = np.stack([preprocess(d, self.prep) for d in encoded[a:b]])
            out.append(self.embed_pixels(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [N, T], mask int32 [N, T]), T = max_position_embeddings; eos appended when the
        tokenizer does not add it (CLIP's pooling reads the eos position). Too long a text is an error."""
        if self.tokenizer is None:
            raise EncoderError("this encoder was built from bare weights and has no tokenizer")
        t, eos = self.cfg.max_positions, self.cfg.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids = np.full((len(texts), t), pad, np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for i, text in enumerate(texts):
            toks = list(self.tokenizer(text)["input_ids"])
            if eos not in toks:
                toks.append(eos)
            if len(toks) > t:
                raise EncoderError(f"text {i} ({text[:40]!r}) has {len(toks)} tokens, the text tower takes {t}")
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return ids, mask

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(texts)):
            ids, mask = self.tokenize(texts[a:b])
            out.append(np.asarray(self._texts(self.params, self._pad(ids), self._pad(mask)))[: b - a])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
