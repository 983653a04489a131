"""ovjax's Pallas flash attention (interpret mode on CPU) against the XLA reference: outputs and q/k/v grads.

The case table covers every (head_dim, GQA ratio) pair, and across it both causal settings, both dtypes,
every packing kind and sequence lengths that are not a multiple of the blocks.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax.kernels.flash_attention import BlockSizes, flash_attention
from ovjax.kernels.reference import mha_reference

S16 = BlockSizes(16, 16, 16, 16, 16, 16)
MIX_A = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16, block_k_dkv=32)
MIX_B = BlockSizes(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16, block_q_dkv=32, block_k_dkv=16)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_segments(kind: str, b: int, t: int, rng: np.random.Generator):
    """int32 [b, t] segment ids of one packing kind (None for 'none')."""
    if kind == "none":
        return None
    rows = []
    for _ in range(b):
        if kind == "single":
            row = [1] * t
        elif kind == "scattered":  # ids reused in non-contiguous places, and an id that collides mod 32
            row = list(rng.choice([0, 1, 5, 37], size=t))
        else:
            lengths = {"packed": [1, 2, 7, 19, 33], "tokens": [1, 1, 1, 2, 5]}[kind]
            n_pad = int(rng.integers(1, max(2, t // 4)))
            row, sid = [], 1
            while len(row) < t - n_pad:
                row += [sid] * int(rng.choice(lengths))
                sid += 1
            row = row[: t - n_pad] + [0] * n_pad  # trailing padding segment, id 0
        rows.append(row)
    return jnp.asarray(np.array(rows, np.int32))


# (head_dim, groups, kv_heads, causal, dtype, packing, T, B, blocks)
CASES = [
    (64, 1, 2, True, jnp.float32, "packed", 77, 2, S16),
    (64, 2, 2, False, jnp.bfloat16, "tokens", 50, 1, MIX_A),
    (64, 4, 2, True, jnp.float32, "none", 45, 1, MIX_B),
    (64, 8, 1, False, jnp.float32, "scattered", 64, 1, S16),
    (128, 1, 2, False, jnp.float32, "single", 40, 1, MIX_A),
    (128, 2, 2, True, jnp.float32, "packed", 100, 1, MIX_B),
    (128, 4, 1, False, jnp.bfloat16, "packed", 33, 2, S16),
    (128, 8, 1, True, jnp.bfloat16, "tokens", 48, 1, MIX_A),
    (12, 1, 2, False, jnp.bfloat16, "none", 57, 1, MIX_B),
    (12, 2, 2, True, jnp.float32, "scattered", 70, 1, S16),
    (12, 4, 2, True, jnp.float32, "tokens", 81, 1, MIX_A),
    (12, 8, 1, False, jnp.float32, "packed", 99, 1, MIX_B),
    (16, 1, 2, True, jnp.bfloat16, "scattered", 90, 1, MIX_A),
    (16, 2, 2, False, jnp.float32, "packed", 128, 1, MIX_B),
    (16, 4, 1, False, jnp.float32, "tokens", 60, 2, S16),
    (16, 8, 1, True, jnp.float32, "single", 37, 1, MIX_B),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# The interpreted kernels are big XLA while loops; backend optimisation only costs compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def out_and_grads(fn, q, k, v, cot):
    """fn's output and the vjp of <out, cot> w.r.t. q, k, v, in one jitted call."""
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cot.astype(out.dtype)))
    return jax.jit(run).lower(q, k, v).compile(compiler_options=FAST_COMPILE)(q, k, v)


def random_qkv(b, t, hq, hkv, d, dtype, seed):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, t, hkv, d), jnp.float32).astype(dtype)
    cot = jax.random.normal(kc, (b, t, hq, d), jnp.float32)
    return q, k, v, cot


@pytest.mark.parametrize("d, groups, hkv, causal, dtype, packing, t, b, blocks", CASES,
                         ids=[f"d{c[0]}-g{c[1]}-{'causal' if c[3] else 'bidir'}-{c[4].__name__}-{c[5]}-t{c[6]}"
                              for c in CASES])
def test_matches_reference(d, groups, hkv, causal, dtype, packing, t, b, blocks):
    rng = np.random.default_rng(d * 1000 + groups * 10 + t)
    seg = make_segments(packing, b, t, rng)
    q, k, v, cot = random_qkv(b, t, groups * hkv, hkv, d, dtype, seed=t)
    got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, seg, causal, interpret=True, block_sizes=blocks),
                        q, k, v, cot)
    want = out_and_grads(lambda q, k, v: mha_reference(q, k, v, seg, causal), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = rel_err(g, w)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


def test_packed_equals_unpacked():
    """Each sample of a packed row gets exactly what it gets alone: nothing leaks across segments."""
    lengths = [23, 1, 30, 9]
    t = sum(lengths) + 7  # + padding
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(7)]).astype(np.int32)
    q, k, v, _ = random_qkv(1, t, 4, 2, 16, jnp.float32, seed=3)
    def fn(q, k, v, s):
        f = jax.jit(lambda q, k, v, s: flash_attention(q, k, v, s, True, interpret=True, block_sizes=MIX_A))
        return f.lower(q, k, v, s).compile(compiler_options=FAST_COMPILE)(q, k, v, s)

    packed = fn(q, k, v, jnp.asarray(seg)[None])
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = fn(q[:, sl], k[:, sl], v[:, sl], jnp.ones((1, n), jnp.int32))
        assert rel_err(packed[:, sl], alone) < 1e-5
        start += n


def test_sm_scale_and_errors():
    q, k, v, _ = random_qkv(1, 20, 2, 1, 16, jnp.float32, seed=5)
    got = flash_attention(q, k, v, None, False, sm_scale=0.3, interpret=True, block_sizes=S16)
    assert rel_err(got, mha_reference(q, k, v, None, False, sm_scale=0.3)) < 1e-5
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q[:, :, :1], k[:, :, :1].repeat(2, axis=2), v[:, :, :1].repeat(2, axis=2), interpret=True)
    with pytest.raises(ValueError, match="S == T"):
        flash_attention(q, k[:, :10], v[:, :10], interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, k, v, interpret=True, block_sizes=BlockSizes(24, 16, 16, 16, 16, 16))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, jnp.ones((1, 19), jnp.int32), interpret=True)


@pytest.mark.parametrize("dtype, d, groups, causal, packed", [
    (jnp.bfloat16, 128, 4, True, True),
    (jnp.float32, 12, 1, False, False),
    (jnp.bfloat16, 64, 2, False, True),
])
def test_lowers_to_triton_for_cuda(dtype, d, groups, causal, packed):
    """The GPU path (default blocks) lowers to Triton IR: forward, dq and dk/dv kernels, no interpreter."""
    t, hkv = 1000, 2
    q = jax.ShapeDtypeStruct((1, t, hkv * groups, d), dtype)
    kv = jax.ShapeDtypeStruct((1, t, hkv, d), dtype)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32) if packed else None

    def loss(q, k, v, s):
        return flash_attention(q, k, v, s, causal).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    names = re.findall(r'name = "(ovjax_flash_\w+)"', text)
    assert sorted(names) == ["ovjax_flash_dkv", "ovjax_flash_dq", "ovjax_flash_fwd"]


@pytest.mark.parametrize("causal, dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_query_shard_against_full_keys(causal, dtype):
    """Sequence parallelism: each query shard (its offset given) against all keys equals those rows of full
    attention, outputs and gradients, with packed samples straddling the shard boundaries; summing the shards'
    dk/dv gives the full dk/dv."""
    t, shards = 64, 4
    n = t // shards
    lengths = [5, 20, 1, 30]  # 5+20 straddles shards 0|1, 30 straddles 2|3; 8 tokens of padding
    seg = jnp.asarray(np.concatenate([np.full(m, i + 1) for i, m in enumerate(lengths)]
                                     + [np.zeros(t - sum(lengths))]).astype(np.int32)[None].repeat(2, 0))
    q, k, v, cot = random_qkv(2, t, 4, 2, 16, dtype, seed=11)
    want = out_and_grads(lambda q, k, v: mha_reference(q, k, v, seg, causal), q, k, v, cot)
    dk = dv = 0
    for i in range(shards):
        sl = slice(i * n, (i + 1) * n)
        offset = jnp.int32(i * n)  # an array, as axis_index gives it inside shard_map
        got = out_and_grads(
            lambda qs, k, v: flash_attention(qs, k, v, seg[:, sl], causal, kv_segment_ids=seg, q_offset=offset,
                                             interpret=True, block_sizes=MIX_A), q[:, sl], k, v, cot[:, sl])
        for name, g, w in zip(("out", "dq"), got[:2], (want[0][:, sl], want[1][:, sl])):
            assert rel_err(g, w) < TOL[dtype], (name, i, rel_err(g, w))
        dk, dv = dk + got[2].astype(jnp.float32), dv + got[3].astype(jnp.float32)
    assert rel_err(dk, want[2]) < TOL[dtype] and rel_err(dv, want[3]) < TOL[dtype]


def test_query_shard_errors():
    q, k, v, _ = random_qkv(1, 32, 2, 1, 16, jnp.float32, seed=5)
    seg = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        flash_attention(q[:, :16], k, v, seg[:, :16], True, q_offset=16, interpret=True)
    with pytest.raises(ValueError, match="q_offset must be a scalar"):
        flash_attention(q[:, :16], k, v, q_offset=jnp.zeros(2, jnp.int32), interpret=True)


def triton_modules(fn, *args):
    """The Triton IR (text) of every pallas_call in jit(fn)(*args) lowered for CUDA, on the CPU."""
    from jax._src.pallas.triton import lowering as triton_lowering

    texts = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def spy(*a, **kw):
        result = original(*a, **kw)
        texts.append(result.module.operation.get_asm())
        return result

    triton_lowering.lower_jaxpr_to_triton_module = spy
    # conftest makes "highest" the global default; the kernel must not depend on it, so lower under "default"
    try:
        with jax.default_matmul_precision("default"):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    return texts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_dots_lower_without_tf32(dtype):
    """f32: every tt.dot of the fwd, dq and dk/dv kernels has inputPrecision ieee (no TF32); bf16: the dots
    take bf16 operands with the lowering's default precision, as before the change. Also covers the
    query-shard form (T != S, traced offset) that sequence parallelism uses."""
    t, s, d = 64, 128, 64
    q = jax.ShapeDtypeStruct((1, t, 4, d), dtype)
    kv = jax.ShapeDtypeStruct((1, s, 2, d), dtype)
    seg_q = jax.ShapeDtypeStruct((1, t), jnp.int32)
    seg_k = jax.ShapeDtypeStruct((1, s), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, sq, sk, off):
        out = flash_attention(q, k, v, sq, True, kv_segment_ids=sk, q_offset=off)
        return out.astype(jnp.float32).sum()

    texts = triton_modules(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg_q, seg_k, offset)
    assert len(texts) == 3  # fwd, dq, dk/dv
    dots = [line for text in texts for line in text.splitlines() if "tt.dot " in line]
    # fwd: qk, pv; dq: qk, dov, dsk; dkv: kq, pdo, vdo, dsq; each in the unmasked and the masked loop body
    assert len(dots) == 2 * (2 + 3 + 4), len(dots)
    # Triton prints the attribute only when it is not its default, IEEE (full float32).
    precisions = {m.group(1) if (m := re.search(r"inputPrecision = (\w+)", line)) else "ieee" for line in dots}
    if dtype == jnp.float32:
        assert precisions == {"ieee"}, precisions
        assert all("xf32>" in line for line in dots)
    else:
        assert precisions == {"tf32"}, precisions  # the attribute's default; Triton ignores it for bf16
        assert all(re.search(r"tensor<\d+x\d+xbf16> \* tensor<\d+x\d+xbf16>", line) for line in dots), dots
