"""Orbax checkpoints of a training run: train state, data-iterator state and run counters in ONE step.

Layout: `DIR/<step>/` with items
    params      the model params (a pytree of arrays)            StandardSave
    opt         {"step", "opt_state"} of the train state          StandardSave
    data        the data iterator's state, one JSON per process   (DataStateHandler, below; restorable
                onto another process count when all agree, as the loader's global state does)
    meta        run counters and the config, JSON                 JsonSave
Params sit in their own item so that a next stage can read them alone (`load_params`), without the
optimizer state of the previous stage.

Saves are asynchronous: `save` returns once the arrays are copied off the devices; the files are written
in the background and a step becomes visible to `latest_step` only when all its items are committed, so a
process killed during a save leaves the previous step as the latest complete checkpoint (the half-written
temporary folder is removed when a manager next opens the directory).

Restore takes an abstract target whose ShapeDtypeStructs carry the shardings of the CURRENT mesh, so a
checkpoint written on one mesh restores onto any other (lesson 15); every array is read shard by shard
into its new layout, never assembled whole on one host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("params", "opt", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


# ------------------------------------------------------------------------- data iterator state

_DATA_FILE = re.compile(r"process_\d+-of-\d+\.json")


class DataStateHandler(ocp.CheckpointHandler):
    """Writes the state each process captured (a JSON-able dict) as `process_<i>-of-<n>.json`.

    The state is captured by the caller when `save` is called (at the step boundary), not when the
    background writer runs, so it always belongs to the step it is saved with."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        i, n = jax.process_index(), jax.process_count()
        text = json.dumps(args.state, sort_keys=True)
        (directory / f"process_{i}-of-{n}.json").write_text(text)

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        """This process's state; on another process count, the one state all writers agree on.

        The loader's state is global (the next global batch index: row k of one stream, whatever the
        process count), so every process wrote the same JSON and any process count can continue from it.
        States that differ cannot be redistributed and are refused."""
        i, n = jax.process_index(), jax.process_count()
        path = directory / f"process_{i}-of-{n}.json"
        if path.exists():
            return json.loads(path.read_text())
        written = sorted(p for p in directory.iterdir() if _DATA_FILE.fullmatch(p.name))
        if not written:
            found = sorted(p.name for p in directory.iterdir())
            raise CheckpointError(f"no data-iterator state in {directory} (found {found})")
        states = {p.name: json.loads(p.read_text()) for p in written}
        distinct = {json.dumps(v, sort_keys=True) for v in states.values()}
        if len(distinct) != 1:
            raise CheckpointError(f"the data-iterator states in {directory} differ between the processes that "
                                  f"wrote them ({', '.join(states)}), so they cannot be restored onto {n} "
                                  f"process(es); only a global state (the same in every process) can")
        return json.loads(distinct.pop())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------- the manager

def _json_ready(obj):
    """Check that a data state survives JSON (no silent str() of unknown objects)."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise CheckpointError(f"the data-iterator state is not JSON-serialisable: {e}") from e


class Checkpointer:
    """A CheckpointManager over `directory` keeping the `keep` latest steps.

    save(step, state, data_state, meta); restore(step, target_params, target_opt) -> dict of the items;
    latest_step(); wait(); close(). `state` is the TrainState (step, params, opt_state)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if keep is not None and keep < 1:
            raise CheckpointError(f"checkpoint.keep must be >= 1 (or None to keep all), got {keep}")
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=not read_only, create=not read_only,
                                            read_only=read_only)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, data_state: Any, meta: dict) -> None:
        """Start saving `state` (+ the data state and counters) as step `step`; returns before the files
        are written (wait() blocks until they are)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=DataStateSave(_json_ready(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        if not self._mngr.save(step, args=args, force=True):
            raise CheckpointError(f"orbax refused to save step {step}")

    def restore(self, step: int, params_target, opt_target) -> dict:
        """-> {"params", "opt" ({"step", "opt_state"}), "data", "meta"} of `step`, arrays laid out as the
        targets' shardings say (abstract ShapeDtypeStruct trees with `.sharding`)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt=ocp.args.StandardRestore(opt_target),
            data=DataStateRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot restore step {step} of {self.directory} into this run's state "
                                  f"(different model or optimizer config?): {type(e).__name__}: {e}") from e
        return {k: out[k] for k in ITEMS}

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


@contextlib.contextmanager
def _quiet_orbax():
    """Reading only some items of a step makes orbax warn once per item not asked for; hide that."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "data": DataStateHandler(), "meta": ocp.JsonCheckpointHandler()}


def _reader(directory: Path):
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                                save_interval_steps=0),
                                 item_handlers=_handlers())


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints: `workdir/checkpoints`, or `workdir` itself when it is a
    checkpoint folder (named checkpoints, or holding step folders and no checkpoints/)."""
    p = Path(workdir)
    if p.name == "checkpoints" or (p.is_dir() and not (p / "checkpoints").exists()
                                   and any(c.name.isdigit() for c in p.iterdir())):
        return p
    return p / "checkpoints"


def load_params(workdir: str | os.PathLike, target=None, step: int | None = None):
    """The params of a run's latest (or given) checkpoint, for starting the next stage.

    target: abstract params (ShapeDtypeStruct with `.sharding`) to restore into; None = host numpy arrays
    of the saved shapes and dtypes. Raises CheckpointError when there is no complete checkpoint."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints at {directory}")
    with _quiet_orbax():
        return _load_params(_reader(directory), directory, target, step)


def _load_params(mngr, directory: Path, target, step):
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if target is None:
            meta = mngr.item_metadata(step)["params"]
            tree = meta.tree if hasattr(meta, "tree") else meta
            host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            cpu_target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), tree)
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(cpu_target)))
            out = {"params": jax.device_get(out["params"])}
        else:
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read params of step {step} in {directory}: {type(e).__name__}: {e}") from e
    finally:
        mngr.close()
    return out["params"]


def read_meta(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The `meta` JSON (counters, config) of a run's latest (or given) checkpoint."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints at {directory}")
    with _quiet_orbax():
        mngr = _reader(directory)
        try:
            step = mngr.latest_step() if step is None else step
            if step is None:
                raise CheckpointError(f"{directory} holds no complete checkpoint")
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        finally:
            mngr.close()
