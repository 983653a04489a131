"""Packing invariance: packed ViT buffers and packed LLM rows give the same outputs as each item alone, and
padding (its length and its contents) never changes real outputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovjax.configs import models as model_configs
from ovjax.data.batch import RowWriter
from ovjax.models.vlm import VLM, freeze, init_params

CFG = model_configs.preset("tiny")
MODEL = VLM(freeze(CFG))
IMG = CFG.image_token_id
PIX = 3 * 14 * 14


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.PRNGKey(0))
    # Random norm weights and biases so no piece can hide behind an identity.
    rs = np.random.RandomState(1)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x + 0.1 * rs.randn(*x.shape).astype(np.float32)), p)


@functools.partial(jax.jit, static_argnames="num_images")
def vision(params, patches, segment, hw, num_images):
    return MODEL.apply({"params": params}, jnp.asarray(patches)[None], jnp.asarray(segment)[None],
                       jnp.asarray(hw)[None], num_images, method=VLM.image_features)[0]


def buffer(images, total, pad_value=0.0):
    """images: list of (patch rows, grid) -> patches [total, 588], segment [total], hw [total, 2]."""
    w = RowWriter(1, total)
    for rows, grid in images:
        w.add_image(rows, grid)
    r = w.row()
    r["patches"][w.patches_used:] = pad_value
    return r["patches"], r["patch_segment"], r["patch_hw"]


def random_image(rs, h, w):
    return rs.randn(h * w, PIX).astype(np.float32), (1, h, w)


def test_vit_buffer_of_three_images_equals_each_alone(params):
    rs = np.random.RandomState(0)
    images = [random_image(rs, 4, 6), random_image(rs, 2, 2), random_image(rs, 6, 4)]
    packed = np.asarray(vision(params, *buffer(images, 80), num_images=4))
    at = 0
    for rows, grid in images:
        n = len(rows) // 4
        alone = np.asarray(vision(params, *buffer([(rows, grid)], len(rows)), num_images=1))
        np.testing.assert_allclose(packed[at:at + n], alone, atol=1e-5, rtol=1e-5)
        at += n


def test_vit_padding_never_changes_real_features(params):
    rs = np.random.RandomState(1)
    images = [random_image(rs, 4, 4), random_image(rs, 2, 4)]
    a = np.asarray(vision(params, *buffer(images, 24), num_images=2))
    b = np.asarray(vision(params, *buffer(images, 64, pad_value=7.0), num_images=5))
    np.testing.assert_allclose(a[:6], b[:6], atol=1e-5, rtol=1e-5)


def sample(rs, n_text, grids):
    """Token list with text, then per image vision_start + K image pads + vision_end; and its images."""
    tokens, images = list(rs.randint(0, 140, n_text)), []
    for h, w in grids:
        tokens += [CFG.vision_start_token_id] + [IMG] * (h * w // 4) + [CFG.vision_end_token_id]
        tokens += list(rs.randint(0, 140, 3))
        images.append(random_image(rs, h, w))
    return np.array(tokens, np.int32), images


def row(samples, seq_len, max_patches, num_images, pad_token=0, pad_pixel=0.0):
    w = RowWriter(seq_len, max_patches)
    for tok, images in samples:
        w.add_sample(tok)
        for rows, grid in images:
            w.add_image(rows, grid)
    r = w.row()
    r["tokens"][w.tokens_used:] = pad_token
    r["patches"][w.patches_used:] = pad_pixel
    keys = ("tokens", "positions", "segment_ids", "patches", "patch_segment", "patch_hw")
    return [jnp.asarray(r[k])[None] for k in keys], num_images


@functools.partial(jax.jit, static_argnames="num_images")
def _logits(params, inputs, num_images):
    tokens, positions, segments, patches, pseg, hw = inputs
    hidden, _ = MODEL.apply({"params": params}, tokens, positions, segments, patches, pseg, hw,
                            num_images=num_images)
    return MODEL.apply({"params": params}, hidden, method=VLM.logits)[0]


def logits(params, inputs, num_images):
    return np.asarray(_logits(params, inputs, num_images))


def test_two_samples_in_one_row_equal_each_alone(params):
    rs = np.random.RandomState(2)
    a = sample(rs, 5, [(2, 4)])
    b = sample(rs, 4, [(4, 4), (2, 2)])
    packed = logits(params, *row([a, b], 64, 48, 4))
    alone_a = logits(params, *row([a], len(a[0]), 8, 1))
    alone_b = logits(params, *row([b], len(b[0]), 20, 2))
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(packed[:na], alone_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[na:na + nb], alone_b, atol=1e-5, rtol=1e-5)


def test_padding_never_changes_real_logits(params):
    rs = np.random.RandomState(3)
    a = sample(rs, 6, [(2, 2)])
    n = len(a[0])
    short = logits(params, *row([a], n + 2, 4, 1))
    long = logits(params, *row([a], n + 30, 40, 3, pad_token=77, pad_pixel=-3.0))
    np.testing.assert_allclose(short[:n], long[:n], atol=1e-5, rtol=1e-5)


def test_samples_do_not_leak_into_each_other(params):
    """Changing the first sample of a row changes nothing in the second (the packing mask is real)."""
    rs = np.random.RandomState(4)
    a1, a2, b = sample(rs, 5, [(2, 2)]), sample(rs, 5, [(2, 2)]), sample(rs, 6, [(2, 4)])
    n1, nb = len(a1[0]), len(b[0])
    assert len(a2[0]) == n1
    x = logits(params, *row([a1, b], 48, 16, 2))
    y = logits(params, *row([a2, b], 48, 16, 2))
    assert np.abs(x[:n1] - y[:n1]).max() > 1e-3  # the first samples differ ...
    np.testing.assert_allclose(x[n1:n1 + nb], y[n1:n1 + nb], atol=1e-5, rtol=1e-5)  # ... the second does not


def test_zero_images_puts_zeros_at_the_image_tokens_only(params):
    """VLM(..., zero_images=True) (eval's no-image control) scatters zeros instead of the image features."""
    rs = np.random.RandomState(5)
    (tokens, _, _, patches, pseg, hw), n = row([sample(rs, 5, [(2, 4)])], 32, 8, 1)

    def embed(zero):
        return np.asarray(MODEL.apply({"params": params}, tokens, patches, pseg, hw, n, zero, method=VLM.embed))[0]
    real, zeroed = embed(False), embed(True)
    is_image = np.asarray(tokens[0]) == IMG
    assert is_image.sum() == 2 and np.abs(real[is_image]).min() > 0
    assert not zeroed[is_image].any()
    np.testing.assert_array_equal(zeroed[~is_image], real[~is_image])
