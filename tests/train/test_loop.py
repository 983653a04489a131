"""The train loop in process: outputs, stage semantics (stage 1 trains only the projector; a stage started
from the previous one begins with its params), the non-finite guard, and that the loop runs THE step of
ovjax/train/step.py (the one tests/train/helpers.py drives). Config parsing: tests/test_config.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ovjax import checkpoint, config
from ovjax.train import command, dataset, loop, optim, start as start_lib
from ovjax.train import step as step_lib

FAST = [("train.xla_compiler_options", "xla_backend_optimization_level=0"), ("train.steps", "4"),
        ("train.log_every", "2"), ("checkpoint.every", "2"), ("data.synthetic_samples", "200"),
        ("train.progress", "lines")]


def test_cli_reports_config_errors(capsys):
    assert command.main(["--config", "configs/stage1.py:tiny", "--workdir", "/tmp/x", "--config.train.nope=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert command.main(["--config", "configs/nothing.py:tiny", "--workdir", "/tmp/x"]) == 2


# ------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def _cfg(name, data_root, *extra):
    over = FAST + [("data.synthetic_root", str(data_root))] + list(extra)
    return config.load(f"configs/{name}.py:tiny", over)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, data_root):
    """A 4-step stage-1 run; every call of a TrainStep during it is recorded (object, step counter)."""
    workdir = tmp_path_factory.mktemp("stage1")
    cfg = _cfg("stage1", data_root)
    calls = []
    real = step_lib.TrainStep.__call__

    def spy(self, state, batch, skip_nonfinite=False):
        calls.append((self, int(state.step)))
        return real(self, state, batch, skip_nonfinite)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_lib.TrainStep, "__call__", spy)
        summary = loop.run(cfg, workdir)
    return cfg, workdir, summary, calls


def _setup_and_step(cfg):
    from ovjax import sharding
    from ovjax.train import state as state_lib

    cfg, _ = dataset.prepare(cfg, Path("/nonexistent"))  # data.synthetic_root is set: the made set is reused
    setup = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
    return setup, step_lib.build(setup, step_lib.compiler_options(cfg.train.xla_compiler_options))


def _init_params(cfg):
    _, step = _setup_and_step(cfg)
    return jax.device_get(step.init(cfg.train.seed).params)


def test_the_loop_runs_the_step_of_step_py(stage1_run):
    """Every step of `loop.run` is a call of the TrainStep that `step.build` returns for the run's setup: the
    object the mesh, accumulation and freeze tests drive (tests/train/helpers.py)."""
    cfg, _, summary, calls = stage1_run
    _, step = _setup_and_step(cfg)
    assert isinstance(step, step_lib.TrainStep)
    assert [n for _, n in calls] == [0, 1, 2, 3] and summary["step"] == 4
    assert all(obj is step for obj, _ in calls)


def test_outputs(stage1_run):
    cfg, workdir, summary, _ = stage1_run
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "samples_seen", "supervised_tokens",
                  "supervised_fraction"):
            assert isinstance(r[k], (int, float)) and np.isfinite(r[k]), (k, r)
        assert 0 < r["supervised_fraction"] < 1 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert recs[1]["samples_seen"] > recs[0]["samples_seen"] > 0
    assert summary["step"] == 4 and summary["samples_seen"] == recs[1]["samples_seen"]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 4
    # the synthetic tokenizer's size and ids went into the tiny model
    assert saved["model"]["text"]["vocab_size"] > 263 and saved["model"]["image_token_id"] == 5
    assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 4]


def test_stage1_changes_only_the_projector(stage1_run):
    cfg, workdir, _, _ = stage1_run
    before = optim.flat(_init_params(cfg))
    after = optim.flat(checkpoint.load_params(workdir))
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed and all(k.startswith("merger/") for k in changed), changed
    assert len(changed) == len([k for k in before if k.startswith("merger/")])


def test_next_stage_begins_with_the_previous_params(stage1_run, tmp_path, data_root):
    from ovjax import sharding
    from ovjax.train import state as state_lib

    _, workdir1, _, _ = stage1_run
    cfg = _cfg("stage1_5", data_root, ("init.from_checkpoint", str(workdir1)))
    cfg, _ = dataset.prepare(cfg, tmp_path)  # the synthetic vocabulary, as run() does
    setup = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    start = start_lib.initial_state(cfg, setup, None, ckpt)
    ckpt.close()
    assert start.step == 0 and int(start.state.step) == 0
    prev = optim.flat(checkpoint.load_params(workdir1))
    mine = optim.flat(jax.device_get(start.state.params))
    assert prev.keys() == mine.keys()
    for k in prev:
        np.testing.assert_array_equal(mine[k], prev[k], err_msg=k)
    # fresh optimizer: zero moments over the stage-1.5 trainable set (ViT, merger, LLM)
    moments = [np.asarray(x) for x in jax.tree_util.tree_leaves(start.state.opt_state) if np.ndim(x) >= 1]
    assert moments and all(not m.any() for m in moments)
    # a model that differs from the previous stage's is refused
    bad = _cfg("stage1_5", data_root, ("init.from_checkpoint", str(workdir1)), ("model.text.num_layers", "3"))
    bad, _ = dataset.prepare(bad, tmp_path)
    with pytest.raises(config.ConfigError, match="model config differs"):
        start_lib.initial_state(bad, state_lib.build(bad, sharding.make_mesh(bad.mesh)), None,
                                checkpoint.Checkpointer(tmp_path / "c2"))


def _poison(monkeypatch, at_step):
    """Make the loader's batch number `at_step` (1-based) carry NaN pixels."""
    real = dataset.make_loader

    def make(cfg, data_dir, mesh):
        inner = real(cfg, data_dir, mesh)
        nxt = inner.__class__.__next__
        count = {"n": 0}

        class Poisoned(inner.__class__):
            def __next__(self):
                b = nxt(self)
                count["n"] += 1
                if count["n"] == at_step:
                    b["patches"] = b["patches"] * np.float32(np.nan)
                return b
        inner.__class__ = Poisoned
        return inner
    monkeypatch.setattr(dataset, "make_loader", make)


def test_nonfinite_stops_naming_the_step(monkeypatch, tmp_path, data_root):
    _poison(monkeypatch, 3)
    cfg = _cfg("stage1", data_root)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss at step 3"):
        loop.run(cfg, tmp_path)
    assert checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [2]


def test_nonfinite_skip(monkeypatch, tmp_path, data_root):
    _poison(monkeypatch, 3)
    cfg = _cfg("stage1", data_root, ("train.on_nonfinite", "skip"))
    summary = loop.run(cfg, tmp_path)
    assert summary["skipped_updates"] == 1 and summary["step"] == 4
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_updates"] == 1 and np.isfinite(recs[-1]["loss"])
    params = checkpoint.load_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_step_benchmark_smoke():
    from ovjax.bench import step as bench

    res = bench.run(("tiny",), steps=1, warmup=0, compile_torch=False,
                    jax_compiler_options={"xla_backend_optimization_level": 0})
    rows = {r["framework"]: r for r in res["rows"]}
    assert set(rows) == {"ovjax (jax.jit)", "PyTorch eager"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and np.isfinite(r["loss"])
    # the same random-init model family on the same batch: both start near log(vocab)
    assert abs(rows["ovjax (jax.jit)"]["loss"] - rows["PyTorch eager"]["loss"]) < 0.5
    assert "| tiny |" in bench.markdown(res)


def test_start_from_an_imported_hf_checkpoint(fixture_dir, tmp_path):
    from ovjax import hf, sharding
    from ovjax.train import state as state_lib

    cfg = config.load("configs/stage1.py:tiny", [("init.from_hf", str(fixture_dir))])
    setup = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
    start = start_lib.initial_state(cfg, setup, None, checkpoint.Checkpointer(tmp_path / "c"))
    assert start.step == 0 and "imported" in start.source
    ref = optim.flat(jax.device_get(hf.load(str(fixture_dir), remote_code_quirks=False).params))
    got = optim.flat(jax.device_get(start.state.params))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    other = config.load("configs/stage1.py:tiny", [("init.from_hf", str(fixture_dir)),
                                                   ("model.text.intermediate_size", "128")])
    with pytest.raises(config.ConfigError, match=r"differ in \['text.intermediate_size'\]"):
        start_lib.initial_state(other, state_lib.build(other, sharding.make_mesh(other.mesh)), None,
                                checkpoint.Checkpointer(tmp_path / "d"))
