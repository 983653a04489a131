"""Held-out evaluation during training (ovjax/train/evaluate.py): the eval loss is the train step's loss, the
accuracies match a plain full-logits reference, and a run with data.eval logs eval lines at the configured
steps, the same ones (and the same values) after a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from ovjax import config, sharding
from ovjax.train import dataset, evaluate, loop, optim, state as state_lib, step as step_lib

FAST = [("train.xla_compiler_options", "xla_backend_optimization_level=0"), ("train.log_every", "2"),
        ("checkpoint.every", "4"), ("data.synthetic_samples", "200"), ("train.progress", "lines"),
        ("eval.every", "3"), ("eval.batches", "2")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """stage1_5 tiny on a synthetic set, with that same packed set as data.eval."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = config.load("configs/stage1_5.py:tiny", FAST + [("data.synthetic_root", str(root))])
    cfg, _ = dataset.prepare(cfg, Path("/nonexistent"))
    return config.with_values(cfg, {"data.eval": cfg.data.train})


def _eval_lines(workdir):
    recs = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "eval/loss" in r}


def test_eval_matches_the_train_loss_and_a_reference(base):
    setup = state_lib.build(base, sharding.make_mesh(base.mesh))
    train_step = step_lib.build(setup, step_lib.compiler_options(base.train.xla_compiler_options))
    params = train_step.init(3).params
    ev = evaluate.Evaluator(base, setup, train_step, log=lambda *a: None)
    batch = next(ev._loader())
    got = jax.device_get(ev._fn(params, batch))
    # the train step's loss function on the same batch and params
    loss_fn = step_lib.make_loss(setup)
    flat = jax.device_get(params)
    host = jax.device_get(batch)
    _, (ref_sum, ref_n) = loss_fn(flat, {}, host, 1.0)
    assert float(got["supervised"]) == float(ref_n) == float(host["loss_mask"].sum()) > 0
    np.testing.assert_allclose(float(got["loss_sum"]), float(ref_sum), rtol=1e-5)
    # accuracies from full logits, computed plainly on the host
    from ovjax.data.batch import IMAGE_KEYS
    from ovjax.models import vlm

    model = vlm.VLM(setup.model_cfg)
    hidden, _ = model.apply({"params": optim.merge(flat, {})}, host["tokens"], host["positions"], host["segment_ids"],
                            num_images=int(base.train.max_images), **{k: host[k] for k in IMAGE_KEYS})
    logits = np.asarray(hidden, np.float32) @ np.asarray(step_lib.head_kernel(flat, setup.model_cfg.text), np.float32)
    hit = (logits.argmax(-1) == host["targets"]) & host["loss_mask"]
    assert float(got["hits"]) == hit.sum()
    exact = samples = 0
    for r in range(hit.shape[0]):
        for s in range(1, int(host["segment_ids"][r].max()) + 1):
            sup = host["loss_mask"][r] & (host["segment_ids"][r] == s)
            if sup.any():
                samples += 1
                exact += bool(hit[r][sup].all())
    assert (float(got["exact"]), float(got["samples"])) == (exact, samples) and samples > 0


def test_eval_schedule_survives_a_resume(base, tmp_path):
    loop.run(config.with_values(base, {"train.steps": 8}), tmp_path / "whole")
    whole = _eval_lines(tmp_path / "whole")
    assert sorted(whole) == [3, 6, 8]
    for r in whole.values():
        assert np.isfinite(r["eval/loss"]) and r["eval/loss"] > 0 and 0 <= r["eval/answer_exact"] <= 1
        assert r["eval/rows"] == 2 * base.train.batch_size and r["eval/samples"] > 0
        assert 0 <= r["eval/token_accuracy"] <= 1 and "loss" not in r
    assert whole[8]["eval/loss"] < whole[3]["eval/loss"]  # the model learns (stage 1.5 on the same set)
    events = b"".join(p.read_bytes() for p in (tmp_path / "whole" / "tb").glob("events.out.tfevents.*"))
    assert b"eval/loss" in events and b"eval/answer_exact" in events

    # a run that lost its last checkpoint (killed before step 8 was saved) resumes from step 4
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "8")
    loop.run(config.with_values(base, {"train.steps": 8}), tmp_path / "split")
    split = _eval_lines(tmp_path / "split")
    assert sorted(split) == [3, 6, 8]
    for s in (3, 6, 8):
        assert split[s]["eval/loss"] == pytest.approx(whole[s]["eval/loss"], rel=1e-6, abs=0)
        assert split[s]["eval/answer_exact"] == whole[s]["eval/answer_exact"]
    assert split[6]["eval/seconds"] != whole[6]["eval/seconds"]  # scored again after the resume, not kept


def test_bad_eval_settings(base):
    with pytest.raises(config.ConfigError, match="data.eval=/nope is not a packed directory"):
        setup = state_lib.build(base, sharding.make_mesh(base.mesh))
        evaluate.Evaluator(config.with_values(base, {"data.eval": "/nope"}), setup, None)
    with pytest.raises(config.ConfigError, match=r"eval.every must be an int >= 0, got -1"):
        from ovjax.train import config as run_config
        run_config.validate(config.with_values(base, {"eval.every": -1}))
