"""images.py against transformers' Qwen2VLImageProcessorPil (temporal_patch_size=1) and hand-computed values."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from ovjax.data import images
from tests.data._make_inputs import encode, image_array, png_bytes

MIN_PIX, MAX_PIX = 3136, 60000


def _hf(min_pixels, max_pixels):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=1,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


# (height, width): up-scaling (area < min_pixels), down-scaling (area > max_pixels), exact multiples,
# odd sizes, wide and tall aspect ratios.
SIZES = [(20, 30), (7, 150), (56, 84), (37, 41), (100, 300), (480, 360), (640, 200), (5, 900), (900, 60)]


@pytest.mark.parametrize("hw", SIZES)
def test_preprocess_matches_transformers(hw):
    h, w = hw
    img = Image.fromarray(image_array(h, w, seed=h * 1000 + w))
    ref = _hf(MIN_PIX, MAX_PIX)(images=[img], return_tensors="np")
    patches, grid = images.preprocess(img, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    assert grid == tuple(int(x) for x in ref["image_grid_thw"][0])
    assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-5)


def test_scaling_directions_are_covered():
    areas = []
    for h, w in SIZES:
        rh, rw = images.smart_resize(h, w, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
        areas.append((h * w < rh * rw, h * w > rh * rw))
    assert any(up for up, _ in areas) and any(down for _, down in areas)
    assert any(h * w > MAX_PIX for h, w in SIZES) and any(h * w < MIN_PIX for h, w in SIZES)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P-transparent", "RGB-transparent"])
def test_modes_match_transformers(mode):
    """Alpha, palette (with/without transparency) and grayscale decode to what the processor sees."""
    arr = image_array(60, 90, seed=3, channels=4)
    arr[:10, :, 3] = 0  # fully transparent rows -> white
    base = Image.fromarray(arr, "RGBA")
    if mode == "P-transparent":
        img = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 0
    elif mode == "RGB-transparent":
        img = base.convert("RGB")
        img.info["transparency"] = (0, 0, 0)
    else:
        img = base.convert(mode) if mode != "P" else base.convert("RGB").convert("P")
    data = encode(img, "PNG")
    decoded = images.decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (90, 60)
    ref = _hf(MIN_PIX, MAX_PIX)(images=[Image.open(io.BytesIO(data))], return_tensors="np")
    patches, grid = images.preprocess(decoded, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    assert grid == tuple(int(x) for x in ref["image_grid_thw"][0])
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-5)


def test_alpha_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red, fully transparent
    out = np.asarray(images.decode_image(encode(Image.fromarray(arr, "RGBA"))))
    assert (out == 255).all()


def test_smart_resize_hand_values():
    # round(100/28)=4 -> 112, round(300/28)=11 -> 308; 112*308 within bounds
    assert images.smart_resize(100, 300) == (112, 308)
    # 28x28 = 784 < 3136: beta = 2 -> ceil(56/28)*28 = 56
    assert images.smart_resize(28, 28, min_pixels=3136) == (56, 56)
    # 1008^2 > 100000: beta = sqrt(10) -> floor(1000/3.1623/28) = 11 -> 308
    assert images.smart_resize(1000, 1000, max_pixels=100000) == (308, 308)
    # 1 x 200 is allowed (ratio exactly 200); h grows to one factor
    assert images.smart_resize(1, 200) == (28, math.ceil(200 * math.sqrt(3136 / 200) / 28) * 28)
    assert images.image_grid(100, 300) == (1, 8, 22)


def test_smart_resize_matches_transformers_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rs = np.random.RandomState(0)
    for _ in range(500):
        h, w = (int(x) for x in rs.randint(1, 5000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((3136, 2560000), (3136, 50000), (100000, 1000000)):
            assert images.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(
                h, w, factor=28, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)


@pytest.mark.parametrize("hw,reason", [((1, 201), "bad_aspect_ratio"), ((3000, 10), "bad_aspect_ratio"),
                                       ((0, 10), "degenerate_size")])
def test_smart_resize_rejects(hw, reason):
    with pytest.raises(images.ImageRejected) as e:
        images.smart_resize(*hw)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("data", [b"", b"not an image at all", png_bytes(40, 40)[:60]])
def test_decode_rejects_undecodable(data):
    with pytest.raises(images.ImageRejected) as e:
        images.decode_image(data)
    assert e.value.reason == "undecodable"


def test_patch_positions_hand_order():
    pos = images.patch_positions((1, 4, 6))
    expected_head = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3), (0, 4), (0, 5), (1, 4),
                     (1, 5), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert pos.dtype == np.int32 and pos.shape == (24, 2)
    assert [tuple(p) for p in pos[:16]] == expected_head
    assert sorted(map(tuple, pos)) == [(h, w) for h in range(4) for w in range(6)]


def test_patch_rows_are_the_pixels_at_patch_positions():
    """Without resizing (56x84 is a multiple of 28), row i is the 14x14 crop at patch_positions[i]."""
    arr = image_array(56, 84, seed=5)
    rows, grid = images.preprocess(arr, dtype=np.uint8)
    assert grid == (1, 4, 6) and rows.dtype == np.uint8
    for i, (h, w) in enumerate(images.patch_positions(grid)):
        crop = arr[h * 14:(h + 1) * 14, w * 14:(w + 1) * 14].transpose(2, 0, 1)  # (C, 14, 14)
        np.testing.assert_array_equal(rows[i], crop.reshape(-1))
    normed, _ = images.preprocess(arr)
    np.testing.assert_array_equal(images.normalize_uint8(rows), normed)


def test_normalisation_values():
    rows = np.zeros((1, 588), np.uint8)
    rows[0, :196] = 255  # channel 0 white, channels 1 and 2 black
    out = images.normalize_uint8(rows)
    assert out[0, 0] == pytest.approx((1.0 - 0.48145466) / 0.26862954, abs=1e-6)
    assert out[0, 196] == pytest.approx(-0.4578275 / 0.26130258, abs=1e-6)
    assert out[0, 587] == pytest.approx(-0.40821073 / 0.27577711, abs=1e-6)


def test_preprocess_several_images_concatenate_like_processor():
    imgs = [Image.fromarray(image_array(h, w, seed=i)) for i, (h, w) in enumerate([(50, 70), (120, 40)])]
    ref = _hf(MIN_PIX, MAX_PIX)(images=imgs, return_tensors="np")
    ours = [images.preprocess(im, min_pixels=MIN_PIX, max_pixels=MAX_PIX) for im in imgs]
    np.testing.assert_allclose(np.concatenate([p for p, _ in ours]), ref["pixel_values"], rtol=0, atol=1e-5)
    assert [list(g) for _, g in ours] == ref["image_grid_thw"].tolist()
