"""The KV-cache path: prefill + one-token decode steps give the logits of the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from ovjax.configs import models as model_configs
from ovjax.models.qwen3 import init_cache
from ovjax.models.vlm import VLM, freeze, init_params

CFG = model_configs.preset("tiny")
MODEL = VLM(freeze(CFG))


@jax.jit
def _run(params, tokens, positions, segments, cache):
    hidden, cache = MODEL.apply({"params": params}, tokens, positions, segments, cache=cache)
    return MODEL.apply({"params": params}, hidden, method=VLM.logits), cache


def run(params, tokens, positions, segments, cache=None):
    logits, cache = _run(params, tokens, positions, segments, cache)
    return np.asarray(logits), cache


def test_prefill_then_decode_equals_full_forward():
    params = init_params(CFG, jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    b, t, prefill = 2, 12, 5
    tokens = jnp.asarray(rs.randint(0, 150, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ones = jnp.ones((b, t), jnp.int32)
    full, _ = run(params, tokens, positions, ones)

    cache = init_cache(CFG.text, b, 16)
    step, cache = run(params, tokens[:, :prefill], positions[:, :prefill], ones[:, :prefill], cache)
    got = [step]
    for i in range(prefill, t):
        step, cache = run(params, tokens[:, i:i + 1], positions[:, i:i + 1], ones[:, i:i + 1], cache)
        got.append(step)
    got = np.concatenate(got, axis=1)
    assert int(cache["index"]) == t
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)


def test_left_padded_row_matches_unpadded():
    """A left-padded prompt (pads in segment 0, positions from the mask) decodes like the bare prompt."""
    params = init_params(CFG, jax.random.PRNGKey(1))
    rs = np.random.RandomState(1)
    prompt = rs.randint(0, 150, 6)
    bare, _ = run(params, jnp.asarray(prompt[None], jnp.int32), jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32))
    padded = np.concatenate([[0, 0, 0], prompt])[None]
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    cache = init_cache(CFG.text, 1, 12)
    out, _ = run(params, jnp.asarray(padded, jnp.int32), jnp.asarray(pos), jnp.asarray(seg), cache)
    np.testing.assert_allclose(out[:, 3:], bare, atol=1e-5, rtol=1e-5)
