"""Flash attention in Pallas (Triton lowering): GQA, segment ids, causal or bidirectional, fwd + bwd.

`flash_attention(q, k, v, segment_ids, causal)`: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D], with
exactly the semantics of `kernels/reference.py` (a query sees the keys of its own segment id; id 0 is an
ordinary id, so padding sees padding and no row is empty).

Query shard against full keys (sequence parallelism): with `q_offset` (an int, or a traced int32 scalar such
as `axis_index * T` inside `shard_map`) the T queries are the global positions q_offset .. q_offset + T - 1 of
a sequence whose S keys (k/v [B, S, Hkv, D], `kv_segment_ids` [B, S]) are all present; causal masking and
block skipping use the global positions, so the result equals the matching rows of full self-attention.

Design:
- K/V are never repeated: query head h reads kv head h // (Hq // Hkv) through its BlockSpec index map, and
  the dk/dv kernel loops over the query heads of its group.
- T is padded to a multiple of the blocks and D to a power of two >= 16 (zeros; the scale uses the real D).
  Padded keys are masked by position; padded queries are sliced away, and their zero cotangents make them
  contribute nothing to the gradients.
- Block skipping: outside the kernels, every (query block, key block) pair is classified from per-block
  min/max segment ids, a 32-bit hash set of the ids and the causal/length structure as
  full (every key visible to every query: no mask needed), partial (mask needed) or empty. Each program gets
  the list of its non-empty blocks, full ones first, and runs two plain loops (no branches inside a loop, so
  Triton can pipeline the loads). The classification is conservative: a pair is only called empty when no
  segment id can be shared, and only called full when the whole pair is one segment.
- float32 inputs run every dot at full precision (`Precision.HIGHEST`, which the Triton lowering turns into
  `inputPrecision = ieee`; the default would be TF32); 16-bit inputs keep the default. f32 accumulation always.
- The forward saves the log-sum-exp (base 2) per query; the backward recomputes probabilities from it in a
  dq kernel (per query block) and a dk/dv kernel (per key block), both accumulating in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

try:  # jax 0.10 / 0.11: the Triton backend lives here (deprecated in 0.11, still the Ampere path).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas import triton as _pl_triton
    _TritonParams = getattr(_pl_triton, "CompilerParams", None) or getattr(_pl_triton, "TritonCompilerParams")
except (ImportError, AttributeError):  # older names, or a jax without the module
    _pl_triton = None
    _TritonParams = getattr(pl, "TritonCompilerParams", None)

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16

# Checkpoint names of the forward's residuals: a remat policy that saves these (ovjax.models.layers) keeps the
# backward from re-running the flash forward.
OUT_NAME = "attention_out"
LSE_NAME = "attention_lse"
FWD_KERNEL_NAME = "ovjax_flash_fwd"  # the forward pallas_call, whose outputs are exactly (out, LSE)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch settings; None picks a heuristic."""

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 128
    block_k_dq: int = 32
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    num_stages: int | None = 2
    num_stages_bwd: int | None = 2

    def all_blocks(self) -> tuple[int, ...]:
        return (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dkv,
                self.block_k_dkv)

    def query_blocks(self) -> tuple[int, ...]:
        return (self.block_q, self.block_q_dq, self.block_q_dkv)

    def key_blocks(self) -> tuple[int, ...]:
        return (self.block_k, self.block_k_dq, self.block_k_dkv)

    def clipped(self, seq_len: int, kv_len: int | None = None) -> "BlockSizes":
        """Query blocks no longer than `seq_len`, key blocks no longer than `kv_len` (default: seq_len), each
        rounded up to a power of two (so short inputs pad little)."""
        def cap(n):
            return max(_MIN_BLOCK, pl.next_power_of_2(n))
        q_cap, k_cap = cap(seq_len), cap(seq_len if kv_len is None else kv_len)
        return dataclasses.replace(self, **{f.name: min(getattr(self, f.name), k_cap if "_k" in f.name else q_cap)
                                            for f in dataclasses.fields(self) if f.name.startswith("block_")})

    def validate(self) -> None:
        for b in self.all_blocks():
            if b < _MIN_BLOCK or b & (b - 1):
                raise ValueError(f"block sizes must be powers of two >= {_MIN_BLOCK}, got {self}")


def default_block_sizes(dtype) -> BlockSizes:
    """Tiles for 16-bit inputs; float32 (tests, checks) gets half-size tiles to fit shared memory on Ampere."""
    if jnp.dtype(dtype).itemsize >= 4:
        return BlockSizes(block_q=64, block_k=32, block_q_dq=64, block_k_dq=32, block_q_dkv=32, block_k_dkv=64)
    return BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one padded call (hashable: it is a non-differentiable custom_vjp argument)."""

    causal: bool
    sm_scale: float
    kv_len: int  # real key length; keys at positions >= kv_len are padding
    padded_len: int  # padded key length
    use_segments: bool
    blocks: BlockSizes
    interpret: bool


def _padded_head_dim(d: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(d))


def _compiler_params(num_warps, num_stages):
    if _TritonParams is None:
        return None
    return _TritonParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------
# Block schedule (plain XLA, outside the kernels)
# ----------------------------------------------------------------------------------------------------------

def _block_summary(seg, block):
    """Per-block min, max and 32-bit hash set of segment ids: seg [B, Tp] -> three [B, Tp // block]."""
    b, tp = seg.shape
    s = seg.reshape(b, tp // block, block)
    bits = jnp.left_shift(jnp.uint32(1), (s & 31).astype(jnp.uint32))
    bits = lax.reduce(bits, jnp.uint32(0), lax.bitwise_or, (2,))
    return s.min(axis=2), s.max(axis=2), bits


def _block_classes(seg, block_q, block_k, cfg: _Config, seg_k=None, q_offset=0):
    """Class of each (query block, key block) pair: 0 full, 1 partial, 2 empty. int32 [B, nq, nk].

    seg: query segment ids [B, Tq]; seg_k: key segment ids [B, Sp] (default: seg); q_offset: global position
    of query 0 (int or traced int32 scalar), so causal pairs are judged on global positions.
    """
    seg_k = seg if seg_k is None else seg_k
    b, tq = seg.shape
    nq, nk = tq // block_q, seg_k.shape[1] // block_k
    q_first = q_offset + jnp.arange(nq)[:, None] * block_q
    q_last = q_first + block_q - 1
    k_first = jnp.arange(nk)[None, :] * block_k
    k_last = k_first + block_k - 1
    visible = k_first < cfg.kv_len
    full = k_last < cfg.kv_len
    if cfg.causal:
        visible = visible & (k_first <= q_last)
        full = full & (k_last <= q_first)
    visible = jnp.broadcast_to(visible, (b, nq, nk))
    full = jnp.broadcast_to(full, (b, nq, nk))
    if cfg.use_segments:
        qmin, qmax, qbits = _block_summary(seg, block_q)
        kmin, kmax, kbits = _block_summary(seg_k, block_k)
        share = ((qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
                 & ((qbits[:, :, None] & kbits[:, None, :]) != 0))
        one_segment = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
                       & (qmin[:, :, None] == kmin[:, None, :]))
        visible = visible & share
        full = full & one_segment
    full = full & visible
    return jnp.where(full, 0, jnp.where(visible, 1, 2)).astype(jnp.int32)


def _schedule(classes):
    """Per row of `classes` [B, nA, nB]: int32 [B, nA, 2 + nB] = [n_full, n_visible, block ids...].

    Block ids are ordered full first, then partial, then empty (never read), each in increasing order.
    """
    nb = classes.shape[-1]
    order = jnp.argsort(classes * nb + jnp.arange(nb, dtype=jnp.int32), axis=-1).astype(jnp.int32)
    n_full = jnp.sum(classes == 0, axis=-1, dtype=jnp.int32)
    n_visible = jnp.sum(classes < 2, axis=-1, dtype=jnp.int32)
    return jnp.concatenate([n_full[..., None], n_visible[..., None], order], axis=-1)


def _with_offset(sched, q_offset):
    """Append the global position of query 0 to every schedule row: [..., 2 + nB] -> [..., 3 + nB]."""
    col = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), sched.shape[:-1] + (1,))
    return jnp.concatenate([sched, col], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Kernels. Refs are 2-D tiles [rows, Dp] unless noted; `sched_ref` is this program's schedule row
# [n_full, n_visible, block ids..., q_offset].
# ----------------------------------------------------------------------------------------------------------

def _visible(q_pos, k_pos, seg_q, seg_k, cfg: _Config, transposed: bool):
    """Boolean mask [len(q), len(k)] (or its transpose) of the keys each query may see; None: all visible."""
    def outer(a, b):  # a indexes rows of the result, b columns
        return a[:, None], b[None, :]

    conds = []
    if cfg.use_segments:
        a, b = outer(seg_k, seg_q) if transposed else outer(seg_q, seg_k)
        conds.append(a == b)
    if cfg.causal:
        if transposed:
            kp, qp = outer(k_pos, q_pos)
        else:
            qp, kp = outer(q_pos, k_pos)
        conds.append(kp <= qp)
    if cfg.kv_len < cfg.padded_len:
        kp = k_pos[:, None] if transposed else k_pos[None, :]
        conds.append(kp < cfg.kv_len)
    if not conds:
        return None
    return functools.reduce(jnp.logical_and, conds)


def _precision(dtype):
    """Full precision for float32 operands (no TF32 in the Triton lowering); the default for 16-bit ones."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _matmul(a, b):
    """a [m, k] @ b [k, n] -> float32 [m, n]."""
    return jnp.dot(a, b, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _scores(a, b, scale):
    """a [m, Dp] . b [n, Dp]^T in float32, times `scale` -> [m, n]."""
    s = lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                        preferred_element_type=jnp.float32)
    return s * scale


def _fwd_kernel(sched_ref, segq_ref, segk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    """One query block of one head: o [bq, Dp], lse [bq] (base-2 log-sum-exp of the scaled logits)."""
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    dp = q_ref.shape[-1]
    q = q_ref[...]
    q_pos = sched_ref[sched_ref.shape[-1] - 1] + pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32)
    seg_q = segq_ref[...] if cfg.use_segments else None
    scale = cfg.sm_scale * _LOG2E

    def step(t, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(sched_ref[2 + t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _scores(q, k, scale)
        if masked:
            k_pos = start + jnp.arange(bk, dtype=jnp.int32)
            seg_k = segk_ref[pl.ds(start, bk)] if cfg.use_segments else None
            mask = _visible(q_pos, k_pos, seg_q, seg_k, cfg, transposed=False)
            if mask is not None:
                s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _matmul(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    n_full, n_visible = sched_ref[0], sched_ref[1]
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)
    # Only a padded query can have no visible key; keep it finite (0 output, +inf lse => p = 0 in the bwd).
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dq_kernel(sched_ref, segq_ref, segk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config):
    """dq [bq, Dp] of one query block of one head, from the saved lse and delta = rowsum(o * do)."""
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = sched_ref[sched_ref.shape[-1] - 1] + pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32)
    seg_q = segq_ref[...] if cfg.use_segments else None
    scale = cfg.sm_scale * _LOG2E

    def step(t, dq, masked):
        start = pl.multiple_of(sched_ref[2 + t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _scores(q, k, scale)
        if masked:
            k_pos = start + jnp.arange(bk, dtype=jnp.int32)
            seg_k = segk_ref[pl.ds(start, bk)] if cfg.use_segments else None
            mask = _visible(q_pos, k_pos, seg_q, seg_k, cfg, transposed=False)
            if mask is not None:
                s = jnp.where(mask, s, _MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dp = _scores(do, v, 1.0)
        ds = p * (dp - delta[:, None])
        return dq + _matmul(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    n_full, n_visible = sched_ref[0], sched_ref[1]
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, segq_ref, segk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, cfg: _Config, groups: int):
    """dk, dv [bk, Dp] of one key block of one kv head, summed over the `groups` query heads that share it.

    q_ref, do_ref: [Tp, groups, Dp]; lse_ref, delta_ref: [groups, Tp]. Works on transposed scores [bk, bq].
    """
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    k = k_ref[...]
    v = v_ref[...]
    k_pos = pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32)
    seg_k = segk_ref[...] if cfg.use_segments else None
    scale = cfg.sm_scale * _LOG2E
    n_full, n_visible = sched_ref[0], sched_ref[1]
    q_offset = sched_ref[sched_ref.shape[-1] - 1]

    def step(t, carry, g, masked):
        dk, dv = carry
        start = pl.multiple_of(sched_ref[2 + t] * bq, bq)
        q = q_ref[pl.ds(start, bq), g, :]
        do = do_ref[pl.ds(start, bq), g, :]
        lse = lse_ref[g, pl.ds(start, bq)]
        delta = delta_ref[g, pl.ds(start, bq)]
        s_t = _scores(k, q, scale)
        if masked:
            q_pos = q_offset + start + jnp.arange(bq, dtype=jnp.int32)
            seg_q = segq_ref[pl.ds(start, bq)] if cfg.use_segments else None
            mask = _visible(q_pos, k_pos, seg_q, seg_k, cfg, transposed=True)
            if mask is not None:
                s_t = jnp.where(mask, s_t, _MASK_VALUE)
        p_t = jnp.exp2(s_t - lse[None, :])
        dv = dv + _matmul(p_t.astype(do.dtype), do)
        dp_t = _scores(v, do, 1.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _matmul(ds_t.astype(q.dtype), q)
        return dk, dv

    def one_head(g, carry):
        carry = lax.fori_loop(0, n_full, functools.partial(step, g=g, masked=False), carry)
        return lax.fori_loop(n_full, n_visible, functools.partial(step, g=g, masked=True), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if groups == 1:
        dk, dv = one_head(0, carry)
    else:
        dk, dv = lax.fori_loop(0, groups, one_head, carry)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# pallas_call wrappers on padded inputs: q [B, Tp, Hq, Dp], k/v [B, Sp, Hkv, Dp], seg_q int32 [B, Tp],
# seg_k int32 [B, Sp], q_offset an int32 scalar (global position of query 0)
# ----------------------------------------------------------------------------------------------------------

def _warps(explicit, dp):
    return explicit if explicit is not None else (4 if dp <= 64 else 8)


def _fwd_call(q, k, v, seg_q, seg_k, q_offset, cfg: _Config):
    """-> o [B, Tp, Hq, Dp] (dtype of q), lse [B, Hq, Tp] float32."""
    b, tp, hq, dp = q.shape
    sp = k.shape[1]
    groups = hq // k.shape[2]
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    sched = _with_offset(_schedule(_block_classes(seg_q, bq, bk, cfg, seg_k, q_offset)), q_offset)
    q_tile = pl.BlockSpec((None, bq, None, dp), lambda i, bi, h: (bi, i, h, 0))
    kv_full = pl.BlockSpec((None, sp, None, dp), lambda i, bi, h: (bi, 0, h // groups, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(tp // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, None, sched.shape[-1]), lambda i, bi, h: (bi, i, 0)),
            pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)),
            q_tile, kv_full, kv_full,
        ],
        out_specs=[q_tile, pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        compiler_params=_compiler_params(_warps(cfg.blocks.num_warps, dp), cfg.blocks.num_stages),
        interpret=cfg.interpret,
        name=FWD_KERNEL_NAME,
    )(sched, seg_q, seg_k, q, k, v)


def _dq_call(q, k, v, seg_q, seg_k, q_offset, do, lse, delta, cfg: _Config):
    b, tp, hq, dp = q.shape
    sp = k.shape[1]
    groups = hq // k.shape[2]
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    sched = _with_offset(_schedule(_block_classes(seg_q, bq, bk, cfg, seg_k, q_offset)), q_offset)
    q_tile = pl.BlockSpec((None, bq, None, dp), lambda i, bi, h: (bi, i, h, 0))
    kv_full = pl.BlockSpec((None, sp, None, dp), lambda i, bi, h: (bi, 0, h // groups, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(tp // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, None, sched.shape[-1]), lambda i, bi, h: (bi, i, 0)),
            pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)),
            q_tile, kv_full, kv_full, q_tile, row_tile, row_tile,
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(_warps(cfg.blocks.num_warps_bwd, dp), cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="ovjax_flash_dq",
    )(sched, seg_q, seg_k, q, k, v, do, lse, delta)


def _dkv_call(q, k, v, seg_q, seg_k, q_offset, do, lse, delta, cfg: _Config):
    b, tp, hq, dp = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    groups = hq // hkv
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    classes = _block_classes(seg_q, bq, bk, cfg, seg_k, q_offset)
    sched = _with_offset(_schedule(jnp.swapaxes(classes, 1, 2)), q_offset)
    k_tile = pl.BlockSpec((None, bk, None, dp), lambda j, bi, h: (bi, j, h, 0))
    q_group = pl.BlockSpec((None, tp, groups, dp), lambda j, bi, h: (bi, 0, h, 0))
    rows_group = pl.BlockSpec((None, groups, tp), lambda j, bi, h: (bi, h, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, groups=groups),
        grid=(sp // bk, b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, sched.shape[-1]), lambda j, bi, h: (bi, j, 0)),
            pl.BlockSpec((None, tp), lambda j, bi, h: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j)),
            q_group, k_tile, k_tile, q_group, rows_group, rows_group,
        ],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(_warps(cfg.blocks.num_warps_bwd, dp), cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="ovjax_flash_dkv",
    )(sched, seg_q, seg_k, q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, seg_q, seg_k, q_offset, cfg: _Config):
    return _fwd_call(q, k, v, seg_q, seg_k, q_offset, cfg)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, q_offset, cfg: _Config):
    o, lse = _fwd_call(q, k, v, seg_q, seg_k, q_offset, cfg)
    # Named, so a remat policy can keep them and the backward need not re-run this forward.
    o, lse = checkpoint_name(o, OUT_NAME), checkpoint_name(lse, LSE_NAME)
    return o, (q, k, v, seg_q, seg_k, q_offset, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, seg_q, seg_k, q_offset, o, lse = res
    # delta_i = sum_d o_id * do_id: the softmax-jacobian term, [B, Hq, Tp] float32 (elementwise: no TF32 dot).
    delta = jnp.swapaxes(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
    dq = _dq_call(q, k, v, seg_q, seg_k, q_offset, do, lse, delta, cfg)
    dk, dv = _dkv_call(q, k, v, seg_q, seg_k, q_offset, do, lse, delta, cfg)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------

def flash_attention(q, k, v, segment_ids=None, causal: bool = False, *, kv_segment_ids=None, q_offset=None,
                    sm_scale: float | None = None, interpret: bool = False, block_sizes: BlockSizes | None = None):
    """Attention [B, T, Hq, D] for q [B, T, Hq, D], k/v [B, S, Hkv, D], segment_ids int [B, T] or None.

    Same semantics as `ovjax.kernels.reference.mha_reference`. Self-attention (S == T) unless `q_offset` is
    given: then q holds the queries at global positions q_offset .. q_offset + T - 1 (an int or an int32
    scalar, may be traced) of a sequence whose S keys are all in k/v, `kv_segment_ids` [B, S] are the keys'
    segment ids (needed with segment_ids when S != T), and the result equals `mha_reference` with
    q_positions = q_offset + arange(T), kv_positions = arange(S). float32 or bfloat16 inputs (float32: dots at
    full precision, no TF32), float32 accumulation; differentiable in q, k, v. `interpret=True` runs the
    kernels in the Pallas interpreter (CPU tests).
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"expected q [B, T, Hq, D] and k/v [B, S, Hkv, D], got {q.shape} and {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")
    b, t, hq, d = q.shape
    s = k.shape[1]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch or head_dim")
    if s != t and q_offset is None:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape}: self-attention needs S == T; pass q_offset for "
                         f"a query shard against the full keys")
    if hq % k.shape[2]:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, ids, n in (("segment_ids", segment_ids, t), ("kv_segment_ids", kv_segment_ids, s)):
        if ids is not None and (ids.shape != (b, n) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise ValueError(f"{name} must be integer [B, {'T' if n == t else 'S'}] = {(b, n)}, got {ids.dtype} "
                             f"{ids.shape}")
    if (segment_ids is None) != (kv_segment_ids is None) and (kv_segment_ids is not None or s != t):
        raise ValueError("pass both segment_ids and kv_segment_ids, or neither (S != T)")
    blocks = default_block_sizes(q.dtype) if block_sizes is None else block_sizes
    blocks.validate()
    blocks = blocks.clipped(t, s)
    tp = -(-t // max(blocks.query_blocks())) * max(blocks.query_blocks())
    sp = -(-s // max(blocks.key_blocks())) * max(blocks.key_blocks())
    dp = _padded_head_dim(d)
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    use_segments = segment_ids is not None
    seg_q = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg_k = seg_q if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    if tp != t or dp != d:
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, dp - d)))
        seg_q = jnp.pad(seg_q, ((0, 0), (0, tp - t)), mode="edge")
    if sp != s or dp != d:
        k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, dp - d))) for x in (k, v))
        seg_k = jnp.pad(seg_k, ((0, 0), (0, sp - s)), mode="edge")
    offset = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32)
    if offset.shape != ():
        raise ValueError(f"q_offset must be a scalar, got shape {offset.shape}")
    cfg = _Config(causal=bool(causal), sm_scale=scale, kv_len=s, padded_len=sp, use_segments=use_segments,
                  blocks=blocks, interpret=bool(interpret))
    out = _flash(q, k, v, seg_q, seg_k, offset, cfg)
    return out[:, :t, :, :d]
