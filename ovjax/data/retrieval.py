"""Exact top-K concept retrieval by chunked similarity: JAX matmul + `jax.lax.top_k`, images sharded over the mesh.

For every image embedding the K concepts of highest score `image . concept` (cosine similarity when both are
L2-normalised). Neither the [images, concepts] score matrix nor anything of its size is ever materialised:

  * images go in chunks of `image_chunk` rows (host loop; a chunk's rows are split over the mesh's batch
    axes, so each device scores only its rows);
  * inside one jitted call, `lax.scan` walks the concepts in chunks of `concept_chunk` (concepts replicated
    on every device): scores [rows, concept_chunk] -> `top_k` -> merged with the running top-K.
Peak memory is about concepts x dim (replicated) + image_chunk x concept_chunk scores per step.

Tie rule (exact, documented): higher score first; among equal scores the LOWER concept id first. It holds
because `jax.lax.top_k` is documented to put the lower index first among equal values, concept chunks are
scanned in increasing id order and the running top-K (lower ids) is placed before the new chunk's
candidates when the two are merged. Matmuls run at HIGHEST precision (no TF32/bf16 passes on GPU), so the
scores are float32 dot products.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ovjax import sharding


class RetrievalError(ValueError):
    """Bad retrieval inputs (shapes, K, non-finite embeddings)."""


def _check(concepts: np.ndarray, k: int, concept_chunk: int) -> None:
    if concepts.ndim != 2 or concepts.shape[0] == 0:
        raise RetrievalError(f"concept embeddings must be a non-empty [C, D] array, got {concepts.shape}")
    if not 1 <= k <= concepts.shape[0]:
        raise RetrievalError(f"top-k {k} must lie in [1, {concepts.shape[0]}] (the number of concepts)")
    if k > concept_chunk:
        raise RetrievalError(f"top-k {k} is larger than the concept chunk {concept_chunk}")
    if not np.isfinite(concepts).all():
        raise RetrievalError("concept embeddings hold NaN or inf")


@partial(jax.jit, static_argnames=("k",))
def _chunk_top_k(images, concepts, num_concepts, k: int):
    """images [R, D]; concepts [n, Cc, D] (zero-padded past num_concepts) -> (scores [R, k], ids [R, k])."""
    rows, chunk = images.shape[0], concepts.shape[1]

    def step(carry, xs):
        best_s, best_i = carry
        block, offset = xs
        s = jnp.matmul(images, block.T, precision=jax.lax.Precision.HIGHEST)  # [R, Cc]
        ids = offset + jnp.arange(chunk, dtype=jnp.int32)
        s = jnp.where(ids[None] < num_concepts, s, -jnp.inf)
        cs, ci = jax.lax.top_k(s, k)
        # running best (lower ids) first: top_k keeps the lower position first among equal scores
        all_s = jnp.concatenate([best_s, cs], axis=1)
        all_i = jnp.concatenate([best_i, offset + ci.astype(jnp.int32)], axis=1)
        top_s, pos = jax.lax.top_k(all_s, k)
        return (top_s, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.full((rows, k), jnp.iinfo(jnp.int32).max, jnp.int32))
    offsets = jnp.arange(concepts.shape[0], dtype=jnp.int32) * chunk
    (best_s, best_i), _ = jax.lax.scan(step, init, (concepts, offsets))
    return best_s, best_i


class Retriever:
    """Top-K concepts of image-embedding chunks against a fixed concept set (see the module docstring).

    concepts: float [C, D]; k: K; mesh: a jax Mesh (None: the default device); image_chunk: rows per call,
    rounded up to a multiple of the mesh's batch-shard count; concept_chunk: concepts per scan step.
    """

    def __init__(self, concepts, k: int, *, mesh=None, image_chunk: int = 4096, concept_chunk: int = 16384):
        concepts = np.asarray(concepts, np.float32)
        concept_chunk = max(k, min(concept_chunk, concepts.shape[0]))
        _check(concepts, k, concept_chunk)
        self.k, self.num_concepts, self.dim = k, concepts.shape[0], concepts.shape[1]
        n_chunks = -(-self.num_concepts // concept_chunk)
        padded = np.zeros((n_chunks * concept_chunk, self.dim), np.float32)
        padded[: self.num_concepts] = concepts
        stacked = padded.reshape(n_chunks, concept_chunk, self.dim)
        if mesh is None:
            self._rows = None
            self._concepts = jnp.asarray(stacked)
            shards = 1
        else:
            shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
            self._rows = sharding.row_sharding(mesh, 2)
            self._concepts = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec()))
        self.image_chunk = -(-image_chunk // shards) * shards

    def top_k(self, images) -> tuple[np.ndarray, np.ndarray]:
        """images float [N, D] -> (scores float32 [N, K], concept ids int32 [N, K]); rows of any count."""
        images = np.asarray(images, np.float32)
        if images.ndim != 2 or images.shape[1] != self.dim:
            raise RetrievalError(f"image embeddings must be [N, {self.dim}], got {images.shape}")
        if not np.isfinite(images).all():
            raise RetrievalError("image embeddings hold NaN or inf")
        scores = np.empty((images.shape[0], self.k), np.float32)
        ids = np.empty((images.shape[0], self.k), np.int32)
        for a in range(0, images.shape[0], self.image_chunk):
            b = min(images.shape[0], a + self.image_chunk)
            block = np.zeros((self.image_chunk, self.dim), np.float32)
            block[: b - a] = images[a:b]
            block = jnp.asarray(block) if self._rows is None else jax.device_put(block, self._rows)
            s, i = _chunk_top_k(block, self._concepts, self.num_concepts, self.k)
            scores[a:b], ids[a:b] = np.asarray(s)[: b - a], np.asarray(i)[: b - a]
        return scores, ids

    def top_k_chunks(self, chunks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`top_k` of each image-embedding chunk in turn (streams from a cache; nothing is concatenated)."""
        for chunk in chunks:
            yield self.top_k(chunk)


def top_k_concepts(images, concepts, k: int, *, mesh=None, image_chunk: int = 4096,
                   concept_chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """One-shot `Retriever(concepts, k, ...).top_k(images)`: (scores [N, K], ids [N, K])."""
    return Retriever(concepts, k, mesh=mesh, image_chunk=image_chunk, concept_chunk=concept_chunk).top_k(images)
