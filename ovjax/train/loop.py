"""The training loop of one stage: resumable, observable. `python -m ovjax train` (ovjax/train/command.py)
loads the config and calls `run`.

Order of a run: data (ovjax/train/dataset.py; the synthetic set is made up front when data.train is empty)
-> mesh and state layout -> THE step (ovjax/train/step.py, `step.build`) -> start (ovjax/train/start.py:
resume, previous stage, HF import or random) -> the loop. Each iteration dispatches step N, then fetches the
metrics of step N-1 (already done, so the host never waits on the device except at log and save steps, where
step N itself is fetched: a non-finite state is never saved).

Non-finite loss or gradient norm: `train.on_nonfinite=stop` (default) stops with an error naming the
first bad step; `skip` drops such updates (the step's program keeps params and optimizer state) and counts
them in `skipped_updates`.

Outputs under DIR: checkpoints/ (Orbax: state, data iterator, counters; every `checkpoint.every` steps and
at the end, `checkpoint.keep` kept), metrics.jsonl (one object per logged step), tb/ (TensorBoard),
config.json (the resolved config). With `data.eval` set, a held-out pass every `eval.every` steps and at the
last step (ovjax/train/evaluate.py) adds an "eval/..." line to metrics.jsonl.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ovjax.train import config as run_config


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf and the run is configured to stop."""


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Train one stage in `workdir`; returns a summary (last loss, counters, seconds)."""
    import jax

    from ovjax import checkpoint, sharding
    from ovjax.train import dataset, evaluate, metrics, start as start_lib, state as state_lib, step as step_lib

    t_start = time.perf_counter()
    run_config.validate(cfg)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    log = print if primary else (lambda *a, **k: None)

    cfg, data_dir = dataset.prepare(cfg, workdir, log)
    setup = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
    if primary:
        (workdir / "config.json").write_text(cfg.to_json(indent=2) + "\n")
    train_step = step_lib.build(setup, step_lib.compiler_options(cfg.train.xla_compiler_options))
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    start = start_lib.initial_state(cfg, setup, train_step, ckpt, log)
    loader = dataset.make_loader(cfg, data_dir, setup.mesh)
    evaluator = evaluate.Evaluator(cfg, setup, train_step, log) if cfg.data.eval else None
    if start.data_state is not None:
        loader.set_state(start.data_state)
    step_flops, peak = startup_report(cfg, setup, workdir, data_dir, loader, start, log)

    t, total, every = cfg.train, int(cfg.train.steps), int(cfg.checkpoint.every)
    skip = t.on_nonfinite == "skip"
    tally = metrics.Tally(start.counters, step_flops=step_flops, n_devices=jax.device_count(), peak=peak)
    writer = metrics.MetricsWriter(workdir, total_steps=total, resume_step=start.step, enabled=primary,
                                   progress={"auto": None, "bar": True, "lines": False}[t.progress])
    state, pending, first_step_s = start.state, None, None
    if start.step >= total:
        done = metrics.read_jsonl(workdir / "metrics.jsonl")
        done = [r for r in done if "loss" in r]  # eval lines have no "loss"
        tally.last = {"loss": done[-1]["loss"]} if done else {}
        log(f"step {start.step} of {total} is done already (checkpoint {ckpt.latest_step()}); nothing to train")
    try:
        for step in range(start.step + 1, total + 1):
            state, m = train_step(state, train_step.put(next(loader)), skip)
            if pending is not None:  # step N-1 is done by now: count it while step N runs
                fetch(tally, writer, *pending, stop=not skip, ckpt=ckpt)
            pending = (step, m)
            first = step == start.step + 1
            is_log, is_save = step % t.log_every == 0 or step == total, step % every == 0 or step == total
            if first or is_log or is_save:  # wait for step N itself
                fetch(tally, writer, *pending, stop=not skip, ckpt=ckpt)
                pending = None
                if first:
                    first_step_s = time.perf_counter() - t_start
                    writer.note(f"first step done {first_step_s:.1f} s after start (compile included)")
                if is_log:
                    writer.write(tally.record(step, loader.epoch))
                if first:
                    tally.start_clock()  # rates count the steps after the first (compile) one
            if evaluator is not None and evaluator.due(step, total):
                record = evaluator(state.params, step)
                tally.exclude(record["eval/seconds"])  # rates are of training steps only
                writer.write_eval(record)
            if is_save:
                ckpt.save(step, state, loader.get_state(),
                          {"step": step, "counters": dict(tally.counters), "config": cfg.to_json()})
        ckpt.wait()
    finally:
        loader.close()
        ckpt.close()
        writer.close()
    seconds = time.perf_counter() - t_start
    last_step = max(start.step, total)
    summary = {"step": last_step, "loss": float(tally.last.get("loss", math.nan)), "seconds": seconds,
               "first_step_seconds": first_step_s, **tally.counters}
    log(f"done: step {last_step}, loss {summary['loss']:.4f}, {seconds:.1f} s; checkpoints in {ckpt.directory}")
    return summary


def fetch(tally, writer, step: int, device_metrics: dict, *, stop: bool, ckpt) -> None:
    """Bring one step's metrics to the host and count them; raise NonFiniteLoss on a bad step when `stop`."""
    import jax

    m = jax.device_get(device_metrics)
    if stop and not bool(m["finite"]):
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
            f"stopping without saving. The latest checkpoint is step {ckpt.latest_step()}; set "
            "--config.train.on_nonfinite=skip to drop such updates instead")
    if not tally.add(step, m):
        writer.note(f"step {step}: non-finite loss {float(m['loss'])}; update skipped "
                    f"({tally.counters['skipped_updates']} so far)")


def startup_report(cfg, setup, workdir: Path, data_dir: Path, loader, start, log) -> tuple[float, float]:
    """Print what the run is about to do; -> (model FLOPs of one step, peak FLOP/s of one device)."""
    import numpy as np

    from ovjax.train import flops as flops_lib, metrics, optim, state as state_lib

    t = cfg.train
    towers = tuple(sorted({p.split("/")[0] for p in setup.trainable}))
    step_flops = flops_lib.step_flops(setup.model_cfg, t.batch_size, t.seq_len, t.max_patches, t.max_images,
                                      trainable=towers)["train"]
    peak, peak_src = metrics.peak_flops(override=t.peak_flops)
    sizes = {p: int(np.prod(x.shape)) for p, x in optim.flat(setup.abstract.params).items()}
    n_train = sum(n for p, n in sizes.items() if p in set(setup.trainable))
    log("=" * 72)
    log(f"ovjax train  workdir {workdir}")
    log(state_lib.report(setup))
    from ovjax.models import lora
    parts = sorted({p.split("/")[0] + (" adapters" if lora.is_adapter(p) else "") for p in setup.trainable})
    log(f"model {cfg.model.name}: {sum(sizes.values()):,} params, {n_train:,} trainable ({', '.join(parts)}); "
        f"compute {cfg.model.dtype}, remat {cfg.model.remat}, attention {cfg.model.attention_impl}")
    log(f"batch {t.batch_size} rows x {t.seq_len} tokens, {t.max_patches} patches/row, micro-batches "
        f"{t.micro_batches}; {step_flops / 1e9:.2f} GFLOP/step; peak {peak / 1e12:.3f} TFLOP/s/device ({peak_src})")
    log(f"data {data_dir} ({loader.num_rows} rows, seed {cfg.data.seed}, {cfg.data.workers} workers); "
        f"start: {start.source}")
    log("=" * 72)
    return step_flops, peak
