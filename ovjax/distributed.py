"""Several processes (one per host, or one per GPU): `jax.distributed` set up from the environment, a
startup report per process, and a watchdog that ends a process whose peer died.

Where the process group comes from (first match wins):
    OVJAX_COORDINATOR=host:port  OVJAX_NUM_PROCESSES=N  OVJAX_PROCESS_ID=i  [OVJAX_LOCAL_DEVICE_IDS=0,1]
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID   (jax's own names, same meaning)
    SLURM (srun, SLURM_NTASKS > 1): count SLURM_NTASKS, index SLURM_PROCID, coordinator = the first host of
        the step's (else the job's) node list, port OVJAX_COORDINATOR_PORT or jax's per-job port; with more
        than one task per node each task takes GPU SLURM_LOCALID (one process per GPU; unless SLURM bound
        the task to one GPU already, CUDA_VISIBLE_DEVICES of one id), else all GPUs of its node
    OVJAX_DISTRIBUTED=1: jax's own cluster auto-detection, as it is
    none of these: one process, nothing to initialise.
Optional: OVJAX_HOST_NAME (what this process calls its host; default the hostname: processes on one host
keep tensor/sequence inside it), OVJAX_INIT_TIMEOUT (s, default 300: waiting for all processes to connect),
OVJAX_PEER_TIMEOUT (s, default 20: a peer silent that long is lost), OVJAX_HEARTBEAT_TIMEOUT (s, default 40:
jax's own heartbeat, the backstop when this module's watchdog cannot run).

Why not just `jax.distributed.initialize()` with its SLURM detector: it always sets
`local_device_ids=[SLURM_LOCALID]`, i.e. one GPU per process, so a one-process-per-node job (`--ntasks-per-node=1`)
would see a single GPU of eight. We use its node-list parsing and port convention (`SlurmCluster`) and
choose the local devices ourselves, then call initialize with detection off.

Liveness: every process writes a counter into the coordination service's key-value store every second and
watches the others'. A peer whose counter has not moved for OVJAX_PEER_TIMEOUT seconds, or a coordinator that
no longer answers, ends this process (exit status 75) with one line naming the lost process and its host, even
while the main thread hangs in a collective. A process that ends cleanly marks itself done first.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Mapping

LOST_PEER_EXIT = 75
KV_PREFIX = "ovjax/"


class DistributedError(RuntimeError):
    """A launch whose process group, devices or mesh do not add up (one line)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the group: the arguments of `jax.distributed.initialize`."""

    source: str                        # "ovjax", "jax", "slurm", "auto"
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- the environment

def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


def _device_ids(env: Mapping[str, str], name: str) -> tuple[int, ...] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        ids = tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not a comma-separated list of device ids") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise DistributedError(f"{name}={raw!r} must list distinct non-negative device ids")
    return ids


def _check_group(source: str, names: tuple[str, str, str], coordinator: str, n: int, i: int) -> None:
    if n < 1:
        raise DistributedError(f"{names[1]}={n}: the process count must be >= 1")
    if not 0 <= i < n:
        raise DistributedError(f"{names[2]}={i} does not fit {names[1]}={n}: process ids run 0..{n - 1} "
                               f"(the process count does not match the launch)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"{names[0]}={coordinator!r} is not host:port")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    head, sep, rest = nodelist.partition("[")
    if "," in head:
        return head.split(",")[0]
    if not sep:
        return head
    first = rest.split("]")[0].split(",")[0].split("-")[0]
    return head + first


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The process group the environment describes (module docstring), or None for a single process.
    Raises DistributedError (one line) when the variables contradict each other."""
    env = os.environ if env is None else env
    for source, names in (("ovjax", ("OVJAX_COORDINATOR", "OVJAX_NUM_PROCESSES", "OVJAX_PROCESS_ID")),
                          ("jax", ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))):
        present = [n for n in names if env.get(n)]
        if not present:
            continue
        if len(present) != 3:
            missing = [n for n in names if n not in present]
            raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} missing: set all three")
        coord, n, i = env[names[0]], _int(env, names[1]), _int(env, names[2])
        _check_group(source, names, coord, n, i)
        ids = _device_ids(env, "OVJAX_LOCAL_DEVICE_IDS") or _device_ids(env, "JAX_LOCAL_DEVICE_IDS")
        return Launch(source, coord, n, i, ids)
    if env.get("SLURM_NTASKS") and env.get("SLURM_PROCID") and _int(env, "SLURM_NTASKS") > 1:
        return _slurm_launch(env)
    if env.get("OVJAX_DISTRIBUTED") == "1":
        return Launch("auto", None, None, None)
    return None


def _slurm_launch(env: Mapping[str, str]) -> Launch:
    from jax._src.clusters.slurm_cluster import SlurmCluster

    n, i = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    nodes_var = next((v for v in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES") if env.get(v)), None)
    nodes = _int(env, nodes_var) if nodes_var else 1
    if n % nodes:
        raise DistributedError(f"SLURM_NTASKS={n} is not a multiple of the {nodes} nodes: give every node the "
                               f"same number of tasks (--ntasks-per-node)")
    port = env.get("OVJAX_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
    if env.get("OVJAX_COORDINATOR"):
        coord = env["OVJAX_COORDINATOR"]
    elif env.get("SLURM_STEP_NODELIST") and env.get("SLURM_JOB_ID") and env is os.environ:
        coord = SlurmCluster.get_coordinator_address(timeout_secs=None, override_coordinator_port=port)
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
        port = port or str(_int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))  # jax's SLURM port rule
        coord = f"{first_slurm_host(nodelist)}:{port}"
    _check_group("slurm", ("coordinator", "SLURM_NTASKS", "SLURM_PROCID"), coord, n, i)
    ids = _device_ids(env, "OVJAX_LOCAL_DEVICE_IDS")
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    bound = bool(visible) and "," not in visible  # --gpus-per-task=1: the task sees its one GPU only
    if ids is None and n // nodes > 1 and not bound:
        ids = (_int(env, "SLURM_LOCALID"),)  # one process per GPU, every task seeing all the node's GPUs
    return Launch("slurm", coord, n, i, ids)


# ----------------------------------------------------------------------------- initialise

@dataclasses.dataclass
class Group:
    """This process's view of the group once initialised."""

    launch: Launch | None
    hosts: tuple[str, ...]             # host name of every process, by process index
    watchdog: "Watchdog | None" = None


_GROUP: Group | None = None


def host_name(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("OVJAX_HOST_NAME") or socket.gethostname()


def initialize(env: Mapping[str, str] | None = None, *, watch: bool = True) -> Group:
    """Join the process group the environment describes (once), check that every process has the same
    number of devices, learn every process's host, and start the watchdog. Single process: a no-op group."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    env = os.environ if env is None else env
    launch = launch_from_env(env)
    if launch is None:
        _GROUP = Group(None, (host_name(env),))
        return _GROUP
    import jax

    timeout = _seconds(env, "OVJAX_INIT_TIMEOUT", 300)
    heartbeat = int(_seconds(env, "OVJAX_HEARTBEAT_TIMEOUT", 40))
    # CPU devices of several processes talk through gloo (lesson 13); the setting does nothing to GPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax aborts the process with a stack trace when not all processes connect in time; a timer that fires
    # a little earlier says it in one line instead.
    timer = threading.Timer(timeout, _join_timed_out, args=(launch, timeout))
    timer.daemon = True
    timer.start()
    kwargs: dict[str, Any] = dict(initialization_timeout=int(timeout) + 15, heartbeat_timeout_seconds=heartbeat)
    try:
        if launch.source == "auto":
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                       local_device_ids=list(launch.local_device_ids) if launch.local_device_ids
                                       else None, cluster_detection_method="deactivate", **kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError/RuntimeError/ValueError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"process {launch.process_id} of {launch.num_processes} could not join the group "
                               f"at {launch.coordinator} ({launch.source} variables): {first[:200]}") from None
    finally:
        timer.cancel()
    client = _client()
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"{KV_PREFIX}host/{me}", f"{host_name(env)}|{jax.local_device_count()}")
    hosts, counts = [], []
    for p in range(n):
        h, _, c = client.blocking_key_value_get(f"{KV_PREFIX}host/{p}", int(timeout * 1000)).rpartition("|")
        hosts.append(h)
        counts.append(int(c))
    if len(set(counts)) != 1:
        raise DistributedError(f"processes have different device counts {dict(enumerate(counts))}: every process "
                               f"needs the same number of local devices")
    if jax.device_count() != n * counts[0]:
        raise DistributedError(f"{jax.device_count()} global devices but {n} processes x {counts[0]} local")
    _GROUP = Group(launch, tuple(hosts))
    if watch:
        peer_timeout = _seconds(env, "OVJAX_PEER_TIMEOUT", 20)
        _GROUP.watchdog = Watchdog(client, me, tuple(hosts), peer_timeout)
        _GROUP.watchdog.start()
    return _GROUP


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedError(f"{name}={raw!r} must be > 0")
    return value


def _join_timed_out(launch: Launch, timeout: float) -> None:
    print(f"launch error: process {launch.process_id} of {launch.num_processes}: not all "
          f"{launch.num_processes} processes joined the group at {launch.coordinator} within {timeout:.0f} s "
          f"({launch.source} variables); did every process start, with the same coordinator and process count?",
          file=sys.stderr, flush=True)
    os._exit(2)


def _client():
    from jax._src import distributed as jd

    return jd.global_state.client


def process_hosts() -> tuple[str, ...] | None:
    """Host name of each process (by index) once `initialize` ran with several processes, else None."""
    return _GROUP.hosts if _GROUP is not None and _GROUP.launch is not None else None


def shutdown() -> None:
    """Mark this process done (peers do not count it as lost), stop the watchdog, leave the group."""
    global _GROUP
    group, _GROUP = _GROUP, None
    if group is None or group.launch is None:
        return
    if group.watchdog is not None:
        group.watchdog.stop()
    import jax

    jax.distributed.shutdown()


def wait_for_lost_peer(seconds: float | None = None) -> None:
    """After the main thread failed in a multi-process run: give the watchdog time to find a lost peer
    (it then ends the process naming it); returns when none was found."""
    if _GROUP is None or _GROUP.watchdog is None:
        return
    _GROUP.watchdog.join(_GROUP.watchdog.peer_timeout + 5 if seconds is None else seconds)


# ----------------------------------------------------------------------------- liveness

class Watchdog(threading.Thread):
    """Publishes this process's heartbeat counter and ends the process when a peer's stops (module docstring)."""

    def __init__(self, client, me: int, hosts: tuple[str, ...], peer_timeout: float, *, period: float = 1.0,
                 exit_fn: Callable[[int], None] = os._exit):
        super().__init__(name="ovjax-peer-watchdog", daemon=True)
        self.client, self.me, self.hosts = client, me, hosts
        self.peer_timeout, self.period, self.exit_fn = peer_timeout, period, exit_fn
        self._stop_event = threading.Event()

    def _key(self, p: int) -> str:
        return f"{KV_PREFIX}alive/{p}"

    def stop(self) -> None:
        self._stop_event.set()
        try:
            self.client.key_value_set(self._key(self.me), "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell then
            pass
        if self.is_alive():
            self.join(self.period * 3)

    def _lost(self, what: str) -> None:
        sys.stdout.flush()
        print(f"distributed: process {self.me} ({self.hosts[self.me]}) lost {what}; exiting with status "
              f"{LOST_PEER_EXIT}", file=sys.stderr, flush=True)
        self.exit_fn(LOST_PEER_EXIT)

    def _try_get(self, p: int) -> str | None:
        try:
            return self.client.key_value_try_get(self._key(p))
        except Exception:  # noqa: BLE001 - not written yet (NOT_FOUND); a dead coordinator shows in the set
            return None

    def run(self) -> None:
        peers = [p for p in range(len(self.hosts)) if p != self.me]
        seen = {p: (None, time.monotonic()) for p in peers}
        beat = 0
        coordinator_since = None
        while not self._stop_event.wait(self.period):
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(self._key(self.me), str(beat), allow_overwrite=True)
                coordinator_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) does not answer
                coordinator_since = coordinator_since or now
                if now - coordinator_since > self.peer_timeout:
                    self._lost(f"the coordinator (process 0, {self.hosts[0]}): {str(e).splitlines()[0][:160]}")
                    return
                continue
            values = {p: self._try_get(p) for p in peers}
            if self._stop_event.is_set():
                return
            for p in peers:
                value = values.get(p)
                if value == "done":
                    seen[p] = ("done", now)
                    continue
                last, since = seen[p]
                if value != last:
                    seen[p] = (value, now)
                elif last != "done" and now - since > self.peer_timeout:
                    self._lost(f"peer process {p} ({self.hosts[p]}): no heartbeat for {now - since:.0f} s")
                    return


# ----------------------------------------------------------------------------- the startup report

def axis_spans(mesh, hosts: tuple[str, ...] | None = None) -> dict[str, str]:
    """For each mesh axis: 'across N hosts' when moving along it changes host, else 'inside a host'."""
    import numpy as np

    hosts = hosts or process_hosts() or ()
    grid = np.vectorize(lambda d: hosts[d.process_index] if hosts else str(d.process_index))(mesh.devices)
    out = {}
    for k, name in enumerate(mesh.axis_names):
        if mesh.devices.shape[k] == 1:
            out[name] = "size 1"
            continue
        lines = np.moveaxis(grid, k, -1).reshape(-1, grid.shape[k])
        n = max(len(set(line)) for line in lines)
        out[name] = f"across {n} hosts" if n > 1 else "inside a host"
    return out


def startup_report(mesh) -> str:
    """One line per process: index/count, host, local/global devices, and where each mesh axis runs."""
    import jax

    me = jax.process_index()
    hosts = process_hosts() or (host_name(),)
    local = jax.local_devices()
    ids = [d.id for d in local]
    span = ", ".join(f"{a}={mesh.shape[a]} {s}" for a, s in axis_spans(mesh, process_hosts()).items())
    src = _GROUP.launch.source if _GROUP is not None and _GROUP.launch is not None else "single process"
    return (f"[process {me}/{jax.process_count()} on {hosts[me] if me < len(hosts) else host_name()}] "
            f"{len(local)} local {local[0].platform} devices (ids {ids[0]}..{ids[-1]}) of {jax.device_count()} "
            f"global on {len(set(hosts))} hosts ({src}); mesh {span}")
