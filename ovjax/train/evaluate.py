"""Held-out evaluation during training: `data.eval` (a packed directory) scored every `eval.every` steps and
at the last step, logged to metrics.jsonl ("eval/..." keys on a line of its own) and TensorBoard.

Per evaluation, one pass over the set in the loader's seeded order (`eval.batches` caps it), in batches of
`train.batch_size` rows with the train step's input shardings:
  eval/loss            summed cross-entropy over supervised tokens / their number: the train step's own loss
                       (`step.chunked_cross_entropy` on the model's hidden states and `step.head_kernel`)
  eval/token_accuracy  supervised tokens whose argmax prediction is the target (teacher forced)
  eval/answer_exact    packed samples whose every supervised token (the answer turns) is argmax-correct,
                       teacher forced; samples without supervised tokens are not counted. Packed records carry
                       targets and loss masks, so this is always computable; it is not free generation.
  eval/samples, eval/supervised_tokens, eval/rows (rows scored; rows that do not fill a last batch are
                       left out and counted in eval/rows_left_out), eval/seconds
The schedule is a function of the global step only, so a resumed run evaluates at the same steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ovjax import sharding
from ovjax.config import ConfigError
from ovjax.data.batch import IMAGE_KEYS
from ovjax.models import vlm
from ovjax.train import step as step_lib


def argmax_hits(hidden, head, targets, chunk: int, dtype=jnp.float32):
    """hidden [B, T, H], head [H, V], targets int [B, T] -> bool [B, T]: argmax of the logits == target.
    The vocabulary projection runs `chunk` tokens at a time, so [B, T, V] logits never exist whole."""
    b, t, h = hidden.shape
    chunk = min(chunk, t)
    n = t // chunk
    hs = jnp.swapaxes(hidden.reshape(b, n, chunk, h), 0, 1)      # [n, B, chunk, H]
    ts = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)        # [n, B, chunk]

    def one(xs):
        hc, tc = xs
        logits = jnp.einsum("bth,hv->btv", hc.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
        return jnp.argmax(logits, axis=-1) == tc
    return jnp.swapaxes(jax.lax.map(one, (hs, ts)), 0, 1).reshape(b, t)


def make_eval_fn(setup):
    """(params, batch) -> {loss_sum, supervised, hits, exact, samples}: float32 scalars for one batch."""
    cfg = setup.cfg
    model = vlm.VLM(setup.model_cfg)
    max_images, chunk = int(cfg.train.max_images), int(cfg.train.loss_chunk)
    dtype = vlm.dtype_of(setup.model_cfg.dtype)

    def eval_fn(params, batch):
        with sharding.activation_rules(setup.mesh):
            images = {k: batch[k] for k in IMAGE_KEYS} if "patches" in batch else {}
            hidden, _ = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                    num_images=max_images if images else 0, **images)
            head = step_lib.head_kernel(params, setup.model_cfg.text)
            mask = batch["loss_mask"]
            loss_sum, supervised = step_lib.chunked_cross_entropy(hidden, head, batch["targets"], mask, chunk, dtype)
            right = argmax_hits(hidden, head, batch["targets"], chunk, dtype) & mask
        b, t = mask.shape
        seg = (jnp.arange(b)[:, None] * (t + 1) + batch["segment_ids"]).reshape(-1)   # one id per (row, sample)
        per_sup = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32), seg, num_segments=b * (t + 1))
        per_right = jax.ops.segment_sum(right.reshape(-1).astype(jnp.int32), seg, num_segments=b * (t + 1))
        answered = per_sup > 0
        return {"loss_sum": loss_sum, "supervised": supervised, "hits": jnp.sum(right).astype(jnp.float32),
                "exact": jnp.sum(answered & (per_right == per_sup)).astype(jnp.float32),
                "samples": jnp.sum(answered).astype(jnp.float32)}
    return eval_fn


class Evaluator:
    """Scores `cfg.data.eval` with the params of a TrainStep's state; `due(step, total)` says when."""

    def __init__(self, cfg, setup, train_step, log=print):
        from ovjax.train import dataset

        self.cfg, self.dir = cfg, Path(cfg.data.eval)
        if not (self.dir / "manifest.json").exists():
            raise ConfigError(f"data.eval={cfg.data.eval} is not a packed directory (no manifest.json); make one "
                              "with `python -m ovjax pack`")
        tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else dataset.find_tokenizer(self.dir)
        if tok is not None:
            dataset.check_tokenizer(cfg, tok)
        self.every, self.max_batches = int(cfg.eval.every), int(cfg.eval.batches)
        self.shardings = train_step.batch_shardings
        self._fn = jax.jit(make_eval_fn(setup), in_shardings=(setup.shardings.params, self.shardings),
                           out_shardings=NamedSharding(setup.mesh, P()))
        loader = self._loader()  # fails here, before training, on a set that fills no batch
        self.num_rows, self.num_batches = loader.num_rows, loader.num_batches
        loader.close()
        if self.max_batches:
            self.num_batches = min(self.num_batches, self.max_batches)
        log(f"eval: {self.dir} ({self.num_rows} rows; {self.num_batches} batch(es) of {cfg.train.batch_size} "
            f"scored every {self.every or 'last'} step(s))")

    def _loader(self):
        from ovjax.data import images, loader

        t, d = self.cfg.train, self.cfg.data
        try:
            return loader.PackedLoader(str(self.dir), seq_len=t.seq_len, max_patches=t.max_patches,
                                       global_batch_size=t.batch_size, max_images=t.max_images,
                                       max_segments=t.max_segments or None, shardings=self.shardings,
                                       seed=d.seed, num_epochs=1, worker_count=0, min_pixels=d.min_pixels,
                                       max_pixels=d.max_pixels or images.MAX_PIXELS)
        except loader.LoaderError as e:
            raise ConfigError(f"data.eval={self.dir}: {e}") from None

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    def __call__(self, params, step: int) -> dict:
        """One pass over the eval set -> the metrics.jsonl record of `step`."""
        jax.block_until_ready(params)  # the train step that made them is not eval time
        t0 = time.perf_counter()
        sums = dict.fromkeys(("loss_sum", "supervised", "hits", "exact", "samples"), 0.0)
        loader = self._loader()
        try:
            for _ in range(self.num_batches):
                out = jax.device_get(self._fn(params, next(loader)))
                for k in sums:
                    sums[k] += float(np.float64(out[k]))
        finally:
            loader.close()
        sup = max(sums["supervised"], 1.0)
        rows = self.num_batches * int(self.cfg.train.batch_size)
        return {"step": step, "eval/loss": sums["loss_sum"] / sup, "eval/token_accuracy": sums["hits"] / sup,
                "eval/answer_exact": sums["exact"] / max(sums["samples"], 1.0), "eval/samples": int(sums["samples"]),
                "eval/supervised_tokens": int(sums["supervised"]), "eval/rows": rows,
                "eval/rows_left_out": self.num_rows - rows, "eval/seconds": time.perf_counter() - t0}
