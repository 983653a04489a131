"""The chunked cross-entropy equals a direct full-softmax computation, for any chunking."""

import numpy as np
import pytest

from ovjax.train.step import chunked_cross_entropy


def direct(hidden, head, targets, mask):
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum(), mask.sum()


@pytest.mark.parametrize("chunk", [32, 8, 1])
def test_chunked_matches_direct(chunk):
    rng = np.random.default_rng(0)
    b, t, h, v = 3, 32, 16, 40
    hidden = rng.standard_normal((b, t, h)).astype(np.float32)
    head = rng.standard_normal((h, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.4
    s, n = chunked_cross_entropy(hidden, head, targets, mask, chunk)
    want_s, want_n = direct(hidden, head, targets, mask)
    assert float(n) == want_n
    np.testing.assert_allclose(float(s), want_s, rtol=1e-5)


def test_chunk_must_divide():
    x = np.zeros((1, 12, 4), np.float32)
    with pytest.raises(ValueError, match="seq_len 12 is not a multiple of train.loss_chunk 5"):
        chunked_cross_entropy(x, np.zeros((4, 8), np.float32), np.zeros((1, 12), np.int32), np.ones((1, 12), bool), 5)
