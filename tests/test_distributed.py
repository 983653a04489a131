"""ovjax.distributed without launching processes: the environment -> process group, the launch checks
(must-show 3 as one-line errors), the hybrid mesh plan, the per-axis host report, the peer watchdog."""

import threading
import types

import numpy as np
import pytest

from ovjax import distributed, sharding
from ovjax.distributed import DistributedError, Launch, launch_from_env


def test_single_process_when_nothing_is_set():
    assert launch_from_env({}) is None
    assert launch_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # an sbatch of one task


def test_explicit_ovjax_variables():
    env = {"OVJAX_COORDINATOR": "node7:1234", "OVJAX_NUM_PROCESSES": "4", "OVJAX_PROCESS_ID": "3",
           "OVJAX_LOCAL_DEVICE_IDS": "0,1"}
    assert launch_from_env(env) == Launch("ovjax", "node7:1234", 4, 3, (0, 1))
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert launch_from_env(jax_env) == Launch("jax", "h:1", 2, 0, None)


@pytest.mark.parametrize("env, message", [
    ({"OVJAX_COORDINATOR": "h:1", "OVJAX_NUM_PROCESSES": "2", "OVJAX_PROCESS_ID": "2"},
     "OVJAX_PROCESS_ID=2 does not fit OVJAX_NUM_PROCESSES=2: process ids run 0..1 (the process count does not match"),
    ({"OVJAX_COORDINATOR": "h:1", "OVJAX_NUM_PROCESSES": "2"},
     "OVJAX_COORDINATOR, OVJAX_NUM_PROCESSES set but OVJAX_PROCESS_ID missing"),
    ({"OVJAX_COORDINATOR": "h", "OVJAX_NUM_PROCESSES": "2", "OVJAX_PROCESS_ID": "0"},
     "OVJAX_COORDINATOR='h' is not host:port"),
    ({"OVJAX_COORDINATOR": "h:1", "OVJAX_NUM_PROCESSES": "two", "OVJAX_PROCESS_ID": "0"},
     "OVJAX_NUM_PROCESSES='two' is not an integer"),
    ({"SLURM_NTASKS": "12", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "5",
      "SLURM_JOB_NODELIST": "n[1-8]", "SLURM_JOB_NUM_NODES": "8"},
     "SLURM_NTASKS=12 is not a multiple of the 8 nodes"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "5",
      "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_JOB_NUM_NODES": "4"},
     "SLURM_PROCID=4 does not fit SLURM_NTASKS=4"),
])
def test_misconfigured_environment_is_one_line(env, message):
    with pytest.raises(DistributedError) as e:
        launch_from_env(env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_slurm_one_process_per_node_sees_all_gpus_one_per_gpu_takes_its_own():
    base = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[017-032]", "SLURM_JOB_NUM_NODES": "16"}
    per_node = launch_from_env({**base, "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "0"})
    # jax's port rule for SLURM: job id mod 4096 in the top 4096 ports
    assert per_node == Launch("slurm", f"gpu017:{4242 % 4096 + 61440}", 16, 5, None)
    per_gpu = launch_from_env({**base, "SLURM_NTASKS": "128", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
                               "OVJAX_COORDINATOR_PORT": "7000"})
    assert per_gpu == Launch("slurm", "gpu017:7000", 128, 13, (5,))
    bound = launch_from_env({**base, "SLURM_NTASKS": "128", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
                             "CUDA_VISIBLE_DEVICES": "5"})
    assert bound.local_device_ids is None  # --gpus-per-task=1: its only visible GPU


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-010,12],cpu1", "gpu003"),
                                             ("a-b[7,9]", "a-b7")])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


@pytest.mark.parametrize("shape, hosts, per_host, outer, dcn, ici", [
    ((2, 4, 1, 1), 2, 4, False, (2, 1, 1, 1), (1, 4, 1, 1)),
    ((16, 8, 1, 1), 16, 8, False, (16, 1, 1, 1), (1, 8, 1, 1)),      # 8b stage 1.5 on 16 nodes x 8 GPUs
    ((4, 4, 2, 1), 2, 16, False, (2, 1, 1, 1), (2, 4, 2, 1)),
    ((1, 16, 1, 1), 2, 8, True, (1, 2, 1, 1), (1, 8, 1, 1)),         # outer fsdp across hosts
    ((2, 16, 1, 1), 4, 8, True, (2, 2, 1, 1), (1, 8, 1, 1)),
])
def test_hybrid_shape(shape, hosts, per_host, outer, dcn, ici):
    assert sharding.hybrid_shape(shape, hosts, per_host, outer) == (dcn, ici)


@pytest.mark.parametrize("shape, outer, message", [
    ((1, 1, 8, 1), False, "mesh.tensor=8 would span hosts: a process has 4 devices"),
    ((1, 1, 2, 4), False, "mesh.tensor x sequence=8 would span hosts"),
    ((1, 8, 1, 1), False, "2 processes need mesh.data (1) divisible by the process count"),
    ((4, 4, 1, 1), False, "has 16 devices but there are 2 processes x 4 devices = 8"),
    ((1, 1, 1, 8), True, "mesh.sequence=8 would span hosts"),
])
def test_hybrid_shape_refuses(shape, outer, message):
    with pytest.raises(sharding.ShardingError) as e:
        sharding.hybrid_shape(shape, 2, 4, outer, unit="process")
    assert message in str(e.value) and "\n" not in str(e.value)


class FakeDevice:  # what the mesh code reads of a device; hashable, as Mesh needs
    platform = device_kind = "cpu"

    def __init__(self, id, process_index):
        self.id, self.process_index = id, process_index


def _fake_devices(n_proc, per_proc):
    return [FakeDevice(p * 100 + i, p) for p in range(n_proc) for i in range(per_proc)]


def test_mesh_over_hosts_with_several_processes_per_host():
    """One process per GPU (4 processes, 2 per host): tensor=2 stays inside a host, data spans the hosts;
    the same processes as their own hosts cannot hold tensor=4."""
    devs = _fake_devices(4, 2)
    hosts = ("a", "a", "b", "b")
    grid = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, sequence=1), devs, hosts=hosts).devices
    host_grid = np.vectorize(lambda d: hosts[d.process_index])(grid)
    assert {tuple(np.unique(host_grid[i])) for i in range(2)} == {("a",), ("b",)}
    assert sorted(d.id for d in grid.reshape(-1)) == sorted(d.id for d in devs)
    with pytest.raises(sharding.ShardingError, match="mesh.tensor=4 would span hosts: a process has 2 devices"):
        sharding.make_mesh(dict(data=2, fsdp=1, tensor=4, sequence=1), devs, hosts=("p0", "p1", "p2", "p3"))
    with pytest.raises(sharding.ShardingError, match="mesh.tensor=8 would span hosts: a host has 4 devices"):
        sharding.make_mesh(dict(data=1, fsdp=1, tensor=8, sequence=1), devs, hosts=hosts)


def test_axis_spans():
    devs = _fake_devices(2, 4)
    mesh = types.SimpleNamespace(devices=np.array(devs, dtype=object).reshape(2, 4, 1, 1),
                                 axis_names=sharding.MESH_AXES)
    assert distributed.axis_spans(mesh, ("n0", "n1")) == {
        "data": "across 2 hosts", "fsdp": "inside a host", "tensor": "size 1", "sequence": "size 1"}


class FakeKV:
    def __init__(self):
        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, k, v, allow_overwrite=False):
        with self.lock:
            self.kv[k] = v

    def key_value_try_get(self, k):
        with self.lock:
            if k not in self.kv:
                raise RuntimeError("NOT_FOUND")
            return self.kv[k]


def test_watchdog_names_the_silent_peer_and_ignores_a_finished_one(capsys):
    kv = FakeKV()
    exits = []
    done = threading.Event()
    dog = distributed.Watchdog(kv, 0, ("h0", "h1", "h2"), peer_timeout=0.6, period=0.05,
                               exit_fn=lambda code: (exits.append(code), done.set()))
    kv.key_value_set("ovjax/alive/2", "done")  # peer 2 finished cleanly; peer 1 never beats
    dog.start()
    assert done.wait(10)
    assert exits == [distributed.LOST_PEER_EXIT]
    err = capsys.readouterr().err
    assert "process 0 (h0) lost peer process 1 (h1): no heartbeat for" in err and "process 2" not in err


def test_watchdog_quiet_while_peers_beat():
    kv = FakeKV()
    exits = []
    dog = distributed.Watchdog(kv, 0, ("h0", "h1"), peer_timeout=0.5, period=0.05, exit_fn=exits.append)
    dog.start()
    for beat in range(30):
        kv.key_value_set("ovjax/alive/1", str(beat))
        threading.Event().wait(0.05)
    dog.stop()
    assert exits == [] and kv.kv["ovjax/alive/0"] == "done"
