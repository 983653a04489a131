"""Building blocks with logical axis names on every parameter dimension.

Parameter axis names (mapped to mesh axes only in ovjax/sharding.py):
  LLM:  vocab, embed, q_heads, kv_heads, head_dim, mlp, layers
  ViT:  vit_patch (588 pixel values of a patch), vit_embed, qkv (the 3 of fused q/k/v), vit_heads,
        vit_head_dim, vit_mlp, merger_in (4 x vit_embed), merger_mlp
Activation axis names (used in `constrain`):
  act_batch, act_seq, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab, act_patches, act_vit_embed
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def constrain(x, names: Sequence[str | None]):
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, tuple(names))


def param(module: nn.Module, name: str, names: Sequence[str | None], shape, init=default_kernel_init,
          dtype: Dtype = jnp.float32):
    return module.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: statistics in float32, scale applied after casting back. x [..., D]."""
    dim: int
    eps: float = 1e-6
    axis_name: str = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", (self.axis_name,), (self.dim,), nn.initializers.ones, self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, statistics in float32. x [..., D]."""
    dim: int
    eps: float = 1e-5
    axis_name: str = "vit_embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", (self.axis_name,), (self.dim,), nn.initializers.ones, self.param_dtype)
        bias = param(self, "bias", (self.axis_name,), (self.dim,), nn.initializers.zeros, self.param_dtype)
        # Gather the (tiny) FSDP-sharded scale/bias, so the partitioner keeps x in its batch layout.
        scale, bias = constrain(scale, (None,)), constrain(bias, (None,))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


class Dense(nn.Module):
    """y = x @ kernel (+ bias), kernel [*in_shape, *out_shape] contracting the last len(in_shape) dims of x.

    in_names / out_names are the logical names of the kernel's input and output dimensions.
    lora_rank > 0 adds a LoRA adapter (ovjax/models/lora.py): y += (lora_alpha / lora_rank) * (x A) B with
    A `lora_a` [*in_shape, rank], B `lora_b` [rank, *out_shape].
    """
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_names: tuple[str | None, ...]
    out_names: tuple[str | None, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_shape)
        if tuple(x.shape[-n_in:]) != tuple(self.in_shape):
            raise ValueError(f"Dense expects trailing dims {self.in_shape}, got {x.shape}")
        kernel = param(self, "kernel", self.in_names + self.out_names, self.in_shape + self.out_shape,
                       self.kernel_init, self.param_dtype)
        batch_dims = x.ndim - n_in
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype),
            ((tuple(range(batch_dims, x.ndim)), tuple(range(n_in))), ((), ())),
            preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None,
        )
        if self.lora_rank:
            y = y + self._adapter(x, batch_dims).astype(y.dtype)
        if self.use_bias:
            bias = param(self, "bias", self.out_names, self.out_shape, nn.initializers.zeros, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y.astype(self.dtype)


    def _adapter(self, x, batch_dims: int):
        from ovjax.models import lora

        n_in, r = len(self.in_shape), self.lora_rank
        fan_in = 1
        for d in self.in_shape:
            fan_in *= d
        # adapters are created (and kept) in float32 whatever the base's param_dtype
        a = param(self, "lora_a", self.in_names + ("lora_rank",), self.in_shape + (r,), lora.a_initializer(fan_in))
        b = param(self, "lora_b", ("lora_rank",) + self.out_names, (r,) + self.out_shape, nn.initializers.zeros)
        xa = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype),
                                 ((tuple(range(batch_dims, x.ndim)), tuple(range(n_in))), ((), ())),
                                 preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None)
        out = jax.lax.dot_general(xa, b.astype(self.dtype), (((xa.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None)
        return out * jnp.asarray(self.lora_alpha / r, out.dtype)


def remat_policy(name: str):
    """Checkpoint policy by config name (MaxText-style; the attention names are set by the flash kernel):

    none: save everything (no remat). full: save nothing. dots / dots_no_batch: save matmul outputs (all / those
    without batch dims). save_attention: save only the flash kernel's output and log-sum-exp (full remat
    otherwise, but the backward does not re-run the attention forward). dots_attention: dots_no_batch plus
    the attention output and log-sum-exp. The attention names only matter with attention_impl pallas/auto.
    """
    from ovjax.kernels.flash_attention import FWD_KERNEL_NAME, LSE_NAME, OUT_NAME

    cp = jax.checkpoint_policies
    names = cp.save_only_these_names(OUT_NAME, LSE_NAME)

    def attention(prim, *avals, **params):
        # Saving the named values alone is not enough: the recomputed part would still hold the forward
        # pallas_call (JAX never dead-code-eliminates a pallas_call), so its outputs are marked saveable too.
        return (prim.name == "pallas_call" and params.get("name") == FWD_KERNEL_NAME) or names(prim, *avals, **params)
    policies = {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
        "save_attention": attention,
        "dots_attention": cp.save_from_both_policies(cp.checkpoint_dots_with_no_batch_dims, attention),
    }
    if name == "none":
        return None
    if name not in policies:
        raise ValueError(f"remat policy {name!r} is not one of {['none', *policies]}")
    return policies[name]


def maybe_remat(block_cls, policy_name: str, static_argnums=()):
    policy = remat_policy(policy_name)
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=policy, prevent_cse=False, static_argnums=static_argnums)
