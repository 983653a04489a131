"""Stage 1 trains the projector only (ViT and LLM bit-identical, no optimizer state for them), and 4
micro-batches give the same step as one batch of the same samples."""

import jax
import numpy as np
import pytest

from ovjax.train import optim
from tests.train.helpers import batches, run, tiny_config


@pytest.fixture(scope="module")
def stage1_runs():
    cfg1, cfg4 = tiny_config("1", micro_batches=1), tiny_config("1", micro_batches=4)
    data = batches(cfg1, 2)
    one = run(cfg1, (1, 1, 1, 1), data)
    # same init params, 4 micro-batches of 2 rows on a (data 2) mesh
    four = run(cfg4, (2, 1, 1, 1), data, params=one[0])
    return one, four


def test_stage1_freezes_vit_and_llm(stage1_runs):
    init, metrics, params, setup, state = stage1_runs[0]
    assert set(setup.trainable) == {p for p in optim.flat(init) if p.startswith("merger/")}
    flat0, flat1 = optim.flat(init), optim.flat(params)
    for path in flat0:
        if path.startswith("merger/"):
            assert np.abs(flat1[path] - flat0[path]).max() > 0, path
        else:
            np.testing.assert_array_equal(flat1[path], flat0[path], err_msg=path)  # bit-identical
    # the optimizer state holds moments for the merger only
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim]
    n_merger = sum(int(np.prod(v.shape)) for k, v in flat0.items() if k.startswith("merger/"))
    assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_merger
    assert all(m["finite"] == 1.0 for m in metrics)


def test_four_micro_batches_equal_one_batch(stage1_runs):
    (_, m1, p1, _, _), (_, m4, p4, _, _) = stage1_runs
    for a, b in zip(m1, m4):
        assert a["supervised_tokens"] == b["supervised_tokens"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-6, atol=1e-7)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-6), p1, p4)
