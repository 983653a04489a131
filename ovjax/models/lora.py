"""LoRA adapters (Hu et al., 2021) on the model's projections: y = x W + (alpha / rank) * (x A) B.

A projection `Dense` with kernel W [*in, *out] gets two leaves beside its kernel: `lora_a` A [*in, rank]
(normal, std 1/sqrt(fan_in)) and `lora_b` B [rank, *out] (zeros), so a fresh adapter leaves the model's
output unchanged. Inside the scanned layers they stack like the kernel, e.g.
language_model/layers/q_proj/lora_a [L, H, rank]. `optim.trainable=("lora", ...)` selects every adapter
leaf (ovjax/train/optim.py); the base weights stay frozen unless a prefix names them.

Config `model.lora`: rank (0 = no adapters), alpha, targets (LLM projection names), vision_targets (ViT
projection names; empty = no adapters in the ViT).

`merged(params, lora_cfg)` folds the adapters into the kernels (what `python -m ovjax export` writes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

LEAVES = ("lora_a", "lora_b")
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_PROJECTIONS = ("qkv", "proj", "fc1", "fc2")


def config(rank: int = 0, alpha: float = 16.0, targets=LLM_PROJECTIONS, vision_targets=()):
    return ml_collections.ConfigDict(dict(rank=rank, alpha=float(alpha), targets=tuple(targets),
                                          vision_targets=tuple(vision_targets)))


def validate(lora_cfg) -> None:
    """Raise ValueError naming the first bad `model.lora` field."""
    if lora_cfg is None:
        return
    if not isinstance(lora_cfg.rank, int) or lora_cfg.rank < 0:
        raise ValueError(f"model.lora.rank must be an int >= 0, got {lora_cfg.rank!r}")
    if lora_cfg.rank and not lora_cfg.alpha > 0:
        raise ValueError(f"model.lora.alpha must be > 0, got {lora_cfg.alpha!r}")
    for field, allowed in (("targets", LLM_PROJECTIONS), ("vision_targets", VIT_PROJECTIONS)):
        bad = [t for t in lora_cfg[field] if t not in allowed]
        if bad:
            raise ValueError(f"model.lora.{field}: {bad} are not projections; choose from {allowed}")
    if lora_cfg.rank and not (lora_cfg.targets or lora_cfg.vision_targets):
        raise ValueError("model.lora.rank > 0 but model.lora.targets and vision_targets are both empty")


def enabled(model_cfg) -> bool:
    lora_cfg = model_cfg.get("lora")
    return bool(lora_cfg and lora_cfg.rank)


def dense_kwargs(lora_cfg, name: str, vision: bool = False) -> dict:
    """The `Dense` arguments of projection `name`: its adapter rank and alpha, or nothing."""
    if not lora_cfg or not lora_cfg.rank:
        return {}
    targets = lora_cfg.vision_targets if vision else lora_cfg.targets
    return dict(lora_rank=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha)) if name in targets else {}


def a_initializer(fan_in: int):
    """Init of A: normal with std 1/sqrt(fan_in) (B starts at zero)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * (1.0 / np.sqrt(fan_in))
    return init


def is_adapter(path: str) -> bool:
    """path: slash path of a param leaf."""
    return path.rsplit("/", 1)[-1] in LEAVES


def adapter_pairs(flat_params: dict[str, Any]) -> list[str]:
    """Slash paths of the projections (parents) that hold an adapter, sorted."""
    return sorted({p.rsplit("/", 1)[0] for p in flat_params if is_adapter(p)})


def delta(a, b, kernel_shape) -> jax.Array:
    """A [*lead, *in, r], B [*lead, r, *out] -> A @ B [*lead, *in, *out] (= kernel_shape), float32."""
    lead = a.ndim + b.ndim - 2 - len(kernel_shape)
    n_in = a.ndim - lead - 1
    lead_shape, rank = a.shape[:lead], a.shape[-1]
    a2 = jnp.reshape(jnp.asarray(a, jnp.float32), lead_shape + (-1, rank))
    b2 = jnp.reshape(jnp.asarray(b, jnp.float32), lead_shape + (rank, -1))
    out = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    if tuple(a.shape[lead:lead + n_in]) + tuple(b.shape[lead + 1:]) != tuple(kernel_shape[lead:]):
        raise ValueError(f"adapter shapes {a.shape} @ {b.shape} do not match kernel {tuple(kernel_shape)}")
    return jnp.reshape(out, kernel_shape)


def merged(params, lora_cfg):
    """Params with every adapter folded in, W' = W + (alpha / rank) A B in float32 (the kernel's dtype kept
    when it is wider), and the adapter leaves removed. Host or device arrays; one projection at a time."""
    from flax import traverse_util

    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    parents = adapter_pairs(flat)
    if not parents:
        return params
    scale = float(lora_cfg.alpha) / float(lora_cfg.rank)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for parent in parents:
        kernel = flat[f"{parent}/kernel"]
        d = delta(flat[f"{parent}/lora_a"], flat[f"{parent}/lora_b"], kernel.shape)
        dtype = jnp.promote_types(kernel.dtype, jnp.float32)
        out[f"{parent}/kernel"] = np.asarray(jnp.asarray(kernel, dtype) + scale * d)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def without_lora(model_cfg):
    """A model config with `lora.rank` 0 (the merged model's config)."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
    if cfg.get("lora") is not None:
        cfg.lora.rank = 0
    return cfg
