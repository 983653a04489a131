"""AdamW with warmup + cosine decay to a floor, global-norm clipping, stage-aware trainable masks and
per-group learning rates (spec/model.md section 7).

Params are addressed by slash paths (`language_model/layers/q_proj/kernel`). Config (`optim` section):
  trainable: path prefixes that train (stage 1: ("merger",); later: the three towers), or "lora" = every
  LoRA adapter leaf (`*/lora_a`, `*/lora_b`, ovjax/models/lora.py); frozen: prefixes (or "lora") excluded
  again (e.g. "visual/class_pos_emb"); groups: {prefix: lr or None} (None = optim.lr; the longest
  matching prefix wins); lr, min_lr, warmup_fraction (or warmup_steps >= 0), b1, b2, eps, weight_decay,
  clip_norm, frozen_dtype ("" or "bfloat16": frozen params held in bf16, e.g. a LoRA run's base), mu_dtype,
  offload (ovjax/train/state.py). Weight decay applies to matrices only (kernels, embeddings), not to norms,
  biases, CLS.

mu_dtype="bfloat16" stores Adam's first moment in bf16 (big_vision does the same): with b1=0.9 each update
moves mu by 10% of the gradient, far above bf16's rounding step (8 mantissa bits, ~0.4% of the value). The
second moment stays float32 on purpose: with b2 near 1 (0.95-0.999) its (1-b2)*g^2 increments fall under that
step and a bf16 nu would stop moving.

Only trainable params enter the optimizer: frozen ones carry no optimizer state and get no gradient.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from ovjax.config import ConfigError
from ovjax.train.config import MU_DTYPES
from ovjax.models import lora

DECAYED_LEAVES = ("kernel", "embed_tokens", "lm_head", *lora.LEAVES)
LORA_SELECTOR = "lora"


def flat(params) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def nest(flat_params: dict[str, Any]):
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_params.items()})


def _matches(path: str, prefix: str) -> bool:
    if prefix == LORA_SELECTOR:
        return lora.is_adapter(path)
    prefix = prefix.strip("/")
    return path == prefix or path.startswith(prefix + "/")


def trainable_paths(params, optim_cfg) -> list[str]:
    """Sorted paths of the params that train. Raises ValueError for a prefix that matches nothing."""
    paths = list(flat(params))
    for field in ("trainable", "frozen"):
        for prefix in optim_cfg.get(field, ()) or ():
            if prefix == LORA_SELECTOR and not any(lora.is_adapter(p) for p in paths):
                raise ValueError(f"optim.{field} names 'lora' but the model has no adapters (model.lora.rank is 0)")
            if not any(_matches(p, prefix) for p in paths):
                raise ValueError(f"optim.{field} prefix {prefix!r} matches no parameter; top level: "
                                 f"{sorted({p.split('/')[0] for p in paths})}")
    train = [p for p in paths if any(_matches(p, t) for t in optim_cfg.trainable)
             and not any(_matches(p, f) for f in optim_cfg.get("frozen", ()) or ())]
    if not train:
        raise ValueError(f"no parameter is trainable with optim.trainable={tuple(optim_cfg.trainable)} and "
                         f"optim.frozen={tuple(optim_cfg.get('frozen', ()) or ())}")
    return sorted(train)


def frozen_dtype(optim_cfg):
    """`optim.frozen_dtype`: the dtype frozen params are held in ("" = as the model makes them)."""
    name = optim_cfg.get("frozen_dtype", "") or ""
    if name not in ("", "float32", "bfloat16"):
        raise ValueError(f"optim.frozen_dtype must be '', 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name) if name else None


def with_frozen_dtype(abstract_params, paths: list[str], dtype):
    """Abstract params with every leaf not in `paths` (the frozen ones) of `dtype` (None: unchanged)."""
    if dtype is None:
        return abstract_params
    keep = set(paths)
    return nest({k: v if k in keep else jax.ShapeDtypeStruct(v.shape, dtype)
                 for k, v in flat(abstract_params).items()})


def split(params, paths: list[str]):
    """-> (trainable nested dict, frozen nested dict)."""
    f = flat(params)
    keep = set(paths)
    return nest({k: v for k, v in f.items() if k in keep}), nest({k: v for k, v in f.items() if k not in keep})


def merge(trainable, frozen):
    return nest({**flat(frozen), **flat(trainable)})


def group_lrs(optim_cfg) -> dict[str, float]:
    """{group name: peak lr}; 'default' always present."""
    out = {"default": float(optim_cfg.lr)}
    for prefix, lr in (optim_cfg.get("groups", None) or {}).items():
        if lr is not None:
            if not lr > 0:
                raise ValueError(f"optim.groups.{prefix} lr must be > 0, got {lr!r}")
            out[prefix] = float(lr)
    return out


def label_of(path: str, groups: dict[str, float]) -> str:
    best = "default"
    for prefix in groups:
        if prefix != "default" and _matches(path, prefix) and (best == "default" or len(prefix) > len(best)):
            best = prefix
    return best


def warmup_steps(optim_cfg, total_steps: int) -> int:
    w = optim_cfg.get("warmup_steps", -1)
    if w is None or w < 0:
        w = round(optim_cfg.warmup_fraction * total_steps)
    return max(1, int(w))


def schedule(peak: float, floor: float, warmup: int, total_steps: int) -> Callable:
    """lr for the update with 0-based index `count`: linear warmup peak*(count+1)/warmup over `warmup`
    updates, then cosine from peak to `floor` reached at the last update (count = total_steps - 1)."""
    floor = min(floor, peak)
    decay = max(total_steps - warmup, 1)

    def lr(count):
        c = jnp.asarray(count, jnp.float32)
        warm = peak * (c + 1.0) / warmup
        frac = jnp.clip((c - warmup + 1.0) / decay, 0.0, 1.0)
        cos = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(c < warmup, warm, cos)
    return lr


def mu_dtype(optim_cfg):
    """optim.mu_dtype -> the jnp dtype of Adam's first moment; ConfigError for another name."""
    name = optim_cfg.get("mu_dtype", "float32")
    if name not in MU_DTYPES:
        raise ConfigError(f"optim.mu_dtype must be one of {MU_DTYPES}, got {name!r}")
    return jnp.dtype(name)


def make_optimizer(optim_cfg, trainable_params, total_steps: int):
    """-> (optax transformation over the trainable nested dict, {group: schedule})."""
    mu = mu_dtype(optim_cfg)
    groups = group_lrs(optim_cfg)
    warm = warmup_steps(optim_cfg, total_steps)
    scheds = {g: schedule(lr, float(optim_cfg.min_lr), warm, total_steps) for g, lr in groups.items()}
    paths = flat(trainable_params)
    labels = nest({p: label_of(p, groups) for p in paths})
    used = sorted(set(flat(labels).values()))

    def decay_mask(tree):  # a callable: inside multi_transform the tree holds masked-out nodes
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED_LEAVES, tree)

    def group_tx(g):
        return optax.chain(
            optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, mu_dtype=mu),
            optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(scheds[g]),
        )
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm),
                     optax.multi_transform({g: group_tx(g) for g in used}, labels))
    return tx, {g: scheds[g] for g in used}
