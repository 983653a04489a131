"""Lighter optimizer state for full fine-tuning on small hardware: optim.mu_dtype=bfloat16 (Adam's first
moment in bf16) and optim.offload=opt_state (the moments in pinned host memory between steps).

Three programs of the tiny stage-1.5 model on a data=1 x fsdp=2 mesh, all from the same initial params:
fp32 (the default), bf16 (mu_dtype=bfloat16) and both (bf16 + offload). bf16 stays within a stated
tolerance of fp32 over 50 steps; offloading only moves bytes, so `both` equals `bf16` bit for bit; `both`
resumes bit for bit from a checkpoint through the run's restore path (ovjax/train/start.py)."""

from __future__ import annotations

import collections
import types

import jax
import numpy as np
import pytest

from ovjax import checkpoint, config, sharding
from ovjax.models.vlm import freeze
from ovjax.train import config as run_config, optim, start as start_lib, state as state_lib, step as step_lib
from ovjax.train.synthetic_batch import synthetic_batch

from .helpers import FAST, M, P, T, host, mesh_of, tiny_config

STEPS = 50          # steps of the fp32 and bf16 runs (4 batches, cyclically)
SAVE, STOP = 4, 8   # `both` saves a checkpoint at SAVE and stops at STOP
MESH = (1, 2, 1, 1)
ROWS = 2            # one row per device (data x fsdp = 2): the ~110 steps take ~1/3 of the time of 8 rows


def _cfg(**optim_fields):
    cfg = tiny_config("1.5")
    cfg.train.update(dict(steps=STEPS, batch_size=ROWS))  # the lr schedule spans the 50 steps
    cfg.optim.update(optim_fields)
    return cfg


def _batches(n: int):
    return [synthetic_batch(freeze(_cfg().model), ROWS, T, P, M, seed=100 + i) for i in range(n)]


def _program(cfg):
    setup = state_lib.build(cfg, mesh_of(MESH))
    step = step_lib.build(setup, compiler_options=FAST)
    return setup, step, step.lower().compile()


def _train(program, state, host_batches, first: int, last: int, on_step=None):
    """Steps first+1..last, step n on batch (n-1) % len -> (state, [loss per step])."""
    _, step, compiled = program
    losses = []
    for n in range(first + 1, last + 1):
        state, m = compiled(state, step.put(host_batches[(n - 1) % len(host_batches)]), step.flag(False))
        losses.append(float(m["loss"]))
        if on_step is not None:
            on_step(n, state)
    return state, losses


def _moments(opt_state):
    """-> (mu leaves, nu leaves) of the Adam states in an optimizer state."""
    adam = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert adam, "no Adam state found"
    return ([x for s in adam for x in jax.tree_util.tree_leaves(s.mu)],
            [x for s in adam for x in jax.tree_util.tree_leaves(s.nu)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = _batches(4)
    programs = {"fp32": _program(_cfg()), "bf16": _program(_cfg(mu_dtype="bfloat16")),
                "both": _program(_cfg(mu_dtype="bfloat16", offload="opt_state"))}
    out = {"programs": programs, "data": data}

    # the one random init, made by the offloaded program's jitted init (opt_state straight into pinned_host)
    state = programs["both"][1].init(0)
    out["init_kinds"] = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(state.opt_state)}
    params0 = host(state.params)

    ckdir = tmp_path_factory.mktemp("light-opt") / "checkpoints"
    ckpt = checkpoint.Checkpointer(ckdir, keep=2)

    def save(n, st):  # as the loop does: asynchronous, mid-run, with the data iterator's position
        if n == SAVE:
            ckpt.save(n, st, {"next_batch": n}, {"step": n, "counters": {}})
    state, out["both"] = _train(programs["both"], state, data, 0, STOP, save)
    ckpt.wait()
    out["both_params"], out["both_state"], out["ckdir"] = host(state.params), state, ckdir

    for name in ("fp32", "bf16"):
        state = state_lib.state_from_params(programs[name][0], params0)
        state, out[name] = _train(programs[name], state, data, 0, STEPS,
                                  lambda n, st: out.update({name + "_params_at_stop": host(st.params)}) if n == STOP
                                  else None)
        out[name + "_state"] = state
    ckpt.close()
    return out


def test_bf16_first_moment_tracks_fp32(runs):
    mu, nu = _moments(runs["bf16_state"].opt_state)
    assert {x.dtype for x in mu} == {np.dtype("bfloat16")} and {x.dtype for x in nu} == {np.dtype("float32")}
    mu32, _ = _moments(runs["fp32_state"].opt_state)
    assert {x.dtype for x in mu32} == {np.dtype("float32")}
    fp32, bf16 = np.array(runs["fp32"]), np.array(runs["bf16"])
    assert len(fp32) == len(bf16) == STEPS and np.isfinite(bf16).all()
    assert fp32[-1] < 0.8 * fp32[0]  # it trains: the comparison is over a moving loss
    assert not np.array_equal(fp32, bf16)  # bf16 mu changes the numbers at all
    # measured on CPU: max relative difference 1.8e-3 (growing slowly, largest at step 50); ~3x margin
    rel = np.abs(bf16 - fp32) / np.abs(fp32)
    assert rel.max() < 5e-3, (rel.max(), int(rel.argmax()) + 1)


def test_offload_keeps_the_moments_in_pinned_host_and_changes_no_bit(runs):
    setup, step, compiled = runs["programs"]["both"]
    n_opt = len(jax.tree_util.tree_leaves(setup.abstract.opt_state))
    assert runs["init_kinds"] == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(runs["both_state"].opt_state)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(runs["both_state"].params)} == {"device"}
    # the same numbers as the bf16 run that keeps its moments on the device: bit for bit
    assert runs["both"] == runs["bf16"][:STOP]
    for a, b in zip(jax.tree_util.tree_leaves(runs["both_params"]),
                    jax.tree_util.tree_leaves(runs["bf16_params_at_stop"])):
        np.testing.assert_array_equal(a, b)
    # the compiled program takes and returns every optimizer leaf in host memory space S(5), the bf16 one none
    entry = {name: prog[2].as_text().split("\n", 1)[0] for name, prog in runs["programs"].items()}
    assert entry["both"].count("S(5)") == 2 * n_opt and "S(5)" not in entry["bf16"]
    # inside, each leaf is moved to the device and back (XLA:CPU lowers these to nothing: one memory)
    jaxpr = jax.make_jaxpr(step_lib.make_step_fn(setup))(setup.abstract_with_shardings(), step.batch_struct,
                                                         jax.ShapeDtypeStruct((), np.bool_))
    moves = collections.Counter(d.memory_kind for e in jaxpr.eqns if e.primitive.name == "device_put"
                                for d in e.params["devices"])
    assert moves == {"device": n_opt, "pinned_host": n_opt}, moves
    # the layout report counts the moments as host bytes
    on_host = sharding.per_device_bytes(setup.abstract.opt_state, setup.shardings.opt_state, "pinned_host")
    assert on_host == sharding.per_device_bytes(setup.abstract.opt_state, setup.shardings.opt_state) > 0
    report = state_lib.report(setup)
    assert f"optimizer state 0.000 GiB per device; optimizer (host) {on_host / 2**30:.3f} GiB" in report, report


def test_resume_with_both_switches_is_bit_exact_and_skips_a_nonfinite_update(runs):
    """Restore step SAVE through `start.initial_state` (what `python -m ovjax train` does in a workdir with
    a checkpoint) into the pinned_host / bf16 targets and train to STOP: the uninterrupted run's losses and
    params, bit for bit. Then the non-finite guard with offloaded moments."""
    cfg = _cfg(mu_dtype="bfloat16", offload="opt_state")
    setup, step, _ = program = runs["programs"]["both"]
    ckpt = checkpoint.Checkpointer(runs["ckdir"], keep=2)
    try:
        start = start_lib.initial_state(cfg, setup, step, ckpt)
    finally:
        ckpt.close()
    assert start.step == SAVE and start.data_state == {"next_batch": SAVE}
    assert {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(start.state.opt_state)} == {"pinned_host"}
    mu, nu = _moments(start.state.opt_state)
    assert {x.dtype for x in mu} == {np.dtype("bfloat16")} and {x.dtype for x in nu} == {np.dtype("float32")}
    state, losses = _train(program, start.state, runs["data"], SAVE, STOP)
    assert losses == runs["both"][SAVE:]
    for a, b in zip(jax.tree_util.tree_leaves(host(state.params)), jax.tree_util.tree_leaves(runs["both_params"])):
        np.testing.assert_array_equal(a, b)

    # a NaN batch with train.on_nonfinite=skip: the update is dropped on the device, the moments come back
    # to pinned_host unchanged
    before = host((state.params, state.opt_state))
    bad = dict(runs["data"][0], patches=runs["data"][0]["patches"] * np.float32(np.nan))
    state, m = program[2](state, step.put(bad), step.flag(True))
    assert not bool(m["finite"]) and int(state.step) == STOP + 1
    assert {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(state.opt_state)} == {"pinned_host"}
    after = host((state.params, state.opt_state))
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_config_errors():
    for key, value in (("optim.mu_dtype", "float16"), ("optim.offload", "params")):
        with pytest.raises(config.ConfigError) as e:
            run_config.validate(config.load("configs/stage1_5.py:tiny", [(key, value)]))
        assert str(e.value).startswith(f"{key} must be one of") and "\n" not in str(e.value), str(e.value)
    run_config.validate(config.load("configs/stage1_5.py:tiny", [("optim.mu_dtype", "bfloat16"),
                                                                 ("optim.offload", "opt_state")]))
    # also where the optimizer and the state layout are built (code that skips validate)
    with pytest.raises(config.ConfigError,
                       match=r"^optim.mu_dtype must be one of \('float32', 'bfloat16'\), got 'int8'$"):
        optim.make_optimizer(_cfg(mu_dtype="int8").optim, {"w": np.zeros(2, np.float32)}, 10)
    with pytest.raises(config.ConfigError, match=r"^optim.offload must be one of \('none', 'opt_state'\), got 'all'$"):
        state_lib.build(_cfg(offload="all"), mesh_of((1, 1, 1, 1)))
    no_host = types.SimpleNamespace(platform="tpu", addressable_memories=lambda: [types.SimpleNamespace(kind="device")])
    with pytest.raises(config.ConfigError, match=r"^optim.offload=opt_state needs memory kind pinned_host; tpu "
                                                 r"devices address \['device'\]$"):
        state_lib.host_memory_kind(no_host)
