"""The whole tiny model (ViT head_dim 12, LLM head_dim 16, GQA 2) with attention_impl="pallas" (interpreted)
gives the loss and gradients of attention_impl="xla" on a packed batch with images and padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ovjax.configs import models as model_configs
from ovjax.models.vlm import VLM, freeze, init_params, patch_positions

PIX = 3 * 14 * 14


def packed_batch(cfg, seq_len=48, max_patches=40):
    """One row: two samples (one with two images), trailing padding; a ViT buffer with padding patches."""
    rs = np.random.RandomState(0)
    tokens = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    segments = np.zeros(seq_len, np.int32)
    patches = np.zeros((max_patches, PIX), np.float32)
    pseg = np.zeros(max_patches, np.int32)
    hw = np.zeros((max_patches, 2), np.int32)
    at, pat, img = 0, 0, 0
    for s, grids in enumerate([[(2, 4)], [(4, 4), (2, 2)]]):
        tok = list(rs.randint(0, 140, 4))
        for h, w in grids:
            tok += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
            tok += list(rs.randint(0, 140, 2))
            patches[pat:pat + h * w] = rs.randn(h * w, PIX)
            img += 1
            pseg[pat:pat + h * w] = img
            hw[pat:pat + h * w] = patch_positions((1, h, w))
            pat += h * w
        tokens[at:at + len(tok)] = tok
        positions[at:at + len(tok)] = np.arange(len(tok))
        segments[at:at + len(tok)] = s + 1
        at += len(tok)
    assert at < seq_len and pat < max_patches  # both buffers end in padding
    return {k: jnp.asarray(v)[None] for k, v in dict(tokens=tokens, positions=positions, segment_ids=segments,
                                                      patches=patches, patch_segment=pseg, patch_hw=hw).items()}


def loss_fn(model, batch, num_images):
    """Mean next-token cross-entropy over the real tokens of each sample."""
    def loss(params):
        hidden, _ = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                batch["patches"], batch["patch_segment"], batch["patch_hw"],
                                num_images=num_images)
        logits = model.apply({"params": params}, hidden, method=VLM.logits).astype(jnp.float32)
        seg = batch["segment_ids"]
        valid = (seg[:, :-1] > 0) & (seg[:, :-1] == seg[:, 1:])
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * valid) / jnp.sum(valid)
    return loss


def test_tiny_model_pallas_equals_xla():
    base = model_configs.preset("tiny")
    params = jax.jit(lambda key: init_params(base, key))(jax.random.PRNGKey(0))  # the same for every impl
    batch = packed_batch(base)
    results = {}
    for impl in ("xla", "pallas"):
        cfg = model_configs.preset("tiny")
        cfg.attention_impl = impl
        step = jax.jit(jax.value_and_grad(loss_fn(VLM(freeze(cfg)), batch, num_images=4)))
        # Backend optimisation only costs compile time on the interpreted kernels.
        results[impl] = step.lower(params).compile(
            compiler_options={"xla_backend_optimization_level": 0})(params)
    (loss_x, grad_x), (loss_p, grad_p) = results["xla"], results["pallas"]
    assert abs(float(loss_p) - float(loss_x)) <= 1e-5 * abs(float(loss_x))
    compared = assert_grads_close(grad_x, grad_p)
    attention_grads_seen = sum("q" in path.lower() for path in compared)
    assert attention_grads_seen > 0


def assert_grads_close(want, got, tol=1e-5) -> list[str]:
    """Every leaf of `got` within `tol` of `want` relative to the leaf's max |want| (all-zero leaves: equal).
    Returns the paths of the non-zero leaves compared."""
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree_util.tree_leaves(got)
    assert len(flat_want) == len(flat_got)
    compared = []
    for (path, gw), gg in zip(flat_want, flat_got):
        gw, gg = np.asarray(gw), np.asarray(gg)
        scale = np.abs(gw).max()
        if scale == 0:
            np.testing.assert_array_equal(gg, gw)
            continue
        err = np.abs(gg - gw).max() / scale
        assert err < tol, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"
        compared.append(jax.tree_util.keystr(path))
    return compared
