"""Remat policies by name: `save_attention` / `dots_attention` keep the flash kernel's output and LSE, so the
backward does not re-run the attention forward (counted in the jaxpr), on one device and under shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax import sharding
from ovjax.models.attention import attention
from ovjax.models.layers import remat_policy
from tests.kernels.test_attention_sharded import pallas_calls


def kernel_names(jaxpr):
    return [e.params["name"] for e in pallas_calls(jaxpr)]


def block(q, k, v, seg):
    """A stand-in layer: a projection before and after the attention."""
    o = attention(jnp.tanh(q), k, v, seg, True, impl="pallas")
    return jnp.sum(jnp.sin(o) ** 2)


def grad_kernels(policy_name, mesh=None):
    q = jnp.ones((2, 32, 4, 16))
    k = v = jnp.ones((2, 32, 2, 16))
    seg = jnp.ones((2, 32), jnp.int32)
    policy = remat_policy(policy_name)
    fn = block if policy_name == "none" else jax.checkpoint(block, policy=policy)
    grad = jax.grad(fn, argnums=(0, 1, 2))
    if mesh is None:
        return kernel_names(jax.make_jaxpr(grad)(q, k, v, seg).jaxpr)
    with jax.set_mesh(mesh):
        return kernel_names(jax.make_jaxpr(grad)(q, k, v, seg).jaxpr)


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one-device", "fsdp2-tensor2"])
def test_attention_policies_do_not_rerun_the_forward(on_mesh):
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, sequence=1), jax.devices()[:4]) if on_mesh else None
    counts = {p: grad_kernels(p, mesh).count("ovjax_flash_fwd") for p in ("none", "full", "save_attention",
                                                                          "dots_attention")}
    assert counts == {"none": 1, "full": 2, "save_attention": 1, "dots_attention": 1}, counts


def test_unknown_policy_lists_the_names():
    with pytest.raises(ValueError, match="save_attention"):
        remat_policy("minimal")
    assert remat_policy("none") is None and np.all([remat_policy(n) is not None for n in ("full", "dots")])
