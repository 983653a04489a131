"""The Flax CLIP port against transformers' torch CLIPModel on a tiny random config (1e-4, float32)."""

import numpy as np
import pytest

from ovjax.data import clip_encoder, clip_model
from tests.data._balance_inputs import IMAGE_SIZE, make_tiny_clip
from tests.data._make_inputs import png_bytes

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=[("quick_gelu", 1.0), ("gelu", 1.0), ("quick_gelu", 6.0)],
                ids=["quick_gelu", "gelu", "quick_gelu-x6"])
def clip_dir(request, tmp_path_factory):
    act, scale = request.param
    return make_tiny_clip(tmp_path_factory.mktemp(f"clip-{act}"), hidden_act=act, weight_scale=scale)


def _torch_model(path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(path), use_safetensors=True).eval()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_image_tower_matches_transformers(clip_dir):
    enc = clip_encoder.ClipEncoder(clip_dir, batch_size=4)
    pixels = np.random.default_rng(0).normal(size=(6, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = _torch_model(clip_dir).get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    np.testing.assert_allclose(enc.embed_pixels(pixels), _unit(ref), atol=1e-4, rtol=1e-4)


def test_text_tower_matches_transformers(clip_dir):
    enc = clip_encoder.ClipEncoder(clip_dir, batch_size=4)
    texts = ["a cat", "a red circle on a mat", "dog", "two birds fly over the sea", "city street at night"]
    ids, mask = enc.tokenize(texts)
    assert (mask.sum(1) < ids.shape[1]).all() and len(set(mask.sum(1).tolist())) > 1  # padding is exercised
    with torch.no_grad():
        ref = _torch_model(clip_dir).get_text_features(input_ids=torch.from_numpy(ids).long(),
                                                       attention_mask=torch.from_numpy(mask).long()).pooler_output
    np.testing.assert_allclose(enc.embed_texts(texts), _unit(ref.numpy()), atol=1e-4, rtol=1e-4)


def test_embed_images_from_bytes(clip_dir):
    enc = clip_encoder.ClipEncoder(clip_dir, batch_size=4)
    data = [png_bytes(40, 56, seed=s) for s in range(3)]
    pixels = np.stack([clip_encoder.preprocess(d, enc.prep) for d in data])
    assert pixels.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = _torch_model(clip_dir).get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    np.testing.assert_allclose(enc.embed_images(data), _unit(ref), atol=1e-4, rtol=1e-4)


def test_rejects_pickle_only_and_wrong_weights(tmp_path, clip_dir):
    import shutil

    bad = tmp_path / "bin-only"
    shutil.copytree(clip_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(clip_model.EncoderError, match="safetensors"):
        clip_model.load_clip(bad)
    cfg, params = clip_model.load_clip(clip_dir)
    import json

    other = json.loads((clip_dir / "config.json").read_text())
    other["projection_dim"] = 8
    with pytest.raises(clip_model.EncoderError, match="text_projection/kernel has shape"):
        clip_model.params_from_hf(_hf_tensors(clip_dir), clip_model.config_from_hf(other), "x")


def _hf_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))
