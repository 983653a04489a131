"""config.json handling: tying decided from text_config (as transformers does), and one clear line for every
bad path, mismatch or unsupported value."""

import json
import os
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ovjax.hf as hf
from ovjax.hf import CheckpointError


def variant(fixture_dir, tmp_path, edit=None, tensors=None):
    """A copy of the ov15-tiny fixture with config.json edited (and optionally other tensors)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    config = json.loads((fixture_dir / "config.json").read_text())
    if edit:
        edit(config)
    (out / "config.json").write_text(json.dumps(config))
    if tensors is None:
        os.symlink(fixture_dir / "model.safetensors", out / "model.safetensors")
    else:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def case(fixture_dir):
    return dict(np.load(fixture_dir / "case.npz"))


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def test_tied_in_text_config_with_stored_head(fixture_dir, tmp_path, case):
    """Released layout: top-level false, text_config true, lm_head.weight stored. transformers ties from
    text_config, so the head is the embedding matrix and the stored head is unused (said in a warning)."""
    def edit(c):
        c["text_config"]["tie_word_embeddings"] = True
    path = variant(fixture_dir, tmp_path, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tied = hf.load(path)
    assert any("lm_head.weight is not used" in str(w.message) for w in caught)
    assert tied.cfg.text.tie_word_embeddings
    assert "lm_head" not in tied.params["language_model"]

    # Reference: the untied import with its head replaced by the stored embedding matrix (read directly).
    untied = hf.load(fixture_dir)
    stored = load_file(str(fixture_dir / "model.safetensors"))
    embed = stored["model.embed_tokens.weight"]
    hidden = np.asarray(untied.params["language_model"]["embed_tokens"])
    assert np.array_equal(hidden, embed)
    params = dict(untied.params)
    params["language_model"] = {**untied.params["language_model"], "lm_head": embed.T.copy()}
    ref = np.asarray(hf.Model(untied.cfg, params).logits(case["text_ids"]))
    got = np.asarray(tied.logits(case["text_ids"]))
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(got - case["text_logits"]).max() > 1e-3      # the stored head really is not used


def test_tied_top_level_without_head(fixture_dir, tmp_path, case):
    tensors = load_file(str(fixture_dir / "model.safetensors"))
    del tensors["lm_head.weight"]

    def edit(c):
        c["tie_word_embeddings"] = True
    model = hf.load(variant(fixture_dir, tmp_path, edit, tensors))
    assert model.cfg.text.tie_word_embeddings
    out = np.asarray(model.logits(case["text_ids"]))
    embed = tensors["model.embed_tokens.weight"]
    assert out.shape == case["text_logits"].shape
    # tied export writes no head, and reloads to the same logits
    again = hf.load(hf.save(model, tmp_path / "export"))
    assert np.array_equal(np.asarray(again.logits(case["text_ids"])), out)
    assert np.array_equal(np.asarray(again.params["language_model"]["embed_tokens"]), embed)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["tie_word_embeddings"] is True and exported["text_config"]["tie_word_embeddings"] is True


def test_export_states_tying_in_both_places(fixture_dir, tmp_path):
    """Exports state tying in both places, so transformers (text_config) and we read the same."""
    hf.save(hf.load(fixture_dir), tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["tie_word_embeddings"] is False and exported["text_config"]["tie_word_embeddings"] is False


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model_type="llava"), "unsupported model_type 'llava'"),
    (lambda c: c["text_config"].update(vocab_size=161), "vocab_size=161 but model.embed_tokens.weight has 160 rows"),
    (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling="),
    (lambda c: c["text_config"].update(attention_bias=True), "attention_bias=True"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c["text_config"].update(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (lambda c: c["text_config"].update(layer_types=["full_attention"]), "layer_types lists 1 layers"),
    (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    (lambda c: c["text_config"].update(intermediate_size=100), "does not fit the config"),
])
def test_bad_config_is_refused_in_one_line(fixture_dir, tmp_path, edit, match):
    with pytest.raises(CheckpointError) as excinfo:
        hf.load(variant(fixture_dir, tmp_path, edit))
    assert match in one_line(excinfo)


def test_bad_paths_are_refused_in_one_line(fixture_dir, tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        hf.load(tmp_path / "nowhere")
    assert "config.json" in one_line(excinfo)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((fixture_dir / "config.json").read_text())
    with pytest.raises(CheckpointError) as excinfo:
        hf.load(tmp_path / "empty")
    assert "neither model.safetensors nor model.safetensors.index.json" in one_line(excinfo)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as excinfo:
        hf.load(tmp_path / "bad")
    assert "not valid JSON" in one_line(excinfo)


def test_missing_and_unexpected_tensors_are_refused(fixture_dir, tmp_path):
    tensors = load_file(str(fixture_dir / "model.safetensors"))
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError) as excinfo:
        hf.load(variant(fixture_dir, tmp_path, None, tensors))
    assert "1 tensors missing" in one_line(excinfo) and "model.norm.weight" in str(excinfo.value)
