"""The train step: loss, gradient accumulation, optimizer update, one `jax.jit` with explicit shardings.

Loss: cross-entropy over `loss_mask` tokens only, summed and divided by the number of supervised tokens of
the WHOLE global batch (all micro-batches, all packed samples; lesson 4), so accumulation and packing do not
change the objective. The vocabulary projection runs in chunks of `train.loss_chunk` tokens under a scan
with a rematerialised body, so [B, T, V] float32 logits never exist whole (lesson 11c). Chunks are strided
(chunk j holds tokens j, j+n, j+2n, ...), so a `sequence`-sharded T stays sharded inside every chunk.

Micro-batches: the batch [B, ...] is viewed as [B/M, M, ...] (row i*M + m goes to micro-batch m), so every
micro-batch keeps its rows spread over (data, fsdp) with no data movement; gradients (float32, trainable
params only) are summed under a scan.

Sequence parallelism (mesh axis `sequence`): the LLM's token axis is sharded at the block edges; inside
attention the queries stay sharded and K/V are all-gathered over `sequence` (a constraint in
ovjax/models/qwen3.py), so each device attends its query block to the full keys. Simple and exact for any
segment layout; costs one all-gather of K/V per layer (K/V are small with GQA: 8 of 32 heads).

Metrics: loss, grad_norm (before clipping), lr (default group) and lr/<group>, supervised_tokens, tokens
(non-padding), finite (loss and grad norm finite; the loop decides what to do when not).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ovjax import sharding
from ovjax.data.batch import IMAGE_KEYS, batch_struct
from ovjax.models import vlm
from ovjax.models.layers import constrain
from ovjax.train import optim
from ovjax.train.state import Setup, TrainState

def head_kernel(params, text_cfg):
    lm = params["language_model"]
    return lm["embed_tokens"].T if text_cfg.tie_word_embeddings else lm["lm_head"]


def chunked_cross_entropy(hidden, head, targets, loss_mask, chunk: int, dtype=jnp.float32):
    """hidden [B, T, H], head [H, V], targets int [B, T], loss_mask bool [B, T] ->
    (sum of -log p(target) over masked tokens, float32 (); number of masked tokens, float32 ())."""
    b, t, h = hidden.shape
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"seq_len {t} is not a multiple of train.loss_chunk {chunk}")
    n = t // chunk

    def strided(x):  # [B, T, ...] -> [n, B, chunk, ...]; chunk j = tokens j, j+n, ...
        return jnp.moveaxis(x.reshape((b, chunk, n) + x.shape[2:]), 2, 0)

    @jax.checkpoint
    def one(hc, tc, mc, w):
        logits = jnp.einsum("bth,hv->btv", hc.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        tgt = jnp.sum(jnp.where(vocab == tc[..., None], logits, 0.0), axis=-1)
        m = mc.astype(jnp.float32)
        return jnp.sum((lse - tgt) * m), jnp.sum(m)

    hidden = constrain(hidden, ("act_batch", "act_seq", "act_embed"))
    if n == 1:
        return one(hidden, targets, loss_mask, head)

    def body(acc, xs):
        s, c = one(*xs, head)
        return (acc[0] + s, acc[1] + c), None

    zero = jnp.zeros((), jnp.float32)
    (s, c), _ = jax.lax.scan(body, (zero, zero), (strided(hidden), strided(targets), strided(loss_mask)))
    return s, c


def split_micro(x, m: int):
    """[B, ...] -> [M, B/M, ...] with row i*M + k in micro-batch k (no data movement under (data, fsdp))."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)


def make_loss(setup: Setup):
    """-> loss_fn(trainable, frozen, micro_batch, denom) -> (loss_sum / denom, (loss_sum, n_supervised))."""
    cfg = setup.cfg
    model = vlm.VLM(setup.model_cfg)
    max_images = int(cfg.train.max_images)
    dtype = vlm.dtype_of(setup.model_cfg.dtype)

    def loss_fn(trainable, frozen, mb, denom):
        params = optim.merge(trainable, frozen)
        images = {k: mb[k] for k in IMAGE_KEYS} if "patches" in mb else {}
        hidden, _ = model.apply({"params": params}, mb["tokens"], mb["positions"], mb["segment_ids"],
                                num_images=max_images if images else 0, **images)
        s, n = chunked_cross_entropy(hidden, head_kernel(params, setup.model_cfg.text), mb["targets"],
                                     mb["loss_mask"], int(cfg.train.loss_chunk), dtype)
        return s / denom, (s, n)
    return loss_fn


def make_step_fn(setup: Setup):
    """The un-jitted step: (state, batch) -> (state, metrics)."""
    m = int(setup.cfg.train.micro_batches)
    mesh = setup.mesh
    loss_fn = make_loss(setup)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    paths = list(setup.trainable)
    trainable_shards, _ = optim.split(setup.shardings.params, paths)

    def constrain_grads(g):
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, g, trainable_shards)

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
        with sharding.activation_rules(mesh):
            trainable, frozen = optim.split(state.params, paths)
            supervised = jnp.sum(batch["loss_mask"].astype(jnp.float32))
            denom = jnp.maximum(supervised, 1.0)
            if m == 1:
                grads, (loss_sum, _) = grad_fn(trainable, frozen, batch, denom)
            else:
                micro = {k: jax.lax.with_sharding_constraint(split_micro(v, m), NamedSharding(
                    mesh, P(None, *sharding.batch_spec(v.ndim, k in sharding.TOKEN_KEYS))))
                         for k, v in batch.items()}

                def body(carry, mb):
                    g_acc, l_acc = carry
                    g, (s, _) = grad_fn(trainable, frozen, mb, denom)
                    g_acc = constrain_grads(jax.tree_util.tree_map(jnp.add, g_acc, g))
                    return (g_acc, l_acc + s), None
                zeros = constrain_grads(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable))
                (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
            grads = constrain_grads(grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = setup.tx.update(grads, state.opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            new_state = TrainState(step=state.step + 1, params=optim.merge(trainable, frozen), opt_state=opt_state)
            loss = loss_sum / denom
            metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": supervised,
                       "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
                       "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
            for g, sched in setup.schedules.items():
                metrics["lr" if g == "default" else f"lr/{g}"] = sched(state.step)
            if "lr" not in metrics:  # every trainable param sits in a named group
                metrics["lr"] = next(iter(setup.schedules.values()))(state.step)
        return new_state, metrics
    return step


class TrainStep:
    """`jax.jit` of the step with explicit in/out shardings; the state argument is donated.

    step(state, batch) -> (state, metrics); step.lower(abstract_state, abstract_batch) for AOT."""

    def __init__(self, setup: Setup, batch_size: int | None = None, compiler_options: dict | None = None):
        self.setup = setup
        structs = batch_struct(setup.cfg, batch_size)
        self.batch_shardings = sharding.batch_shardings(structs, setup.mesh, int(setup.cfg.train.micro_batches))
        self.batch_struct = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                             for k, v in structs.items()}
        replicated = NamedSharding(setup.mesh, P())
        self._jit = jax.jit(make_step_fn(setup), in_shardings=(setup.shardings, self.batch_shardings),
                            out_shardings=(setup.shardings, replicated), donate_argnums=(0,),
                            compiler_options=compiler_options)

    def __call__(self, state, batch):
        missing = set(self.batch_struct) - set(batch)
        if missing:
            raise ValueError(f"batch lacks {sorted(missing)}")
        for k, s in self.batch_struct.items():
            if tuple(batch[k].shape) != s.shape:
                raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, the config expects {s.shape}")
        return self._jit(state, {k: batch[k] for k in self.batch_struct})

    def lower(self, state=None, batch=None):
        return self._jit.lower(state if state is not None else self.setup.abstract_with_shardings(),
                               batch if batch is not None else self.batch_struct)


def put_batch(batch: dict[str, np.ndarray], step: TrainStep) -> dict[str, jax.Array]:
    """Host numpy batch (the whole global batch, one process) -> sharded global arrays."""
    return {k: jax.device_put(np.asarray(batch[k]), step.batch_shardings[k]) for k in step.batch_struct}
