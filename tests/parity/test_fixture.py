"""The ov15-tiny fixture (made by the upstream remote code): import, logits, export bit for bit."""

import json

import numpy as np
import pytest
from safetensors import safe_open

import ovjax.hf


@pytest.fixture(scope="module")
def model(fixture_dir):
    return ovjax.hf.load(fixture_dir)


@pytest.fixture(scope="module")
def case(fixture_dir):
    return dict(np.load(fixture_dir / "case.npz"))


def test_image_logits_match_upstream(model, case):
    out = np.asarray(model.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    assert out.shape == case["logits"].shape
    assert np.abs(out - case["logits"]).max() <= 1e-4


def test_text_logits_match_upstream(model, case):
    out = np.asarray(model.logits(case["text_ids"]))
    assert np.abs(out - case["text_logits"]).max() <= 1e-4


def test_correct_cls_stripping_differs_only_after_the_first_image(fixture_dir, case):
    """Without the remote code's CLS offset quirk, positions up to the end of the first image still match;
    the second image (and everything after it) must not: the quirk is real and our switch reaches it."""
    plain = ovjax.hf.load(fixture_dir, remote_code_quirks=False)
    out = np.asarray(plain.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    diff = np.abs(out - case["logits"]).max(-1)[0]
    second_image = int(np.nonzero(case["input_ids"][0] == 150)[0][6])  # first token of image 2 (6 = 4*6/4)
    assert diff[:second_image].max() <= 1e-4
    assert diff[second_image:].max() > 1e-2


def test_export_is_bit_identical(model, fixture_dir, tmp_path):
    ovjax.hf.save(model, tmp_path)
    with safe_open(fixture_dir / "model.safetensors", framework="numpy") as ref, \
            safe_open(tmp_path / "model.safetensors", framework="numpy") as out:
        assert sorted(ref.keys()) == sorted(out.keys())
        for key in ref.keys():
            a, b = ref.get_tensor(key), out.get_tensor(key)
            assert a.shape == b.shape and a.dtype == b.dtype, key
            assert a.tobytes() == b.tobytes(), key
        assert out.metadata() == ref.metadata()
    exported = json.loads((tmp_path / "config.json").read_text())
    reference = json.loads((fixture_dir / "config.json").read_text())
    for section in ("vision_config", "text_config"):
        for key, value in reference[section].items():
            if key in exported[section]:
                assert exported[section][key] == value, (section, key)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "tie_word_embeddings", "model_type"):
        assert exported[key] == reference[key], key


def test_reimport_of_export_gives_same_logits(model, case, tmp_path):
    ovjax.hf.save(model, tmp_path)
    again = ovjax.hf.load(tmp_path)
    a = np.asarray(model.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    b = np.asarray(again.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    assert np.array_equal(a, b)


def test_sharded_export_round_trips(model, case, tmp_path):
    ovjax.hf.save(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    again = ovjax.hf.load(tmp_path)
    out = np.asarray(again.logits(case["text_ids"]))
    assert np.abs(out - case["text_logits"]).max() <= 1e-4


def test_bad_inputs_are_refused(model, case, tmp_path):
    with pytest.raises(ValueError, match="image tokens"):
        model.logits(case["input_ids"])  # image tokens but no pixels
    with pytest.raises(ValueError, match="patches"):
        model.logits(case["input_ids"], case["pixel_values"][:-4], case["image_grid_thw"])
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.logits(case["text_ids"] + 1000)
    with pytest.raises(ovjax.hf.CheckpointError, match="config.json"):
        ovjax.hf.load(tmp_path)
