"""The attention dispatcher: impl choice, refusals, and that no path drops segment ids (CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax.kernels.reference import mha_reference
from ovjax.models.attention import attention


def inputs(t=24, s=None, hq=4, hkv=2, d=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    s = t if s is None else s
    q = jax.random.normal(kq, (2, t, hq, d)).astype(dtype)
    k = jax.random.normal(kk, (2, s, hkv, d)).astype(dtype)
    v = jax.random.normal(kv, (2, s, hkv, d)).astype(dtype)
    seg = None
    if t >= 19:
        seg = jnp.asarray(np.array([[1] * 10 + [2] * 9 + [0] * (t - 19), [3] * 5 + [4] * (t - 5)], np.int32))
    return q, k, v, seg


def test_unknown_impl():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="not one of"):
        attention(q, k, v, impl="flash")


def test_auto_on_cpu_is_xla():
    assert jax.default_backend() == "cpu"
    q, k, v, seg = inputs()
    np.testing.assert_array_equal(attention(q, k, v, seg, True, impl="auto"),
                                  attention(q, k, v, seg, True, impl="xla"))


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_interprets_on_cpu_and_keeps_segments(causal):
    q, k, v, seg = inputs()
    got = jax.jit(lambda q, k, v, seg: attention(q, k, v, seg, causal, impl="pallas"))(q, k, v, seg)
    want = mha_reference(q, k, v, seg, causal)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-5
    unpacked = mha_reference(q, k, v, None, causal)
    assert float(jnp.abs(got - unpacked).max()) > 1e-2  # the segments really changed the result


def test_pallas_refuses_decode_and_auto_falls_back():
    q, k, v, _ = inputs(t=4, s=24)
    kv_seg = jnp.ones((2, 24), jnp.int32)
    qpos = jnp.broadcast_to(jnp.arange(20, 24), (2, 4))
    kpos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    kwargs = dict(kv_segment_ids=kv_seg, q_positions=qpos, kv_positions=kpos)
    with pytest.raises(ValueError, match="self-attention only"):
        attention(q, k, v, jnp.ones((2, 4), jnp.int32), True, impl="pallas", **kwargs)
    with pytest.raises(ValueError, match="S=24 != T=4"):
        attention(q, k, v, None, False, impl="pallas")
    got = attention(q, k, v, jnp.ones((2, 4), jnp.int32), True, impl="auto", **kwargs)
    want = mha_reference(q, k, v, jnp.ones((2, 4), jnp.int32), True, **kwargs)
    np.testing.assert_array_equal(got, want)


def test_cudnn_refusals():
    q, k, v, seg = inputs(dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="segment ids"):
        attention(q, k, v, seg, True, impl="cudnn")
    with pytest.raises(ValueError, match="needs a GPU"):
        attention(q, k, v, None, True, impl="cudnn")
    with pytest.raises(ValueError, match="self-attention only"):
        attention(q, k, v, None, True, impl="cudnn", kv_segment_ids=jnp.ones((2, 24), jnp.int32))
