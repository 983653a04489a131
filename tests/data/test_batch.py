"""ovjax.data.batch: the contract's shapes, the row writer, and the shardings derived from its logical axes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ovjax import sharding
from ovjax.configs.models import preset
from ovjax.data import batch


def test_shapes_and_keys():
    s = batch.shapes(2, 16, 8)
    assert list(s) == ["tokens", "targets", "loss_mask", "segment_ids", "positions", "patches", "patch_segment",
                       "patch_hw"]
    assert s["tokens"] == ((2, 16), np.dtype(np.int32)) and s["loss_mask"] == ((2, 16), np.dtype(bool))
    assert s["patches"] == ((2, 8, 588), np.dtype(np.float32)) and s["patch_hw"] == ((2, 8, 2), np.dtype(np.int32))
    assert batch.shapes(2, 16, 8, patch_dtype=np.uint8)["patches"][1] == np.uint8
    assert list(batch.shapes(1, 4, None)) == list(batch.TOKEN_KEYS)  # text-only: no image fields
    assert batch.TOKEN_KEYS == ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    assert batch.IMAGE_KEYS == ("patches", "patch_segment", "patch_hw")
    cfg = preset("tiny")
    st = batch.struct(cfg, 3, 32, 12)
    assert st["patches"].shape == (3, 12, 588) and st["tokens"].dtype == np.int32
    cfg.vision = None
    assert set(batch.struct(cfg, 3, 32, 12)) == set(batch.TOKEN_KEYS)


def test_row_writer_hand_case():
    w = batch.RowWriter(10, 12, patch_dim=3)
    w.add_sample([5, 6, 7, 8], [False, False, True, True])
    w.add_image(np.arange(24, dtype=np.float32).reshape(8, 3), (1, 2, 4))
    w.add_sample([9, 10, 11])  # nothing supervised
    row = w.row()
    np.testing.assert_array_equal(row["tokens"], [5, 6, 7, 8, 9, 10, 11, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [6, 7, 8, 0, 10, 11, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["patch_segment"], [1] * 8 + [0] * 4)
    np.testing.assert_array_equal(row["patch_hw"], [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
                                  + [(0, 0)] * 4)
    np.testing.assert_array_equal(row["patches"][:8].reshape(-1), np.arange(24))
    assert not row["patches"][8:].any()
    assert (w.samples, w.tokens_used, w.supervised, w.images, w.patches_used) == (2, 7, 2, 1, 8)


def test_row_writer_numbers_images_after_first_image():
    w = batch.RowWriter(4, 8, patch_dim=1, first_image=5)
    w.add_image(np.ones((4, 1), np.float32), (1, 2, 2))
    w.add_image(np.ones((4, 1), np.float32), (1, 2, 2))
    np.testing.assert_array_equal(w.row()["patch_segment"], [6] * 4 + [7] * 4)


def test_row_writer_errors():
    w = batch.RowWriter(4, 4, patch_dim=1)
    w.add_sample([1, 2, 3])
    with pytest.raises(batch.BatchError, match="more than seq_len=4 tokens"):
        w.add_sample([4, 5])
    with pytest.raises(batch.BatchError, match="more than max_patches=4 patches"):
        w.add_image(np.zeros((8, 1), np.float32), (1, 2, 4))
    with pytest.raises(batch.BatchError, match="3 patch rows for an image of grid"):
        w.add_image(np.zeros((3, 1), np.float32), (1, 2, 2))
    with pytest.raises(batch.BatchError, match="does not match tokens"):
        batch.RowWriter(4, 4).add_sample([1, 2], [True])
    with pytest.raises(batch.BatchError, match="text-only"):
        batch.RowWriter(4, None).add_image(np.zeros((4, 588), np.float32), (1, 2, 2))


def test_batch_shardings_come_from_the_logical_axes():
    m = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}, jax.devices()[:8])
    s = sharding.batch_shardings(batch.struct(preset("tiny"), 8, 16, 12), m)
    for k in batch.TOKEN_KEYS:
        assert s[k].spec == P(("data", "fsdp"), "sequence"), k
    assert s["patches"].spec == P(("data", "fsdp"), None, None)
    assert s["patch_segment"].spec == P(("data", "fsdp"), None)
    assert s["patch_hw"].spec == P(("data", "fsdp"), None, None)
    with pytest.raises(sharding.ShardingError, match=r"batch\['pixels'\] is not a field"):
        sharding.batch_shardings({"pixels": np.zeros((8, 4))}, m)
    with pytest.raises(sharding.ShardingError, match=r"batch\['tokens'\] has shape \(8,\)"):
        sharding.batch_shardings({"tokens": np.zeros((8,))}, m)


def test_micro_batch_shardings_prepend_an_unsharded_axis():
    m = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}, jax.devices()[:8])
    s = sharding.micro_batch_shardings(sharding.batch_shardings(batch.struct(preset("tiny"), 8, 16, 12), m, 2))
    assert s["tokens"].spec == P(None, ("data", "fsdp"), "sequence")
    assert s["patches"].spec == P(None, ("data", "fsdp"), None, None)
    for k in batch.BATCH_KEYS:
        assert s[k].spec[0] is None and len(s[k].spec) == len(batch.FIELD[k].dims) + 1, k
