"""Chunked (and sharded) top-K retrieval equals a brute-force numpy top-K exactly, ties included."""

import jax
import numpy as np
import pytest

from ovjax import sharding
from ovjax.data import retrieval


def brute_force(images, concepts, k):
    """numpy reference: scores in float64 (exact for the small integers used here), then per row the K best
    by (higher score, lower concept id)."""
    s = images.astype(np.float64) @ concepts.astype(np.float64).T
    ids = np.empty((len(s), k), np.int64)
    for r, row in enumerate(s):
        order = np.lexsort((np.arange(row.size), -row))
        ids[r] = order[:k]
    return np.take_along_axis(s, ids, 1), ids


def integer_embeddings(n, d, seed, lo=-2, hi=3):
    # small integers: every dot product is exact in float32 whatever the summation order, and ties abound
    return np.random.default_rng(seed).integers(lo, hi, size=(n, d)).astype(np.float32)


def batch_mesh(n):
    return sharding.make_mesh({a: (-1 if a == sharding.BATCH_AXES[0] else 1) for a in sharding.MESH_AXES},
                              jax.devices()[:n])


@pytest.mark.parametrize("image_chunk,concept_chunk", [(1000, 1000), (16, 7), (5, 10)])
def test_matches_brute_force_with_ties(image_chunk, concept_chunk):
    images, concepts = integer_embeddings(53, 6, 0), integer_embeddings(97, 6, 1)
    k = 5
    ref_s, ref_i = brute_force(images, concepts, k)
    ties = sum(len(np.unique(r)) < k for r in ref_s)
    assert ties > 10  # the tie rule is really exercised
    s, i = retrieval.top_k_concepts(images, concepts, k, image_chunk=image_chunk, concept_chunk=concept_chunk)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_sharded_on_8_devices_matches_brute_force():
    assert len(jax.devices()) >= 8
    images, concepts = integer_embeddings(37, 8, 2, -1, 2), integer_embeddings(211, 8, 3, -1, 2)
    k = 7
    ref_s, ref_i = brute_force(images, concepts, k)
    r = retrieval.Retriever(concepts, k, mesh=batch_mesh(8), image_chunk=12, concept_chunk=50)
    assert r.image_chunk == 16  # rounded up to the 8 batch shards
    s, i = r.top_k(images)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    # streamed chunks give the same rows
    parts = list(r.top_k_chunks([images[:20], images[20:]]))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ref_i)


def test_float_embeddings_match_brute_force():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(40, 16)).astype(np.float32)
    concepts = rng.normal(size=(300, 16)).astype(np.float32)
    ref_s, ref_i = brute_force(images, concepts, 4)
    s, i = retrieval.top_k_concepts(images, concepts, 4, image_chunk=16, concept_chunk=64)
    np.testing.assert_array_equal(i, ref_i)  # random floats: no near-ties at this size
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    c = np.ones((4, 3), np.float32)
    with pytest.raises(retrieval.RetrievalError, match="top-k 5 must lie in"):
        retrieval.Retriever(c, 5)
    with pytest.raises(retrieval.RetrievalError, match="must be \\[N, 3\\]"):
        retrieval.Retriever(c, 2).top_k(np.ones((2, 4), np.float32))
    with pytest.raises(retrieval.RetrievalError, match="NaN"):
        retrieval.Retriever(c, 2).top_k(np.full((2, 3), np.nan, np.float32))
