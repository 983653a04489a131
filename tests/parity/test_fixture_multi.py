"""Four images in one call (ov15-tiny-multi, made by the upstream remote code), and the CLS-window rule of
`vision._remote_code_cls_windows` against a literal re-enactment of the upstream buffer."""

import jax.numpy as jnp
import numpy as np
import pytest

import ovjax.hf
from ovjax.models.vision import _remote_code_cls_windows


@pytest.fixture(scope="module")
def multi_dir(fixture_dir):
    path = fixture_dir.parent / "ov15-tiny-multi"
    if not (path / "model.safetensors").exists():
        pytest.fail(f"the ov15-tiny-multi fixture is missing at {path}")
    return path


def test_four_images_match_upstream(multi_dir):
    case = dict(np.load(multi_dir / "case.npz"))
    model = ovjax.hf.load(multi_dir)
    out = np.asarray(model.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    assert out.shape == case["logits"].shape
    assert np.abs(out - case["logits"]).max() <= 1e-4
    text = np.asarray(model.logits(case["text_ids"]))
    assert np.abs(text - case["text_logits"]).max() <= 1e-4


def test_four_images_differ_without_the_quirk(multi_dir):
    case = dict(np.load(multi_dir / "case.npz"))
    plain = ovjax.hf.load(multi_dir, remote_code_quirks=False)
    out = np.asarray(plain.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    assert np.abs(out - case["logits"]).max() > 1e-2


def upstream_windows(sizes, dim=3):
    """Patch outputs p[k][j] = (k, j, 1) and CLS outputs (k, -1, 0), laid out as the upstream buffer, then the
    windows [cu_k + 1, cu_{k+1} + 1) cut from it, cu over patch counts only."""
    buffer = []
    for k, n in enumerate(sizes):
        buffer.append((k, -1, 0))
        buffer += [(k, j, 1) for j in range(n)]
    cu = np.concatenate([[0], np.cumsum(sizes)])
    return [buffer[cu[k] + 1:cu[k + 1] + 1] for k in range(len(sizes))]


@pytest.mark.parametrize("rows", [[[4, 8, 4, 12]], [[4, 8], [4, 12]], [[4], [4, 2, 6]]])
def test_window_rule_matches_upstream_buffer(rows):
    sizes = [n for row in rows for n in row]
    m = len(sizes)
    p = max(sum(r) for r in rows) + 2                 # some padding in every row
    patch_out = np.zeros((len(rows), p, 3), np.float32)
    cls_out = np.zeros((len(rows), m, 3), np.float32)
    segment = np.zeros((len(rows), p), np.int32)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            patch_out[r, at:at + n] = [(k, j, 1) for j in range(n)]
            segment[r, at:at + n] = k + 1
            cls_out[r, k] = (k, -1, 0)
            at += n
            k += 1
        patch_out[r, at:] = (-7, -7, -7)
    got = np.asarray(_remote_code_cls_windows(jnp.asarray(patch_out), jnp.asarray(cls_out), jnp.asarray(segment)))
    want = upstream_windows(sizes)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            assert [tuple(x) for x in got[r, at:at + n].astype(int).tolist()] == want[k], (r, k)
            at += n
            k += 1
        assert (got[r, at:] == -7).all()      # padding untouched
