"""The XLA reference against a naive float64 numpy attention, chunked and unchunked, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax.kernels.reference import mha_reference


def naive(q, k, v, seg, causal):
    """float64, K/V repeated per group, an explicit loop over query rows."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            visible = seg[bi] == seg[bi, i]
            if causal:
                visible &= np.arange(t) <= i
            logits = np.einsum("hd,shd->hs", q[bi, i], k[bi]) / np.sqrt(d)
            logits[:, ~visible] = -np.inf
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[bi, i] = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), v[bi])
    return out


@pytest.mark.parametrize("t,chunk", [(48, None), (48, 16), (53, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_naive_attention(t, chunk, causal):
    rs = np.random.RandomState(t)
    q, k, v = rs.randn(2, t, 4, 8), rs.randn(2, t, 2, 8), rs.randn(2, t, 2, 8)
    seg = np.sort(rs.randint(0, 4, (2, t)), axis=1).astype(np.int32)
    out = mha_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(seg), causal,
                        q_chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(out), naive(q, k, v, seg, causal), atol=2e-5)


def test_chunked_gradients_equal_unchunked():
    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.randn(1, 70, 4, 8), jnp.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    seg = jnp.asarray(np.sort(rs.randint(0, 3, (1, 70)), axis=1))

    def loss(chunk):
        return lambda q, k, v: jnp.sum(mha_reference(q, k, v, seg, True, q_chunk_size=chunk) ** 2)

    full = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(16), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
