"""Rotary position embeddings (rotate-half convention, as transformers' Qwen3 and MLCD).

1-D (LLM): angle[t, i] = position[t] * theta^(-2i/D), i < D/2, duplicated to D channels.
2-D (ViT): D/4 frequencies theta^(-2i/(D/2)); a patch at (h, w) gets [h * f, w * f] (D/2 angles),
duplicated to D channels, so channel pairs (j, j + D/2) rotate at h frequencies for j < D/4 and at w
frequencies for D/4 <= j < D/2. All angles are computed in float32.
"""

from __future__ import annotations

import jax.numpy as jnp


def inverse_frequencies(dim: int, theta: float) -> jnp.ndarray:
    """float32 [dim/2]: theta^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def text_angles(positions, head_dim: int, theta: float) -> jnp.ndarray:
    """positions int [B, T] -> float32 angles [B, T, head_dim/2]."""
    return positions.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)


def vision_angles(patch_hw, head_dim: int, theta: float = 10000.0) -> jnp.ndarray:
    """patch_hw int [..., 2] (row, column in the image's patch grid) -> float32 angles [..., head_dim/2]."""
    if head_dim % 4:
        raise ValueError(f"2-D rotary needs head_dim divisible by 4, got {head_dim}")
    freqs = inverse_frequencies(head_dim // 2, theta)
    hw = patch_hw.astype(jnp.float32)
    return jnp.concatenate([hw[..., 0:1] * freqs, hw[..., 1:2] * freqs], axis=-1)


def cos_sin(angles) -> tuple[jnp.ndarray, jnp.ndarray]:
    """angles [..., D/2] -> (cos, sin) [..., D], each half repeated (concatenated with itself)."""
    full = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(full), jnp.sin(full)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x [B, T, H, D]; cos, sin [B, T, D] (float32). Rotation in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)
