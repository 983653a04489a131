"""Exact resume: `python -m ovjax train` killed with SIGKILL (at random steps, and in the middle of an
asynchronous save) and rerun logs, for every step, the loss of an uninterrupted run bit for bit; a checkpoint
written on an fsdp=8 mesh resumes on data=2 x tensor=2 (4 devices) within 1e-5.

Each run is a subprocess; they share a persistent compilation cache and one synthetic dataset, so only the
first run and the 4-device run compile."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
EVERY = 3
TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"cache": root / "jax-cache", "data": root / "data", "root": root}


def _cmd(workdir, shared, *extra):
    return [sys.executable, "-m", "ovjax", "train", "--config", "configs/stage1_5.py:tiny", "--workdir", str(workdir),
            f"--config.train.steps={STEPS}", "--config.train.log_every=1", f"--config.checkpoint.every={EVERY}",
            "--config.checkpoint.keep=10", f"--config.data.synthetic_root={shared['data']}",
            "--config.data.synthetic_samples=200", "--config.train.progress=lines",
            "--config.train.xla_compiler_options=xla_backend_optimization_level=0", *extra]


def _env(shared, devices=8):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(shared["cache"]),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    return env


def _run(workdir, shared, *extra, devices=8) -> str:
    p = subprocess.run(_cmd(workdir, shared, *extra), cwd=REPO, env=_env(shared, devices), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _losses(workdir) -> dict[int, float]:
    recs = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"a step is logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def _start(workdir, shared):
    return subprocess.Popen(_cmd(workdir, shared), cwd=REPO, env=_env(shared), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _logged_step(workdir) -> int:
    f = Path(workdir) / "metrics.jsonl"
    if not f.exists():
        return 0
    lines = [x for x in f.read_text().splitlines() if x.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.fixture(scope="module")
def reference(shared):
    workdir = shared["root"] / "reference"
    _run(workdir, shared)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses


def test_sigkill_at_random_steps_resumes_bit_for_bit(reference, shared):
    _, ref = reference
    for kill_at in random.Random(6).sample(range(2, STEPS), 2):
        workdir = shared["root"] / f"kill-{kill_at}"
        proc = _start(workdir, shared)
        deadline = time.time() + 180
        while _logged_step(workdir) < kill_at:
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = _logged_step(workdir)
        assert killed_at < STEPS
        ckdir = workdir / "checkpoints"
        complete = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if ckdir.is_dir() else []
        out = _run(workdir, shared)
        if complete:
            assert f"resumed from {ckdir / str(complete[-1])}" in out, out[-2000:]
        assert _losses(workdir) == ref, f"killed after step {killed_at}"


def test_sigkill_during_async_save_keeps_the_previous_checkpoint(reference, shared):
    from ovjax import checkpoint

    _, ref = reference
    for attempt in range(3):
        workdir = shared["root"] / f"kill-save-{attempt}"
        ckdir = workdir / "checkpoints"
        proc = _start(workdir, shared)
        caught = None
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            names = os.listdir(ckdir) if ckdir.is_dir() else []
            tmp = [int(TMP_STEP.match(n).group(1)) for n in names if TMP_STEP.match(n)]
            done = [int(n) for n in names if n.isdigit()]
            if tmp and done:  # a save in flight, and an earlier one complete
                proc.send_signal(signal.SIGKILL)
                caught = tmp[0]
                break
            time.sleep(0.001)
        proc.wait()
        left = [n for n in os.listdir(ckdir)] if ckdir.is_dir() else []
        if caught is None or not any(TMP_STEP.match(n) for n in left):
            continue  # the save finished before the kill landed: try again
        previous = caught - EVERY
        reader = checkpoint.Checkpointer(ckdir, read_only=True)
        assert reader.latest_step() == previous
        params = checkpoint.load_params(workdir)
        assert params["merger"]  # restorable
        out = _run(workdir, shared)
        assert f"resumed from {ckdir / str(previous)}" in out, out[-2000:]
        assert _losses(workdir) == ref
        assert not any(TMP_STEP.match(n) for n in os.listdir(ckdir))  # the half-written step was cleaned up
        return
    pytest.fail("3 attempts never killed the run while an asynchronous save was in flight")


def test_resume_onto_another_mesh(reference, shared):
    ref_dir, ref = reference
    workdir = shared["root"] / "other-mesh"
    resume_at = 2 * EVERY
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints" / str(resume_at), workdir / "checkpoints" / str(resume_at))
    out = _run(workdir, shared, "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
               devices=4)
    assert "mesh data=2 x fsdp=1 x tensor=2 x sequence=1" in out
    assert f"resumed from {workdir / 'checkpoints' / str(resume_at)}" in out
    got = _losses(workdir)
    assert sorted(got) == list(range(resume_at + 1, STEPS + 1))
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5, (step, loss, ref[step])
