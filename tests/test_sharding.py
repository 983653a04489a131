"""Mesh construction, the rule table's fallbacks, clear errors, and that parameters are sharded (<= 2% of
bytes not split over every non-data device) for the tiny and 8b presets. Abstract shapes: nothing allocated."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from ovjax import sharding
from ovjax.configs import stage1_5
from ovjax.configs.models import preset
from ovjax.models import vlm
from ovjax.train import optim
from ovjax.train import state as state_lib


def mesh(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def test_mesh_shape_fills_and_refuses():
    assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2, sequence=1), 8) == (2, 2, 2, 1)
    assert sharding.mesh_shape(dict(data=1, fsdp=8, tensor=1, sequence=1), 8) == (1, 8, 1, 1)
    with pytest.raises(sharding.ShardingError, match="8 devices are not divisible by 3"):
        sharding.mesh_shape(dict(data=3, fsdp=-1, tensor=1, sequence=1), 8)
    with pytest.raises(sharding.ShardingError, match="has 4 devices but there are 8"):
        sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1, sequence=1), 8)
    with pytest.raises(sharding.ShardingError, match="only one mesh axis may be -1"):
        sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1, sequence=1), 8)
    with pytest.raises(sharding.ShardingError, match="mesh.tensor must be"):
        sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=0, sequence=1), 8)


def test_make_mesh_axes_are_auto():
    m = mesh((1, 2, 2, 2))
    assert m.axis_names == sharding.MESH_AXES
    assert dict(m.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}
    assert tuple(m.axis_types) == (AxisType.Auto,) * 4


def test_rule_fallbacks():
    m = mesh((1, 2, 4, 1))
    # GQA with 2 kv heads on tensor=4: kv_heads cannot take `tensor`, head_dim does
    assert sharding.resolve(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), m) == \
        P(None, "fsdp", None, "tensor")
    assert sharding.resolve(("layers", "embed", "q_heads", "head_dim"), (2, 64, 4, 16), m) == \
        P(None, "fsdp", "tensor", None)
    # size-1 axes are never named; embed takes (fsdp, sequence) together when both are > 1
    m2 = mesh((1, 2, 1, 4))
    assert sharding.resolve(("vocab", "embed"), (160, 64), m2) == P(None, ("fsdp", "sequence"))
    # 60 does not divide fsdp x sequence = 8 but divides fsdp = 2 (the next fallback)
    assert sharding.resolve(("vocab", "embed"), (160, 60), m2) == P(None, "fsdp")
    # nothing divides: stays unsharded (counted by sharding_stats, never an uneven param sharding)
    assert sharding.resolve(("embed",), (7,), m2) == P(None)


@pytest.mark.parametrize("name", ["tiny", "8b"])
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (1, 2, 4, 1)], ids=["fsdp8", "fsdp2-tensor4"])
def test_params_sufficiently_sharded(name, shape):
    m = mesh(shape)
    boxed = vlm.abstract_params(preset(name), boxed=True)
    params = sharding.unbox(boxed)
    shards = sharding.param_shardings(boxed, m)
    st = sharding.sharding_stats(params, shards, m)
    assert st["not_fully_sharded_fraction"] <= 0.02, st["partial"][:5]
    # per-device bytes over the ideal total/8: small 1-D biases and norms stay partly replicated
    assert st["excess"] <= 0.025
    # nothing big stays whole: every array above 1% of the bytes is split over all 8 devices
    for path, b, spec in st["partial"]:
        assert b < 0.01 * st["total_bytes"], (path, spec)
    sharding.check_divisible(params, shards)


def test_optimizer_state_follows_params_and_frozen_has_none():
    cfg = stage1_5.get_config("8b")
    setup = state_lib.build(cfg, mesh((1, 2, 4, 1)))
    flat_shards = optim.flat(setup.shardings.params)
    n_moments = 0
    flat_state = jax.tree_util.tree_flatten_with_path(setup.abstract.opt_state)[0]
    for (path, leaf), shard in zip(flat_state, jax.tree_util.tree_leaves(setup.shardings.opt_state)):
        assert leaf.dtype == np.float32 or leaf.ndim == 0
        if not leaf.ndim:
            continue
        n_moments += 1
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        owner = next("/".join(keys[i:]) for i in range(len(keys)) if "/".join(keys[i:]) in flat_shards)
        assert shard.spec == flat_shards[owner].spec, owner
        assert owner not in ("visual/class_embedding", "visual/class_pos_emb")  # frozen in stage 1.5
    assert n_moments == 2 * len(setup.trainable)  # mu and nu of every trainable param, nothing else
    opt_bytes = sharding.per_device_bytes(setup.abstract.opt_state, setup.shardings.opt_state)
    param_bytes = sharding.per_device_bytes(setup.abstract.params, setup.shardings.params)
    assert abs(opt_bytes / param_bytes - 2.0) < 0.01  # fp32 mu + nu, sharded like the params


def test_batch_and_divisibility_errors():
    m = mesh((2, 2, 1, 2))
    ok = {"tokens": np.zeros((8, 16), np.int32), "patches": np.zeros((8, 12, 588), np.float32)}
    s = sharding.batch_shardings(ok, m, micro_batches=2)
    assert s["tokens"].spec == P(("data", "fsdp"), "sequence") and s["patches"].spec == P(("data", "fsdp"), None, None)
    with pytest.raises(sharding.ShardingError, match=r"batch\['tokens'\]: 2 rows per micro-batch do not divide .* = 4"):
        sharding.batch_shardings(ok, m, micro_batches=4)
    with pytest.raises(sharding.ShardingError, match=r"seq_len 15 does not divide mesh axis sequence=2"):
        sharding.batch_shardings({"tokens": np.zeros((8, 15), np.int32)}, m)
    bad = {"w": jax.ShapeDtypeStruct((6, 4), np.float32)}
    with pytest.raises(sharding.ShardingError, match=r"w: dim 0 \(size 6\) does not divide mesh axes .*size 4"):
        sharding.check_divisible(bad, {"w": jax.sharding.NamedSharding(m, P(("data", "fsdp")))})


def test_layout_report_names_the_mesh():
    cfg = stage1_5.get_config("tiny")
    setup = state_lib.build(cfg, mesh((1, 2, 4, 1)))
    text = state_lib.report(setup)
    assert "devices 8" in text and "mesh data=1 x fsdp=2 x tensor=4 x sequence=1" in text
    assert "optimizer state" in text
