"""Three steps of the tiny model on five meshes of 8 fake CPU devices == the same steps on one device."""

import re

import jax
import numpy as np
import pytest

from tests.train.helpers import batches, run, tiny_config

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 2, 4)]


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config()
    data = batches(cfg, 3)
    init, metrics, params, _, _ = run(cfg, (1, 1, 1, 1), data)
    return cfg, data, init, metrics, params


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_one_device(reference, shape):
    cfg, data, ref_init, ref_metrics, ref_params = reference
    # One mesh checks that the sharded random init creates the very same numbers as one device; the others
    # start from the reference params (saves an init compile each).
    fresh = shape == (1, 2, 2, 2)
    init, metrics, params, setup, state = run(cfg, shape, data, params=None if fresh else ref_init)
    jax.tree_util.tree_map(np.testing.assert_array_equal, init, ref_init)
    for got, want in zip(metrics, ref_metrics):
        assert got["supervised_tokens"] == want["supervised_tokens"] and got["tokens"] == want["tokens"]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5, atol=1e-6)
        assert got["finite"] == 1.0
    assert ref_metrics[2]["loss"] != ref_metrics[0]["loss"]
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params, ref_init)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the steps did update
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params, ref_params)
    # the state comes back in the shardings the step was built with
    for leaf, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(setup.shardings.params)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    if shape == (1, 8, 1, 1):
        assert_fsdp_gathers_weights(run.last_hlo, init)


def assert_fsdp_gathers_weights(hlo: str, params):
    """Lesson 11b: on an fsdp mesh the partitioner must all-gather weights (per layer), never activations."""
    shapes = set()
    for p in jax.tree_util.tree_leaves(params):
        shapes.add(tuple(p.shape))
        shapes.add(tuple(p.shape[1:]))  # one layer of a stacked (scanned) weight
        shapes.add((1,) + tuple(p.shape[1:]))
    gathered = [tuple(int(d) for d in m.group(1).split(",") if d)
                for m in re.finditer(r"= f32\[([0-9,]*)\]\{[^}]*\} all-gather", hlo)]
    assert len(gathered) >= 10
    not_weights = [g for g in gathered if g not in shapes]
    assert not not_weights, f"all-gathers of non-weight arrays: {not_weights}"
