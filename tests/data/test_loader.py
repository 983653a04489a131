"""ovjax.data.loader: the packed-batch contract, determinism over worker counts, exact resume, mesh arrays."""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ovjax.data import images, pack, schema
from ovjax.data.loader import LoaderError, PackedLoader, global_counters, normalize_lut
from tests.data.test_pack import write_raw_set


def png(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_packed(out_dir, bins: list[list[dict]], params: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    name = "packed-00000-of-00001.array_record"
    w = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
    for samples in bins:
        w.write(schema.dumps(schema.make_packed(samples)))
    w.close()
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"format": "ovjax-packed", "status": "complete", "parameters": params,
                   "shards": [{"file": name, "records": len(bins)}]}, f)
    return str(out_dir)


# ----------------------------------------------------------------------------------------------- contract

IMG_A, IMG_B = png(28, 56, 1), png(56, 28, 2)  # with min_pixels 784: grids (1, 2, 4) and (1, 4, 2)
PARAMS = {"seq_len": 10, "max_patches": 24, "max_segments": 4, "max_images": 3}


def hand_set(tmp_path) -> str:
    s1 = schema.make_raw("s1", [10, 11, 12, 13], [0, 0, 1, 1], [IMG_A], [[1, 2, 4]])
    s2 = schema.make_raw("s2", [20, 21, 22], [0, 1, 1], [IMG_B], [[1, 4, 2]])
    s3 = schema.make_raw("s3", [30, 31], [0, 1], [], np.zeros((0, 3)))
    return write_packed(tmp_path / "hand", [[s1, s2], [s3]], PARAMS)


def test_batch_contract_on_a_hand_made_set(tmp_path):
    data = hand_set(tmp_path)
    with PackedLoader(data, seq_len=10, max_patches=24, max_images=3, max_segments=4, global_batch_size=2,
                      min_pixels=784, num_epochs=1) as loader:
        batch = next(loader)
        stats = loader.last_stats
        with pytest.raises(StopIteration):
            next(loader)
    r = 0 if batch["tokens"][0, 0] == 10 else 1  # the row order is shuffled
    a, b = (lambda k: batch[k][r]), (lambda k: batch[k][1 - r])
    np.testing.assert_array_equal(a("tokens"), [10, 11, 12, 13, 20, 21, 22, 0, 0, 0])
    np.testing.assert_array_equal(a("targets"), [11, 12, 13, 0, 21, 22, 0, 0, 0, 0])
    np.testing.assert_array_equal(a("loss_mask"), [0, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(a("segment_ids"), [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(a("positions"), [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(a("patch_segment"), [1] * 8 + [2] * 8 + [0] * 8)
    hw_a = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # grid 2x4, 2x2 cells row-major
    hw_b = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]  # grid 4x2
    np.testing.assert_array_equal(a("patch_hw"), hw_a + hw_b + [(0, 0)] * 8)
    pa, _ = images.preprocess(images.decode_image(IMG_A), min_pixels=784)
    pb, _ = images.preprocess(images.decode_image(IMG_B), min_pixels=784)
    assert a("patches").dtype == np.float32
    np.testing.assert_array_equal(a("patches"), np.concatenate([pa, pb, np.zeros((8, 588), np.float32)]))

    np.testing.assert_array_equal(b("tokens"), [30, 31] + [0] * 8)
    np.testing.assert_array_equal(b("targets"), [31] + [0] * 9)
    np.testing.assert_array_equal(b("loss_mask"), [1] + [0] * 9)
    np.testing.assert_array_equal(b("segment_ids"), [1, 1] + [0] * 8)
    np.testing.assert_array_equal(b("positions"), [0, 1] + [0] * 8)
    assert not b("patches").any() and not b("patch_segment").any() and not b("patch_hw").any()
    assert b("patches").shape == (24, 588)

    assert stats == {"rows": 2, "samples": 3, "tokens": 9, "supervised_tokens": 5, "images": 2, "patches": 16}
    c = global_counters(batch)
    assert (int(c["samples"]), int(c["tokens"]), int(c["supervised_tokens"]), int(c["images"])) == (3, 9, 5, 2)


def test_device_normalisation_table_equals_preprocess():
    lut = normalize_lut()
    pixels = np.random.RandomState(0).randint(0, 256, (5, 588)).astype(np.uint8)
    chan = np.repeat(np.arange(3), 196)
    np.testing.assert_array_equal(lut[chan, pixels], images.normalize_uint8(pixels))


def test_loader_refuses_bad_budgets_and_grids(tmp_path):
    data = hand_set(tmp_path)
    with pytest.raises(LoaderError, match="seq_len=10"):
        PackedLoader(data, seq_len=8, max_patches=24, global_batch_size=1)
    with PackedLoader(data, seq_len=10, max_patches=24, global_batch_size=2) as loader:  # default min_pixels
        with pytest.raises(Exception, match="differs from the recorded"):
            next(loader)


# ----------------------------------------------------------------------------------------------- streams


@pytest.fixture(scope="module")
def packed_set(tmp_path_factory):
    """A packed set of 10 rows from 30 raw samples with small JPEG images."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    recs = []
    for k in range(30):
        imgs, grids, toks = [], [], []
        for j in range(int(rng.integers(0, 3))):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
            imgs.append(buf.getvalue())
            g = images.image_grid(h, w)
            grids.append(g)
            toks += [1] + [2] * (g[1] * g[2] // 4) + [3]
        toks += rng.integers(4, 100, int(rng.integers(2, 40))).tolist()
        recs.append(schema.dumps(schema.make_raw(f"r{k}", toks, rng.random(len(toks)) < 0.5, imgs,
                                                 np.asarray(grids, np.int32).reshape(-1, 3))))
    raw = write_raw_set(tmp / "raw", recs, 2)
    m = pack.pack(raw, str(tmp / "packed"), pack.Budgets(128, 96, 8, 4), workers=1, num_shards=2)
    assert m["counts"]["samples_rejected"] == 0
    assert m["counts"]["bins"] == 10, m["counts"]
    return str(tmp / "packed")


KW = dict(seq_len=128, max_patches=96, max_images=4, max_segments=8, seed=3)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def row_ids(batches):
    return [tuple(r[r > 0][:12].tolist()) + (int((r > 0).sum()),) for b in batches for r in b["tokens"]]


def test_epochs_are_reshuffled_permutations(packed_set):
    with PackedLoader(packed_set, global_batch_size=2, **KW) as loader:
        batches = take(loader, 10)  # 2 epochs of 10 rows
    ids = row_ids(batches)
    assert len(set(ids)) == 10
    assert sorted(ids[:10]) == sorted(ids[10:]) and ids[:10] != ids[10:]


def test_same_batches_for_0_1_2_workers_and_exact_resume(packed_set):
    # 10 rows, batches of 4: batch 2 holds the last 2 rows of epoch 0 and the first 2 of epoch 1.
    with PackedLoader(packed_set, global_batch_size=4, **KW) as loader:
        ref = take(loader, 6)
    states = {}
    for k in (0, 1, 2, 3):
        with PackedLoader(packed_set, global_batch_size=4, **KW) as loader:
            take(loader, k)
            states[k] = json.loads(json.dumps(loader.get_state()))
    with PackedLoader(packed_set, global_batch_size=4, worker_count=1, **KW) as loader:
        same(take(loader, 6), ref)
    for k, state in states.items():  # mid-epoch (1), the straddling batch (2), after the boundary (3)
        with PackedLoader(packed_set, global_batch_size=4, **KW) as loader:
            loader.set_state(state)
            same(take(loader, 6 - k), ref[k:])
    with PackedLoader(packed_set, global_batch_size=4, worker_count=2, **KW) as loader:
        same(take(loader, 3), ref[:3])
        loader.set_state(states[2])  # restore a state taken without workers, while workers run
        same(take(loader, 2), ref[2:4])
        assert loader.get_state()["next_batch"] == 4
    with PackedLoader(packed_set, global_batch_size=4, **{**KW, "seed": 4}) as loader:
        with pytest.raises(LoaderError, match="seed"):
            loader.set_state(states[1])


def test_state_round_trips_through_orbax_json(packed_set, tmp_path):
    import orbax.checkpoint as ocp

    with PackedLoader(packed_set, global_batch_size=2, **KW) as loader:
        take(loader, 3)
        state = loader.get_state()
        want = take(loader, 2)
    ckpt = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    ckpt.save(tmp_path / "it", args=ocp.args.JsonSave(state))
    restored = ckpt.restore(tmp_path / "it", args=ocp.args.JsonRestore())
    assert restored == state
    with PackedLoader(packed_set, global_batch_size=2, **KW) as loader:
        loader.set_state(restored)
        same(take(loader, 2), want)


def test_global_arrays_on_a_mesh(packed_set):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with PackedLoader(packed_set, global_batch_size=8, **KW) as loader:
        ref = take(loader, 3)
    with PackedLoader(packed_set, global_batch_size=8, mesh=mesh, **KW) as loader:
        got = take(loader, 3)
        assert (loader.shard_index, loader.shard_count) == (0, 1)
    same(got, ref)
    for k, v in got[0].items():
        assert isinstance(v, jax.Array) and v.shape[0] == 8
        assert v.sharding.spec[0] == ("data", "fsdp"), k
    assert got[0]["patches"].dtype == np.float32 and got[0]["loss_mask"].dtype == bool
    shardings = {k: NamedSharding(mesh, PartitionSpec("data", *[None] * (v.ndim - 1))) for k, v in ref[0].items()}
    with PackedLoader(packed_set, global_batch_size=8, shardings=shardings, **KW) as loader:
        same(take(loader, 1), ref[:1])


def test_batches_arrive_in_the_steps_input_sharding(packed_set):
    """With a mesh the loader shards every field as sharding.batch_shardings does for the step (tokens also
    over `sequence`), so the loop never re-shards a batch."""
    from ovjax import sharding as sharding_lib
    from ovjax.data import batch as batch_lib

    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}, jax.devices()[:8])
    with PackedLoader(packed_set, global_batch_size=8, **KW) as loader:
        ref = take(loader, 2)
    with PackedLoader(packed_set, global_batch_size=8, mesh=mesh, micro_batches=2, **KW) as loader:
        got = take(loader, 2)
    want = sharding_lib.batch_shardings(batch_lib.struct(_tiny(), 8, KW["seq_len"], KW["max_patches"]), mesh, 2)
    same(got, ref)
    for k, v in got[0].items():
        assert v.sharding == want[k], (k, v.sharding, want[k])
    assert got[0]["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), "sequence")


def _tiny():
    from ovjax.configs.models import preset

    return preset("tiny")


class _FakeSharding:
    """What process_rows reads of a sharding: the rows each addressable device holds."""

    def __init__(self, slices):
        self.slices = slices

    def addressable_devices_indices_map(self, shape):
        return {k: (sl,) for k, sl in enumerate(self.slices)}


def test_process_rows_from_the_addressable_block():
    from ovjax.data.loader import process_rows

    # process 1 of 2 over ("data", "fsdp"): its 4 devices hold rows 4..7 of 8
    assert process_rows(_FakeSharding([slice(4, 5), slice(5, 6), slice(6, 7), slice(7, 8)]), 8) == (1, 2)
    # batch sharded over "data" only, replicated over fsdp across processes: same block, same data
    assert process_rows(_FakeSharding([slice(2, 4), slice(2, 4)]), 8) == (1, 4)
    assert process_rows(_FakeSharding([slice(None)]), 8) == (0, 1)
    with pytest.raises(LoaderError, match="contiguous"):
        process_rows(_FakeSharding([slice(0, 2), slice(4, 6)]), 8)
