"""Real multi-process runs on this machine (launch/local_multiprocess.sh: processes x fake CPU devices, gloo):

1. `train` on 2 processes x 4 devices (data=2 x fsdp=4), 6 steps, a checkpoint at step 3: the losses equal
   a 1-process 8-device run within 1e-5; both processes killed after the checkpoint and rerun resume from it;
   that checkpoint restored by 1 process continues with the same losses.
2. Killing one of two processes mid-run makes the other exit non-zero within 60 s, naming the lost peer.
3. A mesh whose tensor axis would span hosts stops both processes at start with one line.

All runs share one synthetic set (made once with `python -m ovjax synth`; `train` refuses to make it from
several processes) and a persistent compilation cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The synthetic set, its tokenizer's config values, and a compilation cache shared by every run."""
    from ovjax import config
    from ovjax.data import synthetic
    from ovjax.train import dataset

    root = tmp_path_factory.mktemp("multihost")
    synth = ["--config", "configs/stage2.py:tiny", "--config.data.synthetic_samples=64"]
    p = subprocess.run([sys.executable, "-m", "ovjax", "synth", "--out", str(root / "data"), *synth], cwd=REPO,
                       env=_env(root), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    paths = dict(line.split(" ", 1) for line in p.stdout.strip().splitlines()[-2:])
    # what `train` itself would set after making this set (ovjax/train/dataset.py)
    max_pixels = synthetic.spec_for_run(config.load(synth[1], synth[2:]), root / "data").max_pixels
    data = {"data.train": paths["packed"], "data.tokenizer": paths["tokenizer"], "data.max_pixels": max_pixels,
            **dataset.tokenizer_values(paths["tokenizer"])}
    return {"root": root, "overrides": [f"--config.{k}={v}" for k, v in data.items()]}


def _env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVJAX_", "JAX_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def _train(shared, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ovjax", "train", "--config", "configs/stage2.py:tiny", "--workdir", str(workdir),
            *shared["overrides"], "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.train.steps=6",
            "--config.checkpoint.every=3", "--config.checkpoint.keep=5", "--config.train.log_every=1",
            "--config.train.progress=lines", "--config.train.xla_compiler_options=xla_backend_optimization_level=0",
            *extra]


def _run(cmd: list[str], shared, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(shared["root"]), capture_output=True, text=True, timeout=timeout)


def _losses(workdir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs}


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-5, f"step {s}: {a[s]} vs {b[s]}"


def test_two_processes_train_checkpoint_resume_and_restore_on_one(shared):
    root = shared["root"]
    # the reference: 1 process, 8 devices, same mesh and config
    ref = _run(_train(shared, root / "one"), shared)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    want = _losses(root / "one")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    # 2 processes x 4 devices, both killed once checkpoint 3 is complete
    two = root / "two"
    launcher = subprocess.Popen(["bash", str(LAUNCH), "2", "4", "--", *_train(shared, two)], cwd=REPO,
                                env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    deadline = time.monotonic() + 420
    while not (two / "checkpoints" / "3").is_dir() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    out = launcher.communicate(timeout=60)[0]
    assert (two / "checkpoints" / "3").is_dir(), out[-4000:]
    assert "[0] [process 0/2 on local0] 4 local cpu devices" in out and "data=2 across 2 hosts" in out, out[-4000:]
    assert "fsdp=4 inside a host" in out
    written = set(os.listdir(two / "checkpoints" / "3" / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= written, written
    _close(_losses(two), want, [1, 2, 3])
    if (two / "checkpoints" / "6").is_dir():  # the kill came after the end: drop what a timely kill would have
        shutil.rmtree(two / "checkpoints" / "6")
    # a 1-process restore of that checkpoint (copied before the rerun adds checkpoint 6)
    one_from_two = root / "one_from_two"
    shutil.copytree(two / "checkpoints" / "3", one_from_two / "checkpoints" / "3")

    # rerun both processes: they resume from 3 and log steps 4..6
    rerun = _run(["bash", str(LAUNCH), "2", "4", "--", *_train(shared, two)], shared)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"start: resumed from {two / 'checkpoints' / '3'}" in rerun.stdout, rerun.stdout[-3000:]
    got = _losses(two)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    _close(got, want, [1, 2, 3, 4, 5, 6])

    # that 2-process checkpoint on 1 process
    single = _run(_train(shared, one_from_two), shared)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    assert "start: resumed from" in single.stdout
    _close(_losses(one_from_two), want, [4, 5, 6])


def test_a_dead_peer_ends_the_other_process_naming_it(shared):
    root = shared["root"]
    workdir = root / "liveness"
    cmd = _train(shared, workdir, "--config.train.steps=100000", "--config.checkpoint.every=100000")
    port = _free_port()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(root, OVJAX_COORDINATOR=f"localhost:{port}",
                                                     OVJAX_NUM_PROCESSES="2", OVJAX_PROCESS_ID=str(i),
                                                     OVJAX_HOST_NAME=f"node{i}",
                                                     XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            f = workdir / "metrics.jsonl"
            if f.exists() and len(f.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        procs[1].kill()
        killed = time.monotonic()
        err = procs[0].communicate(timeout=120)[1]
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert waited < 60, f"process 0 took {waited:.0f} s to stop"
    assert "lost peer process 1 (node1)" in err, err[-3000:]


def test_tensor_axis_across_hosts_fails_at_start(shared):
    p = _run(["bash", str(LAUNCH), "2", "4", "--", *_train(shared, shared["root"] / "bad", "--config.mesh.data=1",
                                                          "--config.mesh.fsdp=1", "--config.mesh.tensor=8")],
             shared, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if "train: launch error" in x]
    assert len(errors) == 2, p.stderr[-2000:]
    for line in errors:
        assert "mesh.tensor=8 would span hosts: a process has 4 devices" in line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_missing_process_fails_at_start_with_one_line(tmp_path):
    """OVJAX_NUM_PROCESSES=2 but only one process started: exit 2 after OVJAX_INIT_TIMEOUT, one line, no
    stack trace (jax itself would abort with one)."""
    env = _env(tmp_path, OVJAX_COORDINATOR=f"localhost:{_free_port()}", OVJAX_NUM_PROCESSES="2",
               OVJAX_PROCESS_ID="0", OVJAX_INIT_TIMEOUT="3")
    p = subprocess.run([sys.executable, "-m", "ovjax", "train", "--config", "configs/stage2.py:tiny", "--workdir",
                        str(tmp_path / "w")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == (f"launch error: process 0 of 2: not all 2 processes joined the group at "
                                f"{env['OVJAX_COORDINATOR']} within 3 s (ovjax variables); did every process "
                                f"start, with the same coordinator and process count?")


def test_launcher_returns_the_first_failure_and_stops_the_others(tmp_path):
    script = 'if [ "$OVJAX_PROCESS_ID" = 1 ]; then sleep 1; exit 7; fi; echo "$XLA_FLAGS"; sleep 300'
    t = time.monotonic()
    p = subprocess.run(["bash", str(LAUNCH), "3", "2", "--", "bash", "-c", script], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 7, p.stderr
    assert time.monotonic() - t < 60  # the sleeping processes 0 and 2 were stopped
    assert "local_multiprocess: process 1 (pid" in p.stderr and "exited with status 7" in p.stderr
    flags = [x for x in p.stdout.splitlines() if x.startswith("[0] ")]
    assert flags == ["[0] --xla_force_host_platform_device_count=2 "], p.stdout  # DEVICES replaces the inherited 8
