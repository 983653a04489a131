"""Two processes x 4 fake CPU devices (gloo, localhost): the mesh puts `data` across processes and keeps
fsdp/tensor/sequence inside one process (lessons 12-13)."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    from ovjax import distributed, sharding
    distributed.initialize()  # OVJAX_COORDINATOR / OVJAX_NUM_PROCESSES / OVJAX_PROCESS_ID
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2, sequence=1))
    procs = [[d.process_index for d in row.reshape(-1)] for row in mesh.devices]
    print(json.dumps({"shape": dict(mesh.shape), "procs": procs, "n": jax.device_count(),
                      "report": distributed.startup_report(mesh)}))
    try:
        sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    except sharding.ShardingError as e:
        print(json.dumps({"error": str(e)}))
    distributed.shutdown()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_hybrid_mesh():
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               OVJAX_COORDINATOR=f"localhost:{port}", OVJAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=dict(env, OVJAX_PROCESS_ID=str(i),
                                                                      OVJAX_HOST_NAME=f"node{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for i, (out, _) in enumerate(outs):
        lines = [json.loads(x) for x in out.strip().splitlines() if x.startswith("{")]
        got, err = lines[0], lines[1]
        assert got["n"] == 8
        assert got["shape"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
        # each data slice lives in one process, and the two slices in different processes
        assert [set(row) for row in got["procs"]] in ([{0}, {1}], [{1}, {0}])
        assert "mesh.data (1) divisible by the process count" in err["error"]
        report = re.sub(r"\(ids \d+\.\.\d+\)", "(ids)", got["report"])  # device numbering is jax's
        assert report == (f"[process {i}/2 on node{i}] 4 local cpu devices (ids) of 8 global on 2 hosts (ovjax); "
                          f"mesh data=2 across 2 hosts, fsdp=2 inside a host, tensor=2 inside a host, sequence=1 size 1")
