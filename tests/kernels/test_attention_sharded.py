"""The pallas path on a mesh: the kernel runs per device under shard_map (checked in the jaxpr, because
interpreted kernels are ordinary HLO that XLA would partition anyway) and gives the XLA reference's answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax import sharding
from ovjax.kernels.reference import mha_reference
from ovjax.models.attention import attention

FAST = {"xla_backend_optimization_level": 0}
B, T, HQ, HKV, D = 8, 32, 4, 2, 16


def mesh_of(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def inputs():
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (B, T, HQ, D))
    k = jax.random.normal(kk, (B, T, HKV, D))
    v = jax.random.normal(kv, (B, T, HKV, D))
    cot = jax.random.normal(kc, (B, T, HQ, D))
    rows = [[1] * (5 + r) + [2] * (20 - r) + [0] * 7 for r in range(B)]  # samples of different lengths, padding
    return q, k, v, cot, jnp.asarray(np.array(rows, np.int32))


def pallas_calls(jaxpr):
    """Every pallas_call equation in a (closed) jaxpr and all the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += pallas_calls(inner)
    return found


def four_d_operand_shapes(eqn):
    return {tuple(v.aval.shape) for v in eqn.invars if len(v.aval.shape) == 4}


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (2, 2, 2, 1)], ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_kernel_runs_per_device_and_matches_reference(shape):
    mesh = mesh_of(shape)
    n_batch, n_tensor = shape[0] * shape[1], shape[2]
    q, k, v, cot, seg = inputs()

    def fwd(q, k, v, seg):
        return attention(q, k, v, seg, True, impl="pallas")

    def fwd_bwd(q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, seg), q, k, v)
        return (out, *vjp(cot))

    with jax.set_mesh(mesh):
        calls = pallas_calls(jax.make_jaxpr(fwd_bwd)(q, k, v, seg).jaxpr)
        got = jax.jit(fwd).lower(q, k, v, seg).compile(compiler_options=FAST)(q, k, v, seg)
    names = sorted(e.params["name"] for e in calls)
    assert names == ["ovjax_flash_dkv", "ovjax_flash_dq", "ovjax_flash_fwd"], names
    local_q = (B // n_batch, T, HQ // n_tensor, D)
    local_kv = (B // n_batch, T, HKV // n_tensor, D)
    for eqn in calls:
        shapes = four_d_operand_shapes(eqn)
        assert shapes and shapes <= {local_q, local_kv}, (shapes, local_q, local_kv)
    want = mha_reference(q, k, v, seg, True)
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert err < 1e-5, err


def test_sequence_sharded_queries_are_exact():
    """fsdp=2 x sequence=4: queries split over `sequence` (local T/4), K/V gathered (full T); output and
    q/k/v gradients equal the reference, with samples straddling every shard boundary."""
    mesh = mesh_of((1, 2, 1, 4))
    q, k, v, cot, seg = inputs()
    q, k, v, cot, seg = q[:2], k[:2], v[:2], cot[:2], seg[:2]

    def fwd_bwd(fn):
        def run(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(cot))
        return run

    pallas = fwd_bwd(lambda q, k, v: attention(q, k, v, seg, True, impl="pallas", seq_axis="act_seq"))
    with jax.set_mesh(mesh):
        calls = pallas_calls(jax.make_jaxpr(pallas)(q, k, v).jaxpr)
        got = jax.jit(pallas).lower(q, k, v).compile(compiler_options=FAST)(q, k, v)
    assert len(calls) == 3
    local_q = (1, max(16, T // 4), HQ, D)  # the kernel pads its 8 local queries to one 16-row block
    for eqn in calls:
        assert four_d_operand_shapes(eqn) <= {local_q, (1, T, HKV, D)}, four_d_operand_shapes(eqn)
    want = fwd_bwd(lambda q, k, v: mha_reference(q, k, v, seg, True))(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.abs(g - w).max() / jnp.abs(w).max())
        assert err < 1e-5, (name, err)


def test_explicit_mesh_argument_and_specs():
    mesh = mesh_of((1, 2, 2, 2))
    specs = sharding.attention_specs(mesh, (4, 32, 4, 16), (4, 32, 2, 16), "act_seq")
    assert specs.q == jax.sharding.PartitionSpec("fsdp", "sequence", "tensor", None)
    assert specs.kv == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    assert specs.sequence_axes == ("sequence",)
    # kv heads that do not divide `tensor`: heads stay whole on both sides (a query head needs its kv head)
    specs = sharding.attention_specs(mesh, (4, 32, 4, 16), (4, 32, 1, 16), None)
    assert specs.q == jax.sharding.PartitionSpec("fsdp", None, None, None) and specs.q_segments[1] is None
    q, k, v, _, seg = inputs()
    calls = pallas_calls(jax.make_jaxpr(
        lambda q, k, v: attention(q, k, v, seg, False, impl="pallas", mesh=mesh))(q, k, v).jaxpr)
    assert calls and all(four_d_operand_shapes(e) <= {(4, T, 2, D), (4, T, 1, D)} for e in calls)
    with pytest.raises(sharding.ShardingError, match="lacks"):
        sharding.attention_specs(jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)),
                                 (8, 32, 4, 16), (8, 32, 2, 16), None)
