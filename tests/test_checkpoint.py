"""ovjax.checkpoint: one step holds params, optimizer state, data state and counters; keep policy; restore
onto another mesh; params-only reads for the next stage."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ovjax import checkpoint


class _State:  # what Checkpointer.save reads: .step, .params, .opt_state
    def __init__(self, step, params, opt_state):
        self.step, self.params, self.opt_state = step, params, opt_state


def _mesh(shape, names, devices):
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def _tree(mesh, spec_w, spec_b, scale=1.0):
    w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) * scale
    b = np.linspace(-1, 1, 16, dtype=np.float32) * scale
    params = {"layer": {"kernel": jax.device_put(w, NamedSharding(mesh, spec_w)),
                        "bias": jax.device_put(b, NamedSharding(mesh, spec_b))}}
    opt = {"mu": jax.device_put(w * 0.5, NamedSharding(mesh, spec_w)),
           "count": jax.device_put(np.int32(7), NamedSharding(mesh, P()))}
    return params, opt


def _target(tree, mesh, specs):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                                  tree, specs)


def test_round_trip_onto_another_mesh(tmp_path):
    devs = jax.devices()
    assert len(devs) >= 8, "tests/conftest.py sets 8 fake CPU devices"
    save_mesh = _mesh((8,), ("fsdp",), devs[:8])
    params, opt = _tree(save_mesh, P("fsdp", None), P("fsdp"))
    state = _State(jnp.int32(5), params, opt)
    data_state = {"next_batch": 5, "seed": 0, "nested": {"a": [1, 2]}}
    ck = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=3)
    ck.save(5, state, data_state, {"step": 5, "counters": {"samples_seen": 123}})
    ck.wait()
    assert ck.latest_step() == 5
    ck.close()

    # a 4-device mesh of another shape: data=2 x tensor=2
    new_mesh = _mesh((2, 2), ("data", "tensor"), devs[4:8])
    pt = _target(params, new_mesh, {"layer": {"kernel": P(None, "tensor"), "bias": P("tensor")}})
    ot = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(new_mesh, P())),
          "opt_state": _target(opt, new_mesh, {"mu": P("data", "tensor"), "count": P()})}
    ck2 = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=3)
    out = ck2.restore(5, pt, ot)
    ck2.close()
    k = out["params"]["layer"]["kernel"]
    assert k.sharding == NamedSharding(new_mesh, P(None, "tensor"))
    assert {d.id for d in k.sharding.device_set} == {d.id for d in devs[4:8]}
    np.testing.assert_array_equal(np.asarray(k), np.asarray(params["layer"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(out["opt"]["opt_state"]["mu"]), np.asarray(opt["mu"]))
    assert int(out["opt"]["opt_state"]["count"]) == 7 and int(out["opt"]["step"]) == 5
    assert out["opt"]["opt_state"]["mu"].dtype == np.float32
    assert out["data"] == data_state
    assert out["meta"] == {"step": 5, "counters": {"samples_seen": 123}}


def test_keep_policy_and_params_only(tmp_path):
    mesh = _mesh((8,), ("fsdp",), jax.devices()[:8])
    ck = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        params, opt = _tree(mesh, P("fsdp", None), P(), scale=float(step))
        ck.save(step, _State(jnp.int32(step), params, opt), {"next_batch": step}, {"step": step})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    ck.close()
    # host numpy params, no target: what an evaluation or an export needs
    got = checkpoint.load_params(tmp_path)
    assert isinstance(got["layer"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(got["layer"]["kernel"], np.arange(128, dtype=np.float32).reshape(8, 16) * 3)
    older = checkpoint.load_params(tmp_path, step=2)
    np.testing.assert_array_equal(older["layer"]["bias"], np.linspace(-1, 1, 16, dtype=np.float32) * 2)
    assert checkpoint.read_meta(tmp_path) == {"step": 3}


def test_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
        checkpoint.load_params(tmp_path / "nothing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.load_params(tmp_path / "empty")
    mesh = _mesh((8,), ("fsdp",), jax.devices()[:8])
    params, opt = _tree(mesh, P("fsdp", None), P())
    ck = checkpoint.Checkpointer(tmp_path / "bad", keep=1)
    with pytest.raises(checkpoint.CheckpointError, match="JSON"):
        ck.save(1, _State(jnp.int32(1), params, opt), {"x": object()}, {})
    with pytest.raises(checkpoint.CheckpointError, match="keep"):
        checkpoint.Checkpointer(tmp_path / "k", keep=0)
    ck.close()


def test_data_state_file_per_process(tmp_path):
    mesh = _mesh((8,), ("fsdp",), jax.devices()[:8])
    params, opt = _tree(mesh, P("fsdp", None), P())
    ck = checkpoint.Checkpointer(tmp_path, keep=1, async_save=False)
    ck.save(4, _State(jnp.int32(4), params, opt), {"next_batch": 4}, {})
    ck.close()
    f = tmp_path / "4" / "data" / "process_0-of-1.json"
    assert json.loads(f.read_text()) == {"next_batch": 4}


def test_data_state_restores_onto_another_process_count(tmp_path):
    """A checkpoint written by 2 processes (same global loader state in both files) restores on 1; states
    that differ between the writers are refused, naming the files."""
    mesh = _mesh((8,), ("fsdp",), jax.devices()[:8])
    params, opt = _tree(mesh, P("fsdp", None), P())
    ck = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
    ck.save(4, _State(jnp.int32(4), params, opt), {"next_batch": 4}, {})
    ck.save(5, _State(jnp.int32(5), params, opt), {"next_batch": 5}, {})
    ck.close()
    for step, second in ((4, {"next_batch": 4}), (5, {"next_batch": 7})):
        d = tmp_path / str(step) / "data"
        (d / "process_0-of-1.json").rename(d / "process_0-of-2.json")
        (d / "process_1-of-2.json").write_text(json.dumps(second))
    ck = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
    assert ck.restore(4, params, {"step": jnp.int32(0), "opt_state": opt})["data"] == {"next_batch": 4}
    with pytest.raises(checkpoint.CheckpointError, match=r"differ between the processes .*process_0-of-2.json"):
        ck.restore(5, params, {"step": jnp.int32(0), "opt_state": opt})
    ck.close()
