"""The tiny model with attention_impl="pallas" (interpreted) on 8 fake devices: loss and gradients on the
meshes (data, fsdp, tensor, sequence) = (1,8,1,1), (2,2,2,1), (1,2,2,2), (1,1,2,4) equal the one-device run,
on packed rows whose samples straddle the sequence-shard boundaries (T=64: shards of 32 or 16 tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from ovjax import sharding
from ovjax.configs import models as model_configs
from ovjax.models.vlm import VLM, abstract_params, freeze, init_params, patch_positions
from tests.kernels.test_model_pallas import PIX, assert_grads_close, loss_fn

FAST = {"xla_backend_optimization_level": 0}
ROWS, SEQ, PATCHES, IMAGES = 8, 64, 64, 4


def packed_rows(cfg, seed=0):
    """ROWS packed rows of SEQ tokens: 2-5 samples each (text, some with one image), then padding."""
    rs = np.random.RandomState(seed)
    out = {k: np.zeros((ROWS,) + s, d) for k, s, d in (
        ("tokens", (SEQ,), np.int32), ("positions", (SEQ,), np.int32), ("segment_ids", (SEQ,), np.int32),
        ("patches", (PATCHES, PIX), np.float32), ("patch_segment", (PATCHES,), np.int32),
        ("patch_hw", (PATCHES, 2), np.int32))}
    for r in range(ROWS):
        at, pat, img = 0, 0, 0
        for sample in range(1, 6):
            tok = list(rs.randint(0, 140, rs.randint(3, 14)))
            grid = [(2, 2), (2, 4), (4, 4), None][rs.randint(4)]
            if grid is not None:
                tok += [cfg.vision_start_token_id] + [cfg.image_token_id] * (grid[0] * grid[1] // 4)
                tok += [cfg.vision_end_token_id]
            n_patch = 0 if grid is None else grid[0] * grid[1]
            if at + len(tok) > SEQ - 2 or pat + n_patch > PATCHES or img == IMAGES:
                break
            if grid is not None:
                img += 1
                out["patches"][r, pat:pat + n_patch] = rs.randn(n_patch, PIX)
                out["patch_segment"][r, pat:pat + n_patch] = img
                out["patch_hw"][r, pat:pat + n_patch] = patch_positions((1, *grid))
                pat += n_patch
            out["tokens"][r, at:at + len(tok)] = tok
            out["positions"][r, at:at + len(tok)] = np.arange(len(tok))
            out["segment_ids"][r, at:at + len(tok)] = sample
            at += len(tok)
        assert out["segment_ids"][r].max() >= 2 and out["segment_ids"][r, -1] == 0
    return {k: jnp.asarray(v) for k, v in out.items()}


def straddles(segment_ids, shard):
    """Number of (row, boundary) pairs where one sample continues across a shard boundary."""
    s = np.asarray(segment_ids)
    b = np.arange(shard, s.shape[1], shard)
    return int(((s[:, b - 1] == s[:, b]) & (s[:, b] > 0)).sum())


def value_and_grad(cfg, mesh=None):
    """(params, batch) -> (loss, grads); on a mesh, under the activation rules (as the train step runs)."""
    def loss(params, batch):
        fn = loss_fn(VLM(freeze(cfg)), batch, num_images=IMAGES)
        if mesh is None:
            return fn(params)
        with sharding.activation_rules(mesh):
            return fn(params)
    return jax.value_and_grad(loss)


@pytest.fixture(scope="module")
def setup():
    cfg = model_configs.preset("tiny")
    cfg.attention_impl = "pallas"
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(0))
    batch = packed_rows(cfg)
    one = jax.jit(value_and_grad(cfg)).lower(params, batch).compile(compiler_options=FAST)(params, batch)
    return cfg, params, batch, one


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 2, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sharded_pallas_model_equals_one_device(setup, shape):
    cfg, params, batch, (loss_1, grad_1) = setup
    if shape[3] > 1:
        assert straddles(batch["segment_ids"], SEQ // shape[3]) >= ROWS  # the boundaries cut samples
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:8])
    param_shards = sharding.param_shardings(abstract_params(cfg, boxed=True), mesh)
    token_names = {"tokens", "positions", "segment_ids"}
    batch_shards = {k: NamedSharding(mesh, sharding.resolve(
        ("act_batch", "act_seq" if k in token_names else None) + (None,) * (v.ndim - 2), v.shape, mesh))
        for k, v in batch.items()}
    p = jax.device_put(params, param_shards)
    b = jax.device_put(batch, batch_shards)
    step = jax.jit(value_and_grad(cfg, mesh), in_shardings=(param_shards, batch_shards))
    loss_n, grad_n = step.lower(p, b).compile(compiler_options=FAST)(p, b)
    assert abs(float(loss_n) - float(loss_1)) <= 1e-5 * abs(float(loss_1)), (float(loss_n), float(loss_1))
    assert len(assert_grads_close(grad_1, grad_n)) > 0
