"""LoRA (issue 13, must-show 1): a LoRA run started from a previous stage's checkpoint (adapters fresh, base
frozen in bf16) lowers the held-out loss on a task the frozen model does not solve; only the adapters and
the projector (configured trainable) change, every other param bit for bit; `export` folds the adapters
into the kernels and the exported model gives the adapter model's logits within 1e-5."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import ovjax.hf as hf
from ovjax import checkpoint, config, sharding
from ovjax.config import ConfigError
from ovjax.hf import export_cmd
from ovjax.models import lora
from ovjax.train import dataset, loop, optim
from ovjax.train import evaluate as evaluate_lib
from ovjax.train import start as start_lib
from ovjax.train import state as state_lib
from ovjax.train import step as step_lib

FAST = [("train.xla_compiler_options", "xla_backend_optimization_level=0"), ("train.progress", "lines"),
        ("mesh.data", "2"), ("train.log_every", "10")]
STEPS = 30


def _host(tree):
    return {k: np.asarray(v) for k, v in optim.flat(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step stage-1.5 (captions) base; a LoRA run (questions) from it; held-out questions of another seed."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    base_dir, lora_dir = root / "base", root / "lora"
    base_cfg = config.load("configs/stage1_5.py:tiny", FAST + [
        ("train.steps", "2"), ("checkpoint.every", "2"), ("data.synthetic_root", str(data)),
        ("data.synthetic_samples", "200")])
    loop.run(base_cfg, base_dir)
    over = FAST + [("train.steps", str(STEPS)), ("checkpoint.every", str(STEPS)), ("data.synthetic_root", str(data)),
                   ("data.synthetic_samples", "600"), ("init.from_checkpoint", str(base_dir)),
                   ("optim.frozen_dtype", "bfloat16")]
    held_out = dataset.with_synthetic_data(config.load("configs/lora.py:tiny", over + [("data.seed", "7")]),
                                           data, log=lambda *a: None).data.train
    cfg = config.load("configs/lora.py:tiny", over + [("data.eval", held_out), ("eval.batches", "4")])
    cfg = dataset.with_synthetic_data(cfg, data, log=lambda *a: None)
    summary = loop.run(cfg, lora_dir)
    setup = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
    train_step = step_lib.build(setup, step_lib.compiler_options(cfg.train.xla_compiler_options))
    # the params the run started from (what start.py makes): the base read back, adapters fresh (B = 0)
    start = state_lib.state_from_params(
        setup, start_lib.with_fresh_adapters(setup, lambda t: checkpoint.load_params(base_dir, t))).params
    final = checkpoint.load_params(lora_dir, setup.abstract_with_shardings().params)
    evaluator = evaluate_lib.Evaluator(cfg, setup, train_step, log=lambda *a: None)
    return {"cfg": cfg, "lora_dir": lora_dir, "summary": summary, "root": root,
            "start": _host(start), "final": _host(final),
            "eval_start": evaluator(start, 0), "eval_final": evaluator(final, STEPS)}


def test_lora_lowers_the_held_out_loss_of_a_task_the_frozen_model_does_not_solve(runs):
    before, after = runs["eval_start"], runs["eval_final"]
    print("held-out", {k: (before[k], after[k]) for k in ("eval/loss", "eval/answer_exact")})
    # measured (30 steps): loss 5.98 -> 5.12, answer_exact 0.0 -> 0.33. The base's head and final norm are frozen
    # after 2 steps from random init (logits ~0.2 apart), so the loss cannot go far below log(vocab 160) = 5.08
    # here; the answers become right all the same.
    assert before["eval/answer_exact"] <= 0.05          # the frozen base does not answer
    assert after["eval/loss"] < before["eval/loss"] - 0.5
    assert after["eval/answer_exact"] >= 0.2


def test_only_adapters_and_the_projector_change(runs):
    start, final = runs["start"], runs["final"]
    assert set(start) == set(final)
    adapters = [p for p in start if lora.is_adapter(p)]
    assert sorted({p.split("/")[-2] for p in adapters}) == sorted(lora.LLM_PROJECTIONS)
    for p, v in start.items():
        if p.endswith("/lora_b"):
            assert not v.any(), p                        # fresh adapters: B = 0, the run starts at the base
        trainable = lora.is_adapter(p) or p.startswith("merger/")
        if trainable:
            assert final[p].dtype == np.float32, p
            assert not np.array_equal(final[p], v), f"{p} did not train"
        else:
            assert final[p].dtype == np.dtype("bfloat16"), p   # optim.frozen_dtype
            assert np.array_equal(final[p], v), f"frozen {p} changed"


def test_export_folds_the_adapters_into_the_kernels(runs):
    out = runs["root"] / "hf"
    assert export_cmd.main(["--checkpoint", str(runs["lora_dir"]), "--out", str(out)]) == 0
    cfg = runs["cfg"].model
    rng = np.random.RandomState(0)
    ids = rng.randint(10, 40, size=(2, 12))
    k = 4
    ids[0, 2] = cfg.vision_start_token_id
    ids[0, 3:3 + k] = cfg.image_token_id
    ids[0, 3 + k] = cfg.vision_end_token_id
    pixels, grid = rng.randn(16, 588).astype(np.float32), np.array([[1, 4, 4]])
    adapter_model = hf.Model(cfg, optim.nest(runs["final"]))
    want = np.asarray(adapter_model.logits(ids, pixels, grid))
    exported = hf.load(out, remote_code_quirks=False)
    assert not any(lora.is_adapter(p) for p in optim.flat(exported.params))
    got = np.asarray(exported.logits(ids, pixels, grid))
    assert np.abs(got - want).max() <= 1e-5
    kernel = "language_model/layers/q_proj/kernel"     # the adapters did change the exported kernels
    moved = np.abs(np.asarray(optim.flat(exported.params)[kernel]) - runs["start"][kernel].astype(np.float32))
    assert moved.max() > 1e-3


def test_merge_matches_the_adapter_model_in_the_vit_too():
    """Adapters on every LLM and ViT projection with random B: merged params, plain model == adapter model."""
    cfg = config.load("configs/lora.py:tiny", [("model.lora.vision_targets", "qkv,proj,fc1,fc2"),
                                               ("model.lora.rank", "3"), ("model.lora.alpha", "5.0")]).model
    from ovjax.models import vlm
    params = optim.flat(jax.device_get(vlm.init_params(cfg, jax.random.PRNGKey(1))))
    rng = np.random.RandomState(1)
    params = {p: rng.normal(0, 0.3, v.shape).astype(np.float32) if p.endswith("lora_b") else np.asarray(v)
              for p, v in params.items()}
    assert params["visual/blocks/qkv/lora_a"].shape[-1] == 3
    ids = rng.randint(10, 40, size=(1, 10))
    ids[0, 1], ids[0, 2:6], ids[0, 6] = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    pixels, grid = rng.randn(16, 588).astype(np.float32), np.array([[1, 4, 4]])
    want = np.asarray(hf.Model(cfg, optim.nest(params)).logits(ids, pixels, grid))
    merged = lora.merged(optim.nest(params), cfg.lora)
    got = np.asarray(hf.Model(lora.without_lora(cfg), merged).logits(ids, pixels, grid))
    assert np.abs(got - want).max() <= 1e-5
    flat_merged = optim.flat(merged)
    for proj in ("qkv", "proj", "fc1", "fc2"):          # every ViT adapter was folded in
        kernel = f"visual/blocks/{proj}/kernel"
        assert np.abs(flat_merged[kernel] - params[kernel]).max() > 1e-3, kernel


@pytest.mark.parametrize("over, message", [
    ([("optim.trainable", "merger")], "lacks 'lora'"),
    ([("model.lora.rank", "0")], "model.lora.rank is 0"),
    ([("model.lora.targets", "q_proj,nope")], "are not projections"),
    ([("optim.frozen_dtype", "float16")], "optim.frozen_dtype"),
])
def test_lora_config_errors_are_one_line(over, message, tmp_path):
    from ovjax.train.config import validate
    cfg = config.load("configs/lora.py:tiny", over)
    with pytest.raises(ConfigError, match=message) as e:
        validate(cfg)
    assert "\n" not in str(e.value)

