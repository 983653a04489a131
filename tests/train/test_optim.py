"""Schedules, trainable masks, per-group learning rates and weight-decay masks (small trees, no model)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ovjax.configs import stage1, stage1_5, stage2
from ovjax.train import optim
from ovjax.train.config import optim_config


def test_schedule_values():
    lr = optim.schedule(1e-3, 1e-5, warmup=2, total_steps=10)
    np.testing.assert_allclose(float(lr(0)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(1)), 1e-3, rtol=1e-6)
    # cosine over the 8 updates after warmup: halfway (count 5) is the mean of peak and floor
    np.testing.assert_allclose(float(lr(5)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(9)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(50)), 1e-5, rtol=1e-6)


def test_stage_recipes():
    s1, s15, s2 = stage1.get_config("4b"), stage1_5.get_config("8b"), stage2.get_config("4b")
    assert (s1.optim.lr, s1.optim.weight_decay, s1.optim.b2, s1.train.batch_size, s1.train.steps) == (1e-4, 0.0, 0.99, 8, 2500)
    assert (s15.optim.lr, s15.optim.weight_decay, s15.optim.b2, s15.train.batch_size, s15.train.steps) == (1e-5, 0.01, 0.95, 16, 20000)
    assert (s2.optim.lr, s2.optim.weight_decay, s2.optim.b2, s2.train.batch_size, s2.train.steps) == (1e-5, 0.0, 0.99, 224, 3500)
    for c in (s1, s15, s2):
        assert (c.optim.eps, c.optim.clip_norm, c.optim.warmup_fraction, c.optim.min_lr) == (1e-5, 1.0, 0.002, 1e-6)
        assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", "full")
    assert tuple(s1.optim.trainable) == ("merger",)
    assert optim.warmup_steps(s1.optim, 2500) == 5 and optim.warmup_steps(s15.optim, 20000) == 40


PARAMS = {"visual": {"blocks": {"fc1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
                     "class_embedding": jnp.ones((3,))},
          "merger": {"fc1": {"kernel": jnp.ones((3, 3))}, "ln_q": {"scale": jnp.ones((3,))}},
          "language_model": {"embed_tokens": jnp.ones((4, 3)), "lm_head": jnp.ones((3, 4))}}


def cfg(**kw):
    c = optim_config(lr=1e-2, min_lr=1e-2, warmup_steps=1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
    c.update(kw)
    return c


def test_trainable_paths_and_errors():
    c = cfg(trainable=("visual", "merger"), frozen=("visual/class_embedding",))
    assert optim.trainable_paths(PARAMS, c) == ["merger/fc1/kernel", "merger/ln_q/scale", "visual/blocks/fc1/bias",
                                                "visual/blocks/fc1/kernel"]
    with pytest.raises(ValueError, match="optim.trainable prefix 'vision' matches no parameter"):
        optim.trainable_paths(PARAMS, cfg(trainable=("vision",)))
    with pytest.raises(ValueError, match="no parameter is trainable"):
        optim.trainable_paths(PARAMS, cfg(trainable=("merger",), frozen=("merger",)))


def test_group_learning_rates():
    c = cfg()
    c.groups.visual = 1e-4
    c.groups["visual/blocks/fc1/bias"] = 3e-4  # longest prefix wins
    tx, scheds = optim.make_optimizer(c, PARAMS, total_steps=10)
    assert sorted(scheds) == ["default", "visual", "visual/blocks/fc1/bias"]
    grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 1e-3), PARAMS)  # global norm < 1: no clipping
    upd, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    # Adam's first update is -lr * g / (|g| + eps) = -lr (to 1e-5 relative)
    np.testing.assert_allclose(upd["visual"]["blocks"]["fc1"]["kernel"], -1e-4, rtol=1e-4)
    np.testing.assert_allclose(upd["visual"]["blocks"]["fc1"]["bias"], -3e-4, rtol=1e-4)
    np.testing.assert_allclose(upd["merger"]["fc1"]["kernel"], -1e-2, rtol=1e-4)


def test_global_norm_clipping():
    tx, _ = optim.make_optimizer(cfg(), PARAMS, total_steps=10)
    big = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 10.0), PARAMS)
    _, st = tx.update(big, tx.init(PARAMS), PARAMS)
    mu = optax.tree_utils.tree_get(st, "mu")
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(PARAMS))
    assert n == 48
    # clipped to global norm 1: every entry 10 / (10 sqrt(n)); mu = (1 - b1) * clipped grad
    for m in jax.tree_util.tree_leaves(mu):
        np.testing.assert_allclose(np.asarray(m), 0.1 / np.sqrt(48), rtol=1e-5)


def test_weight_decay_only_on_matrices():
    c = cfg(weight_decay=0.5)
    tx, _ = optim.make_optimizer(c, PARAMS, total_steps=10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    upd, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(upd["merger"]["fc1"]["kernel"], -1e-2 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(upd["language_model"]["embed_tokens"], -1e-2 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(upd["merger"]["ln_q"]["scale"], 0.0)
    np.testing.assert_array_equal(upd["visual"]["blocks"]["fc1"]["bias"], 0.0)
    np.testing.assert_array_equal(upd["visual"]["class_embedding"], 0.0)
