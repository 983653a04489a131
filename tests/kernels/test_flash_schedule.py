"""Block classification of the flash kernel against a brute-force dense mask.

'empty' must never hide a visible key, 'full' must never skip a needed mask; with contiguous packing and
ids < 32 the classification is exact, so blocks without visible keys are really skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from ovjax.kernels.flash_attention import BlockSizes, _block_classes, _Config, _schedule


def dense_mask(seg, causal, kv_len):
    """Boolean [B, Tp, Tp]: query t sees key s (same id, s < kv_len, and s <= t if causal)."""
    tp = seg.shape[1]
    m = seg[:, :, None] == seg[:, None, :]
    m &= (np.arange(tp) < kv_len)[None, None, :]
    if causal:
        m &= np.tril(np.ones((tp, tp), bool))[None]
    return m


def block_truth(mask, bq, bk):
    b, tp, _ = mask.shape
    blocks = mask.reshape(b, tp // bq, bq, tp // bk, bk)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


def config(causal, kv_len, tp):
    return _Config(causal=causal, sm_scale=1.0, kv_len=kv_len, padded_len=tp, use_segments=True,
                   blocks=BlockSizes(16, 16, 16, 16, 16, 16), interpret=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bq, bk", [(16, 32), (32, 16)])
def test_classes_are_safe_for_any_ids(causal, bq, bk):
    rng = np.random.default_rng(bq + bk + causal)
    tp, kv_len = 128, 117
    seg = rng.choice([-3, 0, 5, 37, 69, 2], size=(3, tp)).astype(np.int32)  # 5, 37, 69 collide mod 32
    seg[:, kv_len:] = seg[:, kv_len - 1: kv_len]  # edge padding, as flash_attention pads
    cls = np.asarray(_block_classes(jnp.asarray(seg), bq, bk, config(causal, kv_len, tp)))
    any_visible, all_visible = block_truth(dense_mask(seg, causal, kv_len), bq, bk)
    assert not (any_visible & (cls == 2)).any(), "a block with visible keys was classified empty"
    assert not (~all_visible & (cls == 0)).any(), "a block needing a mask was classified full"


@pytest.mark.parametrize("causal", [False, True])
def test_classes_are_exact_for_contiguous_packing(causal):
    tp, kv_len, bq, bk = 192, 180, 32, 16
    lengths = [40, 1, 3, 60, 17, 59]  # sums to 180, then padding
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    seg = np.concatenate([seg, np.full(tp - kv_len, seg[-1])])[None]
    cls = np.asarray(_block_classes(jnp.asarray(seg), bq, bk, config(causal, kv_len, tp)))
    any_visible, all_visible = block_truth(dense_mask(seg, causal, kv_len), bq, bk)
    np.testing.assert_array_equal(cls == 2, ~any_visible)
    np.testing.assert_array_equal(cls == 0, all_visible)
    skipped = (cls == 2).mean()
    assert skipped > (0.5 if causal else 0.4), f"only {skipped:.0%} of the blocks are skipped"


def test_schedule_lists_full_then_partial_blocks():
    classes = jnp.asarray(np.array([[[1, 0, 2, 0, 1], [2, 2, 2, 2, 0]]], np.int32))
    sched = np.asarray(_schedule(classes))
    np.testing.assert_array_equal(sched[0, 0], [2, 4, 1, 3, 0, 4, 2])
    np.testing.assert_array_equal(sched[0, 1], [1, 1, 4, 0, 1, 2, 3])
