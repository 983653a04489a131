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
(non-padding), samples and images (packed samples and images of the global batch), finite (loss and grad
norm finite).

Non-finite updates: the step takes a traced bool `skip_nonfinite` (one program serves both modes); when it
is true, an update with a non-finite loss or gradient norm is replaced by the old params and optimizer state
(the step counter still advances). The loop stops the run instead when it is false.

Optimizer state in host memory (optim.offload=opt_state, ovjax/train/state.py): the state enters and leaves
the step in `pinned_host`; inside, it is copied to the device for the update and back (`make_step_fn`).

`TrainStep` is THE compiled step: `python -m ovjax train` (via `build`, memoized per config), the tests and
the benchmarks all call it; it also holds the jitted random init of the state (`init`).
"""

from __future__ import annotations

import json
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
from ovjax.config import ConfigError
from ovjax.train import optim
from ovjax.train import state as state_lib
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
    """The un-jitted step: (state, batch, skip_nonfinite) -> (state, metrics), states in setup.shardings.

    With optim.offload=opt_state the optimizer state arrives in pinned host memory: it is copied to the device
    for the update (placed after the gradients in the program; when the copy runs is XLA's schedule) and the
    kept state is copied back. The choice between the new and the old state is made on the device, so no
    conditional works on host buffers."""
    m = int(setup.cfg.train.micro_batches)
    mesh = setup.mesh
    loss_fn = make_loss(setup)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    paths = list(setup.trainable)
    trainable_shards, _ = optim.split(setup.shardings.params, paths)
    offload = state_lib.offloads_opt_state(setup.cfg)
    opt_on_device = state_lib.device_shardings(setup.shardings.opt_state)

    def constrain_grads(g):
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, g, trainable_shards)

    def step(state: TrainState, batch, skip_nonfinite) -> tuple[TrainState, dict[str, Any]]:
        with sharding.activation_rules(mesh):
            trainable, frozen = optim.split(state.params, paths)
            supervised = jnp.sum(batch["loss_mask"].astype(jnp.float32))
            denom = jnp.maximum(supervised, 1.0)
            if m == 1:
                grads, (loss_sum, _) = grad_fn(trainable, frozen, batch, denom)
            else:
                micro_shards = sharding.micro_batch_shardings(sharding.batch_shardings(batch, mesh, m))
                micro = {k: jax.lax.with_sharding_constraint(split_micro(v, m), micro_shards[k])
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
            old_opt = state.opt_state
            if offload:
                old_opt = jax.tree_util.tree_map(jax.device_put, old_opt, opt_on_device)
            loss = loss_sum / denom
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            take = finite | jnp.logical_not(skip_nonfinite)

            def update(g, opt, params):
                updates, opt = setup.tx.update(g, opt, params)
                return optax.apply_updates(params, updates), opt

            # drop a non-finite update when asked. The update runs INSIDE the conditional, so the old and the new
            # params + moments never exist side by side (a select after the update held both: 2x the state)
            trainable, opt_state = jax.lax.cond(take, update, lambda g, opt, params: (params, opt),
                                                grads, old_opt, trainable)
            params = optim.merge(trainable, frozen)
            if offload:
                opt_state = jax.tree_util.tree_map(jax.device_put, opt_state, setup.shardings.opt_state)
            metrics = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": supervised,
                       "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)), "finite": finite,
                       "samples": jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32),
                       "images": (jnp.sum(jnp.max(batch["patch_segment"], axis=1)).astype(jnp.float32)
                                  if "patch_segment" in batch else jnp.zeros((), jnp.float32))}
            for g, sched in setup.schedules.items():
                metrics["lr" if g == "default" else f"lr/{g}"] = sched(state.step)
            if "lr" not in metrics:  # every trainable param sits in a named group
                metrics["lr"] = next(iter(setup.schedules.values()))(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return step


class TrainStep:
    """`jax.jit` of the guarded step with explicit in/out shardings; the state argument is donated.

    step(state, batch, skip_nonfinite=False) -> (state, metrics); step.put(batch) places a batch in the
    step's shardings; step.init(seed) -> a random TrainState made in its shardings; step.lower() for AOT
    (arguments: state, batch, the skip flag; `flag(bool)` gives the flag's device value)."""

    def __init__(self, setup: Setup, batch_size: int | None = None, compiler_options: dict | None = None):
        self.setup = setup
        structs = batch_struct(setup.cfg, batch_size)
        self.batch_shardings = sharding.batch_shardings(structs, setup.mesh, int(setup.cfg.train.micro_batches))
        self.batch_struct = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                             for k, v in structs.items()}
        self._replicated = NamedSharding(setup.mesh, P())
        self._flags = {}
        self._jit = jax.jit(make_step_fn(setup),
                            in_shardings=(setup.shardings, self.batch_shardings, self._replicated),
                            out_shardings=(setup.shardings, self._replicated), donate_argnums=(0,),
                            compiler_options=compiler_options)
        self._init = None

    def flag(self, skip_nonfinite: bool) -> jax.Array:
        if skip_nonfinite not in self._flags:
            self._flags[skip_nonfinite] = jax.device_put(np.bool_(skip_nonfinite), self._replicated)
        return self._flags[skip_nonfinite]

    def __call__(self, state, batch, skip_nonfinite: bool = False):
        missing = set(self.batch_struct) - set(batch)
        if missing:
            raise ValueError(f"batch lacks {sorted(missing)}")
        for k, s in self.batch_struct.items():
            if tuple(batch[k].shape) != s.shape:
                raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, the config expects {s.shape}")
        return self._jit(state, {k: batch[k] for k in self.batch_struct}, self.flag(bool(skip_nonfinite)))

    def put(self, batch) -> dict[str, jax.Array]:
        """A batch (host numpy, or global arrays) -> global arrays in the step's shardings (moved only where
        the sharding differs)."""
        return {k: batch[k] if getattr(batch[k], "sharding", None) == s else jax.device_put(batch[k], s)
                for k, s in self.batch_shardings.items()}

    def init(self, seed: int) -> TrainState:
        """Random init of the whole state, every array made in its sharding (the jitted init is kept)."""
        if self._init is None:
            self._init = state_lib.make_init(self.setup)
        return self._init(jax.random.PRNGKey(seed))

    def lower(self, state=None, batch=None):
        return self._jit.lower(state if state is not None else self.setup.abstract_with_shardings(),
                               batch if batch is not None else self.batch_struct,
                               jax.ShapeDtypeStruct((), jnp.bool_, sharding=self._replicated))


def put_batch(batch: dict[str, np.ndarray], step: TrainStep) -> dict[str, jax.Array]:
    """Host numpy batch (the whole global batch, one process) -> sharded global arrays."""
    return step.put(batch)


def compiler_options(text: str) -> dict | None:
    """`train.xla_compiler_options` "a=1,b=x" -> {"a": 1, "b": "x"} (None when empty)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"train.xla_compiler_options: {item!r} is not name=value")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out or None


_BUILT: dict[str, TrainStep] = {}
LOOP_ONLY = ("on_nonfinite", "progress", "log_every", "peak_flops")  # train fields the compiled step never reads


def build(setup: Setup, compiler_options: dict | None = None) -> TrainStep:
    """The TrainStep of `setup`, kept per (model, optim, train, mesh sections, devices, options), so a second
    run of the same config in one process (tests, the demo) reuses the compiled programs."""
    c = setup.cfg
    sections = {k: json.loads(c[k].to_json()) for k in ("model", "optim", "train", "mesh")}
    for k in LOOP_ONLY:
        sections["train"].pop(k, None)
    key = json.dumps([sections, [d.id for d in setup.mesh.devices.flat], list(setup.mesh.axis_names),
                      list(setup.mesh.devices.shape), compiler_options], sort_keys=True, default=str)
    if key not in _BUILT:
        _BUILT[key] = TrainStep(setup, compiler_options=compiler_options)
    return _BUILT[key]
