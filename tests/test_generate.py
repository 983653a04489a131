"""Generation (issue 11, must-show 4): batched output equals batch-size-1 output token for token (greedy,
prompts of different lengths, with and without images); KV-cache logits equal a full recompute (1e-4)."""

import numpy as np
import pytest

import ovjax.hf as hf
from ovjax.generate import Generator, left_pad, sample


@pytest.fixture(scope="module")
def model(fixture_dir):
    return hf.load(fixture_dir, remote_code_quirks=False)


def prompt(rng, cfg, length, images=()):
    """Random text tokens with, after the first two, one vision span per image grid."""
    ids = list(rng.randint(0, 140, size=2))
    for _, h, w in images:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    ids += list(rng.randint(0, 140, size=length))
    return np.asarray(ids, np.int32)


def pixels(rng, grids):
    return rng.randn(sum(t * h * w for t, h, w in grids), 588).astype(np.float32)


def test_kv_cache_logits_equal_full_recompute(model):
    rng = np.random.RandomState(0)
    grids = [(1, 4, 4)]
    ids = prompt(rng, model.cfg, 5, grids)
    px = pixels(rng, grids)
    gen = Generator(model.cfg, model.params)
    logits = []
    out = gen.generate([ids], (px, np.asarray(grids)), max_new_tokens=6, record_logits=logits)[0]
    assert len(out) == 6
    full = np.asarray(model.logits(np.concatenate([ids, out[:-1]])[None], px, np.asarray(grids)))[0]
    for i, step in enumerate(logits):
        assert np.abs(step[0] - full[len(ids) - 1 + i]).max() <= 1e-4, i
    assert out == [int(np.argmax(step[0])) for step in logits]


def test_batched_equals_one_by_one(model):
    rng = np.random.RandomState(1)
    cfg = model.cfg
    specs = [(7, [(1, 4, 4)]), (2, []), (11, [(1, 2, 4), (1, 4, 2)]), (4, [])]
    prompts = [prompt(rng, cfg, n, g) for n, g in specs]
    images = [pixels(rng, g) if g else None for _, g in specs]
    gen = Generator(cfg, model.params)
    alone = []
    for p, (_, g), px in zip(prompts, specs, images):
        alone.append(gen.generate([p], (px, np.asarray(g)) if g else None, max_new_tokens=8, pad_id=0)[0])
    all_grids = [g for _, gs in specs for g in gs]
    all_px = np.concatenate([px for px in images if px is not None])
    together = gen.generate(prompts, (all_px, np.asarray(all_grids)), max_new_tokens=8, pad_id=0)
    assert together == alone
    assert len({len(p) for p in prompts}) == len(prompts)      # really different lengths


def test_stop_token_ends_a_row_only(model):
    rng = np.random.RandomState(2)
    prompts = [prompt(rng, model.cfg, 3), prompt(rng, model.cfg, 6)]
    gen = Generator(model.cfg, model.params)
    free = gen.generate(prompts, None, max_new_tokens=5)
    stop = free[0][1]
    stopped = gen.generate(prompts, None, max_new_tokens=5, stop_ids=(stop,))
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    if stop not in free[1]:
        assert stopped[1] == free[1]


def test_left_pad_positions_from_mask():
    tokens, segment, positions = left_pad([np.array([5, 6, 7]), np.array([9])], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert segment.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_top_p_keeps_only_the_nucleus():
    import jax
    import jax.numpy as jnp
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample(logits, jax.random.PRNGKey(i), 1.0, 0.8)[0]) for i in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, jax.random.PRNGKey(0), 0.0, 1.0)[0]) == 0
