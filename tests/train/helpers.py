"""Shared set-up for the train tests: a tiny run config, meshes over the fake CPU devices, host copies."""

import jax
import numpy as np

from ovjax import sharding
from ovjax.configs import stage1, stage1_5
from ovjax.train import state as state_lib, step as step_lib
from ovjax.train.synthetic_batch import synthetic_batch

# Backend optimisation off: the SPMD partitioner still runs in full, compiles take ~3x less time on CPU.
FAST = {"xla_backend_optimization_level": 0}
B, T, P, M = 8, 64, 64, 4


def tiny_config(stage: str = "1.5", micro_batches: int = 1):
    cfg = (stage1 if stage == "1" else stage1_5).get_config("tiny")
    cfg.optim.lr = 1e-3
    cfg.train.update(dict(batch_size=B, seq_len=T, max_patches=P, max_images=M, micro_batches=micro_batches,
                          loss_chunk=16))
    return cfg


def mesh_of(shape):
    n = int(np.prod(shape))
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:n])


def batches(cfg, n: int):
    from ovjax.models.vlm import freeze
    return [synthetic_batch(freeze(cfg.model), B, T, P, M, seed=100 + i) for i in range(n)]


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x), tree)


def run(cfg, shape, host_batches, seed: int = 0, params=None):
    """-> (host params at init, [metrics per step], host params after the steps, setup, final state).
    params: host params to start from (placed onto the mesh); None = sharded random init from `seed`.

    The step and the random init are `step.build(setup, ...)`'s, the very objects `python -m ovjax train`
    runs (ovjax/train/loop.py), compiled ahead of time here to read their HLO."""
    setup = state_lib.build(cfg, mesh_of(shape))
    step = step_lib.build(setup, compiler_options=FAST)
    state = step.init(seed) if params is None else state_lib.state_from_params(setup, params)
    init = host(state.params)
    compiled = step.lower().compile()
    metrics = []
    for b in host_batches:
        state, m = compiled(state, step.put(b), step.flag(False))
        metrics.append({k: float(v) for k, v in m.items()})
    run.last_hlo = compiled.as_text()
    return init, metrics, host(state.params), setup, state
