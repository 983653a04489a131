"""The train state (one pytree) and its sharded creation.

TrainState: step int32 (), params (the whole model, float32 unless model.param_dtype or, for the frozen
ones, optim.frozen_dtype says otherwise),
opt_state (optax state over the trainable params only; float32, Adam's first moment bf16 with
optim.mu_dtype=bfloat16). Compute dtype is model.dtype (bf16 for the big presets): the model casts weights
per matmul, params and optimizer state stay float32.

optim.offload="opt_state": the optimizer state's shardings have memory kind `pinned_host`, so between steps
the moments live in host memory; the step (ovjax/train/step.py) copies them to the device for the update
and back. Only the optimizer state: the params are read by the forward pass, so keeping them on the host
between steps would not lower the step's peak.

`Setup` holds everything static about a run that the step and the checkpointer need: the mesh, the
optimizer, the trainable paths, the abstract state and its shardings. Building it allocates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovjax import sharding
from ovjax.config import ConfigError
from ovjax.models import vlm
from ovjax.train import optim
from ovjax.train.config import OFFLOAD


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Setup:
    cfg: ml_collections.ConfigDict          # the whole run config
    model_cfg: ml_collections.FrozenConfigDict
    mesh: Mesh
    tx: Any                                  # optax transformation over the trainable params
    schedules: dict[str, Callable]           # {group: lr(count)}
    trainable: tuple[str, ...]               # slash paths of the trainable params
    abstract: TrainState                     # ShapeDtypeStruct leaves
    shardings: TrainState                    # NamedSharding leaves
    param_names: Any                         # logical names per param

    def abstract_with_shardings(self) -> TrainState:
        """The restore target of a checkpoint onto this mesh (lesson 15)."""
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      self.abstract, self.shardings)


def build(cfg, mesh: Mesh) -> Setup:
    """Abstract state, shardings and optimizer for `cfg` (sections model, optim, train) on `mesh`."""
    model_cfg = vlm.freeze(cfg.model)
    boxed = vlm.abstract_params(model_cfg, boxed=True)
    params_abs = sharding.unbox(boxed)
    param_shards = sharding.param_shardings(boxed, mesh)
    paths = optim.trainable_paths(params_abs, cfg.optim)
    params_abs = optim.with_frozen_dtype(params_abs, paths, optim.frozen_dtype(cfg.optim))
    trainable_abs, _ = optim.split(params_abs, paths)
    tx, schedules = optim.make_optimizer(cfg.optim, trainable_abs, int(cfg.train.steps))
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    trainable_shards, _ = optim.split(param_shards, paths)
    opt_shards = sharding.match_shardings(opt_abs, trainable_abs, trainable_shards, mesh)
    if offloads_opt_state(cfg):
        kind = host_memory_kind()
        opt_shards = jax.tree_util.tree_map(lambda s: s.with_memory_kind(kind), opt_shards)
    replicated = NamedSharding(mesh, P())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs, opt_state=opt_abs)
    shards = TrainState(step=replicated, params=param_shards, opt_state=opt_shards)
    return Setup(cfg=cfg, model_cfg=model_cfg, mesh=mesh, tx=tx, schedules=schedules, trainable=tuple(paths),
                 abstract=abstract, shardings=shards, param_names=sharding.logical_names(boxed))


def offloads_opt_state(cfg) -> bool:
    """optim.offload -> whether the optimizer state lives in host memory; ConfigError for another value."""
    v = cfg.optim.get("offload", "none")
    if v not in OFFLOAD:
        raise ConfigError(f"optim.offload must be one of {OFFLOAD}, got {v!r}")
    return v == "opt_state"


def host_memory_kind(device=None) -> str:
    """"pinned_host" where `device` (default: the first) can address it; else ConfigError."""
    device = device or jax.devices()[0]
    kinds = [m.kind for m in device.addressable_memories()]
    if "pinned_host" not in kinds:
        raise ConfigError(f"optim.offload=opt_state needs memory kind pinned_host; {device.platform} devices "
                          f"address {kinds}")
    return "pinned_host"


def device_shardings(tree):
    """Shardings with memory kind `device` (where a host-offloaded state is computed on)."""
    return jax.tree_util.tree_map(lambda s: s.with_memory_kind("device"), tree)


def _fresh(setup: Setup, params) -> TrainState:
    # params take the state's dtypes (frozen params may be held in bf16: optim.frozen_dtype)
    params = jax.tree_util.tree_map(lambda p, a: p.astype(a.dtype), params, setup.abstract.params)
    trainable, _ = optim.split(params, list(setup.trainable))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(trainable))


def make_init(setup: Setup):
    """jit(rng) -> a random TrainState, every array created in its sharding (never a full copy on one host)."""
    def init(key):
        return _fresh(setup, sharding.unbox(vlm.init_params(setup.model_cfg, key, boxed=True)))
    # XLA:CPU spends ~20 s optimising the tiny model's random init; it runs once, so skip the optimiser there.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(init, out_shardings=setup.shardings, compiler_options=opts)


def init_state(setup: Setup, rng) -> TrainState:
    """Random init (see make_init)."""
    return make_init(setup)(rng)


def state_from_params(setup: Setup, params) -> TrainState:
    """A fresh state (step 0, zero moments) around given params (an imported or previous-stage model).
    Host (numpy) params are placed shard by shard via the jit's in_shardings."""
    sharding.check_divisible(params, setup.shardings.params)
    return jax.jit(lambda p: _fresh(setup, p), in_shardings=(setup.shardings.params,),
                   out_shardings=setup.shardings)(params)


def report(setup: Setup) -> str:
    """Layout lines to print at start: processes, devices, mesh, per-device param and optimizer bytes."""
    return sharding.layout_report(setup.mesh, setup.abstract.params, setup.shardings.params,
                                  setup.abstract.opt_state, setup.shardings.opt_state)
